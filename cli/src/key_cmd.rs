//! `ckpt key export|import`: take a sealed store's key to another machine.
//!
//! The key never enters the store (see `ckpt_store::seal`); to restart on a
//! second machine, export it here and import it there. The exported text
//! also carries the head record (the newest generation this machine
//! committed or saw), so the other machine refuses a replayed older
//! catalog from the start.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use ckpt_store::Store;
use ckpt_store::seal;
use clap::Subcommand;

/// `ckpt key ...`
#[derive(Subcommand)]
pub enum KeyCmd {
    /// Write the key of the store (--store) to FILE (0600), or to stdout with `-`.
    Export {
        #[command(flatten)]
        store: crate::StoreArg,
        /// Where to write it (`-`: stdout). Keep it private: it reads and forges the store.
        file: String,
    },
    /// Install a key written by `ckpt key export` (FILE, or `-` for stdin) on this machine.
    Import {
        /// The exported key (`-`: stdin).
        file: String,
    },
}

/// `ckpt store ...`
#[derive(Subcommand)]
pub enum StoreCmd {
    /// Seal a store made before stores were sealed: rewrite its packs encrypted and authenticated with a new key (kept outside the store), crash-safe at every step.
    Seal {
        #[command(flatten)]
        store: crate::StoreArg,
    },
    /// Make a new store (a store is also made by the first `ckpt launch` or `ckpt run` on it, with $CKPT_COMPRESSION's codec).
    Init {
        #[command(flatten)]
        store: crate::StoreArg,
        /// The codec its blobs are compressed with: lz4 (fastest: the default) or zstd (~20-60% smaller, ~2x the CPU to checkpoint, ~3x to restart).
        #[arg(long, env = "CKPT_COMPRESSION")]
        compression: Option<ckpt_store::Codec>,
    },
    /// Show the store's codec, or change it (CODEC: lz4 or zstd) for the blobs stored from now on; blobs already stored keep theirs and read as before.
    Compression {
        #[command(flatten)]
        store: crate::StoreArg,
        /// lz4 or zstd.
        codec: Option<ckpt_store::Codec>,
    },
}

/// Run a `ckpt store` subcommand.
pub fn run_store(cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Init { store, compression } => {
            let url = crate::store_url(&store);
            if Store::open(&url).is_ok() {
                bail!("store {url} exists already (its codec: `ckpt store compression --store {url}`)");
            }
            // An S3 store is made with $CKPT_COMPRESSION's codec and cannot
            // change it afterwards (`Store::set_codec`): refused before it
            // is made with another.
            if let Some(c) = compression
                && ckpt_store::remote::is_s3_url(&url)
                && c != ckpt_store::compression_requested()?
            {
                bail!("the codec of an s3:// store is set as it is made, from $CKPT_COMPRESSION: run `CKPT_COMPRESSION={c} ckpt store init --store {url}`");
            }
            let s = Store::open_or_create(&url, ckpt_store::DEFAULT_CHUNK_SIZE)?;
            if let Some(c) = compression
                && s.codec()? != c
            {
                s.set_codec(c)?;
            }
            eprintln!("store {url} made: {} compression, {}", s.codec()?, if s.is_sealed() { "sealed" } else { "not sealed" });
            Ok(())
        }
        StoreCmd::Compression { store, codec } => {
            let url = crate::store_url(&store);
            let s = Store::open(&url)?;
            match codec {
                None => println!("{}", s.codec()?),
                Some(c) => {
                    let was = s.codec()?;
                    s.set_codec(c)?;
                    eprintln!("store {url}: blobs stored from now on are compressed with {c} (was {was}); blobs stored before keep theirs");
                }
            }
            Ok(())
        }
        StoreCmd::Seal { store } => {
            let url = crate::store_url(&store);
            let s = Store::open(&url)?;
            if s.is_sealed() {
                eprintln!("store {url} is sealed already");
                return Ok(());
            }
            let done = s.writer()?.seal_store()?;
            drop(s);
            let check = Store::open(&url)?;
            anyhow::ensure!(check.is_sealed(), "store {url} does not open as sealed after sealing");
            eprintln!(
                "store {url} sealed: {} blobs in {} packs, {} generations; its key is {} (back it up; `ckpt key export` takes it to another machine)",
                done.blobs,
                done.packs,
                done.generations,
                done.key_file.display()
            );
            Ok(())
        }
    }
}

/// Run a `ckpt key` subcommand.
pub fn run(cmd: KeyCmd) -> Result<()> {
    match cmd {
        KeyCmd::Export { store, file } => export(&crate::store_url(&store), &file),
        KeyCmd::Import { file } => import(&file),
    }
}

fn export(url: &str, file: &str) -> Result<()> {
    let store = Store::open(url)?;
    let Some(mut text) = store.export_key() else {
        bail!("store {url} is not sealed: it has no key to export (seal it first: `ckpt store seal --store {url}`)");
    };
    let id = store.store_id()?;
    if let Some((g, mac)) = seal::read_head(&seal::key_path(&id))? {
        text.push_str(&format!("head {g} {}\n", hex::encode(mac)));
    }
    if file == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
    } else {
        seal::write_private_atomic(Path::new(file), text.as_bytes())?;
        eprintln!("the key of store {url} (store id {id}) is in {file}: copy it privately to the other machine and run `ckpt key import {file}` there");
    }
    Ok(())
}

fn import(file: &str) -> Result<()> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin().read_to_string(&mut text).context("read the key from stdin")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("read key file {file}"))?;
    }
    let (id, master) = seal::parse_key_file(&text, Path::new(file))?;
    let dest = seal::key_path(&id);
    match seal::read_key_file(&dest)? {
        Some((have, m)) if have == id && m == master => eprintln!("the key of store {id} is already in {}", dest.display()),
        Some((have, _)) if have == id => {
            bail!("{} already holds a different key for store {id}: a store has one key; if that one is wrong, remove it first", dest.display())
        }
        Some((have, _)) => bail!("{} holds the key of store {have}: unset $CKPT_KEY_FILE (or name a new file) to import the key of store {id}", dest.display()),
        None => {
            seal::write_private_atomic(&dest, seal::key_file_text(&id, &master).as_bytes())?;
            eprintln!("imported the key of store {id} into {}", dest.display());
        }
    }
    // The head record: the newer of ours and the exported one.
    if let Some(line) = text.lines().find_map(|l| l.strip_prefix("head ")) {
        let mut w = line.split_whitespace();
        let g: Option<u64> = w.next().and_then(|s| s.parse().ok());
        let mut mac = [0u8; 32];
        let ok = w.next().is_some_and(|h| hex::decode_to_slice(h, &mut mac).is_ok());
        let (Some(g), true) = (g, ok) else { bail!("{file}: the head line is not `head GENERATION MAC`") };
        let ours = seal::read_head(&dest)?;
        if ours.is_none_or(|(h, _)| h < g) {
            seal::write_head(&dest, g, &mac)?;
        }
    }
    Ok(())
}

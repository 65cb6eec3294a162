//! Sealing a store made before stores were sealed (`ckpt store seal`):
//! every blob rewritten into new, sealed packs under its keyed address,
//! every generation row given its MAC, in steps that each leave a store
//! that opens and loses no generation, like gc's repack:
//!
//! 1. the key is written beside where it belongs (`<key file>.pending`):
//!    an interrupted seal leaves an unsealed store that opens as before,
//!    and the next `seal` takes the same key again;
//! 2. the new packs are written, fsync'd and renamed into place (until the
//!    catalog names them they are orphans, which gc deletes);
//! 3. one catalog transaction: the old pack and blob rows out, the new in,
//!    the MACs, `meta.sealed` and `meta.key_check`;
//! 4. the key moved to its place (a sealed store whose key is still
//!    `.pending` finds and moves it when opened);
//! 5. the old pack files deleted (orphans if interrupted).
//!
//! This module must never delete a pack the catalog names, nor seal an
//! `s3://` store in place (pull it, seal the copy, push it to a new prefix).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::catalog;
use crate::error::IoCtx;
use crate::pack::{self, FinishedPack, OpenPack};
use crate::seal::{self, Keys};
use crate::reader::{Loc, open_pack};
use crate::{BlobKind, Hash, Result, StoreError, Writer, now_ms};

/// Test hook: `CKPT_SEAL_PAUSE_AT=PHASE` makes the seal print `ckpt-seal:
/// paused at PHASE` on stderr and sleep for an hour there (`after-key`,
/// `after-packs`, `after-commit`, `after-key-move`), so that a test can
/// `kill -9` it at every step.
pub const ENV_PAUSE_AT: &str = "CKPT_SEAL_PAUSE_AT";

fn pause(phase: &str) {
    if std::env::var(ENV_PAUSE_AT).is_ok_and(|p| p == phase) {
        eprintln!("ckpt-seal: paused at {phase}");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// What [`Writer::seal_store`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sealed {
    /// Blobs rewritten.
    pub blobs: u64,
    /// Packs written.
    pub packs: u64,
    /// Generations given a MAC.
    pub generations: u64,
    /// Where the key now is.
    pub key_file: PathBuf,
}

/// The pending key of an interrupted seal.
pub(crate) fn pending_path(key_file: &std::path::Path) -> PathBuf {
    let mut s = key_file.as_os_str().to_owned();
    s.push(".pending");
    PathBuf::from(s)
}

impl Writer {
    /// Seal this (unsealed, local) store: see the module doc. The store
    /// and this writer must be dropped afterwards (they still see it
    /// unsealed): open it again.
    pub fn seal_store(&self) -> Result<Sealed> {
        self.no_pending()?;
        if self.inner.keys.is_some() {
            return Err(StoreError::Invalid(format!("store {} is sealed already", self.inner.url())));
        }
        if self.inner.remote.is_some() {
            return Err(StoreError::Invalid(format!(
                "store {} is on S3: seal a local copy instead (`ckpt pull {url} --store DIR`, `ckpt store seal --store DIR`, `ckpt push s3://BUCKET/NEW-PREFIX --store DIR`)",
                self.inner.url(),
                url = self.inner.url()
            )));
        }
        let id = self.store().store_id()?;
        let key_file = seal::key_path(&id);
        let pending = pending_path(&key_file);
        // 1. The key: the pending one of an interrupted seal, else new.
        let keys = match seal::read_key_file(&pending)? {
            Some((pid, master)) if pid == id => Keys::from_master(&id, master)?,
            _ => {
                let k = Keys::generate(&id)?;
                seal::write_private_atomic(&pending, seal::export_text(&k).as_bytes())?;
                k
            }
        };
        pause("after-key");
        // 2. Every blob, pack by pack, into new sealed packs.
        let cat = self.inner.catalog_path.clone();
        let rows: Vec<(String, Vec<(Loc, BlobKind)>)> = {
            let conn = self.inner.conn();
            let mut out = Vec::new();
            for pk in catalog::packs::all(&conn, &cat)? {
                let name: std::sync::Arc<str> = pk.name.as_str().into();
                let locs = catalog::blobs::of_pack(&conn, &cat, pk.id)?
                    .into_iter()
                    .map(|(h, offset, clen, ulen, kind)| (Loc { hash: h, addr: h, pack: name.clone(), offset, clen, ulen }, kind))
                    .collect();
                out.push((pk.name, locs));
            }
            out
        };
        let store = self.store();
        let tmp = self.inner.root.join("tmp");
        let mut new: Vec<FinishedPack> = Vec::new();
        let mut open: Option<OpenPack> = None;
        let mut nblobs = 0u64;
        let written = (|| -> Result<()> {
            for (name, locs) in &rows {
                if locs.is_empty() {
                    continue;
                }
                let path = store.pack_path(name);
                let f = open_pack(&path, &locs[0].0.hash)?;
                for (l, kind) in locs {
                    let mut buf = vec![0u8; l.clen as usize];
                    f.read_exact_at(&mut buf, l.offset).map_err(|e| StoreError::Corrupt { pack: path.clone(), hash: l.hash, reason: format!("cannot be read: {e}") })?;
                    // Checked against its BLAKE3 before it is sealed.
                    ckpt_chunker::decode(&buf, l.ulen as usize, &l.hash).map_err(|e| StoreError::Corrupt { pack: path.clone(), hash: l.hash, reason: e.to_string() })?;
                    let raw = buf.len() == l.ulen as usize && Hash::of(&buf) == l.hash;
                    let a = keys.address(&l.hash);
                    let sealed = keys.seal(&a, raw, &buf);
                    if open.is_none() {
                        open = Some(OpenPack::create(&tmp).ctx(|| format!("create a pack file in {}", tmp.display()))?);
                    }
                    let o = open.as_mut().expect("open pack");
                    o.append(*kind, a, &sealed, l.ulen).ctx(|| format!("write pack file in {}", tmp.display()))?;
                    nblobs += 1;
                    if o.len() >= self.opts.pack_target {
                        new.push(open.take().expect("open pack").finish(&self.inner.root).ctx(|| "finish a sealed pack file".to_string())?);
                    }
                }
            }
            if let Some(o) = open.take() {
                new.push(o.finish(&self.inner.root).ctx(|| "finish a sealed pack file".to_string())?);
            }
            Ok(())
        })();
        if let Err(e) = written {
            if let Some(o) = open.take() {
                o.discard();
            }
            for n in &new {
                let _ = fs::remove_file(&n.path);
            }
            return Err(e);
        }
        pause("after-packs");
        // 3. One transaction.
        let old: Vec<PathBuf> = rows.iter().map(|(n, _)| store.pack_path(n)).collect();
        let ngens = self.with_transaction(|tx| {
            catalog::blobs::delete_all(tx, &cat)?;
            catalog::packs::delete_all(tx, &cat)?;
            let now = now_ms();
            for f in &new {
                let pid = catalog::packs::insert(tx, &cat, &f.name, f.size, f.entries.len(), now)?;
                catalog::blobs::insert(tx, &cat, f.entries.iter().map(|e| (e, pid)))?;
            }
            let mut macs: HashMap<i64, [u8; 32]> = HashMap::new();
            for g in catalog::generations::all_strict(tx, &cat)? {
                macs.insert(g.info.id as i64, keys.generation_mac(&g.info, g.info_text.as_deref()));
            }
            catalog::generations::set_macs(tx, &cat, &macs)?;
            catalog::set_meta(tx, &cat, "sealed", seal::SCHEME)?;
            catalog::set_meta(tx, &cat, "key_check", &keys.check_value())?;
            Ok(macs.len() as u64)
        })?;
        pause("after-commit");
        // 4. The key in its place.
        fs::rename(&pending, &key_file).ctx(|| format!("move the key {} to {}", pending.display(), key_file.display()))?;
        pause("after-key-move");
        // 5. The old packs (none is named by the catalog any more).
        for p in old {
            if let Err(e) = fs::remove_file(&p) {
                tracing::warn!(pack = %p.display(), error = %e, "cannot remove an unsealed pack (an orphan now: `ckpt gc` deletes it)");
            }
        }
        let _ = pack::sync_dir(&self.inner.root.join("packs"));
        tracing::info!(store = %self.inner.url(), blobs = nblobs, packs = new.len(), generations = ngens, key = %key_file.display(), "store sealed");
        Ok(Sealed { blobs: nblobs, packs: new.len() as u64, generations: ngens, key_file })
    }
}

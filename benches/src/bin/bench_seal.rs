//! The cost of sealing (issue 14): the store's side of a full checkpoint,
//! of a 1% incremental one and of a restart's reads, into a sealed store
//! (keyed addresses, AES-256-GCM per blob under a per-writer subkey, MAC'd
//! generation rows)
//! and into an unsealed one, alternating in the same run on the same data
//! (image-like pages, as benches/programs/bench_heap.c writes them).
//! Capture (reading the program's memory, hashing) is the same for both
//! and is not in these figures: they are the part sealing can slow down.
//!
//! - full: a writer on a new store, every page put from all cores (zstd,
//!   then sealing), the manifest put, commit (packs fsync'd);
//! - incremental: 1% of the pages changed, put and committed on top;
//! - restart read: a new `Store::open` and `read_blobs_batched` of every
//!   page of the incremental generation (opening, decompressing,
//!   checking each blob's BLAKE3).
//!
//! Run: `cargo build --release -p ckpt-benches && target/release/bench-seal [--mib 256] [--reps 3]`.
//! Prints Markdown.
//!
//! `--aead`: the AEADs' ceilings, one thread. `--e2e [--incr N]` (needs
//! `cargo build --release -p ckpt-cli -p ckpt-preload -p ckpt-restorer -p ckpt-benches`):
//! whole `ckpt checkpoint` (full, 1% incremental) and `ckpt restart` (warm,
//! to first output) of a `bench_heap`, sealed and `CKPT_UNSEALED=1`
//! alternating, each on a fresh store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ckpt_benches::{PAGE, Rng, fill_page, median};
use ckpt_store::{BlobKind, Hash, NewGeneration, Store};
use rayon::prelude::*;

fn gen_of(manifest: Hash, parent: Option<u64>, bytes: u64) -> NewGeneration {
    NewGeneration { parent, created_ms: 0, duration_ms: 0, nprocs: 1, logical_bytes: bytes, dirty_tracking: "bench".into(), manifest, info: serde_json::json!({"bench": "seal", "downtime_ms": 0.1}) }
}

/// (full ms, incremental ms, restart read ms, stored bytes)
fn run(sealed: bool, mem: &[u8], changed: &[(usize, Vec<u8>)], rep: usize) -> (f64, f64, f64, u64) {
    let dir = std::env::temp_dir().join(format!("ckpt-bench-seal-{}-{rep}-{sealed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = dir.to_str().unwrap().to_string();
    let store = Store::open_or_create_with(&url, PAGE, sealed).unwrap();
    assert_eq!(store.is_sealed(), sealed);
    let w = store.writer().unwrap();
    let t = Instant::now();
    let hashes = ckpt_chunker::hash_chunks(mem, PAGE);
    let hash_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    mem.par_chunks(PAGE).zip(hashes.par_iter()).for_each(|(c, h)| {
        w.put(BlobKind::Chunk, *h, c).unwrap();
    });
    let m = w.put_meta(format!("manifest {rep} full").as_bytes()).unwrap();
    let g1 = w.commit(gen_of(m, None, mem.len() as u64)).unwrap();
    let full = t.elapsed().as_secs_f64() * 1e3;
    let mut hashes2 = hashes.clone();
    let t = Instant::now();
    let new: Vec<Hash> = changed.par_iter().map(|(_, p)| {
        let h = Hash::of(p);
        w.put(BlobKind::Chunk, h, p).unwrap();
        h
    }).collect();
    let m = w.put_meta(format!("manifest {rep} incremental").as_bytes()).unwrap();
    let g2 = w.commit(gen_of(m, Some(g1.id), mem.len() as u64)).unwrap();
    let incr = t.elapsed().as_secs_f64() * 1e3;
    for ((i, _), h) in changed.iter().zip(new) {
        hashes2[*i] = h;
    }
    drop(w);
    let stored = store.stats().unwrap().pack_bytes;
    let id = store.store_id().unwrap();
    drop(store);
    let t = Instant::now();
    let store = Store::open(&url).unwrap();
    let _ = store.generation(g2.id).unwrap();
    let n = AtomicU64::new(0);
    store.read_blobs_batched(&hashes2, |batch| {
        n.fetch_add(batch.iter().map(|(_, b)| b.len() as u64).sum(), Ordering::Relaxed);
        Ok(())
    }).unwrap();
    let read = t.elapsed().as_secs_f64() * 1e3;
    assert!(n.load(Ordering::Relaxed) > 0);
    eprintln!("rep {rep} {}: hash {hash_ms:.0} ms (not counted), full {full:.0} ms, incremental {incr:.0} ms, restart read {read:.0} ms", if sealed { "sealed" } else { "unsealed" });
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    if sealed {
        let k = ckpt_store::seal::key_path(&id);
        let _ = std::fs::remove_file(ckpt_store::seal::head_path(&k));
        let _ = std::fs::remove_file(k);
    }
    (full, incr, read, stored)
}


fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(def);
    let mib = opt("--mib", 256);
    let reps = opt("--reps", 3);
    if args.iter().any(|a| a == "--aead") {
        aead_ceilings();
        return;
    }
    if args.iter().any(|a| a == "--e2e") {
        e2e(mib, reps, opt("--incr", 3));
        return;
    }
    let mut mem = vec![0u8; mib << 20];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (i, p) in mem.chunks_exact_mut(PAGE).enumerate() {
        fill_page(&mut rng, p, i as u64, false);
    }
    let npages = mem.len() / PAGE;
    let changed: Vec<(usize, Vec<u8>)> = (0..npages / 100)
        .map(|k| {
            let i = (rng.next() as usize) % npages;
            let mut p = vec![0u8; PAGE];
            fill_page(&mut rng, &mut p, (npages + k) as u64, false);
            (i, p)
        })
        .collect();
    // Ceilings, same run, same data, all cores: zstd (the store's
    // encoder), the store's sealing and opening of 4 KiB blobs.
    let keys = ckpt_store::seal::Keys::generate("bench").unwrap();
    let a = Hash::of(b"address");
    let t = Instant::now();
    let n: usize = mem.par_chunks(PAGE).map(|c| ckpt_chunker::encode(c, ckpt_chunker::DEFAULT_LEVEL).bytes().len()).sum();
    std::hint::black_box(n);
    let zstd = ckpt_benches::gbps(mem.len() as u64, t.elapsed());
    let t = Instant::now();
    let sealed: Vec<Vec<u8>> = mem.par_chunks(PAGE).map(|c| keys.seal(&a, true, c)).collect();
    let seal = ckpt_benches::gbps(mem.len() as u64, t.elapsed());
    let t = Instant::now();
    sealed.par_iter().for_each_init(Vec::new, |buf, b| {
        keys.open_into(&a, b, buf).unwrap();
    });
    let open = ckpt_benches::gbps(mem.len() as u64, t.elapsed());
    drop(sealed);
    let mut res: [Vec<(f64, f64, f64, u64)>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order = if rep % 2 == 0 { [false, true] } else { [true, false] };
        for sealed in order {
            res[sealed as usize].push(run(sealed, &mem, &changed, rep));
        }
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("{} cores, Linux {}, {mib} MiB of image-like pages, 4 KiB chunks, zstd level {}; medians of {reps} runs each, sealed and unsealed alternating in one run.\n", rayon::current_num_threads(), kernel.trim(), ckpt_chunker::DEFAULT_LEVEL);
    println!("Ceilings, all cores, same data: zstd -1 encode {zstd:.2} GB/s; sealing ({}) seal {seal:.2} GB/s, open {open:.2} GB/s (4 KiB blobs).\n", ckpt_store::seal::SCHEME);
    println!("| store side of | unsealed ms | sealed ms | sealed / unsealed |");
    println!("|---|---|---|---|");
    let names = ["full checkpoint (put + commit)", "1% incremental (put + commit)", "restart read (open + read every page)"];
    for (k, name) in names.iter().enumerate() {
        let pick = |v: &Vec<(f64, f64, f64, u64)>| median(v.iter().map(|r| [r.0, r.1, r.2][k]).collect());
        let (u, s) = (pick(&res[0]), pick(&res[1]));
        println!("| {name} | {u:.0} | {s:.0} | {:.3} |", s / u);
    }
    let (u, s) = (res[0][0].3 as f64, res[1][0].3 as f64);
    println!("| stored bytes (MiB) | {:.1} | {:.1} | {:.3} |", u / 1048576.0, s / 1048576.0, s / u);
}

/// `--aead`: the AEADs a sealed store could use, one thread, 4 KiB blobs,
/// next to zstd and BLAKE3 on the same data (medians of 5, alternating).
fn aead_ceilings() {
    use ckpt_benches::ceilings::{Aead, Sample};
    let s = Sample::new(false);
    let aeads = [Aead::XChaCha20Poly1305, Aead::RustCryptoAes256Gcm, Aead::RingAes256Gcm];
    let mut r: Vec<Vec<(f64, f64)>> = vec![Vec::new(); aeads.len()];
    let (mut z, mut uz, mut b3) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        for (k, a) in aeads.iter().enumerate() {
            r[k].push(s.aead_1(*a));
        }
        z.push(s.zstd_1(PAGE, ckpt_chunker::DEFAULT_LEVEL).0);
        uz.push(s.unzstd(PAGE, ckpt_chunker::DEFAULT_LEVEL, false));
        b3.push(s.blake3_1(PAGE));
    }
    println!("One thread, 4 KiB blobs of image-like pages, GB/s, medians of 5 (alternating):\n");
    println!("| | seal / encode | open / decode |");
    println!("|---|---|---|");
    for (k, a) in aeads.iter().enumerate() {
        println!("| {a:?} | {:.2} | {:.2} |", median(r[k].iter().map(|x| x.0).collect()), median(r[k].iter().map(|x| x.1).collect()));
    }
    println!("| zstd -{} | {:.2} | {:.2} |", ckpt_chunker::DEFAULT_LEVEL, median(z), median(uz));
    println!("| BLAKE3 | {:.2} | |", median(b3));
}

fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) -> Option<Instant> {
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    loop {
        match rx.recv_timeout(deadline.checked_duration_since(Instant::now())?) {
            Ok(l) if l.starts_with(prefix) => return Some(Instant::now()),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// `--e2e`: whole `ckpt` commands, sealed and unsealed (`CKPT_UNSEALED=1`)
/// alternating in one run, each on a fresh store of its own (keys in the
/// run's own `XDG_CONFIG_HOME`): the full checkpoint of a `bench_heap` of
/// `--mib` MiB, the median of `--incr` (3) incrementals, each after 1% of its pages changed,
/// and the median of 3 warm restarts (packs in the page cache) to its first
/// output line. (full ms, incremental ms, restart ms)
fn e2e(mib: usize, reps: usize, nincr: usize) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let ckpt = std::env::current_exe().unwrap().parent().unwrap().join("ckpt");
    let one = |sealed: bool, rep: usize| -> (f64, f64, f64) {
        let env = ckpt_benches::Env::new(&ckpt, "seal-e2e", &format!("{rep}-{sealed}"));
        let cmd = || -> Command {
            let mut c = env.cmd();
            c.env("XDG_CONFIG_HOME", env.dir.join("config")).env_remove("CKPT_KEY_FILE");
            if sealed {
                c.env_remove("CKPT_UNSEALED");
            } else {
                c.env("CKPT_UNSEALED", "1");
            }
            c
        };
        let run = |args: &[&str]| {
            let out = cmd().args(args).stdin(Stdio::null()).output().unwrap();
            assert!(out.status.success(), "ckpt {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let mut child = cmd()
            .args(["launch", "--dirty-tracking", "uffd-wp", "--", env!("CKPT_BENCH_HEAP"), "-m", &mib.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let out = lines_of(child.stdout.take().unwrap());
        wait_line(&out, "READY").expect("READY");
        let t = Instant::now();
        run(&["checkpoint"]);
        let full = t.elapsed().as_secs_f64() * 1e3;
        let mut incr = Vec::new();
        for _ in 0..nincr {
            writeln!(stdin, "mutate 1 random").unwrap();
            wait_line(&out, "MUTATED").expect("MUTATED");
            let t = Instant::now();
            run(&["checkpoint"]);
            incr.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let _ = cmd().arg("kill").stdin(Stdio::null()).output();
        drop(stdin);
        let _ = child.wait();
        // What was measured is what it claims: the catalog says so.
        let cat = ckpt_store::rusqlite::Connection::open(env.dir.join("store/catalog.db")).unwrap();
        let scheme: Option<String> = cat.query_row("SELECT value FROM meta WHERE key = 'sealed'", [], |r| r.get(0)).ok();
        assert_eq!(scheme.as_deref(), sealed.then_some(ckpt_store::seal::SCHEME), "the store's scheme");
        drop(cat);
        let mut rs = Vec::new();
        let mut tries = 0;
        while rs.len() < 3 {
            tries += 1;
            assert!(tries <= 20, "20 restarts of {} gave 3 first outputs only {} times", env.dir.display(), rs.len());
            let t = Instant::now();
            let mut rc = cmd();
            rc.arg("restart").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
            let mut c = rc.spawn().unwrap();
            let o = lines_of(c.stdout.take().unwrap());
            let first = wait_line(&o, "BEAT").map(|at| at.duration_since(t).as_secs_f64() * 1e3);
            // The first output may come before the restored process is
            // back at the coordinator, whose kill then finds nothing to
            // kill: again until `ckpt restart` (which waits for it) ends.
            for _ in 0..600 {
                let _ = cmd().arg("kill").stdin(Stdio::null()).output();
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = c.wait();
            match first {
                Some(ms) => rs.push(ms),
                // Refused at once: the coordinator still lists the process
                // just killed; try again.
                None => std::thread::sleep(std::time::Duration::from_millis(250)),
            }
        }
        let r = (full, median(incr), median(rs));
        eprintln!("rep {rep} {}: full {:.0} ms, incremental {:.0} ms, restart {:.0} ms", if sealed { "sealed" } else { "unsealed" }, r.0, r.1, r.2);
        r
    };
    let mut res: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        let order = if rep % 2 == 0 { [false, true] } else { [true, false] };
        for sealed in order {
            res[sealed as usize].push(one(sealed, rep));
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("{} cores, {mib} MiB `bench_heap`, uffd-wp; whole `ckpt` commands, medians of {reps} runs each, sealed ({}) and unsealed alternating; load average at the end {}.\n", rayon::current_num_threads(), ckpt_store::seal::SCHEME, load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    // The load of a shared machine drifts during a run: the median of each
    // rep's own sealed / unsealed (run back to back) follows it less than
    // the ratio of the two medians.
    println!("| ckpt command | unsealed ms | sealed ms | sealed / unsealed (of medians) | median of per-run sealed / unsealed |");
    println!("|---|---|---|---|---|");
    let incr_name = format!("incremental, 1% changed (median of {nincr} per run)");
    let names = ["full checkpoint", &incr_name, "restart to first output, warm (median of 3 per run)"];
    for (k, name) in names.iter().enumerate() {
        let at = |r: &(f64, f64, f64)| [r.0, r.1, r.2][k];
        let pick = |v: &Vec<(f64, f64, f64)>| median(v.iter().map(at).collect());
        let (u, s) = (pick(&res[0]), pick(&res[1]));
        let paired = median(res[0].iter().zip(&res[1]).map(|(u, s)| at(s) / at(u)).collect());
        println!("| {name} | {u:.0} | {s:.0} | {:.3} | {paired:.3} |", s / u);
    }
}

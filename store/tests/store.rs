//! Store tests on real files in temporary directories.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use ckpt_store::pack::{self, PackEntry};
use ckpt_store::{
    BlobKind, DEFAULT_CHUNK_SIZE, Hash, NewGeneration, Store, StoreError, WriterOptions,
};
use rayon::prelude::*;

/// Deterministic pseudo-random blob `i` of `len` bytes (compressible-ish).
fn blob(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    // Small random bytes, each 4 of them twice: both codecs shrink it
    // (zstd by their entropy, LZ4 by the repeats).
    (0..len)
        .map(|k| {
            if k % 8 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            (x >> ((k % 4) * 8)) as u8 & 0x3f
        })
        .collect()
}

/// Blobs `ids` of `len` bytes ([`blob`]), each with its hash.
fn blobs_with_hashes(ids: std::ops::Range<u64>, len: usize) -> Vec<(Hash, Vec<u8>)> {
    ids.into_par_iter()
        .map(|i| {
            let b = blob(i, len);
            (Hash::of(&b), b)
        })
        .collect()
}

/// Blobs `0..n` of `len` bytes put by `w` in parallel and committed as one
/// generation; the writer is dropped.
fn commit_blobs(w: ckpt_store::Writer, n: u64, len: usize) -> Vec<(Hash, Vec<u8>)> {
    let blobs = blobs_with_hashes(0..n, len);
    blobs.par_iter().for_each(|(h, b)| {
        w.put(BlobKind::Chunk, *h, b).unwrap();
    });
    let m = w.put_meta(b"m").unwrap();
    w.commit(gen_for(m, None)).unwrap();
    blobs
}

/// The catalog of the store at `dir` edited as a hostile writer would (its
/// constraints not kept): blob `h`'s row names a pack the table lacks. The
/// store opened again.
fn point_at_a_missing_pack(dir: &Path, store: &Store, h: &Hash) -> Store {
    let c = rusqlite::Connection::open(dir.join("catalog.db")).unwrap();
    c.execute_batch("PRAGMA foreign_keys = OFF").unwrap();
    let a = store.address(h);
    assert_eq!(c.execute("UPDATE blobs SET pack_id = 999999 WHERE hash = ?1", [&a.0[..]]).unwrap(), 1);
    drop(c);
    Store::open(&url(dir)).unwrap()
}

fn gen_for(manifest: Hash, parent: Option<u64>) -> NewGeneration {
    NewGeneration {
        parent,
        created_ms: 1_700_000_000_000,
        duration_ms: 12,
        nprocs: 2,
        logical_bytes: 1 << 20,
        dirty_tracking: "scan".into(),
        manifest,
        info: serde_json::json!({"hosts": ["a"]}),
    }
}

fn small_packs() -> WriterOptions {
    WriterOptions {
        pack_target: 64 * 1024,
        ..Default::default()
    }
}

fn url(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn pack_files(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(root.join("packs")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            v.push(f.path());
        }
    }
    v.sort();
    v
}

#[test]
fn round_trip_many_blobs_across_packs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE).unwrap();
    assert_eq!(store.chunk_size(), DEFAULT_CHUNK_SIZE);
    assert!(store.latest().unwrap().is_none());
    let w = store.writer_with(small_packs()).unwrap();
    assert_eq!(w.next_generation_id(), 1);

    let blobs: Vec<(Hash, Vec<u8>)> = (0..300)
        .map(|i| {
            let b = blob(i, DEFAULT_CHUNK_SIZE);
            (Hash::of(&b), b)
        })
        .collect();
    // put from many threads at once
    let newly: usize = blobs
        .par_iter()
        .map(|(h, b)| w.put(BlobKind::Chunk, *h, b).unwrap() as usize)
        .sum();
    assert_eq!(newly, 300);
    assert!(blobs.iter().all(|(h, _)| w.known(h)));
    let m = w.put_meta(b"manifest one").unwrap();
    let (new, stored) = w.pending_stats();
    assert_eq!(new, 300 * DEFAULT_CHUNK_SIZE as u64 + 12);
    assert!(stored > 0 && stored < new);
    // not visible before commit
    assert!(!store.contains(&blobs[0].0).unwrap());
    let g = w.commit(gen_for(m, None)).unwrap();
    assert_eq!(g.id, 1);
    assert_eq!(g.new_bytes, new);
    assert_eq!(g.stored_bytes, stored);
    assert_eq!(w.pending_stats(), (0, 0));
    assert!(pack_files(dir.path()).len() > 3, "several packs expected");
    assert!(
        std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );

    // every pack describes itself and is named by its BLAKE3
    let mut from_trailers: Vec<PackEntry> = Vec::new();
    for p in pack_files(dir.path()) {
        let bytes = std::fs::read(&p).unwrap();
        let name = blake3::hash(&bytes).to_hex().to_string();
        assert_eq!(
            p.file_name().unwrap().to_str().unwrap(),
            format!("{name}.pack")
        );
        from_trailers.extend(pack::parse_index(&bytes).unwrap());
    }
    assert_eq!(from_trailers.len(), 301);

    for (h, b) in &blobs {
        assert!(store.contains(h).unwrap());
        assert_eq!(&store.read_blob(h).unwrap(), b);
    }
    assert_eq!(store.read_blob(&m).unwrap(), b"manifest one");

    // bulk read, with duplicates and the zero chunk
    let mut want: Vec<Hash> = blobs.iter().map(|(h, _)| *h).collect();
    want.extend(blobs.iter().take(10).map(|(h, _)| *h));
    want.push(Hash::ZERO_CHUNK);
    let got = Mutex::new(HashMap::new());
    store
        .read_blobs(&want, |h, d| {
            assert!(got.lock().unwrap().insert(*h, d.to_vec()).is_none());
            Ok(())
        })
        .unwrap();
    let got = got.into_inner().unwrap();
    assert_eq!(got.len(), 301);
    assert_eq!(got[&Hash::ZERO_CHUNK], vec![0u8; DEFAULT_CHUNK_SIZE]);
    for (h, b) in &blobs {
        assert_eq!(&got[h], b);
    }

    let st = store.stats().unwrap();
    assert_eq!(st.blobs, 301);
    assert_eq!(st.generations, 1);
    assert_eq!(st.packs as usize, pack_files(dir.path()).len());
    assert_eq!(st.stored_bytes, stored);
    assert_eq!(st.logical_bytes, new);

    // a sink error stops the read and is passed through
    let e = store
        .read_blobs(&want, |_, _| Err(StoreError::callback("disk full")))
        .unwrap_err();
    assert_eq!(e.to_string(), "disk full");
    // unknown blob
    let e = store.read_blob(&Hash::of(b"nope")).unwrap_err();
    assert!(matches!(e, StoreError::BlobNotFound { .. }), "{e}");
    assert!(matches!(
        store.read_blobs(&[Hash::of(b"nope")], |_, _| Ok(())),
        Err(StoreError::BlobNotFound { .. })
    ));

    // reopen from a plain path: everything still there
    drop(w);
    let again = Store::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(again.generations().unwrap(), vec![g]);
    assert_eq!(again.read_blob(&blobs[7].0).unwrap(), blobs[7].1);
}

#[test]
fn dedup_and_zero_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), 4096).unwrap();
    let w = store.writer().unwrap();
    let b = blob(1, 4096);
    let h = Hash::of(&b);
    assert!(w.put(BlobKind::Chunk, h, &b).unwrap());
    assert!(!w.put(BlobKind::Chunk, h, &b).unwrap());
    let zeros = vec![0u8; 4096];
    assert!(!w.put(BlobKind::Chunk, Hash::ZERO_CHUNK, &zeros).unwrap());
    assert!(w.known(&Hash::ZERO_CHUNK));
    let m = w.put_meta(b"m1").unwrap();
    let g1 = w.commit(gen_for(m, None)).unwrap();
    assert_eq!(g1.new_bytes, 4096 + 2);
    assert_eq!(store.stats().unwrap().blobs, 2);
    assert_eq!(store.read_blob(&Hash::ZERO_CHUNK).unwrap(), zeros);
    assert!(store.contains(&Hash::ZERO_CHUNK).unwrap());

    // second generation: everything known, nothing new
    assert!(!w.put(BlobKind::Chunk, h, &b).unwrap());
    assert!(!w.put(BlobKind::Meta, m, b"m1").unwrap());
    let packs_before = pack_files(dir.path()).len();
    let g2 = w.commit(gen_for(m, Some(1))).unwrap();
    assert_eq!((g2.id, g2.new_bytes, g2.stored_bytes), (2, 0, 0));
    assert_eq!(
        pack_files(dir.path()).len(),
        packs_before,
        "empty commit writes no pack"
    );
    drop(w);

    // a new writer knows the committed blobs
    let w = store.writer().unwrap();
    assert!(w.known(&h));
    assert!(!w.put(BlobKind::Chunk, h, &b).unwrap());
    assert_eq!(w.next_generation_id(), 3);
}

#[test]
fn commit_abort_and_listing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path().to_str().unwrap(), DEFAULT_CHUNK_SIZE).unwrap();
    let w = store.writer_with(small_packs()).unwrap();

    // a manifest that was never put is refused
    let e = w.commit(gen_for(Hash::of(b"ghost"), None)).unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");

    let mut committed = Vec::new();
    for gi in 0..3u64 {
        let hs: Vec<Hash> = (0..20)
            .map(|i| {
                let b = blob(gi * 1000 + i, 8192);
                let h = Hash::of(&b);
                w.put(BlobKind::Chunk, h, &b).unwrap();
                h
            })
            .collect();
        let m = w.put_meta(format!("manifest {gi}").as_bytes()).unwrap();
        let parent = committed
            .last()
            .map(|(g, _): &(ckpt_store::GenerationInfo, _)| g.id);
        let g = w.commit(gen_for(m, parent)).unwrap();
        committed.push((g, hs));
    }

    // abort: blobs forgotten, packs deleted, nothing visible
    let packs_before = pack_files(dir.path());
    let aborted: Vec<(Hash, Vec<u8>)> = (0..40)
        .map(|i| {
            let b = blob(50_000 + i, 8192);
            (Hash::of(&b), b)
        })
        .collect();
    for (h, b) in &aborted {
        assert!(w.put(BlobKind::Chunk, *h, b).unwrap());
    }
    // Full packs are made durable and put in place by a thread of their own.
    let t0 = std::time::Instant::now();
    while pack_files(dir.path()).len() <= packs_before.len() && t0.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        pack_files(dir.path()).len() > packs_before.len(),
        "some packs rolled"
    );
    w.abort();
    assert_eq!(pack_files(dir.path()), packs_before);
    assert!(
        std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    assert_eq!(w.pending_stats(), (0, 0));
    for (h, _) in &aborted {
        assert!(!w.known(h));
        assert!(!store.contains(h).unwrap());
    }
    assert_eq!(w.next_generation_id(), 4);
    // put again after abort: stored for real this time
    assert!(w.put(BlobKind::Chunk, aborted[0].0, &aborted[0].1).unwrap());

    // bad parent is refused, and the pending blobs stay pending
    let m = w.put_meta(b"m4").unwrap();
    let e = w.commit(gen_for(m, Some(99))).unwrap_err();
    assert!(e.to_string().contains("99"), "{e}");
    assert!(!store.contains(&aborted[0].0).unwrap());
    let g4 = w.commit(gen_for(m, Some(3))).unwrap();
    assert_eq!(g4.id, 4);
    assert_eq!(store.read_blob(&aborted[0].0).unwrap(), aborted[0].1);

    let gens = store.generations().unwrap();
    assert_eq!(
        gens.iter().map(|g| g.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for (g, hs) in &committed {
        assert_eq!(&store.generation(g.id).unwrap(), g);
        assert_eq!(
            store.read_blob(&g.manifest).unwrap(),
            format!("manifest {}", g.id - 1).as_bytes()
        );
        for h in hs {
            assert!(store.contains(h).unwrap());
        }
    }
    assert_eq!(gens[1].parent, Some(1));
    assert_eq!(gens[0].info, serde_json::json!({"hosts": ["a"]}));
    assert_eq!(store.latest().unwrap().unwrap().id, 4);
    let e = store.generation(7).unwrap_err();
    assert!(matches!(e, StoreError::GenerationNotFound { .. }));
    assert!(e.to_string().contains("generations 1-4"), "{e}");
    // GenerationInfo serializes with the manifest as hex
    let j = serde_json::to_value(&gens[0]).unwrap();
    assert_eq!(j["manifest"], gens[0].manifest.to_string());
}

/// Commit blobs, return the store, their hashes, contents, and each blob's
/// pack entry.
fn committed_store(dir: &Path) -> (Store, Vec<(Hash, Vec<u8>)>) {
    let store = Store::open_or_create(&url(dir), DEFAULT_CHUNK_SIZE).unwrap();
    let w = store.writer().unwrap();
    let blobs: Vec<(Hash, Vec<u8>)> = (0..8)
        .map(|i| {
            let b = blob(i, DEFAULT_CHUNK_SIZE);
            (Hash::of(&b), b)
        })
        .collect();
    for (h, b) in &blobs {
        w.put(BlobKind::Chunk, *h, b).unwrap();
    }
    let m = w.put_meta(b"m").unwrap();
    w.commit(gen_for(m, None)).unwrap();
    (store, blobs)
}

fn only_pack(dir: &Path) -> (PathBuf, Vec<PackEntry>) {
    let packs = pack_files(dir);
    assert_eq!(packs.len(), 1);
    let entries = pack::parse_index(&std::fs::read(&packs[0]).unwrap()).unwrap();
    (packs[0].clone(), entries)
}

#[test]
fn truncated_pack_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, blobs) = committed_store(dir.path());
    let (path, entries) = only_pack(dir.path());
    let last = entries.iter().find(|e| e.hash == store.address(&blobs[7].0)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(last.offset + last.clen as u64 / 2).unwrap();
    drop(f);

    for e in [
        store.read_blob(&blobs[7].0).unwrap_err(),
        store
            .read_blobs(&[blobs[0].0, blobs[7].0], |_, _| Ok(()))
            .unwrap_err(),
    ] {
        match &e {
            StoreError::Corrupt { pack, hash, reason } => {
                assert_eq!(pack, &path);
                assert_eq!(*hash, blobs[7].0);
                assert!(reason.contains("truncated"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&blobs[7].0.to_string()) && msg.contains("ckpt verify"),
            "{msg}"
        );
    }
    // blobs before the cut still read fine
    assert_eq!(store.read_blob(&blobs[0].0).unwrap(), blobs[0].1);
}

#[test]
fn bit_flipped_pack_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (store, blobs) = committed_store(dir.path());
    let (path, entries) = only_pack(dir.path());
    let target = entries.iter().find(|e| e.hash == store.address(&blobs[3].0)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(target.offset + target.clen as u64 / 2) as usize] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let e = store.read_blob(&blobs[3].0).unwrap_err();
    assert!(
        matches!(&e, StoreError::Corrupt { hash, pack, .. } if *hash == blobs[3].0 && *pack == path),
        "{e:?}"
    );
    let e = store
        .read_blobs(
            &blobs.iter().map(|b| b.0).collect::<Vec<_>>(),
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Corrupt { hash, .. } if *hash == blobs[3].0),
        "{e:?}"
    );
    assert_eq!(store.read_blob(&blobs[2].0).unwrap(), blobs[2].1);

    // a missing pack is named too
    std::fs::remove_file(&path).unwrap();
    let e = store.read_blob(&blobs[0].0).unwrap_err();
    assert!(
        matches!(&e, StoreError::MissingPack { pack, .. } if *pack == path),
        "{e:?}"
    );
    assert!(e.to_string().contains("ckpt verify"));
    assert!(matches!(
        store.read_blobs(&[blobs[1].0], |_, _| Ok(())),
        Err(StoreError::MissingPack { .. })
    ));
}

#[test]
fn newer_schema_refused_without_modification() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_s, _) = committed_store(dir.path());
    }
    let db = dir.path().join("catalog.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        v.sort();
        v
    };
    let before = std::fs::read(&db).unwrap();
    let files_before = listing(dir.path());
    for r in [
        Store::open(&url(dir.path())),
        Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE),
    ] {
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::NewerSchema {
                    found: 99,
                    supported: ckpt_store::SCHEMA_VERSION,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("schema version 99") && msg.contains("upgrade ckpt"),
            "{msg}"
        );
    }
    assert_eq!(std::fs::read(&db).unwrap(), before);
    assert_eq!(listing(dir.path()), files_before);
}

#[test]
fn not_a_store_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("thesis.tex"), "precious").unwrap();
    for r in [
        Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE),
        Store::open(&url(dir.path())),
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, StoreError::NotAStore { .. }), "{e:?}");
        assert!(e.to_string().contains("not a ckpt store (no catalog.db)"));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // missing directory: open refuses, open_or_create creates
    let sub = dir.path().join("new/store");
    assert!(matches!(
        Store::open(&url(&sub)),
        Err(StoreError::NoSuchStore { .. })
    ));
    assert!(!sub.exists());
    assert!(matches!(
        Store::open_or_create(&url(&sub), 1000),
        Err(StoreError::InvalidChunkSize { .. })
    ));
    let s = Store::open_or_create(&url(&sub), 8192).unwrap();
    assert_eq!(s.chunk_size(), 8192);
    assert!(sub.join("catalog.db").is_file());
    drop(s);
    // an existing store keeps its chunk size
    assert_eq!(
        Store::open_or_create(&url(&sub), 4096)
            .unwrap()
            .chunk_size(),
        8192
    );
    assert_eq!(Store::open(&url(&sub)).unwrap().chunk_size(), 8192);

    // An unknown scheme is refused with a message naming the URL.
    let e = Store::open("ftp://host/store").unwrap_err();
    assert!(matches!(e, StoreError::Unsupported { .. }));
    assert!(e.to_string().contains("ftp://host/store"), "{e}");
}

#[test]
fn second_writer_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE).unwrap();
    let w = store.writer().unwrap();
    let other = Store::open(&url(dir.path())).unwrap();
    let e = other.writer().unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id()))
            && msg.contains("in use by another ckpt process"),
        "{msg}"
    );
    // reading is fine while locked
    assert!(other.generations().unwrap().is_empty());
    drop(w);
    other.writer().unwrap();
}

const CHILD_ENV: &str = "CKPT_STORE_TEST_CRASH_CHILD";

/// Not a test on its own: the body of the child process of
/// `killed_writer_leaves_earlier_generations_intact`.
#[test]
fn crash_child_helper() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(&root).unwrap();
    let w = store.writer_with(small_packs()).unwrap();
    let mut i = 1_000_000u64;
    loop {
        let b = blob(i, DEFAULT_CHUNK_SIZE);
        w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap();
        if i == 1_000_050 {
            println!("PUTTING");
        }
        i += 1;
    }
}

#[test]
fn killed_writer_leaves_earlier_generations_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (store, blobs) = committed_store(dir.path());
    let gens = store.generations().unwrap();
    let stats = store.stats().unwrap();
    let packs_before = pack_files(dir.path());
    drop(store);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let l = lines.next().expect("child exited early").unwrap();
        if l.contains("PUTTING") {
            break;
        }
    }
    // the child is writing packs: it holds the lock
    let store = Store::open(&url(dir.path())).unwrap();
    assert!(matches!(store.writer(), Err(StoreError::Locked { .. })));
    // Killed once it has made a pack durable (orphaned by the kill): a pack
    // is made durable (fsync, rename) by a thread of the child's own, which
    // a loaded machine can hold up for longer than any fixed sleep.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pack_files(dir.path()).len() == packs_before.len() {
        assert!(std::time::Instant::now() < deadline, "the child made no pack durable in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = Store::open(&url(dir.path())).unwrap();
    assert_eq!(store.generations().unwrap(), gens);
    assert_eq!(store.stats().unwrap(), stats);
    for (h, b) in &blobs {
        assert_eq!(&store.read_blob(h).unwrap(), b);
    }
    let rep = store.verify().unwrap();
    assert!(rep.is_ok(), "{rep:?}");
    assert_eq!(rep.blobs, 9);
    assert_eq!(
        rep.orphan_packs.len(),
        pack_files(dir.path()).len() - packs_before.len()
    );
    // the lock died with the child; stale temporary files are cleaned up
    let w = store.writer().unwrap();
    assert!(
        std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(!w.known(&Hash::of(&blob(1_000_000, DEFAULT_CHUNK_SIZE))));
    let b = blob(1_000_000, DEFAULT_CHUNK_SIZE);
    assert!(w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap());
    let m = w.put_meta(b"after crash").unwrap();
    assert_eq!(w.commit(gen_for(m, Some(1))).unwrap().id, 2);
    assert_eq!(store.read_blob(&Hash::of(&b)).unwrap(), b);
}

#[test]
fn maintenance_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (store, blobs) = committed_store(dir.path());
    assert!(store.verify().unwrap().is_ok());
    let w = store.writer().unwrap();
    assert!(w.known(&blobs[0].0));
    // refused while blobs are pending
    let b = blob(77, 4096);
    w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap();
    assert!(w.with_transaction(|_| Ok(())).is_err());
    w.abort();
    // gc-like: drop generation 1 and all its blobs
    let n = w
        .with_transaction(|tx| {
            tx.execute("DELETE FROM generations WHERE id = 1", [])
                .unwrap();
            Ok(tx.execute("DELETE FROM blobs", []).unwrap())
        })
        .unwrap();
    assert_eq!(n, 9);
    assert!(!w.known(&blobs[0].0));
    assert!(store.generations().unwrap().is_empty());
    // ids are never reused
    assert_eq!(w.next_generation_id(), 2);
    let m = w.put_meta(b"m2").unwrap();
    assert_eq!(w.commit(gen_for(m, None)).unwrap().id, 2);
    let e = store.generation(1).unwrap_err();
    assert!(e.to_string().contains("it has generations 2"), "{e}");
}

#[test]
fn incompressible_blobs_are_stored_raw_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), 4096).unwrap();
    let w = store.writer().unwrap();
    // Hash-like words: zstd cannot shrink them.
    let random: Vec<u8> = (0..4096u64 / 32).flat_map(|i| *Hash::of(&i.to_le_bytes()).as_bytes()).collect();
    let text = blob(7, 4096);
    let (hr, ht) = (Hash::of(&random), Hash::of(&text));
    assert!(w.put(BlobKind::Chunk, hr, &random).unwrap());
    assert!(w.put(BlobKind::Chunk, ht, &text).unwrap());
    let m = w.put_meta(b"manifest").unwrap();
    w.commit(gen_for(m, None)).unwrap();
    drop(w);
    let packs = pack_files(dir.path());
    let entries: Vec<PackEntry> = packs.iter().flat_map(|p| pack::parse_index(&std::fs::read(p).unwrap()).unwrap()).collect();
    let e = entries.iter().find(|e| e.hash == store.address(&hr)).unwrap();
    assert_eq!(e.clen as usize, e.ulen as usize + ckpt_store::seal::OVERHEAD, "an incompressible chunk is stored as it is (sealed)");
    assert!(entries.iter().find(|e| e.hash == store.address(&ht)).unwrap().clen < 4096, "a compressible one is compressed");
    assert_eq!(store.read_blob(&hr).unwrap(), random);
    assert_eq!(store.read_blob(&ht).unwrap(), text);
    assert!(store.verify().unwrap().is_ok());
    // A damaged raw blob is named, never returned.
    let (p, e) = packs
        .iter()
        .find_map(|p| pack::parse_index(&std::fs::read(p).unwrap()).unwrap().into_iter().find(|e| e.hash == store.address(&hr)).map(|e| (p, e)))
        .unwrap();
    let mut bytes = std::fs::read(p).unwrap();
    bytes[e.offset as usize + 100] ^= 0xff;
    std::fs::write(p, &bytes).unwrap();
    let err = store.read_blob(&hr).unwrap_err();
    assert!(err.to_string().contains(&hr.to_string()), "{err}");
    assert!(!store.verify().unwrap().is_ok());
}

/// The known set handed from writer to writer (`known_cache`): taken over
/// only while nothing else changed the catalog, and with it the last
/// committed generation vouched for as intact. A set kept across a change
/// would name blobs the store no longer has, and a checkpoint reusing them
/// could not be restarted.
#[test]
fn the_known_set_passes_between_writers_only_while_nothing_else_changed_the_store() {
    use ckpt_store::BlobSink;
    let dir = tempfile::tempdir().unwrap();
    let (store, blobs) = committed_store(dir.path());
    // Writer 1 committed generation 1 and was dropped: the next takes over.
    let w = store.writer().unwrap();
    assert_eq!(w.intact_generation(), Some(1));
    assert!(w.known(&blobs[0].0));
    // An aborted blob is not handed on, and the generation stays intact.
    let b = blob(100, 4096);
    w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap();
    drop(w);
    let w = store.writer().unwrap();
    assert_eq!(w.intact_generation(), Some(1));
    assert!(!w.known(&Hash::of(&b)), "an aborted blob must not be known");
    let m = w.put_meta(b"m2").unwrap();
    assert_eq!(w.commit(gen_for(m, Some(1))).unwrap().id, 2);
    drop(w);

    // Another connection (another process's gc) deletes a blob's row.
    {
        let other = Store::open(&url(dir.path())).unwrap();
        let w2 = other.writer().unwrap();
        w2.with_transaction(|tx| Ok(tx.execute("DELETE FROM blobs WHERE hash = (SELECT hash FROM blobs ORDER BY hash LIMIT 1)", []).unwrap()))
            .unwrap();
    }
    let w = store.writer().unwrap();
    assert_eq!(w.intact_generation(), None, "another connection changed the catalog: nothing is vouched for");
    let all: Vec<Hash> = blobs.iter().map(|(h, _)| *h).chain([Hash::of(b"m"), m]).collect();
    assert_eq!(all.iter().filter(|h| w.known(h)).count(), all.len() - 1, "the deleted row must not be known");
    let m3 = w.put_meta(b"m3").unwrap();
    assert_eq!(w.commit(gen_for(m3, Some(2))).unwrap().id, 3);
    drop(w);
    let w = store.writer().unwrap();
    assert_eq!(w.intact_generation(), Some(3));

    // Maintenance through this same store: the set is reloaded and no
    // generation is vouched for.
    w.with_transaction(|tx| Ok(tx.execute("DELETE FROM blobs", []).unwrap())).unwrap();
    drop(w);
    let w = store.writer().unwrap();
    assert_eq!(w.intact_generation(), None);
    assert!(blobs.iter().all(|(h, _)| !w.known(h)));
    assert!(!w.known(&m3));
}

/// A restart's bulk locate (more than 4096 blobs: one ordered scan of the
/// index merged with the sorted addresses) finds exactly the blobs asked
/// for, among others it skips, and refuses one the catalog lacks or whose
/// row names a pack the table does not have, before handing out any.
#[test]
fn batched_read_of_many_blobs_locates_by_one_merged_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE).unwrap();
    let blobs = commit_blobs(store.writer().unwrap(), 6000, 512);
    // Every other blob of the first 5,000, duplicates, and the zero chunk.
    let mut wanted: Vec<Hash> = blobs[..5000].iter().step_by(2).map(|(h, _)| *h).collect();
    wanted.extend(blobs[..5000].iter().step_by(2).map(|(h, _)| *h).take(100));
    wanted.extend(blobs[5000..].iter().map(|(h, _)| *h));
    wanted.push(Hash::ZERO_CHUNK);
    let read = |hashes: &[Hash]| {
        let got = Mutex::new(HashMap::new());
        store
            .read_blobs_batched(hashes, |batch| {
                let mut g = got.lock().unwrap();
                for (h, b) in batch {
                    assert!(g.insert(*h, b.to_vec()).is_none(), "blob {h} handed out twice");
                }
                Ok(())
            })
            .map(|()| got.into_inner().unwrap())
    };
    let got = read(&wanted).unwrap();
    assert_eq!(got.len(), 2500 + 1000 + 1);
    assert_eq!(got[&Hash::ZERO_CHUNK], vec![0u8; DEFAULT_CHUNK_SIZE]);
    for (i, (h, b)) in blobs.iter().enumerate() {
        assert_eq!(got.get(h), (i >= 5000 || i % 2 == 0).then_some(b), "blob {i}");
    }
    // One blob the catalog lacks: named, nothing handed out.
    let missing = Hash::of(b"never stored");
    let mut with_missing = wanted.clone();
    with_missing.push(missing);
    match read(&with_missing) {
        Err(StoreError::BlobNotFound { hash, .. }) => assert_eq!(hash, missing),
        other => panic!("a missing blob was not refused: {:?}", other.map(|g| g.len())),
    }
    // A row that names a pack the table lacks is no location.
    let store = point_at_a_missing_pack(dir.path(), &store, &blobs[5000].0);
    let got = Mutex::new(0usize);
    let r = store.read_blobs_batched(&wanted, |batch| {
        *got.lock().unwrap() += batch.len();
        Ok(())
    });
    assert!(matches!(r, Err(StoreError::BlobNotFound { hash, .. }) if hash == blobs[5000].0), "{r:?}");
    assert_eq!(*got.lock().unwrap(), 0, "blobs handed out before the missing one was found");
}

/// gc's sweep of a generation takes its first-touched record with it; the
/// record of a generation that stays is kept.
#[test]
fn a_swept_generation_loses_its_first_touched_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE).unwrap();
    let w = store.writer().unwrap();
    let m1 = w.put_meta(b"m1").unwrap();
    let g1 = w.commit(gen_for(m1, None)).unwrap();
    let m2 = w.put_meta(b"m2").unwrap();
    let g2 = w.commit(gen_for(m2, Some(g1.id))).unwrap();
    for g in [&g1, &g2] {
        store.put_touched(g, format!("record of {}", g.id).as_bytes()).unwrap();
    }
    let file = |id: u64| dir.path().join(format!("touched/{id}.rec"));
    assert!(file(g1.id).exists() && file(g2.id).exists());
    let live: std::collections::HashSet<Hash> = [m2].into_iter().collect();
    w.sweep(&[g1.id], &live).unwrap();
    assert!(!file(g1.id).exists(), "the swept generation's record is still there");
    assert_eq!(store.touched(&g2).unwrap().as_deref(), Some(&b"record of 2"[..]));
}

/// Whether pack file `p` reads from the page cache without waiting (its
/// first page, `RWF_NOWAIT`).
fn cached(p: &Path) -> bool {
    let f = std::fs::File::open(p).unwrap();
    let mut page = [0u8; 4096];
    let mut bufs = [std::io::IoSliceMut::new(&mut page)];
    rustix::io::preadv2(&f, &mut bufs, 0, rustix::io::ReadWriteFlags::NOWAIT).is_ok_and(|n| n > 0)
}

/// A restart's streamed read ([`Store::read_blobs_indexed`]): every place
/// a blob is listed at (duplicates included, the zero chunk too) gets that
/// blob's bytes exactly once, whether the packs are in the page cache
/// (decoded as the scan finds them) or not (decoded after it, in file
/// order), through the scan (more than 4096 blobs) and through lookups (a
/// few); a blob the catalog lacks, a row naming a pack the table lacks, a
/// missing pack file and a truncated one are refused, naming the blob.
/// Sealed and unsealed.
#[test]
fn indexed_read_hands_every_place_its_blob_once() {
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create_with(&url(dir.path()), DEFAULT_CHUNK_SIZE, sealed).unwrap();
        let key = sealed.then(|| ckpt_store::seal::key_path(&store.store_id().unwrap()));
        let blobs = commit_blobs(store.writer_with(small_packs()).unwrap(), 6000, 4096);
        // Every other blob of the first 5,000, some twice, the zero chunk
        // twice, the last 1,000, in no order of theirs.
        let mut wanted: Vec<Hash> = blobs[..5000].iter().step_by(2).map(|(h, _)| *h).collect();
        wanted.push(Hash::ZERO_CHUNK);
        wanted.extend(blobs[..5000].iter().step_by(2).map(|(h, _)| *h).take(100));
        wanted.extend(blobs[5000..].iter().rev().map(|(h, _)| *h));
        wanted.push(Hash::ZERO_CHUNK);
        let bytes: HashMap<Hash, &[u8]> = blobs.iter().map(|(h, b)| (*h, &b[..])).chain([(Hash::ZERO_CHUNK, &[0u8; DEFAULT_CHUNK_SIZE][..])]).collect();
        let read = |store: &Store, hashes: &[Hash]| -> Result<usize, StoreError> {
            let got: Vec<Mutex<u32>> = (0..hashes.len()).map(|_| Mutex::new(0)).collect();
            store.read_blobs_indexed(hashes, |batch| {
                assert!(batch.len() <= ckpt_store::BATCH_BLOBS);
                for (at, b) in batch {
                    for &i in *at {
                        assert_eq!(*b, bytes[&hashes[i]], "place {i} got another blob's bytes");
                        *got[i].lock().unwrap() += 1;
                    }
                }
                Ok(())
            })?;
            for (i, n) in got.iter().enumerate() {
                assert_eq!(*n.lock().unwrap(), 1, "place {i} ({}) handed out {} times", hashes[i], n.lock().unwrap());
            }
            Ok(hashes.len())
        };
        assert_eq!(read(&store, &wanted).unwrap(), wanted.len());
        // Not in the page cache: decoded after the scan, in file order.
        let files = pack_files(dir.path());
        let evict = || {
            for p in &files {
                let f = std::fs::File::open(p).unwrap();
                rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
            }
        };
        evict();
        // (a probe reads ahead: evicted again after it)
        let left = files.iter().filter(|p| cached(p)).count();
        if left > 0 {
            eprintln!("{left} of {} packs stay in the page cache: the uncached case is read as the cached one", files.len());
        }
        evict();
        assert_eq!(read(&store, &wanted).unwrap(), wanted.len());
        // A few: looked up one by one.
        assert_eq!(read(&store, &wanted[..300]).unwrap(), 300);
        // One blob the catalog lacks: named.
        let missing = Hash::of(b"never stored");
        for few in [false, true] {
            let mut with_missing = if few { wanted[..10].to_vec() } else { wanted.clone() };
            with_missing.insert(3, missing);
            match read(&store, &with_missing) {
                Err(StoreError::BlobNotFound { hash, .. }) => assert_eq!(hash, missing),
                other => panic!("a missing blob was not refused: {other:?}"),
            }
        }
        // A row naming a pack the table lacks is no location.
        let store = point_at_a_missing_pack(dir.path(), &store, &blobs[5000].0);
        assert!(matches!(read(&store, &wanted), Err(StoreError::BlobNotFound { hash, .. }) if hash == blobs[5000].0));
        // A row whose length no chunk has (the decode buffer is sized by
        // it): refused before anything is allocated for it.
        let wanted: Vec<Hash> = blobs.iter().enumerate().filter(|(i, _)| *i != 5000).map(|(_, (h, _))| *h).collect();
        let a = store.address(&blobs[10].0);
        let set_ulen = |n: i64| {
            let c = rusqlite::Connection::open(dir.path().join("catalog.db")).unwrap();
            assert_eq!(c.execute("UPDATE blobs SET ulen = ?1 WHERE hash = ?2", rusqlite::params![n, &a.0[..]]).unwrap(), 1);
        };
        set_ulen(1 << 31);
        match read(&Store::open(&url(dir.path())).unwrap(), &wanted) {
            Err(StoreError::Corrupt { reason, .. }) => assert!(reason.contains("more than a chunk"), "{reason}"),
            other => panic!("a blob longer than a chunk was not refused: {other:?}"),
        }
        set_ulen(4096);
        let store = Store::open(&url(dir.path())).unwrap();
        assert_eq!(read(&store, &wanted).unwrap(), wanted.len());
        // A truncated pack file, then a missing one.
        let victim = files.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
        let len = std::fs::metadata(victim).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(victim).unwrap().set_len(len / 2).unwrap();
        match read(&store, &wanted) {
            Err(StoreError::Corrupt { reason, .. }) => assert!(reason.contains("truncated"), "{reason}"),
            other => panic!("a truncated pack was not refused: {other:?}"),
        }
        std::fs::remove_file(victim).unwrap();
        match read(&store, &wanted) {
            Err(StoreError::MissingPack { pack, .. }) => assert_eq!(&pack, victim),
            other => panic!("a missing pack was not refused: {other:?}"),
        }
        if let Some(k) = key {
            let _ = std::fs::remove_file(ckpt_store::seal::head_path(&k));
            let _ = std::fs::remove_file(&k);
        }
    }
}

/// The rows of the packs a capture fills are inserted while it goes on
/// (a transaction of their own connection): still invisible until the
/// commit, read around meanwhile, rolled back by a failed commit and
/// inserted again by the next.
#[test]
fn rows_inserted_early_are_visible_only_after_a_commit_that_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(&url(dir.path()), DEFAULT_CHUNK_SIZE).unwrap();
    let w = store.writer_with(small_packs()).unwrap();
    let blobs = blobs_with_hashes(70_000..70_000 + 200, DEFAULT_CHUNK_SIZE);
    for (h, b) in &blobs {
        assert!(w.put(BlobKind::Chunk, *h, b).unwrap());
    }
    // Packs filled: their rows are being inserted; the store reads on.
    let t0 = std::time::Instant::now();
    while pack_files(dir.path()).len() < 3 && t0.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(pack_files(dir.path()).len() >= 3, "several packs expected");
    assert!(blobs.iter().all(|(h, _)| !store.contains(h).unwrap()));
    assert!(store.generations().unwrap().is_empty());
    let m = w.put_meta(b"early manifest").unwrap();
    // A refused commit keeps nothing of them.
    let e = w.commit(gen_for(m, Some(42))).unwrap_err();
    assert!(e.to_string().contains("42"), "{e}");
    assert!(blobs.iter().all(|(h, _)| !store.contains(h).unwrap()));
    let g = w.commit(gen_for(m, None)).unwrap();
    assert_eq!(g.id, 1);
    for (h, b) in &blobs {
        assert_eq!(&store.read_blob(h).unwrap(), b);
    }
    let stats = store.stats().unwrap();
    assert_eq!(stats.blobs, 201);
    assert_eq!(stats.packs as usize, pack_files(dir.path()).len());
    drop(w);
    // A second round on the same writer's successor, early rows again.
    let w = store.writer_with(small_packs()).unwrap();
    let more = blobs_with_hashes(80_000..80_000 + 100, DEFAULT_CHUNK_SIZE);
    for (h, b) in &more {
        assert!(w.put(BlobKind::Chunk, *h, b).unwrap());
    }
    let m2 = w.put_meta(b"second manifest").unwrap();
    let g2 = w.commit(gen_for(m2, Some(1))).unwrap();
    assert_eq!(g2.id, 2);
    for (h, b) in more.iter().chain(&blobs) {
        assert_eq!(&store.read_blob(h).unwrap(), b);
    }
    assert_eq!(store.stats().unwrap().blobs, 302);
}

//! Sealed stores at the store's level (issue 14): no plaintext in the
//! packs, an edited or forged generation row, an altered blob, a replayed
//! catalog, a removed seal and a missing key are each refused, naming what
//! is wrong; an unsealed store still works. The keys live where a user's
//! do (`~/.config/ckpt/keys`); each test removes the ones it made.

use std::path::{Path, PathBuf};

use ckpt_store::{BlobKind, Hash, NewGeneration, Store, StoreError, pack, rusqlite, seal};

fn gen_for(manifest: Hash, parent: Option<u64>) -> NewGeneration {
    NewGeneration {
        parent,
        created_ms: 1,
        duration_ms: 2,
        nprocs: 1,
        logical_bytes: 4096,
        dirty_tracking: "test".into(),
        manifest,
        info: serde_json::json!({"ratio": 0.1 + 0.2, "host": "h"}),
    }
}

fn url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// Removes the key and head record of a store when dropped.
struct KeyGuard(PathBuf);

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(seal::head_path(&self.0));
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A page zstd cannot shrink (an unsealed store keeps it as it is), with
/// `secret` at offset 100.
fn incompressible(seed: u8, secret: &[u8]) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut page);
    page[100..100 + secret.len()].copy_from_slice(secret);
    page
}

/// A sealed store, its key's guard, every blob put (hash, plaintext) and
/// the two generations' ids.
type TwoGenerations = (Store, KeyGuard, Vec<(Hash, Vec<u8>)>, [u64; 2]);

/// A sealed store with two generations, each with a page holding `secret`.
fn two_generations(dir: &Path, secret: &[u8]) -> TwoGenerations {
    let store = Store::open_or_create_with(&url(dir), 4096, true).unwrap();
    assert!(store.is_sealed());
    let guard = KeyGuard(seal::key_path(&store.store_id().unwrap()));
    let w = store.writer().unwrap();
    let mut blobs = Vec::new();
    let mut ids = [0; 2];
    for (g, id) in ids.iter_mut().enumerate() {
        let page = incompressible(g as u8, secret);
        let h = Hash::of(&page);
        assert!(w.put(BlobKind::Chunk, h, &page).unwrap());
        blobs.push((h, page));
        let m = w.put_meta(format!("manifest {g}").as_bytes()).unwrap();
        *id = w.commit(gen_for(m, (g > 0).then_some(1))).unwrap().id;
    }
    drop(w);
    (store, guard, blobs, ids)
}

fn packs(root: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(root.join("packs")).unwrap().flatten() {
        v.extend(std::fs::read_dir(d.path()).unwrap().flatten().map(|f| f.path()));
    }
    v
}

fn sql(dir: &Path, q: &str) {
    let c = rusqlite::Connection::open(dir.join("catalog.db")).unwrap();
    c.execute_batch(q).unwrap();
}

#[test]
fn sealed_packs_hold_no_plaintext_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let secret = b"seal-test-secret-4b1d";
    let (store, _k, blobs, ids) = two_generations(dir.path(), secret);
    for p in packs(dir.path()) {
        let b = std::fs::read(&p).unwrap();
        assert!(!b.windows(secret.len()).any(|w| w == secret), "{} holds the secret", p.display());
        // Trailer addresses are keyed: not the pages' BLAKE3.
        for e in pack::parse_index(&b).unwrap() {
            assert!(blobs.iter().all(|(h, _)| *h != e.hash), "a trailer names a plain BLAKE3");
        }
    }
    let catalog = std::fs::read(dir.path().join("catalog.db")).unwrap();
    for (h, data) in &blobs {
        assert!(!catalog.windows(32).any(|w| w == h.0), "the catalog names plain BLAKE3 {h}");
        assert_eq!(&store.read_blob(h).unwrap(), data);
    }
    assert_eq!(store.generations().unwrap().iter().map(|g| g.id).collect::<Vec<_>>(), ids.to_vec());
    assert!(store.verify().unwrap().is_ok());
    // A fresh open (another process would do the same) reads it all.
    let again = Store::open(&url(dir.path())).unwrap();
    assert_eq!(again.read_blob(&blobs[1].0).unwrap(), blobs[1].1);
}

#[test]
fn edited_and_forged_rows_and_altered_blobs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _k, blobs, ids) = two_generations(dir.path(), b"x");
    drop(store);
    // Re-parent generation 2, change generation 1's size.
    sql(dir.path(), &format!("UPDATE generations SET parent = NULL WHERE id = {}; UPDATE generations SET logical_bytes = 1 WHERE id = {};", ids[1], ids[0]));
    let store = Store::open(&url(dir.path())).unwrap();
    for id in ids {
        match store.generation(id) {
            Err(StoreError::Tampered { what, .. }) => assert!(what.contains(&format!("generation {id}: its catalog row does not match its MAC")), "{what}"),
            other => panic!("generation {id} of an edited catalog: {other:?}"),
        }
    }
    assert!(matches!(store.latest(), Err(StoreError::Tampered { .. })));
    assert!(matches!(store.generations(), Err(StoreError::Tampered { .. })));
    let (good, bad) = store.authentic_generations().unwrap();
    assert!(good.is_empty() && bad.len() == 2, "{good:?} {bad:?}");
    let r = store.verify().unwrap();
    assert_eq!(r.problems.iter().filter(|p| p.contains("does not match its MAC")).count(), 2, "{:?}", r.problems);

    // A forged row without a MAC.
    sql(dir.path(), "INSERT INTO generations SELECT 50, NULL, created_ms, duration_ms, nprocs, logical_bytes, new_bytes, stored_bytes, dirty_tracking, manifest, info, NULL FROM generations LIMIT 1");
    let r = store.verify().unwrap();
    assert!(r.problems.iter().any(|p| p.contains("generation 50: its catalog row has no MAC")), "{:?}", r.problems);

    // One byte of a sealed blob: refused on read, named by verify.
    let p = &packs(dir.path())[0];
    let mut bytes = std::fs::read(p).unwrap();
    let e = pack::parse_index(&bytes).unwrap()[0];
    bytes[(e.offset + 30) as usize] ^= 1;
    std::fs::write(p, &bytes).unwrap();
    let which = blobs.iter().find(|(h, _)| store.address(h) == e.hash);
    if let Some((h, _)) = which {
        let err = store.read_blob(h).unwrap_err();
        assert!(err.to_string().contains("does not open with the store's key"), "{err}");
    }
    let r = store.verify().unwrap();
    assert!(r.problems.iter().any(|p| p.contains("does not open with the store's key")), "{:?}", r.problems);
}

#[test]
fn replayed_catalog_removed_seal_and_missing_key_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, k, blobs, ids) = two_generations(dir.path(), b"x");
    drop(store);
    // Replay: generation 2 gone, as in a copy taken after generation 1.
    let copy = tempfile::tempdir().unwrap();
    std::fs::remove_dir(copy.path()).unwrap();
    assert!(std::process::Command::new("cp").arg("-a").arg(dir.path()).arg(copy.path()).status().unwrap().success());
    sql(copy.path(), &format!("DELETE FROM generations WHERE id = {}", ids[1]));
    match Store::open(&url(copy.path())) {
        Err(e @ StoreError::Replayed { .. }) => {
            let m = e.to_string();
            assert!(m.contains(&format!("generation {} was committed or seen here", ids[1])) && m.contains(".head"), "{m}");
        }
        other => panic!("a replayed catalog opened: {other:?}"),
    }
    // Deleting the head record accepts the rollback on purpose.
    std::fs::remove_file(seal::head_path(&k.0)).unwrap();
    let rolled = Store::open(&url(copy.path())).unwrap();
    assert_eq!(rolled.latest().unwrap().unwrap().id, ids[0]);
    drop(rolled);
    // ... and the head now names generation 1: the full store is newer, fine.
    Store::open(&url(dir.path())).unwrap();

    // The seal removed from the catalog (a downgrade): refused.
    sql(copy.path(), "DELETE FROM meta WHERE key = 'sealed'");
    match Store::open(&url(copy.path())) {
        Err(StoreError::Tampered { what, .. }) => assert!(what.contains("sealing was removed"), "{what}"),
        other => panic!("a store whose seal was removed opened: {other:?}"),
    }

    // Without the key: refused, naming the fix.
    let saved = std::fs::read(&k.0).unwrap();
    std::fs::remove_file(&k.0).unwrap();
    let e = Store::open(&url(dir.path())).unwrap_err();
    assert!(matches!(e, StoreError::NoKey { .. }), "{e:?}");
    assert!(e.to_string().contains("ckpt key import"), "{e}");
    // A key file others may read is refused.
    std::fs::write(&k.0, &saved).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&k.0, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Store::open(&url(dir.path())).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&k.0, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = Store::open(&url(dir.path())).unwrap();
    assert_eq!(s.read_blob(&blobs[0].0).unwrap(), blobs[0].1);
}

#[test]
fn unsealed_store_still_works_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create_with(&url(dir.path()), 4096, false).unwrap();
    assert!(!store.is_sealed() && store.export_key().is_none());
    let w = store.writer().unwrap();
    let secret = b"seal-test-secret-4b1d";
    let page = incompressible(9, secret);
    let h = Hash::of(&page);
    w.put(BlobKind::Chunk, h, &page).unwrap();
    let m = w.put_meta(b"m").unwrap();
    w.commit(gen_for(m, None)).unwrap();
    drop(w);
    assert_eq!(store.address(&h), h);
    // The control of `sealed_packs_hold_no_plaintext_and_read_back`: the
    // same kind of page is there in plaintext when the store is not sealed.
    assert!(packs(dir.path()).iter().any(|p| std::fs::read(p).unwrap().windows(secret.len()).any(|w| w == secret)));
    let again = Store::open(&url(dir.path())).unwrap();
    assert_eq!(again.read_blob(&h).unwrap(), page);
    assert!(again.verify().unwrap().is_ok());
    drop(again);
    // Not authenticated by a key, but still by its BLAKE3: a forged page
    // (the secret changed in the pack) is refused when read and named by
    // verify, never returned as the page.
    let p = packs(dir.path()).into_iter().find(|p| std::fs::read(p).unwrap().windows(secret.len()).any(|w| w == secret)).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    let at = b.windows(secret.len()).position(|w| w == secret).unwrap();
    b[at] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let forged = Store::open(&url(dir.path())).unwrap();
    assert!(forged.read_blob(&h).is_err(), "a forged page of an unsealed store was read as the page");
    let r = forged.verify().unwrap();
    assert!(!r.is_ok() && r.problems.iter().any(|p| p.contains(&h.to_string()[..16])), "verify of a forged unsealed pack: {:?}", r.problems);
}

/// The blobs of the v1 fixture (`tests/fixtures/v1-store`, made by the
/// XChaCha20-Poly1305 code of scheme v1 before AES-256-GCM became the
/// scheme): each as the code that made it wrote it, and its BLAKE3 as
/// recorded when the fixture was made.
fn v1_fixture_blobs() -> Vec<(Hash, Vec<u8>, &'static str)> {
    let text: Vec<u8> = (0..200).flat_map(|i| format!("line {i} of a compressible page\n").into_bytes()).take(4096).collect();
    vec![
        (Hash::of(b"manifest 0"), b"manifest 0".to_vec(), "0995ee641e3b3b6c3a840144f8f72ae306fd37e980bc8fba3e5da5eae59c4002"),
        (Hash::of(b"manifest 1"), b"manifest 1".to_vec(), "a86b470d8ff375cc7bdfb7462070740a338c33cd95de8dba2e6211bcd8e6b92f"),
        {
            // As `incompressible`, from the XOF of "v1 fixture".
            let mut p = vec![0u8; 4096];
            blake3::Hasher::new().update(b"v1 fixture").finalize_xof().fill(&mut p);
            p[100..121].copy_from_slice(b"seal-v1-fixture-4b1d!");
            (Hash::of(&p), p, "098c32c18931db02ad6f5cbb71075b5b581bf2b71484c4845c0357aa2395f85b")
        },
        (Hash::of(&text), text, "f00780ec5b004e84a42e071f4374a55a178ee47bd2c91104b66c733ebc61c708"),
    ]
}

#[test]
fn v1_store_opens_reads_every_blob_and_takes_new_writes() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-store");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir(&root).unwrap();
    assert!(std::process::Command::new("cp").arg("-r").arg(fixture.join("catalog.db")).arg(fixture.join("packs")).arg(&root).status().unwrap().success());
    // The key goes where a user's goes, never into the store.
    let key_text = std::fs::read_to_string(fixture.join("key")).unwrap();
    let (id, _) = seal::parse_key_file(&key_text, &fixture.join("key")).unwrap();
    let key = KeyGuard(seal::key_path(&id));
    assert!(seal::read_key_file(&key.0).unwrap().is_none(), "{} exists already: another run of this test?", key.0.display());
    seal::write_private_atomic(&key.0, key_text.as_bytes()).unwrap();

    let store = Store::open(&url(&root)).unwrap();
    assert!(store.is_sealed());
    let scheme = |root: &Path| -> String {
        rusqlite::Connection::open(root.join("catalog.db")).unwrap().query_row("SELECT value FROM meta WHERE key = 'sealed'", [], |r| r.get(0)).unwrap()
    };
    assert_eq!(scheme(&root), seal::SCHEME_V1);
    let blobs = v1_fixture_blobs();
    for (h, data, recorded) in &blobs {
        assert_eq!(h.to_string(), *recorded, "the fixture's content as made");
        assert_eq!(&store.read_blob(h).unwrap(), data, "blob {h} of the v1 fixture");
    }
    // Every blob row of the catalog is one of these: all were read.
    let rows: std::collections::BTreeSet<Vec<u8>> = {
        let c = rusqlite::Connection::open(root.join("catalog.db")).unwrap();
        let mut st = c.prepare("SELECT hash FROM blobs").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect()
    };
    let ours: std::collections::BTreeSet<Vec<u8>> = blobs.iter().map(|(h, _, _)| store.address(h).0.to_vec()).collect();
    assert_eq!(rows, ours);
    // The generations (MAC'd rows) name the manifests; the restart's read
    // path (batched, from all cores) returns the pages.
    let gens = store.generations().unwrap();
    assert_eq!(gens.iter().map(|g| (g.id, g.parent, g.manifest)).collect::<Vec<_>>(), vec![(1, None, blobs[0].0), (2, Some(1), blobs[1].0)]);
    let pages: Vec<Hash> = blobs[2..].iter().map(|(h, _, _)| *h).collect();
    let got = std::sync::Mutex::new(Vec::new());
    store.read_blobs_batched(&pages, |batch| {
        got.lock().unwrap().extend(batch.iter().map(|(h, b)| (*h, b.to_vec())));
        Ok(())
    }).unwrap();
    let mut got = got.into_inner().unwrap();
    got.sort();
    let mut want: Vec<(Hash, Vec<u8>)> = blobs[2..].iter().map(|(h, d, _)| (*h, d.clone())).collect();
    want.sort();
    assert!(got == want, "batched reads of the v1 pages differ");
    let r = store.verify().unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);

    // A new generation written into the v1 store: its blob is sealed as v2
    // (AES-256-GCM, algorithm byte 2) and both kinds read back.
    let w = store.writer().unwrap();
    let page = incompressible(7, b"written after v2");
    let h = Hash::of(&page);
    assert!(w.put(BlobKind::Chunk, h, &page).unwrap());
    let m = w.put_meta(b"manifest 2").unwrap();
    let g3 = w.commit(gen_for(m, Some(2))).unwrap();
    drop(w);
    drop(store);
    let a = {
        let s = Store::open(&url(&root)).unwrap();
        s.address(&h)
    };
    let e = packs(&root)
        .iter()
        .find_map(|p| {
            let b = std::fs::read(p).unwrap();
            pack::parse_index(&b).unwrap().into_iter().find(|e| e.hash == a).map(|e| (b[e.offset as usize], e.clen as usize, e.ulen as usize))
        })
        .expect("the new blob's pack");
    assert_eq!(e, (2, 4096 + seal::OVERHEAD, 4096), "the new blob is a v2 blob (algorithm byte, clen)");
    let again = Store::open(&url(&root)).unwrap();
    assert_eq!(again.read_blob(&h).unwrap(), page);
    for (h, data, _) in &blobs {
        assert_eq!(&again.read_blob(h).unwrap(), data);
    }
    assert_eq!(again.latest().unwrap().unwrap().id, g3.id);
    assert!(again.verify().unwrap().is_ok());
    assert_eq!(scheme(&root), seal::SCHEME_V1, "the store's scheme is left as it is");

    // An altered v1 blob is still refused, naming it.
    drop(again);
    let p = packs(&root).into_iter().find(|p| p.to_string_lossy().contains("af4b046c")).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    let e = pack::parse_index(&b).unwrap()[0];
    b[(e.offset + 40) as usize] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let s = Store::open(&url(&root)).unwrap();
    let r = s.verify().unwrap();
    assert!(r.problems.iter().any(|p| p.contains("does not open with the store's key")), "{:?}", r.problems);
}

//! First-touched records: for a generation, which of its pages the program
//! touched first the last time it was restarted lazily (written by the
//! page server of that restart, read by the next lazy restart to prefetch
//! them). The body is the engine's; the store keeps it authenticated.
//!
//! A record is one small object beside the packs: `touched/GEN.rec` in the
//! store's directory, or the same key under an `s3://` store's prefix (not
//! cached). It is `body | tag [32]`, the tag a MAC ([`seal::Keys::touched_mac`])
//! over the store id, the generation's id and manifest and the body in a
//! sealed store (a record edited, forged or moved from another generation
//! fails it), and a keyed-by-context BLAKE3 of the same in an unsealed one
//! (that only detects damage: an unsealed store authenticates nothing). A
//! record is a hint: it may be replaced by an older authentic record of the
//! same generation (a replay), and what reads it must still treat every
//! entry as hostile (the engine checks each against the image's regions
//! and reads every page through the image's own chunk lists).
//!
//! This module must never hand out a body whose tag does not check, nor
//! read more than [`MAX_RECORD`] bytes of one.

use std::path::PathBuf;

use crate::seal;
use crate::{GenerationInfo, Result, Store, StoreError};

/// The largest record read or written (tag included).
pub const MAX_RECORD: u64 = 1 << 20;
const TAG: usize = 32;

impl crate::Writer {
    /// Removes the first-touched records of generations `ids`, once gc's
    /// sweep has deleted their rows. Best effort: a record left behind
    /// names a generation that is gone and is never read again.
    pub(crate) fn remove_touched(&self, ids: &[u64]) {
        let rels: Vec<String> = ids.iter().map(|&id| Store::touched_rel(id)).collect();
        match &self.inner.remote {
            // One concurrent batch of DELETEs (a missing object is fine).
            Some(remote) => {
                if let Err(e) = remote.delete_many(&rels) {
                    tracing::warn!(generations = ?ids, "could not remove the first-touched records of deleted generations: {e}");
                }
            }
            None => {
                for (id, rel) in ids.iter().zip(&rels) {
                    match std::fs::remove_file(self.inner.root.join(rel)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            tracing::warn!(generation = id, "could not remove the first-touched record of a deleted generation ({rel}): {e}")
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

impl Store {
    fn touched_rel(id: u64) -> String {
        format!("touched/{id}.rec")
    }

    fn touched_path(&self, id: u64) -> PathBuf {
        self.inner.root.join(Self::touched_rel(id))
    }

    fn touched_tag(&self, g: &GenerationInfo, body: &[u8]) -> [u8; 32] {
        match self.keys() {
            Some(k) => k.touched_mac(g, body),
            None => {
                let mut h = blake3::Hasher::new_derive_key("ckpt 2026 unsealed first-touched record v1");
                for b in [&g.id.to_le_bytes()[..], &g.manifest.0[..], body] {
                    h.update(&(b.len() as u64).to_le_bytes());
                    h.update(b);
                }
                *h.finalize().as_bytes()
            }
        }
    }

    /// Writes (replaces) the first-touched record of generation `g`.
    pub fn put_touched(&self, g: &GenerationInfo, body: &[u8]) -> Result<()> {
        if body.len() as u64 + TAG as u64 > MAX_RECORD {
            return Err(StoreError::Invalid(format!("a first-touched record of {} bytes is more than the {MAX_RECORD} a record may have", body.len())));
        }
        let mut data = body.to_vec();
        data.extend_from_slice(&self.touched_tag(g, body));
        match &self.inner.remote {
            Some(r) => r.put_bytes(&Self::touched_rel(g.id), data).map(|_| ()),
            None => seal::write_private_atomic(&self.touched_path(g.id), &data),
        }
    }

    /// The body of generation `g`'s first-touched record, `None` if it has
    /// none. A record longer than [`MAX_RECORD`] or whose tag does not
    /// check is [`StoreError::Tampered`] (read no further than that).
    pub fn touched(&self, g: &GenerationInfo) -> Result<Option<Vec<u8>>> {
        let rel = Self::touched_rel(g.id);
        let too_big = |len: u64| self.inner.tampered(format!("the first-touched record of generation {} is {len} bytes, more than a record may have ({MAX_RECORD})", g.id));
        let mut data: Vec<u8> = match &self.inner.remote {
            Some(r) => {
                let Some(info) = r.head(&rel)? else { return Ok(None) };
                if info.size > MAX_RECORD {
                    return Err(too_big(info.size));
                }
                if info.size == 0 {
                    return Err(self.inner.tampered(format!("the first-touched record of generation {} is empty", g.id)));
                }
                let whole = 0..info.size;
                match r.get_ranges(&rel, std::slice::from_ref(&whole)) {
                    Ok(mut v) => v.pop().map(|b| b.to_vec()).unwrap_or_default(),
                    // Gone between the HEAD and the GET (replaced, or removed).
                    Err(StoreError::Remote(e)) if matches!(*e, crate::RemoteError::MissingObject { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            None => {
                use std::io::Read;
                let path = self.touched_path(g.id);
                let f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(StoreError::io(format!("open {}", path.display()), e)),
                };
                let mut v = Vec::new();
                f.take(MAX_RECORD + 1).read_to_end(&mut v).map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
                if v.len() as u64 > MAX_RECORD {
                    return Err(too_big(v.len() as u64));
                }
                v
            }
        };
        if data.len() < TAG {
            return Err(self.inner.tampered(format!("the first-touched record of generation {} is {} bytes, shorter than its tag", g.id, data.len())));
        }
        let tag = data.split_off(data.len() - TAG);
        let want = self.touched_tag(g, &data);
        // blake3's Hash compares in constant time.
        let tag: [u8; TAG] = tag.try_into().expect("TAG bytes");
        if blake3::Hash::from(tag) != blake3::Hash::from(want) {
            return Err(self.inner.tampered(format!("the first-touched record of generation {} does not authenticate (edited, forged, or moved from another generation)", g.id)));
        }
        Ok(Some(data))
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreError};

    fn store_with_generation(dir: &std::path::Path, sealed: bool) -> (Store, crate::GenerationInfo) {
        let url = dir.join("s").display().to_string();
        let store = Store::open_or_create_with(&url, 4096, sealed).unwrap();
        let g = crate::GenerationInfo {
            id: 7,
            parent: None,
            created_ms: 0,
            duration_ms: 0,
            nprocs: 1,
            logical_bytes: 0,
            new_bytes: 0,
            stored_bytes: 0,
            dirty_tracking: String::new(),
            manifest: crate::Hash([3; 32]),
            info: serde_json::Value::Null,
        };
        (store, g)
    }

    /// A record reads back as written; an edited byte, a record moved to
    /// another generation, a truncated or an oversized one is refused as
    /// tampered, sealed or not; a generation without one has none.
    #[test]
    fn a_record_authenticates_or_is_refused() {
        for sealed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (store, g) = store_with_generation(dir.path(), sealed);
            let key = crate::seal::key_path(&store.store_id().unwrap());
            assert_eq!(store.touched(&g).unwrap(), None);
            store.put_touched(&g, b"pages touched first").unwrap();
            assert_eq!(store.touched(&g).unwrap().as_deref(), Some(&b"pages touched first"[..]));
            let path = store.touched_path(g.id);
            let good = std::fs::read(&path).unwrap();
            let tampered = |s: &Store, g: &crate::GenerationInfo| matches!(s.touched(g), Err(StoreError::Tampered { .. }));

            let mut bad = good.clone();
            bad[3] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            assert!(tampered(&store, &g), "an edited record was accepted (sealed: {sealed})");

            std::fs::write(&path, &good[..10]).unwrap();
            assert!(tampered(&store, &g), "a truncated record was accepted");

            std::fs::write(&path, vec![0u8; super::MAX_RECORD as usize + 1]).unwrap();
            assert!(tampered(&store, &g), "an oversized record was accepted");

            // Generation 7's record under generation 8's name.
            let g8 = crate::GenerationInfo { id: 8, ..g.clone() };
            std::fs::write(store.touched_path(8), &good).unwrap();
            assert!(tampered(&store, &g8), "a record moved to another generation was accepted");
            if sealed {
                let _ = std::fs::remove_file(crate::seal::head_path(&key));
                let _ = std::fs::remove_file(&key);
            }
        }
    }
}

//! The ranges of one address space that a lazy restart has still to fill.
//!
//! Each range is kept where it is now in the address space (`dst`) and
//! where the image has it (`src`): the two are the same until the program
//! moves memory with `mremap`. A range leaves the set when it is filled, or
//! when the program unmaps or drops it (`munmap`, `MADV_DONTNEED`): from
//! then on it reads as zero, and nothing may be copied into it.

use std::collections::BTreeMap;

/// One range: `len` bytes at `dst` in the address space, `src` in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Piece {
    pub dst: u64,
    pub len: u64,
    pub src: u64,
}

/// Disjoint ranges still to fill, found by where they are and by where the
/// image has them (each image byte is in at most one place of one space).
#[derive(Clone, Default, Debug)]
pub(super) struct Unfilled {
    /// dst → (len, src).
    by_dst: BTreeMap<u64, (u64, u64)>,
    /// src → dst.
    by_src: BTreeMap<u64, u64>,
}

impl Unfilled {
    /// Adds a range that overlaps none of the set (in either address).
    pub fn insert(&mut self, p: Piece) {
        if p.len == 0 {
            return;
        }
        debug_assert!(self.at(p.dst).is_none() && self.at(p.dst + p.len - 1).is_none());
        self.by_dst.insert(p.dst, (p.len, p.src));
        self.by_src.insert(p.src, p.dst);
    }

    fn remove(&mut self, dst: u64) -> Option<Piece> {
        let (len, src) = self.by_dst.remove(&dst)?;
        self.by_src.remove(&src);
        Some(Piece { dst, len, src })
    }

    /// Cuts the range that holds `at` (not at its start) in two there.
    fn split(&mut self, at: u64) {
        let Some((&d, &(len, src))) = self.by_dst.range(..at).next_back() else { return };
        if at < d + len {
            self.by_dst.insert(d, (at - d, src));
            self.by_dst.insert(at, (d + len - at, src + (at - d)));
            self.by_src.insert(src + (at - d), at);
        }
    }

    /// Takes `[start, end)` (addresses in the space) out of the set; returns
    /// the pieces that were in it.
    pub fn carve(&mut self, start: u64, end: u64) -> Vec<Piece> {
        if start >= end {
            return Vec::new();
        }
        self.split(start);
        self.split(end);
        let keys: Vec<u64> = self.by_dst.range(start..end).map(|(k, _)| *k).collect();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }

    /// The range holding address `addr`.
    pub fn at(&self, addr: u64) -> Option<Piece> {
        let (&dst, &(len, src)) = self.by_dst.range(..=addr).next_back()?;
        (addr < dst + len).then_some(Piece { dst, len, src })
    }

    /// Where the image's `[start, end)` still waits to be filled: the parts
    /// of the set's ranges that hold it, in image order.
    pub fn of_source(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        for (&s, &d) in self.by_src.range(..end).rev() {
            let len = self.by_dst[&d].0;
            if s + len <= start {
                break;
            }
            let (lo, hi) = (s.max(start), (s + len).min(end));
            out.push(Piece { dst: d + (lo - s), len: hi - lo, src: lo });
        }
        out.reverse();
        out
    }

    /// `mremap` moved `[from, from + len)` to `to`: what was unfilled there
    /// is unfilled at its new place; whatever was at `to` is gone.
    pub fn moved(&mut self, from: u64, to: u64, len: u64) {
        let pieces = self.carve(from, from.saturating_add(len));
        self.carve(to, to.saturating_add(len));
        for p in pieces {
            self.insert(Piece { dst: p.dst - from + to, ..p });
        }
    }

    /// Bytes still unfilled.
    pub fn bytes(&self) -> u64 {
        self.by_dst.values().map(|(len, _)| len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(u: &Unfilled) -> Vec<(u64, u64, u64)> {
        u.by_dst.iter().map(|(d, (l, s))| (*d, *l, *s)).collect()
    }

    #[test]
    fn carving_moving_and_finding_by_source_agree_with_a_page_map() {
        // The set against a plain map of page → source page, under a run
        // of fills, drops and moves.
        const P: u64 = 4096;
        let mut u = Unfilled::default();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        for (start, pages) in [(0x10000u64, 64u64), (0x100000, 16)] {
            u.insert(Piece { dst: start, len: pages * P, src: start });
            for k in 0..pages {
                model.insert(start + k * P, start + k * P);
            }
        }
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for step in 0..2000 {
            // Somewhere in the first region, or where moves took pages.
            let area = |k: u64| if k.is_multiple_of(2) { 0x10000 } else { 0x200000 };
            let a = area(next(2)) + next(80) * P;
            let n = 1 + next(6);
            if step % 2 == 0 {
                u.carve(a, a + n * P);
                for k in 0..n {
                    model.remove(&(a + k * P));
                }
            } else {
                let to = area(next(2)) + next(80) * P;
                if a.abs_diff(to) < n * P {
                    continue; // mremap refuses overlapping ranges
                }
                u.moved(a, to, n * P);
                let moved: Vec<(u64, u64)> = (0..n).filter_map(|k| model.remove(&(a + k * P)).map(|s| (to + k * P, s))).collect();
                for k in 0..n {
                    model.remove(&(to + k * P));
                }
                model.extend(moved);
            }
            // Every page of the model is where the set says, and the
            // source lookup finds each exactly there.
            let mut from_set: BTreeMap<u64, u64> = BTreeMap::new();
            for (d, l, s) in pieces(&u) {
                for k in 0..l / P {
                    from_set.insert(d + k * P, s + k * P);
                }
            }
            assert_eq!(from_set, model, "step {step}");
            for (&d, &s) in model.iter().take(40) {
                assert_eq!(u.at(d).map(|p| p.src + (d - p.dst)), Some(s));
                let found = u.of_source(s, s + P);
                assert_eq!(found, vec![Piece { dst: d, len: P, src: s }], "step {step}: source {s:#x}");
            }
            assert_eq!(u.bytes(), model.len() as u64 * P);
        }
    }

    #[test]
    fn a_source_range_spread_over_moved_pieces_is_found_in_order() {
        const P: u64 = 4096;
        let mut u = Unfilled::default();
        u.insert(Piece { dst: 0x1000_0000, len: 8 * P, src: 0x1000_0000 });
        // Pages 2..4 move far away, page 6 is dropped.
        u.moved(0x1000_0000 + 2 * P, 0x7000_0000, 2 * P);
        u.carve(0x1000_0000 + 6 * P, 0x1000_0000 + 7 * P);
        let got = u.of_source(0x1000_0000 + P, 0x1000_0000 + 8 * P);
        assert_eq!(
            got,
            vec![
                Piece { dst: 0x1000_0000 + P, len: P, src: 0x1000_0000 + P },
                Piece { dst: 0x7000_0000, len: 2 * P, src: 0x1000_0000 + 2 * P },
                Piece { dst: 0x1000_0000 + 4 * P, len: 2 * P, src: 0x1000_0000 + 4 * P },
                Piece { dst: 0x1000_0000 + 7 * P, len: P, src: 0x1000_0000 + 7 * P },
            ]
        );
        assert!(u.at(0x1000_0000 + 6 * P).is_none());
    }
}

//! Sets of pages as sorted runs, and sparse chunk lists.
//!
//! A mapping's size says nothing about its cost: a program may reserve
//! terabytes (`MAP_NORESERVE`: sanitizer shadow memory, arenas of language
//! runtimes) and touch a few pages. Everything a capture keeps per mapping
//! is therefore sized by what exists, never by what is reserved: which
//! pages are present or written ([`PageRuns`]), and which chunks hold data
//! ([`SparseChunks`]).

use ckpt_chunker::Hash;

/// Page indices (relative to a mapping's start) as sorted, disjoint,
/// non-adjacent half-open runs `[lo, hi)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRuns(Vec<(u64, u64)>);

impl PageRuns {
    /// No page.
    pub fn new() -> PageRuns {
        PageRuns(Vec::new())
    }

    /// Every page of `[0, n)`.
    pub fn all(n: u64) -> PageRuns {
        if n == 0 { PageRuns::new() } else { PageRuns(vec![(0, n)]) }
    }

    /// Adds `[lo, hi)`, which must not start before the last run added.
    pub fn push(&mut self, lo: u64, hi: u64) {
        if hi <= lo {
            return;
        }
        match self.0.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => self.0.push((lo, hi)),
        }
    }

    /// Runs from any order, overlapping or not.
    pub fn from_unsorted(mut runs: Vec<(u64, u64)>) -> PageRuns {
        runs.sort_unstable();
        let mut out = PageRuns::new();
        for (lo, hi) in runs {
            out.push(lo, hi);
        }
        out
    }

    /// One flag per page of `[0, flags.len())`.
    pub fn from_flags(flags: impl IntoIterator<Item = bool>) -> PageRuns {
        let mut out = PageRuns::new();
        for (i, f) in flags.into_iter().enumerate() {
            if f {
                out.push(i as u64, i as u64 + 1);
            }
        }
        out
    }

    /// The runs, in order.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(lo, hi)| hi - lo).sum()
    }

    /// The runs that meet `[lo, hi)`, clipped to it.
    pub fn clip(&self, lo: u64, hi: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.0.partition_point(|r| r.1 <= lo);
        self.0[first..].iter().take_while(move |r| r.0 < hi).map(move |r| (r.0.max(lo), r.1.min(hi)))
    }

    /// Is some page of `[lo, hi)` in the set?
    pub fn any_in(&self, lo: u64, hi: u64) -> bool {
        self.clip(lo, hi).next().is_some()
    }

    /// Do both sets hold the same pages of `[lo, hi)`?
    pub fn same_in(&self, other: &PageRuns, lo: u64, hi: u64) -> bool {
        self.clip(lo, hi).eq(other.clip(lo, hi))
    }

    /// The pages in both sets.
    pub fn intersect(&self, other: &PageRuns) -> PageRuns {
        let mut out = PageRuns::new();
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            out.push(a.0.max(b.0), a.1.min(b.1));
            if a.1 <= b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    /// The pages in either set.
    pub fn union(&self, other: &PageRuns) -> PageRuns {
        PageRuns::from_unsorted(self.0.iter().chain(&other.0).copied().collect())
    }

    /// The pages in exactly one of the sets.
    pub fn sym_diff(&self, other: &PageRuns) -> PageRuns {
        // Boundaries of both, in order: inside exactly one between two.
        let mut edges: Vec<u64> = self.0.iter().chain(&other.0).flat_map(|r| [r.0, r.1]).collect();
        edges.sort_unstable();
        let mut out = PageRuns::new();
        let (mut depth, mut from) = (0usize, 0u64);
        edges.dedup();
        for x in edges {
            let inside = |set: &PageRuns| set.any_in(x, x + 1);
            let d = usize::from(inside(self)) + usize::from(inside(other));
            if depth == 1 && d != 1 {
                out.push(from, x);
            }
            if d == 1 && depth != 1 {
                from = x;
            }
            depth = d;
        }
        out
    }

    /// The groups of `per` pages (chunks) that hold a page of the set, as
    /// runs of group indices.
    pub fn groups(&self, per: u64) -> PageRuns {
        let mut out = PageRuns::new();
        for &(lo, hi) in &self.0 {
            out.push(lo / per, hi.div_ceil(per));
        }
        out
    }

    /// The members of the set, one by one.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|&(lo, hi)| lo..hi)
    }

    /// Is `x` in the set?
    pub fn contains(&self, x: u64) -> bool {
        self.any_in(x, x + 1)
    }

    /// Is some page of `[lo, hi)` in both sets?
    pub fn meets_in(&self, other: &PageRuns, lo: u64, hi: u64) -> bool {
        let (mut a, mut b) = (self.clip(lo, hi).peekable(), other.clip(lo, hi).peekable());
        while let (Some(&x), Some(&y)) = (a.peek(), b.peek()) {
            if x.0 < y.1 && y.0 < x.1 {
                return true;
            }
            if x.1 <= y.1 {
                a.next();
            } else {
                b.next();
            }
        }
        false
    }
}

/// A mapping's chunk hashes, keeping only those that are not
/// [`Hash::ZERO_CHUNK`]: `(chunk index, hash)` sorted by index, out of
/// `len` chunks in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseChunks {
    pub len: u64,
    pub entries: Vec<(u64, Hash)>,
}

impl SparseChunks {
    /// `len` zero chunks.
    pub fn zeros(len: u64) -> SparseChunks {
        SparseChunks { len, entries: Vec::new() }
    }

    /// From a dense list.
    pub fn from_dense(hashes: &[Hash]) -> SparseChunks {
        let entries = hashes.iter().enumerate().filter(|(_, h)| **h != Hash::ZERO_CHUNK).map(|(i, h)| (i as u64, *h)).collect();
        SparseChunks { len: hashes.len() as u64, entries }
    }

    /// The hash of chunk `i` (zero if none is kept).
    pub fn get(&self, i: u64) -> Hash {
        match self.entries.binary_search_by_key(&i, |e| e.0) {
            Ok(k) => self.entries[k].1,
            Err(_) => Hash::ZERO_CHUNK,
        }
    }

    /// The indices of the non-zero chunks in `[lo, hi)`.
    pub fn indices_in(&self, lo: u64, hi: u64) -> impl Iterator<Item = u64> + '_ {
        let first = self.entries.partition_point(|e| e.0 < lo);
        self.entries[first..].iter().take_while(move |e| e.0 < hi).map(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_answer_ranges() {
        let r = PageRuns::from_unsorted(vec![(10, 12), (0, 2), (2, 4), (11, 15), (100, 101)]);
        assert_eq!(r.runs(), &[(0, 4), (10, 15), (100, 101)]);
        assert_eq!(r.count(), 10);
        assert!(r.any_in(3, 5) && !r.any_in(4, 10) && r.any_in(14, 100) && !r.any_in(15, 100));
        assert_eq!(r.clip(1, 11).collect::<Vec<_>>(), vec![(1, 4), (10, 11)]);
        assert_eq!(PageRuns::from_flags([false, true, true, false, true]).runs(), &[(1, 3), (4, 5)]);
    }

    #[test]
    fn set_operations_agree_with_flags() {
        let a = PageRuns::from_unsorted(vec![(0, 4), (8, 9), (20, 30)]);
        let b = PageRuns::from_unsorted(vec![(2, 10), (25, 26), (29, 31)]);
        let flags = |r: &PageRuns| (0..40).map(|i| r.contains(i)).collect::<Vec<bool>>();
        let (fa, fb) = (flags(&a), flags(&b));
        let want = |f: &dyn Fn(bool, bool) -> bool| PageRuns::from_flags(fa.iter().zip(&fb).map(|(&x, &y)| f(x, y)));
        assert_eq!(a.intersect(&b), want(&|x, y| x && y));
        assert_eq!(a.union(&b), want(&|x, y| x || y));
        assert_eq!(a.sym_diff(&b), want(&|x, y| x != y));
        assert_eq!(a.groups(4).runs(), &[(0, 1), (2, 3), (5, 8)]);
        assert_eq!(a.iter().take(5).collect::<Vec<_>>(), vec![0, 1, 2, 3, 8]);
    }

    #[test]
    fn same_and_meets_look_only_inside_the_range() {
        let a = PageRuns::from_unsorted(vec![(0, 4), (8, 9)]);
        let b = PageRuns::from_unsorted(vec![(2, 4), (8, 9)]);
        assert!(a.same_in(&b, 2, 16) && !a.same_in(&b, 0, 16));
        assert!(a.meets_in(&b, 0, 3) && !a.meets_in(&b, 4, 8) && a.meets_in(&b, 4, 9));
        assert!(!a.meets_in(&PageRuns::new(), 0, 100));
    }

    #[test]
    fn sparse_chunks_keep_only_data() {
        let h = Hash([7; 32]);
        let s = SparseChunks::from_dense(&[Hash::ZERO_CHUNK, h, Hash::ZERO_CHUNK, h]);
        assert_eq!(s.len, 4);
        assert_eq!(s.entries, vec![(1, h), (3, h)]);
        assert_eq!((s.get(0), s.get(3)), (Hash::ZERO_CHUNK, h));
        assert_eq!(s.indices_in(2, 4).collect::<Vec<_>>(), vec![3]);
    }
}

//! The dirty bitmap: one bit per 4 KiB guest page, bit `gfn % 64` of word
//! `gfn / 64` (the layout of KVM's dirty log, so words can be sent as they
//! are). Filled by D-bit harvesting (Intel SDM Vol 3C 29.3.5; AMD APM Vol 2
//! 15.25 "Nested Paging"), write-protect tracking and Intel PML draining
//! (SDM Vol 3C 29.3.6).

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::Gfn;

/// One bit per 4 KiB guest page. Frames at or beyond `pages()` are ignored
/// by `set` and read as clean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for guest frames `0..pages`.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).expect("bitmap larger than the address space");
        DirtyBitmap { words: vec![0; words], pages }
    }

    /// Number of guest frames covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    #[allow(clippy::cast_possible_truncation)] // gfn < pages, and the words fit in memory
    fn word(gfn: u64) -> usize {
        (gfn / 64) as usize
    }

    /// Marks `gfn` dirty (ignored beyond `pages()`).
    pub fn set(&mut self, gfn: Gfn) {
        if gfn.0 < self.pages {
            self.words[Self::word(gfn.0)] |= 1 << (gfn.0 % 64);
        }
    }

    /// Marks `count` frames from `first` dirty; returns how many of them are
    /// within `pages()`.
    pub fn set_range(&mut self, first: Gfn, count: u64) -> u64 {
        let start = first.0.min(self.pages);
        let end = first.0.saturating_add(count).min(self.pages);
        let mut g = start;
        while g < end {
            let bit = g % 64;
            let n = (64 - bit).min(end - g);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.words[Self::word(g)] |= mask;
            g += n;
        }
        end - start
    }

    /// Whether `gfn` is marked dirty.
    pub fn get(&self, gfn: Gfn) -> bool {
        gfn.0 < self.pages && self.words[Self::word(gfn.0)] & (1 << (gfn.0 % 64)) != 0
    }

    /// Marks every frame clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Number of dirty frames.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The dirty frames, ascending.
    pub fn iter(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = i as u64 * 64;
            let mut w = w;
            core::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(Gfn(base + bit))
            })
        })
    }

    /// The bitmap's words (bit `gfn % 64` of word `gfn / 64`; bits beyond
    /// `pages()` are zero).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// First frame at or after `from` whose bit equals `dirty`, or `pages()`.
    fn next(&self, from: u64, dirty: bool) -> u64 {
        if from >= self.pages {
            return self.pages;
        }
        let flip = if dirty { 0 } else { u64::MAX };
        let mut i = Self::word(from);
        let mut w = (self.words[i] ^ flip) & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return (i as u64 * 64 + u64::from(w.trailing_zeros())).min(self.pages);
            }
            i += 1;
            if i == self.words.len() {
                return self.pages;
            }
            w = self.words[i] ^ flip;
        }
    }

    /// Coalesced (first gfn, page count) runs of set bits, ascending (migration sends ranges).
    pub fn ranges(&self) -> impl Iterator<Item = (Gfn, u64)> + '_ {
        let mut at = 0;
        core::iter::from_fn(move || {
            let start = self.next(at, true);
            if start >= self.pages {
                return None;
            }
            let end = self.next(start, false);
            at = end;
            Some((Gfn(start), end - start))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count_and_clear() {
        let mut b = DirtyBitmap::new(130);
        assert_eq!(b.pages(), 130);
        assert_eq!(b.words().len(), 3);
        for g in [0, 63, 64, 129] {
            b.set(Gfn(g));
        }
        assert!(b.get(Gfn(63)) && b.get(Gfn(64)) && !b.get(Gfn(65)));
        assert_eq!(b.count(), 4);
        b.clear_all();
        assert_eq!(b.count(), 0);
        assert!(!b.get(Gfn(0)));
    }

    #[test]
    fn frames_beyond_pages_are_ignored() {
        let mut b = DirtyBitmap::new(70);
        b.set(Gfn(70));
        b.set(Gfn(1000));
        assert_eq!(b.count(), 0);
        assert!(!b.get(Gfn(1000)));
        assert_eq!(b.set_range(Gfn(60), 100), 10);
        assert_eq!(b.words()[1], (1 << 6) - 1, "no bits beyond pages");
    }

    #[test]
    fn set_range_marks_exactly_the_range() {
        let mut b = DirtyBitmap::new(2048);
        assert_eq!(b.set_range(Gfn(512), 512), 512);
        assert_eq!(b.count(), 512);
        assert!(!b.get(Gfn(511)) && b.get(Gfn(512)) && b.get(Gfn(1023)) && !b.get(Gfn(1024)));
        assert_eq!(b.set_range(Gfn(3), 5), 5);
        assert_eq!(b.iter().take(5).map(|g| g.0).collect::<Vec<_>>(), [3, 4, 5, 6, 7]);
    }

    #[test]
    fn iter_is_ascending() {
        let mut b = DirtyBitmap::new(1000);
        let gfns = [999, 0, 64, 5, 128, 127];
        for g in gfns {
            b.set(Gfn(g));
        }
        let got: Vec<u64> = b.iter().map(|g| g.0).collect();
        assert_eq!(got, [0, 5, 64, 127, 128, 999]);
    }

    #[test]
    fn ranges_coalesce_runs_across_words() {
        let mut b = DirtyBitmap::new(300);
        b.set_range(Gfn(0), 3);
        b.set(Gfn(10));
        b.set_range(Gfn(60), 80); // 60..140 crosses two word boundaries
        b.set_range(Gfn(256), 44); // runs to the end
        let got: Vec<(u64, u64)> = b.ranges().map(|(g, n)| (g.0, n)).collect();
        assert_eq!(got, [(0, 3), (10, 1), (60, 80), (256, 44)]);
    }

    #[test]
    fn ranges_of_full_and_empty_bitmaps() {
        let mut b = DirtyBitmap::new(128);
        assert_eq!(b.ranges().count(), 0);
        b.set_range(Gfn(0), 128);
        assert_eq!(b.ranges().map(|(g, n)| (g.0, n)).collect::<Vec<_>>(), [(0, 128)]);
        let empty = DirtyBitmap::new(0);
        assert_eq!(empty.ranges().count(), 0);
        assert_eq!(empty.iter().count(), 0);
    }

    #[test]
    fn ranges_agree_with_iter_on_a_pattern() {
        let mut b = DirtyBitmap::new(1000);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.set(Gfn(x % 1000));
        }
        let from_ranges: Vec<u64> = b.ranges().flat_map(|(g, n)| g.0..g.0 + n).collect();
        let from_iter: Vec<u64> = b.iter().map(|g| g.0).collect();
        assert_eq!(from_ranges, from_iter);
        // Runs are maximal: no two touch.
        let r: Vec<(Gfn, u64)> = b.ranges().collect();
        assert!(r.windows(2).all(|w| w[0].0 .0 + w[0].1 < w[1].0 .0));
    }
}

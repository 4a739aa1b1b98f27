//! Dirty-page tracking over the tables, two ways:
//!
//! - D bits: the processor sets the dirty flag of a leaf it writes through
//!   (Intel SDM Vol 3C 29.3.5, EPTP bit 6 enables it; AMD APM Vol 2 15.25
//!   "Nested Paging": nested leaves take A/D like long-mode leaves).
//!   [`Slat::harvest_dirty`] test-and-clears them.
//! - Write protection: [`Slat::wp_arm`] clears W on every writable leaf and
//!   marks it tracked (software bit 52); the first write to a page then exits
//!   (EPT violation, SDM 29.3.3 / #NPF, APM 15.25.6), [`Slat::wp_fault`]
//!   restores W, and [`Slat::wp_harvest`] collects and re-protects the
//!   written pages. A tracked page is dirty when it is tracked and writable.
//!
//! This module owns those five operations. Both harvests return a
//! [`TlbFlush`]: the processor caches D=1 and W=1 in its TLB, so until the
//! flush it may keep writing a page without setting D again or faulting. The
//! caller must flush, and copy (send) the reported pages only after the flush:
//! writes that slip through before it land in memory before the copy, and
//! every write after it is caught by the next harvest.

use core::sync::atomic::Ordering;

use crate::addr::{Gfn, Gpa, PageSize};
use crate::bitmap::DirtyBitmap;
use crate::entry::{is_leaf, TRACKED, WRITE};
use crate::slat::{update, FrameAccess, Slat, SlatError, TlbFlush, Visit};

fn flush_if(needed: bool) -> TlbFlush {
    if needed {
        TlbFlush::required()
    } else {
        TlbFlush::none()
    }
}

fn count(marked: u64) -> usize {
    usize::try_from(marked).unwrap_or(usize::MAX)
}

impl Slat {
    /// D-bit harvest: atomically test-and-clear D (fetch_and) on every leaf;
    /// set the bit of every page of a leaf whose D was set (512 bits for a
    /// 2 MiB leaf) in `out`. Returns the number of pages marked (within
    /// `out.pages()`) and the flush token (needed if any D was cleared).
    /// A leaf reaching past `out` keeps its D bit (it is reported as far
    /// as `out` goes, and again by the next harvest): clearing it lost the
    /// writes to the pages `out` has no bit for.
    ///
    /// Also clears a D bit found on a level-2 entry that points at a page
    /// table and reports its 512 pages: a processor that set D on a 2 MiB
    /// leaf just as `split` replaced it may land the bit there (the bit is
    /// ignored by hardware in non-leaf entries of both formats).
    pub fn harvest_dirty(&self, fa: &impl FrameAccess, out: &mut DirtyBitmap) -> (usize, TlbFlush) {
        let d = self.format().dirty();
        let mut marked = 0;
        let mut cleared = false;
        self.visit(fa, |e, v, gpa, kind| {
            if v & d == 0 {
                return;
            }
            let pages = match kind {
                Visit::Leaf(size) => size.pages(),
                Visit::PageTable => PageSize::Size2M.pages(),
            };
            let first = Gpa(gpa).gfn();
            if first.0 + pages > out.pages() {
                marked += out.set_range(first, pages);
                return;
            }
            if e.fetch_and(!d, Ordering::AcqRel) & d == 0 {
                return;
            }
            cleared = true;
            marked += out.set_range(first, pages);
        });
        (count(marked), flush_if(cleared))
    }

    /// Write-protect tracking: clear W on every writable leaf and mark it
    /// tracked (software bit 52 in both formats). Leaves that are not
    /// writable are not tracked: a write to them stays a genuine fault.
    /// Pages mapped later are not tracked. Arming while armed drops the
    /// dirtiness of pages written since the last `wp_harvest`.
    pub fn wp_arm(&self, fa: &impl FrameAccess) -> TlbFlush {
        let mut changed = false;
        self.visit(fa, |e, v, _, kind| {
            if kind == Visit::PageTable || v & WRITE == 0 {
                return;
            }
            let r = update(e, |old| (is_leaf(old) && old & WRITE != 0).then_some((old & !WRITE) | TRACKED));
            changed |= r.is_ok();
        });
        flush_if(changed)
    }

    /// Called on an EPT violation / #NPF for a write to `gpa`. If the leaf is
    /// tracked, make the page writable (dirty) and return `Ok((true, _))`; a
    /// tracked 2 MiB leaf is split first so only the 4 KiB page becomes
    /// writable. An untracked page is a genuine fault: `Ok((false, _))`.
    /// `NotMapped` if nothing maps `gpa`, `OutOfRange` beyond the limit.
    ///
    /// Flush: needed after a split, and when the page was already writable
    /// (a spurious fault from a stale TLB entry, e.g. another vCPU faulted on
    /// it first). Restoring W alone needs none: the fault itself dropped the
    /// faulting translation (SDM Vol 3C 29.4.3.1); should a processor keep
    /// it anyway, the retried write faults again and takes the spurious path.
    pub fn wp_fault(&mut self, fa: &mut impl FrameAccess, gpa: Gpa) -> Result<(bool, TlbFlush), SlatError> {
        if gpa.0 >= self.limit().0 {
            return Err(SlatError::OutOfRange(gpa));
        }
        let mut slot = self.lookup(fa, gpa.0, 1);
        if !is_leaf(slot.entry) {
            return Err(SlatError::NotMapped(gpa));
        }
        if slot.entry & TRACKED == 0 {
            return Ok((false, TlbFlush::none()));
        }
        let mut flush = TlbFlush::none();
        if slot.level == 2 {
            flush = self.split_slot(fa, slot)?;
            slot = self.lookup(fa, gpa.0, 1);
        }
        let old = Self::entry(fa, &slot).fetch_or(WRITE, Ordering::AcqRel);
        Ok((true, flush.merge(flush_if(old & WRITE != 0))))
    }

    /// Report every tracked leaf that is writable (was written since the
    /// last harvest or arm) into `out` and clear its W again. Returns (pages
    /// marked, flush); the flush is needed if any W was cleared. A leaf
    /// reaching past `out` stays writable, as in [`Slat::harvest_dirty`].
    pub fn wp_harvest(&self, fa: &impl FrameAccess, out: &mut DirtyBitmap) -> (usize, TlbFlush) {
        let mut marked = 0;
        let mut cleared = false;
        self.visit(fa, |e, v, gpa, kind| {
            let Visit::Leaf(size) = kind else { return };
            if v & (TRACKED | WRITE) != TRACKED | WRITE {
                return;
            }
            let first = Gfn(gpa >> 12);
            if first.0 + size.pages() > out.pages() {
                marked += out.set_range(first, size.pages());
                return;
            }
            if e.fetch_and(!WRITE, Ordering::AcqRel) & WRITE == 0 {
                return;
            }
            cleared = true;
            marked += out.set_range(first, size.pages());
        });
        (count(marked), flush_if(cleared))
    }

    /// Stop WP tracking: restore W on all tracked leaves, clear the tracked
    /// bit. The flush is needed if any W was restored (a stale read-only TLB
    /// entry would otherwise raise a fault `wp_fault` calls genuine).
    pub fn wp_disarm(&self, fa: &impl FrameAccess) -> TlbFlush {
        let mut restored = false;
        self.visit(fa, |e, v, _, kind| {
            if kind == Visit::PageTable || v & TRACKED == 0 {
                return;
            }
            let old = update(e, |old| Some((old | WRITE) & !TRACKED));
            restored |= old.is_ok_and(|old| old & WRITE == 0);
        });
        flush_if(restored)
    }
}

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::addr::{Hpa, PAGE_2M, PAGE_4K};
    use crate::entry::{Format, Perms};
    use crate::sim::{guest_write, walk_path, FakeMemory, Fault};

    const HOST: u64 = 0x10_0000_0000;
    const FORMATS: [Format; 2] = [Format::Ept, Format::Npt];

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mode {
        DBits,
        WriteProtect,
    }

    fn setup(format: Format, limit: u64) -> (Slat, FakeMemory) {
        let mut fa = FakeMemory::new();
        let slat = Slat::new(format, &mut fa, Gpa(limit)).unwrap();
        (slat, fa)
    }

    fn map(slat: &mut Slat, fa: &mut FakeMemory, gpa: u64, size: PageSize, perms: Perms) {
        slat.map(fa, Gpa(gpa), Hpa(HOST + gpa), size, perms).unwrap().done();
    }

    /// What the hypervisor does with a write: let the processor try, and on a
    /// write fault ask `wp_fault` and retry once.
    fn write_with_wp(slat: &mut Slat, fa: &mut FakeMemory, gpa: u64) {
        match guest_write(slat, fa, Gpa(gpa)) {
            Ok(hpa) => assert_eq!(hpa, Hpa(HOST + gpa)),
            Err(Fault::Write(_)) => {
                let (tracked, flush) = slat.wp_fault(fa, Gpa(gpa)).unwrap();
                assert!(tracked, "write fault on {gpa:#x} is not a tracking fault");
                flush.done();
                assert_eq!(guest_write(slat, fa, Gpa(gpa)), Ok(Hpa(HOST + gpa)));
            }
            Err(e) => panic!("{e:?} writing {gpa:#x}"),
        }
    }

    fn harvest(slat: &Slat, fa: &FakeMemory, mode: Mode, out: &mut DirtyBitmap) -> (usize, TlbFlush) {
        match mode {
            Mode::DBits => slat.harvest_dirty(fa, out),
            Mode::WriteProtect => slat.wp_harvest(fa, out),
        }
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn harvest_with_nothing_written_reports_nothing_and_needs_no_flush() {
        for f in FORMATS {
            for mode in [Mode::DBits, Mode::WriteProtect] {
                let (mut slat, mut fa) = setup(f, 64 << 20);
                map(&mut slat, &mut fa, 0, PageSize::Size2M, Perms::RWX);
                map(&mut slat, &mut fa, PAGE_2M, PageSize::Size4K, Perms::RWX);
                if mode == Mode::WriteProtect {
                    assert!(slat.wp_arm(&fa).needed());
                }
                let mut out = DirtyBitmap::new((64 << 20) / PAGE_4K);
                let (n, flush) = harvest(&slat, &fa, mode, &mut out);
                assert_eq!((n, flush.needed(), out.count()), (0, false, 0), "{f:?} {mode:?}");
                flush.done();
            }
        }
    }

    #[test]
    fn harvest_reports_written_pages_once_and_asks_for_a_flush() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            map(&mut slat, &mut fa, 0x2000, PageSize::Size4K, Perms::RWX);
            guest_write(&slat, &fa, Gpa(0x2010)).unwrap();
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.harvest_dirty(&fa, &mut out);
            assert!(flush.needed());
            flush.done();
            assert_eq!(n, 1);
            assert_eq!(out.iter().collect::<Vec<_>>(), [Gfn(2)]);
            // D is clear now: the next harvest finds nothing.
            let mut again = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.harvest_dirty(&fa, &mut again);
            assert_eq!((n, flush.needed()), (0, false));
            flush.done();
        }
    }

    #[test]
    fn a_dirty_large_leaf_reports_all_512_pages() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x40_0000, PageSize::Size2M, Perms::RWX);
            guest_write(&slat, &fa, Gpa(0x40_1000)).unwrap();
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.harvest_dirty(&fa, &mut out);
            flush.done();
            assert_eq!(n, 512);
            assert_eq!(out.ranges().collect::<Vec<_>>(), [(Gfn(0x400), 512)]);
        }
    }

    #[test]
    fn split_carries_dirtiness_to_every_small_page() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x40_0000, PageSize::Size2M, Perms::RWX);
            guest_write(&slat, &fa, Gpa(0x40_1000)).unwrap();
            slat.split(&mut fa, Gpa(0x40_0000)).unwrap().done();
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.harvest_dirty(&fa, &mut out);
            flush.done();
            assert_eq!(n, 512, "{f:?}");
            assert_eq!(out.ranges().collect::<Vec<_>>(), [(Gfn(0x400), 512)]);
            // After the split, harvesting is per page.
            guest_write(&slat, &fa, Gpa(0x40_3000)).unwrap();
            out.clear_all();
            let (n, flush) = slat.harvest_dirty(&fa, &mut out);
            flush.done();
            assert_eq!((n, out.iter().collect::<Vec<_>>()), (1, vec![Gfn(0x403)]));
        }
    }

    #[test]
    fn dirty_bit_landing_on_a_split_slot_is_still_reported() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x40_0000, PageSize::Size2M, Perms::RWX);
            slat.split(&mut fa, Gpa(0x40_0000)).unwrap().done();
            // A processor that walked the old 2 MiB leaf sets D late, in what
            // is now the page-table pointer.
            let (pd, idx, _) = walk_path(&slat, &fa, Gpa(0x40_0000))[2];
            fa.table(pd)[idx].fetch_or(f.dirty(), core::sync::atomic::Ordering::SeqCst);
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.harvest_dirty(&fa, &mut out);
            flush.done();
            assert_eq!(n, 512);
            assert_eq!(fa.table(pd)[idx].load(core::sync::atomic::Ordering::SeqCst) & f.dirty(), 0);
            assert_eq!(slat.translate(&fa, Gpa(0x40_0000)).unwrap().1, PageSize::Size4K, "still a table");
        }
    }

    #[test]
    fn a_bitmap_too_small_loses_no_write() {
        // A 2 MiB leaf reaching past the bitmap is reported as far as the
        // bitmap goes and stays dirty (clearing it lost pages 100..512).
        let (mut slat, mut fa) = setup(Format::Ept, 64 << 20);
        map(&mut slat, &mut fa, 0, PageSize::Size2M, Perms::RWX);
        guest_write(&slat, &fa, Gpa(0)).unwrap();
        let mut out = DirtyBitmap::new(100);
        let (n, flush) = slat.harvest_dirty(&fa, &mut out);
        flush.done();
        assert_eq!((n, out.count()), (100, 100));
        let mut full = DirtyBitmap::new(1 << 14);
        slat.harvest_dirty(&fa, &mut full).1.done();
        assert_eq!(full.count(), 512, "the leaf's D bit was cleared");
        // The same for write protection.
        slat.wp_arm(&fa).done();
        assert!(slat.wp_fault(&mut fa, Gpa(128 << 12)).unwrap().0);
        let mut out = DirtyBitmap::new(100);
        slat.wp_harvest(&fa, &mut out).1.done();
        assert_eq!(out.count(), 0);
        let mut full = DirtyBitmap::new(1 << 14);
        slat.wp_harvest(&fa, &mut full).1.done();
        assert!(full.get(Gfn(128)), "the written page was write-protected unreported");
    }

    #[test]
    fn wp_arm_write_protects_and_first_write_faults() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            slat.wp_arm(&fa).done();
            assert_eq!(guest_write(&slat, &fa, Gpa(0x1000)), Err(Fault::Write(1)));
            assert!(!slat.translate(&fa, Gpa(0x1000)).unwrap().2.write);
            let (tracked, flush) = slat.wp_fault(&mut fa, Gpa(0x1000)).unwrap();
            assert!(tracked);
            assert!(!flush.needed(), "restoring W after the fault needs no flush");
            flush.done();
            assert!(guest_write(&slat, &fa, Gpa(0x1000)).is_ok());
            // A second fault on the now writable page is a stale TLB entry.
            let (tracked, flush) = slat.wp_fault(&mut fa, Gpa(0x1000)).unwrap();
            assert!(tracked && flush.needed());
            flush.done();
        }
    }

    #[test]
    fn wp_fault_on_a_large_leaf_makes_only_that_page_writable() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            slat.wp_arm(&fa).done();
            let (tracked, flush) = slat.wp_fault(&mut fa, Gpa(0x20_5123)).unwrap();
            assert!(tracked && flush.needed(), "split needs a flush");
            flush.done();
            assert!(guest_write(&slat, &fa, Gpa(0x20_5123)).is_ok());
            assert_eq!(guest_write(&slat, &fa, Gpa(0x20_6000)), Err(Fault::Write(1)));
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.wp_harvest(&fa, &mut out);
            assert!(flush.needed());
            flush.done();
            assert_eq!((n, out.iter().collect::<Vec<_>>()), (1, vec![Gfn(0x205)]));
            assert_eq!(guest_write(&slat, &fa, Gpa(0x20_5000)), Err(Fault::Write(1)), "re-protected");
        }
    }

    #[test]
    fn wp_fault_tells_genuine_faults_apart() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RX);
            slat.wp_arm(&fa).done();
            // Read-only pages are not tracked: the write fault is genuine.
            let (tracked, flush) = slat.wp_fault(&mut fa, Gpa(0x1000)).unwrap();
            assert!(!tracked && !flush.needed());
            flush.done();
            assert_eq!(guest_write(&slat, &fa, Gpa(0x1000)), Err(Fault::Write(1)));
            assert_eq!(slat.wp_fault(&mut fa, Gpa(0x9000)).unwrap_err(), SlatError::NotMapped(Gpa(0x9000)));
            assert_eq!(slat.wp_fault(&mut fa, Gpa(64 << 20)).unwrap_err(), SlatError::OutOfRange(Gpa(64 << 20)));
        }
    }

    #[test]
    fn wp_disarm_restores_write_and_stops_tracking() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            map(&mut slat, &mut fa, 0x2000, PageSize::Size4K, Perms::R);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RW);
            slat.wp_arm(&fa).done();
            let flush = slat.wp_disarm(&fa);
            assert!(flush.needed());
            flush.done();
            assert!(guest_write(&slat, &fa, Gpa(0x1000)).is_ok());
            assert!(guest_write(&slat, &fa, Gpa(0x20_0000)).is_ok());
            assert_eq!(slat.translate(&fa, Gpa(0x2000)).unwrap().2, Perms::R, "read-only stays read-only");
            assert_eq!(slat.translate(&fa, Gpa(0x20_0000)).unwrap().2, Perms::RW);
            let (tracked, flush) = slat.wp_fault(&mut fa, Gpa(0x1000)).unwrap();
            assert!(!tracked);
            flush.done();
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.wp_harvest(&fa, &mut out);
            assert_eq!((n, flush.needed()), (0, false));
            flush.done();
            let again = slat.wp_disarm(&fa);
            assert!(!again.needed());
            again.done();
        }
    }

    #[test]
    fn protect_while_tracking_keeps_writable_pages_tracked() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f, 64 << 20);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            map(&mut slat, &mut fa, 0x2000, PageSize::Size4K, Perms::RWX);
            slat.wp_arm(&fa).done();
            // Still writable by rights: stays protected until written.
            slat.protect(&mut fa, Gpa(0x1000), PageSize::Size4K, Perms::RW).unwrap().done();
            write_with_wp(&mut slat, &mut fa, 0x1000);
            // Read-only by rights: leaves tracking, a write is a genuine fault.
            slat.protect(&mut fa, Gpa(0x2000), PageSize::Size4K, Perms::R).unwrap().done();
            assert!(!slat.wp_fault(&mut fa, Gpa(0x2000)).unwrap().0);
            let mut out = DirtyBitmap::new(1 << 14);
            let (n, flush) = slat.wp_harvest(&fa, &mut out);
            flush.done();
            assert_eq!((n, out.iter().collect::<Vec<_>>()), (1, vec![Gfn(1)]));
            assert_eq!(slat.translate(&fa, Gpa(0x1000)).unwrap().2, Perms::R, "re-protected, exec dropped");
        }
    }

    /// The model test: a 64 MiB guest of mixed 2 MiB and 4 KiB leaves (some
    /// 4 KiB holes), 20 rounds of random writes and random splits, then a
    /// harvest. Every written page is reported; nothing else is, except the
    /// other pages of a 2 MiB leaf that was written while still large (D-bit
    /// mode only: WP mode splits before making a page writable).
    #[test]
    fn harvest_never_misses_a_write_and_is_exact_for_small_pages() {
        const GUEST: u64 = 64 << 20;
        const PAGES: u64 = GUEST / PAGE_4K;
        const REGIONS: u64 = GUEST / PAGE_2M;
        for f in FORMATS {
            for mode in [Mode::DBits, Mode::WriteProtect] {
                for seed in [1u64, 0xDEAD_BEEF, 0x1234_5678_9ABC, 42, 7_777_777] {
                    let ctx = format!("{f:?} {mode:?} seed {seed:#x}");
                    let mut rng = XorShift(seed);
                    let (mut slat, mut fa) = setup(f, GUEST);
                    let mut mapped = vec![false; PAGES as usize];
                    for r in 0..REGIONS {
                        let base = r * PAGE_2M;
                        match rng.below(3) {
                            0 => {
                                map(&mut slat, &mut fa, base, PageSize::Size2M, Perms::RWX);
                                mapped[(base / PAGE_4K) as usize..][..512].fill(true);
                            }
                            kind => {
                                for i in 0..512 {
                                    if kind == 1 || rng.below(2) == 0 {
                                        map(&mut slat, &mut fa, base + i * PAGE_4K, PageSize::Size4K, Perms::RWX);
                                        mapped[(base / PAGE_4K + i) as usize] = true;
                                    }
                                }
                            }
                        }
                    }
                    if mode == Mode::WriteProtect {
                        slat.wp_arm(&fa).done();
                    }
                    for round in 0..20 {
                        let mut written = vec![false; PAGES as usize];
                        let mut coarse = vec![false; REGIONS as usize];
                        let writes = 1 + rng.below(300);
                        for _ in 0..writes {
                            if rng.below(20) == 0 {
                                let gpa = rng.below(REGIONS) * PAGE_2M;
                                match slat.split(&mut fa, Gpa(gpa)) {
                                    Ok(flush) => flush.done(),
                                    Err(e) => assert_eq!(e, SlatError::NotMapped(Gpa(gpa)), "{ctx}"),
                                }
                            }
                            let gfn = loop {
                                let g = rng.below(PAGES);
                                if mapped[g as usize] {
                                    break g;
                                }
                            };
                            let gpa = gfn * PAGE_4K + rng.below(PAGE_4K);
                            let large = slat.translate(&fa, Gpa(gpa)).unwrap().1 == PageSize::Size2M;
                            match mode {
                                Mode::DBits => assert_eq!(guest_write(&slat, &fa, Gpa(gpa)), Ok(Hpa(HOST + gpa))),
                                Mode::WriteProtect => write_with_wp(&mut slat, &mut fa, gpa),
                            }
                            written[gfn as usize] = true;
                            coarse[(gpa / PAGE_2M) as usize] |= large && mode == Mode::DBits;
                        }
                        let mut out = DirtyBitmap::new(PAGES);
                        let (n, flush) = harvest(&slat, &fa, mode, &mut out);
                        assert_eq!(n as u64, out.count(), "{ctx} round {round}");
                        assert!(flush.needed(), "{ctx} round {round}: pages were written");
                        flush.done();
                        for gfn in 0..PAGES {
                            let (w, got) = (written[gfn as usize], out.get(Gfn(gfn)));
                            assert!(!w || got, "{ctx} round {round}: write to gfn {gfn:#x} missed");
                            assert!(
                                !got || w || coarse[(gfn / 512) as usize],
                                "{ctx} round {round}: gfn {gfn:#x} reported but not written"
                            );
                            assert!(!got || mapped[gfn as usize], "{ctx}: unmapped gfn {gfn:#x} reported");
                        }
                    }
                    slat.destroy(&mut fa);
                    assert_eq!(fa.live(), 0, "{ctx}");
                }
            }
        }
    }
}

//! The second-level table tree: four levels (PML4, PDPT, PD, PT) in either
//! the EPT or the NPT format, mapping guest-physical to host-physical
//! addresses with 4 KiB and 2 MiB leaves. This module owns the tree's shape:
//! creating, mapping, unmapping, translating, splitting large leaves, changing
//! permissions and freeing the tables. Intel SDM Vol 3C 29.3 "The Extended
//! Page Table Mechanism (EPT)" (29.3.2 translation, 29.3.3 violations and
//! misconfigurations, 29.4.3 invalidation); AMD APM Vol 2 15.25 "Nested
//! Paging" (15.25.5 nested table walk, 15.16 TLB control).
//!
//! Concurrency model: one thread owns the `Slat` and changes the tree
//! (`&mut self` methods) while vCPUs may be running on it, so the only
//! concurrent writer is the processor, which sets A and D bits with locked
//! operations. Every change to a live entry is therefore an atomic swap,
//! compare-exchange or read-modify-write that keeps A/D bits set meanwhile.
//!
//! Every method that changes what the processor may have cached returns a
//! [`TlbFlush`]; table frames handed to [`FrameAccess::free_table`] may still
//! be referenced by a running vCPU's paging-structure caches until that flush
//! is done (single-vCPU guests stopped for the call are not affected; a
//! `FrameAccess` serving guests whose other vCPUs keep running must defer
//! reusing freed frames until the flush).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Gpa, Hpa, PageSize, PAGE_4K};
use crate::entry::{is_leaf, is_table, leaf_addr, table_addr, Format, Perms, ADDR_2M, ADDR_4K, PS, TRACKED, WRITE};

/// Host memory as the table code sees it.
pub trait FrameAccess {
    /// A zeroed 4 KiB frame for a page table, or None when out of memory.
    fn alloc_table(&mut self) -> Option<Hpa>;
    /// Gives back a table frame.
    fn free_table(&mut self, hpa: Hpa);
    /// The 512 entries of the table frame at `hpa`. Entries are AtomicU64 because
    /// the CPU sets A/D bits concurrently.
    fn table(&self, hpa: Hpa) -> &[AtomicU64; 512];
}

/// Why a table operation was refused. A refused operation leaves the
/// translations as they were (tables it allocated may stay, empty).
#[derive(Debug, PartialEq, Eq)]
pub enum SlatError {
    /// `FrameAccess::alloc_table` returned None.
    OutOfMemory,
    /// The guest or host address is not aligned to the page size, or the host
    /// address has bits above 51.
    Unaligned,
    /// Something is already mapped at this guest address.
    AlreadyMapped(Gpa),
    /// Nothing is mapped at this guest address.
    NotMapped(Gpa),
    /// The range starting at this address goes beyond the guest's limit.
    OutOfRange(Gpa),
}

/// Proof that the guest's cached translations must be flushed (INVEPT
/// single-context on the EPTP / VMCB `TLB_CONTROL` = flush this guest's ASID)
/// before the guest runs again. Consume it with [`TlbFlush::done`] after
/// flushing.
#[must_use = "flush the guest TLB (INVEPT single-context / VMCB TLB_CONTROL) before the guest runs, then call done()"]
#[derive(Debug, PartialEq, Eq)]
pub struct TlbFlush {
    needed: bool,
}

impl TlbFlush {
    /// Nothing to flush.
    pub const fn none() -> Self {
        TlbFlush { needed: false }
    }

    /// A flush is required.
    pub const fn required() -> Self {
        TlbFlush { needed: true }
    }

    /// One token for both changes: a flush is needed if either needs one.
    pub const fn merge(self, other: TlbFlush) -> Self {
        TlbFlush { needed: self.needed || other.needed }
    }

    /// Whether the caller must flush.
    pub const fn needed(&self) -> bool {
        self.needed
    }

    /// Consumes the token once the flush is done (or was not needed).
    pub fn done(self) {}
}

/// Highest guest address a 4-level table reaches (256 TiB).
const MAX_LIMIT: u64 = 1 << 48;

/// A position in the tree: entry `idx` of the table at `table`, at `level`
/// (4 = root, 1 = page table), and the entry's value when it was read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) table: Hpa,
    pub(crate) idx: usize,
    pub(crate) level: u8,
    pub(crate) entry: u64,
}

/// Index of `gpa` in a table of `level`.
#[allow(clippy::cast_possible_truncation)] // masked to 9 bits
pub(crate) const fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 511) as usize
}

/// Atomically replaces the entry's value `old` by `f(old)` (compare-exchange
/// loop, retried when the processor sets A/D meanwhile); `Ok(old)` when
/// replaced, `Err(old)` when `f` declined. (`AtomicU64::fetch_update` under
/// a name that is stable on the pinned toolchain.)
pub(crate) fn update(e: &AtomicU64, mut f: impl FnMut(u64) -> Option<u64>) -> Result<u64, u64> {
    let mut old = e.load(Ordering::Acquire);
    loop {
        let new = f(old).ok_or(old)?;
        match e.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(old),
            Err(now) => old = now,
        }
    }
}

/// What `Slat::visit` shows its callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Visit {
    /// A leaf of this size.
    Leaf(PageSize),
    /// A level-2 entry pointing at a page table.
    PageTable,
}

const fn leaf_level(size: PageSize) -> u8 {
    match size {
        PageSize::Size4K => 1,
        PageSize::Size2M => 2,
    }
}

/// The guest's second-level address translation tables.
pub struct Slat {
    format: Format,
    root: Hpa,
    limit: u64,
}

impl Slat {
    /// Empty 4-level tables for guest addresses below `limit` (at most
    /// 256 TiB), in `format`.
    pub fn new(format: Format, fa: &mut impl FrameAccess, limit: Gpa) -> Result<Self, SlatError> {
        if limit.0 > MAX_LIMIT {
            return Err(SlatError::OutOfRange(limit));
        }
        let root = fa.alloc_table().ok_or(SlatError::OutOfMemory)?;
        Ok(Slat { format, root, limit: limit.0 })
    }

    /// The root table (PML4): the nCR3 value for NPT (VMCB N_CR3).
    pub fn root(&self) -> Hpa {
        self.root
    }

    /// The entry format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The first guest address the tables refuse.
    pub fn limit(&self) -> Gpa {
        Gpa(self.limit)
    }

    /// EPTP value (SDM Vol 3C 25.6.11): root | WB memory type (6) |
    /// (4-1)<<3 page-walk length | bit 6 if `ad` (A/D enable). Only
    /// meaningful for Format::Ept.
    pub fn eptp(&self, ad: bool) -> u64 {
        (self.root.0 & ADDR_4K) | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 }
    }

    pub(crate) fn entry<'a>(fa: &'a impl FrameAccess, slot: &Slot) -> &'a AtomicU64 {
        &fa.table(slot.table)[slot.idx]
    }

    fn check(&self, gpa: Gpa, size: PageSize) -> Result<(), SlatError> {
        if !gpa.0.is_multiple_of(size.bytes()) {
            return Err(SlatError::Unaligned);
        }
        match gpa.0.checked_add(size.bytes()) {
            Some(end) if end <= self.limit => Ok(()),
            _ => Err(SlatError::OutOfRange(gpa)),
        }
    }

    /// Walks to `gpa` and stops at `stop` level, at a leaf, or at an empty
    /// entry, whichever comes first.
    pub(crate) fn lookup(&self, fa: &impl FrameAccess, gpa: u64, stop: u8) -> Slot {
        let mut table = self.root;
        let mut level = 4;
        loop {
            let idx = index(gpa, level);
            let entry = fa.table(table)[idx].load(Ordering::Acquire);
            if level == stop || !is_table(entry) {
                return Slot { table, idx, level, entry };
            }
            table = table_addr(entry);
            level -= 1;
        }
    }

    /// Like `lookup`, but allocates the missing tables above `stop`.
    fn lookup_alloc(&self, fa: &mut impl FrameAccess, gpa: u64, stop: u8) -> Result<Slot, SlatError> {
        let mut table = self.root;
        let mut level = 4;
        loop {
            let idx = index(gpa, level);
            let entry = fa.table(table)[idx].load(Ordering::Acquire);
            if level == stop || is_leaf(entry) {
                return Ok(Slot { table, idx, level, entry });
            }
            table = if entry == 0 {
                let new = fa.alloc_table().ok_or(SlatError::OutOfMemory)?;
                fa.table(table)[idx].store(self.format.table_entry(new), Ordering::Release);
                new
            } else {
                table_addr(entry)
            };
            level -= 1;
        }
    }

    /// Maps the `size` page at `gpa` to the frame at `hpa`. A new mapping
    /// needs no flush (the processor caches no not-present translations),
    /// unless a 2 MiB leaf replaced an emptied page table, which is freed.
    pub fn map(
        &mut self,
        fa: &mut impl FrameAccess,
        gpa: Gpa,
        hpa: Hpa,
        size: PageSize,
        perms: Perms,
    ) -> Result<TlbFlush, SlatError> {
        self.check(gpa, size)?;
        if !hpa.0.is_multiple_of(size.bytes()) || hpa.0 & !ADDR_4K != 0 {
            return Err(SlatError::Unaligned);
        }
        let slot = self.lookup_alloc(fa, gpa.0, leaf_level(size))?;
        if is_leaf(slot.entry) {
            return Err(SlatError::AlreadyMapped(gpa));
        }
        let leaf = self.format.leaf_entry(hpa, size, perms);
        if slot.entry == 0 {
            Self::entry(fa, &slot).store(leaf, Ordering::Release);
            return Ok(TlbFlush::none());
        }
        // A page table under the 2 MiB slot: only usable if it is empty.
        let pt = table_addr(slot.entry);
        if let Some(i) = fa.table(pt).iter().position(|e| e.load(Ordering::Acquire) != 0) {
            return Err(SlatError::AlreadyMapped(Gpa(gpa.0 + i as u64 * PAGE_4K)));
        }
        Self::entry(fa, &slot).store(leaf, Ordering::Release);
        fa.free_table(pt);
        Ok(TlbFlush::required())
    }

    /// Removes the mapping of the `size` page at `gpa`. A 4 KiB unmap inside
    /// a 2 MiB leaf splits it first; a 2 MiB unmap over a page table removes
    /// every 4 KiB leaf in it (NotMapped if there is none) and frees the
    /// table. Emptied tables are otherwise kept until `destroy`.
    pub fn unmap(&mut self, fa: &mut impl FrameAccess, gpa: Gpa, size: PageSize) -> Result<TlbFlush, SlatError> {
        self.check(gpa, size)?;
        let slot = self.lookup(fa, gpa.0, leaf_level(size));
        match size {
            PageSize::Size4K => {
                if !is_leaf(slot.entry) {
                    return Err(SlatError::NotMapped(gpa));
                }
                let mut flush = TlbFlush::none();
                let mut slot = slot;
                if slot.level == 2 {
                    flush = self.split_slot(fa, slot)?;
                    slot = self.lookup(fa, gpa.0, 1);
                }
                debug_assert!(slot.level == 1 && is_leaf(slot.entry));
                Self::entry(fa, &slot).swap(0, Ordering::AcqRel);
                Ok(flush.merge(TlbFlush::required()))
            }
            PageSize::Size2M => {
                if slot.level != 2 || slot.entry == 0 {
                    return Err(SlatError::NotMapped(gpa));
                }
                if is_leaf(slot.entry) {
                    Self::entry(fa, &slot).swap(0, Ordering::AcqRel);
                    return Ok(TlbFlush::required());
                }
                let pt = table_addr(slot.entry);
                let mut any = false;
                for e in fa.table(pt) {
                    any |= e.swap(0, Ordering::AcqRel) != 0;
                }
                if !any {
                    return Err(SlatError::NotMapped(gpa));
                }
                Self::entry(fa, &slot).swap(0, Ordering::AcqRel);
                fa.free_table(pt);
                Ok(TlbFlush::required())
            }
        }
    }

    /// The host address of the byte at `gpa`, the size of the leaf mapping it
    /// and the leaf's rights; None if unmapped or beyond the limit.
    pub fn translate(&self, fa: &impl FrameAccess, gpa: Gpa) -> Option<(Hpa, PageSize, Perms)> {
        if gpa.0 >= self.limit {
            return None;
        }
        let slot = self.lookup(fa, gpa.0, 1);
        if !is_leaf(slot.entry) {
            return None;
        }
        let size = if slot.level == 2 { PageSize::Size2M } else { PageSize::Size4K };
        let base = leaf_addr(slot.entry, size);
        Some((Hpa(base.0 + (gpa.0 & (size.bytes() - 1))), size, self.format.perms(slot.entry)))
    }

    /// Replace the 2 MiB leaf containing gpa by a table of 512 4 KiB leaves with the same
    /// frames and permissions; the A and D bits of the big leaf are copied to every small one
    /// (so no write is lost). No-op (Ok(TlbFlush::none())) if already 4 KiB. Safe
    /// against the CPU setting D concurrently on the old leaf: the new table is
    /// built, then swapped in with compare_exchange, rebuilt and retried if A/D
    /// changed meanwhile.
    pub fn split(&mut self, fa: &mut impl FrameAccess, gpa: Gpa) -> Result<TlbFlush, SlatError> {
        if gpa.0 >= self.limit {
            return Err(SlatError::OutOfRange(gpa));
        }
        let slot = self.lookup(fa, gpa.0, 2);
        if slot.level != 2 || slot.entry == 0 {
            return Err(SlatError::NotMapped(gpa));
        }
        if is_table(slot.entry) {
            return Ok(TlbFlush::none());
        }
        self.split_slot(fa, slot)
    }

    /// Splits the 2 MiB leaf at `slot` (level 2, `slot.entry` read before).
    pub(crate) fn split_slot(&self, fa: &mut impl FrameAccess, slot: Slot) -> Result<TlbFlush, SlatError> {
        debug_assert!(slot.level == 2 && is_leaf(slot.entry) && slot.entry & PS != 0);
        let new = fa.alloc_table().ok_or(SlatError::OutOfMemory)?;
        let hw = self.format.accessed() | self.format.dirty();
        let mut old = slot.entry;
        loop {
            // Same bits as the big leaf (rights, A/D, memory type, NX, software
            // bits) without PS and the address; bit 12 (NPT's 2 MiB PAT bit) is
            // zero in our leaves, so the small leaves' PAT (bit 7) stays zero.
            let small = old & !(PS | ADDR_4K);
            let base = old & ADDR_2M;
            for (i, e) in fa.table(new).iter().enumerate() {
                e.store(small | (base + i as u64 * PAGE_4K), Ordering::Relaxed);
            }
            match Self::entry(fa, &slot).compare_exchange(
                old,
                self.format.table_entry(new),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(TlbFlush::required()),
                Err(now) => {
                    // Only the processor writes meanwhile, and only A/D.
                    debug_assert_eq!(now & !hw, old & !hw, "2 MiB leaf changed under split");
                    old = now;
                }
            }
        }
    }

    /// Calls `f(entry, value, gpa, kind)` for every leaf and for every
    /// level-2 entry that points at a page table, in ascending guest address
    /// order. Values are read with relaxed loads (a snapshot; callers that
    /// change an entry do so with an atomic read-modify-write).
    #[inline]
    pub(crate) fn visit(&self, fa: &impl FrameAccess, mut f: impl FnMut(&AtomicU64, u64, u64, Visit)) {
        for (i4, e4) in fa.table(self.root).iter().enumerate() {
            let v4 = e4.load(Ordering::Acquire);
            if !is_table(v4) {
                continue;
            }
            for (i3, e3) in fa.table(table_addr(v4)).iter().enumerate() {
                let v3 = e3.load(Ordering::Acquire);
                if !is_table(v3) {
                    continue;
                }
                let gpa3 = ((i4 as u64) << 39) | ((i3 as u64) << 30);
                for (i2, e2) in fa.table(table_addr(v3)).iter().enumerate() {
                    let v2 = e2.load(Ordering::Acquire);
                    let gpa2 = gpa3 | ((i2 as u64) << 21);
                    if is_leaf(v2) {
                        f(e2, v2, gpa2, Visit::Leaf(PageSize::Size2M));
                        continue;
                    }
                    if v2 == 0 {
                        continue;
                    }
                    f(e2, v2, gpa2, Visit::PageTable);
                    for (i1, e1) in fa.table(table_addr(v2)).iter().enumerate() {
                        let v1 = e1.load(Ordering::Relaxed);
                        if is_leaf(v1) {
                            f(e1, v1, gpa2 | ((i1 as u64) << 12), Visit::Leaf(PageSize::Size4K));
                        }
                    }
                }
            }
        }
    }

    /// Split every 2 MiB leaf. On error, the leaves split so far stay split
    /// (flush anyway before the guest runs).
    pub fn split_all(&mut self, fa: &mut impl FrameAccess) -> Result<TlbFlush, SlatError> {
        let mut flush = TlbFlush::none();
        for i4 in 0..512 {
            let e4 = fa.table(self.root)[i4].load(Ordering::Acquire);
            if !is_table(e4) {
                continue;
            }
            for i3 in 0..512 {
                let e3 = fa.table(table_addr(e4))[i3].load(Ordering::Acquire);
                if !is_table(e3) {
                    continue;
                }
                let pd = table_addr(e3);
                for idx in 0..512 {
                    let entry = fa.table(pd)[idx].load(Ordering::Acquire);
                    if is_leaf(entry) {
                        flush = flush.merge(self.split_slot(fa, Slot { table: pd, idx, level: 2, entry })?);
                    }
                }
            }
        }
        Ok(flush)
    }

    /// Changes the rights of the `size` page at `gpa` (a 4 KiB page inside a
    /// 2 MiB leaf splits it first; a 2 MiB page over a page table changes
    /// every 4 KiB leaf in it). A/D bits are kept. While write-protect
    /// tracking is armed, a tracked page given rights with write stays tracked
    /// (and keeps its current W, so a clean page is still caught on its next
    /// write); given rights without write it leaves tracking.
    pub fn protect(
        &mut self,
        fa: &mut impl FrameAccess,
        gpa: Gpa,
        size: PageSize,
        perms: Perms,
    ) -> Result<TlbFlush, SlatError> {
        self.check(gpa, size)?;
        let mut slot = self.lookup(fa, gpa.0, leaf_level(size));
        if slot.entry == 0 {
            return Err(SlatError::NotMapped(gpa));
        }
        let mut flush = TlbFlush::none();
        if size == PageSize::Size4K && slot.level == 2 {
            flush = self.split_slot(fa, slot)?;
            slot = self.lookup(fa, gpa.0, 1);
        }
        if is_leaf(slot.entry) {
            self.set_perms(Self::entry(fa, &slot), perms);
            return Ok(flush.merge(TlbFlush::required()));
        }
        let mut any = false;
        for e in fa.table(table_addr(slot.entry)) {
            any |= self.set_perms(e, perms);
        }
        if any {
            Ok(TlbFlush::required())
        } else {
            Err(SlatError::NotMapped(gpa))
        }
    }

    /// Sets the rights of the leaf `e`; false if `e` is empty.
    fn set_perms(&self, e: &AtomicU64, perms: Perms) -> bool {
        let f = self.format;
        let r = update(e, |old| {
            if !is_leaf(old) {
                return None;
            }
            let mut new = f.with_perms(old, perms);
            if old & TRACKED != 0 {
                if perms.write {
                    new = (new & !WRITE) | (old & WRITE);
                } else {
                    new &= !TRACKED;
                }
            }
            Some(new)
        });
        r.is_ok()
    }

    /// Free every table frame (not the mapped guest frames).
    pub fn destroy(self, fa: &mut impl FrameAccess) {
        fn free(fa: &mut impl FrameAccess, table: Hpa, level: u8) {
            if level > 1 {
                for i in 0..512 {
                    let e = fa.table(table)[i].load(Ordering::Acquire);
                    if is_table(e) {
                        free(fa, table_addr(e), level - 1);
                    }
                }
            }
            fa.free_table(table);
        }
        free(fa, self.root, 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_2M;
    use crate::sim::{guest_read, guest_write, walk_path, FakeMemory, Fault};

    const GIB: u64 = 1 << 30;
    /// Host frames backing guest memory start here.
    const HOST: u64 = 0x10_0000_0000;
    const FORMATS: [Format; 2] = [Format::Ept, Format::Npt];

    fn setup(format: Format) -> (Slat, FakeMemory) {
        let mut fa = FakeMemory::new();
        let slat = Slat::new(format, &mut fa, Gpa(4 * GIB)).unwrap();
        (slat, fa)
    }

    fn map(slat: &mut Slat, fa: &mut FakeMemory, gpa: u64, size: PageSize, perms: Perms) {
        slat.map(fa, Gpa(gpa), Hpa(HOST + gpa), size, perms).unwrap().done();
    }

    #[test]
    fn map_translate_unmap_4k_in_both_formats() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x1234_5000, PageSize::Size4K, Perms::RX);
            assert_eq!(
                slat.translate(&fa, Gpa(0x1234_5678)),
                Some((Hpa(HOST + 0x1234_5678), PageSize::Size4K, Perms::RX)),
                "{f:?}"
            );
            assert_eq!(slat.translate(&fa, Gpa(0x1234_6000)), None);
            assert_eq!(slat.translate(&fa, Gpa(0x1234_4FFF)), None);
            let flush = slat.unmap(&mut fa, Gpa(0x1234_5000), PageSize::Size4K).unwrap();
            assert!(flush.needed());
            flush.done();
            assert_eq!(slat.translate(&fa, Gpa(0x1234_5678)), None);
        }
    }

    #[test]
    fn map_translate_unmap_2m_in_both_formats() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x4000_0000, PageSize::Size2M, Perms::RWX);
            for off in [0, 0x1000, 0x1F_FFFF] {
                assert_eq!(
                    slat.translate(&fa, Gpa(0x4000_0000 + off)),
                    Some((Hpa(HOST + 0x4000_0000 + off), PageSize::Size2M, Perms::RWX)),
                    "{f:?}"
                );
            }
            assert_eq!(slat.translate(&fa, Gpa(0x4020_0000)), None);
            slat.unmap(&mut fa, Gpa(0x4000_0000), PageSize::Size2M).unwrap().done();
            assert_eq!(slat.translate(&fa, Gpa(0x4000_0000)), None);
        }
    }

    #[test]
    fn new_mapping_needs_no_flush() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            let flush = slat.map(&mut fa, Gpa(0), Hpa(HOST), PageSize::Size4K, Perms::RWX).unwrap();
            assert!(!flush.needed());
            flush.done();
        }
    }

    #[test]
    fn hardware_walk_accepts_the_entries_and_faults_as_the_rights_say() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::R);
            map(&mut slat, &mut fa, 0x2000, PageSize::Size4K, Perms::NONE);
            assert_eq!(guest_write(&slat, &fa, Gpa(0x20_0123)), Ok(Hpa(HOST + 0x20_0123)), "{f:?}");
            assert_eq!(guest_read(&slat, &fa, Gpa(0x1FFF)), Ok(Hpa(HOST + 0x1FFF)));
            assert_eq!(guest_write(&slat, &fa, Gpa(0x1000)), Err(Fault::Write(1)));
            assert_eq!(guest_read(&slat, &fa, Gpa(0x2000)), Err(Fault::NotPresent(1)));
            assert_eq!(guest_read(&slat, &fa, Gpa(0x3000)), Err(Fault::NotPresent(1)));
            assert_eq!(guest_read(&slat, &fa, Gpa(GIB)), Err(Fault::NotPresent(3)));
            // The no-rights leaf keeps its frame for software.
            assert_eq!(slat.translate(&fa, Gpa(0x2000)), Some((Hpa(HOST + 0x2000), PageSize::Size4K, Perms::NONE)));
        }
    }

    #[test]
    fn misaligned_addresses_are_refused() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            let e = |r: Result<TlbFlush, SlatError>| r.unwrap_err();
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0x1001), Hpa(HOST), PageSize::Size4K, Perms::RWX)),
                SlatError::Unaligned
            );
            assert_eq!(e(slat.map(&mut fa, Gpa(0), Hpa(HOST + 8), PageSize::Size4K, Perms::RWX)), SlatError::Unaligned);
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0x1000), Hpa(HOST), PageSize::Size2M, Perms::RWX)),
                SlatError::Unaligned
            );
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0), Hpa(HOST + 0x1000), PageSize::Size2M, Perms::RWX)),
                SlatError::Unaligned
            );
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0), Hpa(1 << 52), PageSize::Size4K, Perms::RWX)),
                SlatError::Unaligned,
                "host address beyond 52 bits"
            );
            assert_eq!(e(slat.unmap(&mut fa, Gpa(0x1000), PageSize::Size2M)), SlatError::Unaligned);
            assert_eq!(e(slat.protect(&mut fa, Gpa(0x10), PageSize::Size4K, Perms::R)), SlatError::Unaligned);
        }
    }

    #[test]
    fn overlapping_maps_report_already_mapped() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            map(&mut slat, &mut fa, 0x5000, PageSize::Size4K, Perms::RWX);
            let e = |r: Result<TlbFlush, SlatError>| r.unwrap_err();
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0x5000), Hpa(HOST), PageSize::Size4K, Perms::RWX)),
                SlatError::AlreadyMapped(Gpa(0x5000))
            );
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0x20_3000), Hpa(HOST), PageSize::Size4K, Perms::RWX)),
                SlatError::AlreadyMapped(Gpa(0x20_3000)),
                "4 KiB inside a 2 MiB leaf"
            );
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0x20_0000), Hpa(HOST), PageSize::Size2M, Perms::RWX)),
                SlatError::AlreadyMapped(Gpa(0x20_0000))
            );
            assert_eq!(
                e(slat.map(&mut fa, Gpa(0), Hpa(HOST), PageSize::Size2M, Perms::RWX)),
                SlatError::AlreadyMapped(Gpa(0x5000)),
                "2 MiB over a page table names the first mapped page"
            );
            // Nothing changed.
            assert_eq!(slat.translate(&fa, Gpa(0x5000)), Some((Hpa(HOST + 0x5000), PageSize::Size4K, Perms::RWX)));
        }
    }

    #[test]
    fn unmapped_addresses_report_not_mapped() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x5000, PageSize::Size4K, Perms::RWX);
            let e = |r: Result<TlbFlush, SlatError>| r.unwrap_err();
            assert_eq!(e(slat.unmap(&mut fa, Gpa(0x6000), PageSize::Size4K)), SlatError::NotMapped(Gpa(0x6000)));
            assert_eq!(e(slat.unmap(&mut fa, Gpa(GIB), PageSize::Size4K)), SlatError::NotMapped(Gpa(GIB)));
            assert_eq!(e(slat.unmap(&mut fa, Gpa(0x20_0000), PageSize::Size2M)), SlatError::NotMapped(Gpa(0x20_0000)));
            assert_eq!(e(slat.split(&mut fa, Gpa(0x40_0000))), SlatError::NotMapped(Gpa(0x40_0000)));
            assert_eq!(
                e(slat.protect(&mut fa, Gpa(0x7000), PageSize::Size4K, Perms::R)),
                SlatError::NotMapped(Gpa(0x7000))
            );
            slat.unmap(&mut fa, Gpa(0x5000), PageSize::Size4K).unwrap().done();
            assert_eq!(e(slat.unmap(&mut fa, Gpa(0x5000), PageSize::Size4K)), SlatError::NotMapped(Gpa(0x5000)));
            assert_eq!(e(slat.unmap(&mut fa, Gpa(0), PageSize::Size2M)), SlatError::NotMapped(Gpa(0)), "empty table");
            assert_eq!(
                e(slat.protect(&mut fa, Gpa(0), PageSize::Size2M, Perms::R)),
                SlatError::NotMapped(Gpa(0)),
                "empty table"
            );
        }
    }

    #[test]
    fn addresses_beyond_the_limit_are_out_of_range() {
        for f in FORMATS {
            let mut fa = FakeMemory::new();
            let mut slat = Slat::new(f, &mut fa, Gpa(64 << 20)).unwrap();
            assert_eq!(slat.limit(), Gpa(64 << 20));
            let last = (64 << 20) - PAGE_4K;
            map(&mut slat, &mut fa, last, PageSize::Size4K, Perms::RWX);
            let e = |r: Result<TlbFlush, SlatError>| r.unwrap_err();
            assert_eq!(
                e(slat.map(&mut fa, Gpa(64 << 20), Hpa(HOST), PageSize::Size4K, Perms::RWX)),
                SlatError::OutOfRange(Gpa(64 << 20))
            );
            assert_eq!(
                e(slat.map(&mut fa, Gpa(!0x1F_FFFF), Hpa(HOST), PageSize::Size2M, Perms::RWX)),
                SlatError::OutOfRange(Gpa(!0x1F_FFFF)),
                "no overflow"
            );
            assert_eq!(e(slat.unmap(&mut fa, Gpa(64 << 20), PageSize::Size4K)), SlatError::OutOfRange(Gpa(64 << 20)));
            assert_eq!(e(slat.split(&mut fa, Gpa(64 << 20))), SlatError::OutOfRange(Gpa(64 << 20)));
            assert_eq!(slat.translate(&fa, Gpa(64 << 20)), None);
            assert!(matches!(Slat::new(f, &mut fa, Gpa((1 << 48) + 1)), Err(SlatError::OutOfRange(_))));
        }
    }

    #[test]
    fn capped_memory_reports_out_of_memory() {
        for f in FORMATS {
            let mut fa = FakeMemory::with_cap(0);
            assert!(matches!(Slat::new(f, &mut fa, Gpa(GIB)), Err(SlatError::OutOfMemory)));
            // Root + PDPT + PD fit, the page table does not.
            let mut fa = FakeMemory::with_cap(3);
            let mut slat = Slat::new(f, &mut fa, Gpa(GIB)).unwrap();
            assert_eq!(
                slat.map(&mut fa, Gpa(0x1000), Hpa(HOST), PageSize::Size4K, Perms::RWX).unwrap_err(),
                SlatError::OutOfMemory
            );
            // A 2 MiB leaf needs no page table.
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            assert_eq!(slat.split(&mut fa, Gpa(0x20_0000)).unwrap_err(), SlatError::OutOfMemory);
            assert_eq!(slat.translate(&fa, Gpa(0x20_0000)).unwrap().1, PageSize::Size2M, "unchanged");
            fa.set_cap(None);
            slat.destroy(&mut fa);
            assert_eq!(fa.live(), 0);
        }
    }

    #[test]
    fn split_keeps_every_page_translation_and_rights() {
        for f in FORMATS {
            for perms in [Perms::RWX, Perms::RX, Perms::R] {
                let (mut slat, mut fa) = setup(f);
                map(&mut slat, &mut fa, 0x60_0000, PageSize::Size2M, perms);
                let flush = slat.split(&mut fa, Gpa(0x60_1234)).unwrap();
                assert!(flush.needed());
                flush.done();
                for i in 0..512 {
                    let gpa = 0x60_0000 + i * PAGE_4K + 0x10;
                    assert_eq!(
                        slat.translate(&fa, Gpa(gpa)),
                        Some((Hpa(HOST + gpa), PageSize::Size4K, perms)),
                        "{f:?} page {i}"
                    );
                    assert_eq!(guest_read(&slat, &fa, Gpa(gpa)), Ok(Hpa(HOST + gpa)));
                }
                let again = slat.split(&mut fa, Gpa(0x60_0000)).unwrap();
                assert!(!again.needed(), "already 4 KiB");
                again.done();
            }
        }
    }

    #[test]
    fn split_all_splits_every_large_leaf() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            for gpa in [0, 0x20_0000, 0x4000_0000, 0x8020_0000] {
                map(&mut slat, &mut fa, gpa, PageSize::Size2M, Perms::RWX);
            }
            map(&mut slat, &mut fa, 0x60_0000, PageSize::Size4K, Perms::RWX);
            slat.split_all(&mut fa).unwrap().done();
            for gpa in [0, 0x20_0000, 0x4000_0000, 0x8020_0000] {
                assert_eq!(slat.translate(&fa, Gpa(gpa + 0x1F_F000)).unwrap().1, PageSize::Size4K);
            }
            let none = slat.split_all(&mut fa).unwrap();
            assert!(!none.needed());
            none.done();
        }
    }

    #[test]
    fn split_merges_a_dirty_bit_set_while_it_builds_the_table() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            let (pd, idx, _) = *walk_path(&slat, &fa, Gpa(0x20_0000)).last().unwrap();
            // The processor writes the page while split allocates the table.
            fa.poke_on_next_alloc(pd, idx, f.dirty() | f.accessed());
            slat.split(&mut fa, Gpa(0x20_0000)).unwrap().done();
            for i in 0..512 {
                let (_, _, e) = *walk_path(&slat, &fa, Gpa(0x20_0000 + i * PAGE_4K)).last().unwrap();
                assert_ne!(e & f.dirty(), 0, "{f:?} page {i} lost D");
                assert_ne!(e & f.accessed(), 0, "{f:?} page {i} lost A");
            }
        }
    }

    #[test]
    fn unmapping_4k_inside_a_large_leaf_splits_it() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RX);
            slat.unmap(&mut fa, Gpa(0x20_5000), PageSize::Size4K).unwrap().done();
            assert_eq!(slat.translate(&fa, Gpa(0x20_5000)), None);
            assert_eq!(slat.translate(&fa, Gpa(0x20_4000)), Some((Hpa(HOST + 0x20_4000), PageSize::Size4K, Perms::RX)));
            assert_eq!(slat.translate(&fa, Gpa(0x20_6000)), Some((Hpa(HOST + 0x20_6000), PageSize::Size4K, Perms::RX)));
        }
    }

    #[test]
    fn unmapping_2m_over_a_page_table_removes_its_pages_and_frees_it() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            slat.split(&mut fa, Gpa(0x20_0000)).unwrap().done();
            let live = fa.live();
            slat.unmap(&mut fa, Gpa(0x20_0000), PageSize::Size2M).unwrap().done();
            assert_eq!(fa.live(), live - 1);
            assert_eq!(slat.translate(&fa, Gpa(0x20_0000)), None);
            assert_eq!(slat.translate(&fa, Gpa(0x3F_F000)), None);
            // The slot takes a 2 MiB leaf again.
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
        }
    }

    #[test]
    fn a_large_leaf_replaces_an_emptied_page_table() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            slat.unmap(&mut fa, Gpa(0x1000), PageSize::Size4K).unwrap().done();
            let live = fa.live();
            let flush = slat.map(&mut fa, Gpa(0), Hpa(HOST), PageSize::Size2M, Perms::RWX).unwrap();
            assert!(flush.needed(), "the freed table may be cached");
            flush.done();
            assert_eq!(fa.live(), live - 1);
            assert_eq!(slat.translate(&fa, Gpa(0x1000)).unwrap().1, PageSize::Size2M);
        }
    }

    #[test]
    fn protect_changes_rights_and_keeps_the_frame() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x20_0000, PageSize::Size2M, Perms::RWX);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            slat.protect(&mut fa, Gpa(0x1000), PageSize::Size4K, Perms::R).unwrap().done();
            assert_eq!(guest_write(&slat, &fa, Gpa(0x1000)), Err(Fault::Write(1)));
            assert_eq!(slat.translate(&fa, Gpa(0x1000)), Some((Hpa(HOST + 0x1000), PageSize::Size4K, Perms::R)));
            // 4 KiB inside a 2 MiB leaf: split, only that page changes.
            slat.protect(&mut fa, Gpa(0x20_3000), PageSize::Size4K, Perms::NONE).unwrap().done();
            assert_eq!(guest_read(&slat, &fa, Gpa(0x20_3000)), Err(Fault::NotPresent(1)));
            assert_eq!(guest_write(&slat, &fa, Gpa(0x20_4000)), Ok(Hpa(HOST + 0x20_4000)));
            // 2 MiB over the page table: every page.
            slat.protect(&mut fa, Gpa(0x20_0000), PageSize::Size2M, Perms::RX).unwrap().done();
            for i in 0..512 {
                assert_eq!(slat.translate(&fa, Gpa(0x20_0000 + i * PAGE_4K)).unwrap().2, Perms::RX);
            }
        }
    }

    #[test]
    fn protect_keeps_accessed_and_dirty_bits() {
        for f in FORMATS {
            let (mut slat, mut fa) = setup(f);
            map(&mut slat, &mut fa, 0x1000, PageSize::Size4K, Perms::RWX);
            guest_write(&slat, &fa, Gpa(0x1000)).unwrap();
            slat.protect(&mut fa, Gpa(0x1000), PageSize::Size4K, Perms::R).unwrap().done();
            let (_, _, e) = *walk_path(&slat, &fa, Gpa(0x1000)).last().unwrap();
            assert_eq!(e & (f.dirty() | f.accessed()), f.dirty() | f.accessed());
        }
    }

    #[test]
    fn destroy_frees_every_table() {
        for f in FORMATS {
            let mut fa = FakeMemory::new();
            let mut slat = Slat::new(f, &mut fa, Gpa(1 << 40)).unwrap();
            for gpa in [0, 0x1000, 0x20_0000, 0x4000_0000, 0x80_0000_0000 + 0x1000] {
                let size = if gpa % PAGE_2M == 0 && gpa != 0 { PageSize::Size2M } else { PageSize::Size4K };
                map(&mut slat, &mut fa, gpa, size, Perms::RWX);
            }
            slat.split_all(&mut fa).unwrap().done();
            assert!(fa.live() > 5);
            slat.destroy(&mut fa);
            assert_eq!(fa.live(), 0, "{f:?}");
        }
    }

    #[test]
    fn eptp_has_root_wb_walk_length_and_ad_bit() {
        let (slat, _fa) = setup(Format::Ept);
        let root = slat.root().0;
        assert_eq!(slat.eptp(false), root | 0x1E);
        assert_eq!(slat.eptp(true), root | 0x5E);
    }

    #[test]
    fn tlb_flush_tokens_merge_and_report() {
        assert!(!TlbFlush::none().needed());
        assert!(TlbFlush::required().needed());
        assert!(!TlbFlush::none().merge(TlbFlush::none()).needed());
        assert!(TlbFlush::none().merge(TlbFlush::required()).needed());
        assert!(TlbFlush::required().merge(TlbFlush::none()).needed());
        TlbFlush::required().done();
    }
}

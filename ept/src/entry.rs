//! The two entry formats: Intel EPT (SDM Vol 3C 29.3.2, tables 29-1..29-6)
//! and AMD NPT, which is the x86-64 long-mode page-table format (AMD APM
//! Vol 2 15.25 "Nested Paging", 5.4 "Long-Mode Page Translation"). This module
//! owns every bit position; the rest of the crate asks it to build and decode
//! entries.
//!
//! | bit | EPT | NPT |
//! |---|---|---|
//! | 0 | R | P |
//! | 1 | W | RW |
//! | 2 | X | US (always set: nested walks are user accesses) |
//! | 5:3 | memory type, 6 = WB (leaves) | 5 = A, (3,4 PWT/PCD = 0) |
//! | 6 | IPAT = 0 | D (leaves) |
//! | 7 | PS (2 MiB leaf) | PS (2 MiB leaf) |
//! | 8 | A | G = 0 |
//! | 9 | D (leaves) | available |
//! | 51:12 | address (51:21 for 2 MiB) | address (51:21 for 2 MiB) |
//! | 52 | software: write-protect tracked | available: tracked |
//! | 53 | software: leaf (see below) | available: leaf |
//! | 63 | suppress #VE = 0 | NX |
//!
//! Software bit 53 marks every leaf this crate writes, so a leaf stays
//! recognisable (and keeps its address) even when its permissions are all
//! removed and the hardware considers it not present. A zero entry is empty;
//! a non-zero entry without bit 53 is a table pointer.

use crate::addr::{Hpa, PageSize};

/// Address bits 51:12 of a table pointer or 4 KiB leaf.
pub(crate) const ADDR_4K: u64 = 0x000F_FFFF_FFFF_F000;
/// Address bits 51:21 of a 2 MiB leaf.
pub(crate) const ADDR_2M: u64 = 0x000F_FFFF_FFE0_0000;
/// Page size: the level-2 entry is a 2 MiB leaf (both formats).
pub(crate) const PS: u64 = 1 << 7;
/// Write permission (EPT W, NPT RW): bit 1 in both formats.
pub(crate) const WRITE: u64 = 1 << 1;
/// Software bit: the leaf is write-protected for dirty tracking.
pub(crate) const TRACKED: u64 = 1 << 52;
/// Software bit: the entry is a leaf written by this crate.
pub(crate) const LEAF: u64 = 1 << 53;

const EPT_R: u64 = 1 << 0;
const EPT_W: u64 = 1 << 1;
const EPT_X: u64 = 1 << 2;
const EPT_MT_WB: u64 = 6 << 3;
const EPT_A: u64 = 1 << 8;
const EPT_D: u64 = 1 << 9;

const NPT_P: u64 = 1 << 0;
const NPT_RW: u64 = 1 << 1;
const NPT_US: u64 = 1 << 2;
const NPT_A: u64 = 1 << 5;
const NPT_D: u64 = 1 << 6;
const NPT_NX: u64 = 1 << 63;

/// Which processor's second-level table format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Intel extended page tables.
    Ept,
    /// AMD nested page tables.
    Npt,
}

/// Access rights of a leaf.
///
/// Write implies read in both formats: EPT treats write-without-read as a
/// misconfiguration and NPT cannot express it, so [`Format`] encodes
/// `write` as read+write. NPT cannot express execute-only either: any access
/// right makes the leaf present, hence readable; `translate` reports what the
/// entry really allows. Execute-only EPT leaves need the CPU's
/// execute-only capability (IA32_VMX_EPT_VPID_CAP bit 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Instruction fetches allowed.
    pub exec: bool,
}

impl Perms {
    /// Read, write and execute.
    pub const RWX: Perms = Perms { read: true, write: true, exec: true };
    /// Read and write, no execute.
    pub const RW: Perms = Perms { read: true, write: true, exec: false };
    /// Read and execute.
    pub const RX: Perms = Perms { read: true, write: false, exec: true };
    /// Read only.
    pub const R: Perms = Perms { read: true, write: false, exec: false };
    /// No access: the leaf keeps its frame but every access faults.
    pub const NONE: Perms = Perms { read: false, write: false, exec: false };
}

impl Format {
    /// The accessed bit (set by the CPU on every level it walks).
    pub(crate) const fn accessed(self) -> u64 {
        match self {
            Format::Ept => EPT_A,
            Format::Npt => NPT_A,
        }
    }

    /// The dirty bit (set by the CPU on a leaf it writes through).
    pub(crate) const fn dirty(self) -> u64 {
        match self {
            Format::Ept => EPT_D,
            Format::Npt => NPT_D,
        }
    }

    /// The bits [`Perms`] controls.
    const fn perm_mask(self) -> u64 {
        match self {
            Format::Ept => EPT_R | EPT_W | EPT_X,
            Format::Npt => NPT_P | NPT_RW | NPT_NX,
        }
    }

    fn perm_bits(self, p: Perms) -> u64 {
        let read = p.read || p.write;
        match self {
            Format::Ept => {
                (if read { EPT_R } else { 0 }) | (if p.write { EPT_W } else { 0 }) | (if p.exec { EPT_X } else { 0 })
            }
            Format::Npt => {
                (if read || p.exec { NPT_P } else { 0 })
                    | (if p.write { NPT_RW } else { 0 })
                    | (if p.exec { 0 } else { NPT_NX })
            }
        }
    }

    /// A non-leaf entry pointing at the table frame `hpa`: full rights, so the
    /// leaf alone decides (EPT R|W|X; NPT P|RW|US).
    pub(crate) fn table_entry(self, hpa: Hpa) -> u64 {
        (hpa.0 & ADDR_4K)
            | match self {
                Format::Ept => EPT_R | EPT_W | EPT_X,
                Format::Npt => NPT_P | NPT_RW | NPT_US,
            }
    }

    /// A leaf mapping `hpa` (aligned to `size`) with `perms`; A and D clear.
    pub(crate) fn leaf_entry(self, hpa: Hpa, size: PageSize, perms: Perms) -> u64 {
        let (addr, ps) = match size {
            PageSize::Size4K => (hpa.0 & ADDR_4K, 0),
            PageSize::Size2M => (hpa.0 & ADDR_2M, PS),
        };
        let fixed = match self {
            Format::Ept => EPT_MT_WB,
            Format::Npt => NPT_US,
        };
        LEAF | addr | ps | fixed | self.perm_bits(perms)
    }

    /// The rights a leaf grants.
    pub(crate) fn perms(self, e: u64) -> Perms {
        match self {
            Format::Ept => Perms { read: e & EPT_R != 0, write: e & EPT_W != 0, exec: e & EPT_X != 0 },
            Format::Npt => {
                let p = e & NPT_P != 0;
                Perms { read: p, write: p && e & NPT_RW != 0, exec: p && e & NPT_NX == 0 }
            }
        }
    }

    /// `e` with its rights replaced by `perms`; every other bit kept.
    pub(crate) fn with_perms(self, e: u64, perms: Perms) -> u64 {
        (e & !self.perm_mask()) | self.perm_bits(perms)
    }
}

/// Whether `e` is a leaf written by this crate.
pub(crate) const fn is_leaf(e: u64) -> bool {
    e & LEAF != 0
}

/// Whether `e` points at a lower-level table.
pub(crate) const fn is_table(e: u64) -> bool {
    e != 0 && e & LEAF == 0
}

/// The frame a leaf of `size` maps.
pub(crate) const fn leaf_addr(e: u64, size: PageSize) -> Hpa {
    match size {
        PageSize::Size4K => Hpa(e & ADDR_4K),
        PageSize::Size2M => Hpa(e & ADDR_2M),
    }
}

/// The table a non-leaf entry points at.
pub(crate) const fn table_addr(e: u64) -> Hpa {
    Hpa(e & ADDR_4K)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_leaf_has_rights_wb_type_and_ps() {
        let e = Format::Ept.leaf_entry(Hpa(0x20_0000), PageSize::Size2M, Perms::RWX);
        assert_eq!(e, LEAF | 0x20_0000 | PS | (6 << 3) | 0b111);
        let e = Format::Ept.leaf_entry(Hpa(0x5000), PageSize::Size4K, Perms::RX);
        assert_eq!(e, LEAF | 0x5000 | (6 << 3) | 0b101);
    }

    #[test]
    fn npt_leaf_has_user_bit_and_nx_when_not_executable() {
        let e = Format::Npt.leaf_entry(Hpa(0x5000), PageSize::Size4K, Perms::R);
        assert_eq!(e, LEAF | 0x5000 | 0b101 | (1 << 63));
        let e = Format::Npt.leaf_entry(Hpa(0x40_0000), PageSize::Size2M, Perms::RWX);
        assert_eq!(e, LEAF | 0x40_0000 | PS | 0b111);
    }

    #[test]
    fn table_entries_grant_everything() {
        assert_eq!(Format::Ept.table_entry(Hpa(0x7000)), 0x7007);
        assert_eq!(Format::Npt.table_entry(Hpa(0x7000)), 0x7007);
        assert!(is_table(0x7007));
        assert!(!is_leaf(0x7007));
        assert_eq!(table_addr(0x7007), Hpa(0x7000));
    }

    #[test]
    fn write_implies_read_in_both_formats() {
        let wo = Perms { read: false, write: true, exec: false };
        for f in [Format::Ept, Format::Npt] {
            let e = f.leaf_entry(Hpa(0x1000), PageSize::Size4K, wo);
            assert_eq!(f.perms(e), Perms::RW, "{f:?}");
        }
    }

    #[test]
    fn perms_round_trip_and_with_perms_keeps_other_bits() {
        for f in [Format::Ept, Format::Npt] {
            for p in [Perms::RWX, Perms::RW, Perms::RX, Perms::R, Perms::NONE] {
                let e = f.leaf_entry(Hpa(0x20_0000), PageSize::Size2M, Perms::RWX) | f.dirty() | f.accessed() | TRACKED;
                let e2 = f.with_perms(e, p);
                assert_eq!(f.perms(e2), p, "{f:?} {p:?}");
                assert_eq!(
                    e2 & (f.dirty() | f.accessed() | TRACKED | LEAF | PS),
                    e & (f.dirty() | f.accessed() | TRACKED | LEAF | PS)
                );
                assert_eq!(leaf_addr(e2, PageSize::Size2M), Hpa(0x20_0000));
            }
        }
    }

    #[test]
    fn npt_cannot_express_execute_only() {
        let xo = Perms { read: false, write: false, exec: true };
        let e = Format::Npt.leaf_entry(Hpa(0x1000), PageSize::Size4K, xo);
        assert_eq!(Format::Npt.perms(e), Perms::RX);
        let e = Format::Ept.leaf_entry(Hpa(0x1000), PageSize::Size4K, xo);
        assert_eq!(Format::Ept.perms(e), xo);
    }

    #[test]
    fn no_rights_leaf_is_not_present_to_hardware_but_still_a_leaf() {
        let e = Format::Ept.leaf_entry(Hpa(0x1000), PageSize::Size4K, Perms::NONE);
        assert_eq!(e & 0b111, 0);
        assert!(is_leaf(e));
        let e = Format::Npt.leaf_entry(Hpa(0x1000), PageSize::Size4K, Perms::NONE);
        assert_eq!(e & 1, 0);
        assert!(is_leaf(e));
    }
}

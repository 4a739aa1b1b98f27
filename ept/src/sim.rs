//! Host-side simulation for the unit tests and the `harvest` benchmark (which
//! includes this file with `#[path]`): a fake physical memory of table frames
//! and a fake processor that walks the tables the way the hardware does.
//!
//! The walk is written from the manuals (Intel SDM Vol 3C 29.3.2 and 29.3.5,
//! AMD APM Vol 2 15.25 and 5.4), independently of the crate's `entry` module,
//! so encoding mistakes there show up as faults or wrong addresses here. It
//! only uses the crate's public API (`Slat::root`, `Slat::format`,
//! `FrameAccess::table`).
#![allow(dead_code)]

use core::sync::atomic::{AtomicU64, Ordering};
use std::boxed::Box;
use std::vec::Vec;

use crate::{Format, FrameAccess, Gpa, Hpa, Slat};

/// Host-physical address of the first fake table frame (512 GiB, far from
/// the guest frames the tests map).
pub const TABLE_BASE: u64 = 0x80_0000_0000;

const ADDR: u64 = 0x000F_FFFF_FFFF_F000;

/// An arena of table frames. Freed frames are never handed out again, so a
/// use after free panics instead of reading a recycled table.
#[derive(Default)]
pub struct FakeMemory {
    frames: Vec<Option<Box<[AtomicU64; 512]>>>,
    live: usize,
    cap: Option<usize>,
    poke: Option<(Hpa, usize, u64)>,
}

impl FakeMemory {
    /// Unlimited memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Memory that refuses to hold more than `tables` live table frames.
    pub fn with_cap(tables: usize) -> Self {
        FakeMemory { cap: Some(tables), ..Self::default() }
    }

    /// Changes the cap on live table frames.
    pub fn set_cap(&mut self, tables: Option<usize>) {
        self.cap = tables;
    }

    /// Table frames allocated and not freed.
    pub fn live(&self) -> usize {
        self.live
    }

    /// On the next `alloc_table`, before allocating, OR `bits` into entry
    /// `idx` of table `table`: the processor writing concurrently with the
    /// table code.
    pub fn poke_on_next_alloc(&mut self, table: Hpa, idx: usize, bits: u64) {
        self.poke = Some((table, idx, bits));
    }

    fn index(hpa: Hpa) -> usize {
        assert_eq!(hpa.0 % 4096, 0, "table address {:#x} not page aligned", hpa.0);
        assert!(hpa.0 >= TABLE_BASE, "{:#x} is not a table frame", hpa.0);
        ((hpa.0 - TABLE_BASE) / 4096) as usize
    }
}

impl FrameAccess for FakeMemory {
    fn alloc_table(&mut self) -> Option<Hpa> {
        if let Some((t, i, bits)) = self.poke.take() {
            self.table(t)[i].fetch_or(bits, Ordering::SeqCst);
        }
        if self.cap.is_some_and(|cap| self.live >= cap) {
            return None;
        }
        self.frames.push(Some(Box::new([const { AtomicU64::new(0) }; 512])));
        self.live += 1;
        Some(Hpa(TABLE_BASE + (self.frames.len() as u64 - 1) * 4096))
    }

    fn free_table(&mut self, hpa: Hpa) {
        let i = Self::index(hpa);
        assert!(self.frames[i].take().is_some(), "double free of table {:#x}", hpa.0);
        self.live -= 1;
    }

    fn table(&self, hpa: Hpa) -> &[AtomicU64; 512] {
        let i = Self::index(hpa);
        self.frames.get(i).and_then(|f| f.as_deref()).unwrap_or_else(|| panic!("table {:#x} freed or unknown", hpa.0))
    }
}

/// Why the fake processor refused an access: an EPT violation / #NPF
/// (`NotPresent`, `Write`), or an EPT misconfiguration / reserved-bit #NPF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The entry at this level (4 = root) is not present.
    NotPresent(u8),
    /// The entry at this level denies writing.
    Write(u8),
    /// The entry at this level is malformed.
    Misconfig(u8),
}

/// The processor reading the byte at `gpa`: A set on every level.
pub fn guest_read(slat: &Slat, fa: &impl FrameAccess, gpa: Gpa) -> Result<Hpa, Fault> {
    access(slat, fa, gpa, false)
}

/// The processor writing the byte at `gpa`: A set on every level, D on the
/// leaf (locked OR, as the hardware does), or the fault it would report.
pub fn guest_write(slat: &Slat, fa: &impl FrameAccess, gpa: Gpa) -> Result<Hpa, Fault> {
    access(slat, fa, gpa, true)
}

/// The (table, index, entry) triples a hardware walk of `gpa` visits, root
/// first, down to the leaf or the first non-present entry.
pub fn walk_path(slat: &Slat, fa: &impl FrameAccess, gpa: Gpa) -> Vec<(Hpa, usize, u64)> {
    let mut out = Vec::new();
    let mut table = slat.root();
    for level in (1..=4u8).rev() {
        let idx = ((gpa.0 >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize;
        let e = fa.table(table)[idx].load(Ordering::SeqCst);
        out.push((table, idx, e));
        let present = match slat.format() {
            Format::Ept => e & 0b111 != 0,
            Format::Npt => e & 1 != 0,
        };
        if !present || level == 1 || (level == 2 && e & (1 << 7) != 0) {
            break;
        }
        table = Hpa(e & ADDR);
    }
    out
}

fn access(slat: &Slat, fa: &impl FrameAccess, gpa: Gpa, write: bool) -> Result<Hpa, Fault> {
    let format = slat.format();
    let (a, d) = match format {
        Format::Ept => (1 << 8, 1 << 9),
        Format::Npt => (1 << 5, 1 << 6),
    };
    let mut path = [(Hpa(0), 0usize); 4];
    let mut table = slat.root();
    for level in (1..=4u8).rev() {
        let idx = ((gpa.0 >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize;
        path[usize::from(4 - level)] = (table, idx);
        let e = fa.table(table)[idx].load(Ordering::SeqCst);
        let writable = e & 0b10 != 0;
        match format {
            Format::Ept => {
                if e & 0b111 == 0 {
                    return Err(Fault::NotPresent(level));
                }
                if e & 0b011 == 0b010 {
                    return Err(Fault::Misconfig(level));
                }
            }
            Format::Npt => {
                if e & 1 == 0 {
                    return Err(Fault::NotPresent(level));
                }
                // Nested walks are user accesses: US clear on any level faults.
                if e & 0b100 == 0 {
                    return Err(Fault::Misconfig(level));
                }
            }
        }
        if write && !writable {
            return Err(Fault::Write(level));
        }
        let ps = e & (1 << 7) != 0;
        if ps && level != 2 {
            return Err(Fault::Misconfig(level));
        }
        if level == 1 || ps {
            if format == Format::Ept && (e >> 3) & 7 != 6 {
                return Err(Fault::Misconfig(level));
            }
            let size: u64 = if ps { 2 << 20 } else { 4096 };
            for &(t, i) in &path[..usize::from(5 - level)] {
                fa.table(t)[i].fetch_or(a, Ordering::SeqCst);
            }
            if write {
                fa.table(table)[idx].fetch_or(d, Ordering::SeqCst);
            }
            return Ok(Hpa((e & ADDR & !(size - 1)) + (gpa.0 & (size - 1))));
        }
        table = Hpa(e & ADDR);
    }
    unreachable!("the walk ends at level 1")
}

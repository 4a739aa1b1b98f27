//! The built-in test guest's contract with the hypervisor: its memory
//! layout, the shared config/status page, and the page stamp both sides
//! compute. The guest program itself is assembly in the kernel
//! (`vm/guest.rs`); everything it agrees on with the hypervisor is here, so
//! it is tested on the host.
//!
//! ```text
//! GPA 0x0000_1000  config page: hypervisor -> guest (CFG_*), guest -> hypervisor (ST_*)
//! GPA 0x0000_2000  guest PML4, 0x3000 PDPT, 0x4000.. PDs (2 MiB pages, identity)
//! GPA 0x0001_0000  guest code          GPA 0x0001_8000..0x0002_0000 stack
//! GPA 0x0010_0000  generation table: one u32 per data page
//! GPA data_start   data pages (2 MiB aligned, to the end of memory)
//! ```
//!
//! Every data page holds a stamp: word 0 = its GFN, word 1 = its generation,
//! words 2..512 = `(gfn << 32 ^ gen) ^ (i * GOLDEN)`. The guest bumps a page's
//! generation in the table, then rewrites the page; before rewriting it checks
//! the old stamp (the running self-check). A full verify checks every word.

use alloc::string::String;

/// Guest-physical address of the config/status page.
pub const CONFIG_GPA: u64 = 0x1000;
/// Guest PML4.
pub const PML4_GPA: u64 = 0x2000;
/// Guest PDPT.
pub const PDPT_GPA: u64 = 0x3000;
/// First guest PD (one per GiB).
pub const PD_GPA: u64 = 0x4000;
/// Where the guest program is loaded and starts.
pub const CODE_GPA: u64 = 0x10000;
/// Largest guest program.
pub const CODE_MAX: usize = 0x8000;
/// Initial guest RSP.
pub const STACK_TOP: u64 = 0x20000;
/// RSP for the single step of hidden `vm trap`: its #DB pushes the frame
/// on page 0x1E000, below it, which nothing else writes (the program ends
/// by `CODE_GPA + CODE_MAX`, the stack stays near `STACK_TOP`). Under
/// write-protect dirty tracking that push itself faults, so the #DB's
/// delivery is cut short by an exit and must be finished after it.
pub const TRAP_STACK: u64 = 0x1F008;
const _: () = assert!(TRAP_STACK - 0x1008 >= CODE_GPA + CODE_MAX as u64 && TRAP_STACK + 0x800 <= STACK_TOP);
/// Generation table.
pub const GEN_TABLE_GPA: u64 = 0x100000;
/// Smallest and largest guest memory, MiB (4 PDs of identity map cover 4 GiB).
pub const MIN_MEM_MIB: u64 = 16;
/// See [`MIN_MEM_MIB`].
pub const MAX_MEM_MIB: u64 = 4096;

/// Host memory a VM of `bytes` needs besides its RAM once dirty tracking
/// splits its 2 MiB mappings into 4 KiB tables: 8 bytes per page plus the
/// upper levels.
pub fn table_bytes(bytes: u64) -> u64 {
    bytes / 256
}

/// The largest guest memory, in whole 2 MiB, whose RAM and split tables
/// fit in `avail` bytes: what a destination with `avail` to spare accepts.
pub fn largest_guest(avail: u64) -> u64 {
    let fits = u128::from(avail) * 256 / 257;
    u64::try_from(fits).unwrap_or(u64::MAX) & !((2 << 20) - 1)
}

/// Config fields (byte offsets in the config page), written by the
/// hypervisor.
pub mod cfg {
    /// `HVGUEST1`.
    pub const MAGIC: u64 = 0x00;
    /// Guest memory size in bytes.
    pub const MEM_BYTES: u64 = 0x08;
    /// GPA of the first data page.
    pub const DATA_START: u64 = 0x10;
    /// Number of data pages.
    pub const DATA_PAGES: u64 = 0x18;
    /// GPA of the generation table.
    pub const GEN_TABLE: u64 = 0x20;
    /// Workload code, see [`super::Workload::code`].
    pub const WORKLOAD: u64 = 0x28;
    /// Hot-set size in pages (workload hot).
    pub const HOT_PAGES: u64 = 0x30;
    /// Page writes per second, 0 = as fast as possible.
    pub const RATE: u64 = 0x38;
    /// TSC frequency, for the guest's timing.
    pub const TSC_HZ: u64 = 0x40;
    /// Bumped by the hypervisor to ask for a full verify.
    pub const VERIFY_REQ: u64 = 0x48;
    /// Nonzero: the guest triple-faults on purpose (containment test).
    pub const CRASH_REQ: u64 = 0x50;
    /// Nonzero: the guest runs VMSAVE once (hidden `vm vmsave`, a test that
    /// SVM instructions exit to the hypervisor).
    pub const VMSAVE_REQ: u64 = 0x58;
    /// Nonzero: the guest loads a GDT of its own (at offset 0x800 of this
    /// page, its TSS at 0x900) and `ltr`s selector 0x28 once (hidden
    /// `vm ltr`, a test that guest state stays out of the host).
    pub const LTR_REQ: u64 = 0x60;
    /// Nonzero: the guest loads the GDT of `LTR_REQ` (without the `ltr`),
    /// installs an IDT with a #DB handler, sets DR6.BD, single-steps one
    /// instruction on the stack at [`TRAP_STACK`] and takes the #DB, then
    /// single-steps a CPUID (which the hypervisor emulates) and takes that
    /// #DB, then goes back to no IDT (hidden `vm trap`, a test that #DB
    /// exits and is reflected back, with DR6 as the processor would leave
    /// it, and that an emulated instruction traps as it would have run).
    pub const TRAP_REQ: u64 = 0x68;
    /// Nonzero: the guest stores XMM0's low quadword, DR0, CR2,
    /// KernelGsBase (through `swapgs` and `rdgsbase`, after setting
    /// CR4.FSGSBASE) and CR8 in `st::SEEN_XMM0`, `st::SEEN_DR0`,
    /// `st::SEEN_CR2`, `st::SEEN_KERNEL_GS_BASE` and `st::SEEN_CR8`, then
    /// loads this value into each, its low 4 bits into CR8 (hidden `vm
    /// regs`, a test that each guest's registers that no VM transition
    /// switches are its own, and that a migration carries them).
    pub const REGS_REQ: u64 = 0x70;
    /// Nonzero: the guest sets off an endless chain of #DB exceptions (a
    /// write breakpoint on the slot of its #DB stack that delivering a #DB
    /// writes) and never comes back from it (hidden `vm dbchain`, a test
    /// that such a guest cannot hold the host: CVE-2015-8104).
    pub const DBCHAIN_REQ: u64 = 0x78;
    /// Nonzero: the guest loads the GDT of `LTR_REQ` and an IDT whose #UD
    /// and #GP handlers note the vector and go on after the instruction,
    /// runs each of [`super::INSNS`] once (XSETBV with CR4.OSXSAVE set,
    /// else it raises #UD without an exit; the last, a MOV to CR4 that
    /// sets VMXE, only if the request has bit 1 set), notes in `st::INSN_FAULTS`
    /// what it raised, then goes back to no IDT (hidden `vm insns`, a test that
    /// they exit and the hypervisor answers as a CPU whose CPUID offers
    /// nothing).
    pub const INSNS_REQ: u64 = 0x80;
}

/// Status fields, written by the guest.
pub mod st {
    /// Heartbeat count (10 per second of guest time).
    pub const TICKS: u64 = 0x100;
    /// Pages rewritten.
    pub const WRITES: u64 = 0x108;
    /// Stamps found wrong by the running self-check.
    pub const CHECK_ERRORS: u64 = 0x110;
    /// Data page index + 1 being rewritten right now, 0 when none.
    pub const IN_FLIGHT: u64 = 0x118;
    /// Equals `VERIFY_REQ` once the requested verify is done.
    pub const VERIFY_DONE: u64 = 0x120;
    /// Pages the last verify found wrong.
    pub const VERIFY_BAD: u64 = 0x128;
    /// Index of the first wrong page, `u64::MAX` for none.
    pub const VERIFY_FIRST_BAD: u64 = 0x130;
    /// Sweep cursor.
    pub const CURSOR: u64 = 0x138;
    /// PRNG state.
    pub const RNG: u64 = 0x140;
    /// Guest TSC at which the guest wants to run again when it executes
    /// `HLT` (its next heartbeat or page write). The guest has no
    /// interrupts: the hypervisor treats `HLT` as "wait until this TSC",
    /// and resumes it at the first host tick past it, or at once when a
    /// request (verify, crash) is pending.
    pub const WAKE_TSC: u64 = 0x148;
    /// Data pages the last verify checked (all of them, unless its layout
    /// in the config page is wrong).
    pub const VERIFY_PAGES: u64 = 0x150;
    /// #DB exceptions the guest's own handler took (`vm trap`).
    pub const TRAPS: u64 = 0x158;
    /// DR6 as the guest's #DB handler read it (`vm trap`; BS, bit 14, says
    /// single-step).
    pub const TRAP_DR6: u64 = 0x160;
    /// XMM0's low quadword as the guest found it (`vm regs`).
    pub const SEEN_XMM0: u64 = 0x168;
    /// DR0 as the guest found it (`vm regs`).
    pub const SEEN_DR0: u64 = 0x170;
    /// CR2 as the guest found it (`vm regs`).
    pub const SEEN_CR2: u64 = 0x178;
    /// KernelGsBase as the guest found it (`vm regs`).
    pub const SEEN_KERNEL_GS_BASE: u64 = 0x180;
    /// CR8, the task priority, as the guest found it (`vm regs`).
    pub const SEEN_CR8: u64 = 0x188;
    /// What each of [`super::INSNS`] raised, a byte each in that order:
    /// the vector, 0xFF for nothing (`vm insns`).
    pub const INSN_FAULTS: u64 = 0x190;
    /// The RIP the last #DB of `vm trap` returned to.
    pub const TRAP_RIP: u64 = 0x198;
    /// Where the #DB after `vm trap`'s CPUID must return to: right after it.
    pub const TRAP_RIP_WANTED: u64 = 0x1A0;
}

/// The instructions hidden `vm insns` runs, in order (`st::INSN_FAULTS`).
pub const INSNS: [&str; 8] = ["invd", "wbinvd", "rdpmc", "rdtscp", "monitor", "mwait", "xsetbv", "mov_cr4_vmxe"];

/// Port the guest's heartbeat goes out on (`OUT 0xE0, AL`).
pub const PORT_HEARTBEAT: u16 = 0xE0;
/// Port the guest reports a finished verify on.
pub const PORT_VERIFY: u16 = 0xE1;
/// Config page magic.
pub const MAGIC: u64 = u64::from_le_bytes(*b"HVGUEST1");
/// Multiplier of the stamp pattern.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// What the guest does between heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Only heartbeats.
    Idle,
    /// Rewrite pages in order, wrapping around.
    Sweep,
    /// Rewrite pages picked at random.
    Random,
    /// Rewrite pages picked at random among the first `n`.
    Hot(u64),
}

impl Workload {
    /// The code the guest reads from `cfg::WORKLOAD`.
    pub fn code(self) -> u64 {
        match self {
            Workload::Idle => 0,
            Workload::Sweep => 1,
            Workload::Random => 2,
            Workload::Hot(_) => 3,
        }
    }

    /// Parses `idle`, `sweep`, `random` or `hot:<pages>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Workload::Idle),
            "sweep" => Ok(Workload::Sweep),
            "random" => Ok(Workload::Random),
            _ => match s.strip_prefix("hot:").map(str::parse::<u64>) {
                Some(Ok(n)) if n >= 1 => Ok(Workload::Hot(n)),
                _ => Err(alloc::format!("bad workload '{s}': idle, sweep, random or hot:<pages> (pages >= 1)")),
            },
        }
    }

    /// Name as `parse` takes it.
    pub fn describe(self) -> String {
        match self {
            Workload::Idle => String::from("idle"),
            Workload::Sweep => String::from("sweep"),
            Workload::Random => String::from("random"),
            Workload::Hot(n) => alloc::format!("hot:{n}"),
        }
    }
}

/// Where things are in a guest of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// First data page.
    pub data_start: u64,
    /// Number of data pages.
    pub data_pages: u64,
}

impl Layout {
    /// The layout of a guest with `mem_mib` MiB. The generation table gets one
    /// u32 for every page of memory (an upper bound), data starts at the next
    /// 2 MiB boundary.
    pub fn new(mem_mib: u64) -> Self {
        let mem_bytes = mem_mib << 20;
        let table_end = GEN_TABLE_GPA + (mem_bytes / 4096) * 4;
        let data_start = table_end.div_ceil(2 << 20) * (2 << 20);
        Layout { mem_bytes, data_start, data_pages: (mem_bytes - data_start) / 4096 }
    }

    /// GFN of data page `index`.
    pub fn gfn(&self, index: u64) -> u64 {
        (self.data_start >> 12) + index
    }

    /// Data page index of `gfn`, if it is a data page.
    pub fn index(&self, gfn: u64) -> Option<u64> {
        let first = self.data_start >> 12;
        (gfn >= first && gfn < first + self.data_pages).then(|| gfn - first)
    }
}

/// Word `i` of the stamp of page `gfn` at generation `gen`.
pub fn stamp_word(gfn: u64, gen: u32, i: usize) -> u64 {
    match i {
        0 => gfn,
        1 => u64::from(gen),
        _ => ((gfn << 32) ^ u64::from(gen)) ^ (i as u64).wrapping_mul(GOLDEN),
    }
}

/// Fills `page` with the stamp of (`gfn`, `gen`).
pub fn stamp(page: &mut [u64; 512], gfn: u64, gen: u32) {
    for (i, w) in page.iter_mut().enumerate() {
        *w = stamp_word(gfn, gen, i);
    }
}

/// Whether `page` holds exactly the stamp of (`gfn`, `gen`).
pub fn stamp_ok(page: &[u64; 512], gfn: u64, gen: u32) -> bool {
    page.iter().enumerate().all(|(i, &w)| w == stamp_word(gfn, gen, i))
}

/// The PD entries of the guest's identity map: 2 MiB pages, present,
/// writable. Entry `n` maps GPA `n * 2 MiB`.
pub fn pd_entry(n: u64) -> u64 {
    (n << 21) | 0x83
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_guest_is_the_largest_that_fits_with_its_tables() {
        for avail in [0, 1 << 20, 2 << 20, (2 << 20) + (8 << 10), 100 << 20, (4 << 30) + (16 << 20), u64::MAX / 2] {
            let m = largest_guest(avail);
            assert_eq!(m % (2 << 20), 0, "{avail}");
            assert!(m + table_bytes(m) <= avail, "{avail}: {m} does not fit");
            let next = m + (2 << 20);
            assert!(next + table_bytes(next) > avail, "{avail}: {next} would fit too");
        }
    }

    #[test]
    fn layout_leaves_room_for_the_generation_table() {
        let l = Layout::new(16);
        assert_eq!(l.data_start, 2 << 20);
        assert_eq!(l.data_pages, (14 << 20) / 4096);
        let big = Layout::new(4096);
        assert!(GEN_TABLE_GPA + big.data_pages * 4 <= big.data_start);
        assert_eq!(big.data_start % (2 << 20), 0);
        assert_eq!(l.index(l.gfn(5)), Some(5));
        assert_eq!(l.index(l.gfn(0) - 1), None);
        assert_eq!(l.index(l.gfn(l.data_pages)), None);
    }

    #[test]
    fn stamps_check_every_word() {
        let mut page = [0u64; 512];
        stamp(&mut page, 0x1234, 7);
        assert!(stamp_ok(&page, 0x1234, 7));
        assert!(!stamp_ok(&page, 0x1234, 8));
        assert!(!stamp_ok(&page, 0x1235, 7));
        page[300] ^= 1;
        assert!(!stamp_ok(&page, 0x1234, 7));
    }

    #[test]
    fn workloads_parse_and_print() {
        for w in ["idle", "sweep", "random", "hot:64"] {
            assert_eq!(Workload::parse(w).unwrap().describe(), w);
        }
        for bad in ["hot:", "hot:0", "hot:x", "busy", ""] {
            assert!(Workload::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Workload::Hot(3).code(), 3);
    }
}

//! AMD SVM: the VMCB layout, the guest setup our VMs use, and exit decoding.
//!
//! Follows AMD APM Vol. 2, chapter 15 "Secure Virtual Machine" and Appendix B
//! "Layout of VMCB" (Table B-1 control area, Table B-2 state save area). The
//! VMCB is plain data here; `VMRUN` itself lives in the kernel's `arch/svm.rs`.

use crate::exit::{Access, Insn, VmExit};

/// A segment register in the VMCB state save area (APM Table B-2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Packed attributes: type[3:0], S[4], DPL[6:5], P[7], AVL[8], L[9],
    /// D/B[10], G[11].
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

/// Control area (APM Table B-1), offsets 0x000..0x400.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ControlArea {
    /// 0x000: CR0-15 read (bits 15:0) and write (31:16) intercepts.
    pub intercept_cr: u32,
    /// 0x004: DR read/write intercepts.
    pub intercept_dr: u32,
    /// 0x008: exception intercepts, one bit per vector.
    pub intercept_exceptions: u32,
    /// 0x00C: INTR, NMI, ..., SHUTDOWN intercepts (see [`intercept`]).
    pub intercept_misc1: u32,
    /// 0x010: VMRUN, VMMCALL, ... intercepts (see [`intercept2`]).
    pub intercept_misc2: u32,
    /// 0x014: more intercepts.
    pub intercept_misc3: u32,
    _reserved1: [u8; 0x3C - 0x18],
    /// 0x03C: PAUSE filter threshold.
    pub pause_filter_threshold: u16,
    /// 0x03E: PAUSE filter count.
    pub pause_filter_count: u16,
    /// 0x040: physical address of the I/O permission map (12 KiB).
    pub iopm_base_pa: u64,
    /// 0x048: physical address of the MSR permission map (8 KiB).
    pub msrpm_base_pa: u64,
    /// 0x050: TSC offset.
    pub tsc_offset: u64,
    /// 0x058: guest ASID.
    pub guest_asid: u32,
    /// 0x05C: TLB control (see [`tlb_control`]).
    pub tlb_control: u8,
    _reserved2: [u8; 3],
    /// 0x060: V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING (bit 24),
    /// V_INTR_VECTOR.
    pub vintr: u64,
    /// 0x068: interrupt shadow.
    pub interrupt_shadow: u64,
    /// 0x070: exit code.
    pub exit_code: u64,
    /// 0x078: EXITINFO1.
    pub exit_info1: u64,
    /// 0x080: EXITINFO2.
    pub exit_info2: u64,
    /// 0x088: EXITINTINFO.
    pub exit_int_info: u64,
    /// 0x090: bit 0 enables nested paging.
    pub np_enable: u64,
    /// 0x098: AVIC APIC BAR.
    pub avic_apic_bar: u64,
    /// 0x0A0: GHCB guest-physical address.
    pub ghcb_pa: u64,
    /// 0x0A8: event injection.
    pub event_inj: u64,
    /// 0x0B0: nested page table root (N_CR3).
    pub n_cr3: u64,
    /// 0x0B8: LBR virtualization enable.
    pub lbr_virt_enable: u64,
    /// 0x0C0: VMCB clean bits.
    pub clean_bits: u32,
    _reserved3: u32,
    /// 0x0C8: next sequential instruction pointer (with NRIP save).
    pub next_rip: u64,
    /// 0x0D0: number of instruction bytes fetched.
    pub insn_len: u8,
    /// 0x0D1: the fetched instruction bytes (with decode assists).
    pub insn_bytes: [u8; 15],
    _reserved4: [u8; 0x400 - 0xE0],
}

/// State save area (APM Table B-2), offsets 0x400..0x1000.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StateSaveArea {
    /// 0x400.
    pub es: Segment,
    /// 0x410.
    pub cs: Segment,
    /// 0x420.
    pub ss: Segment,
    /// 0x430.
    pub ds: Segment,
    /// 0x440.
    pub fs: Segment,
    /// 0x450.
    pub gs: Segment,
    /// 0x460.
    pub gdtr: Segment,
    /// 0x470.
    pub ldtr: Segment,
    /// 0x480.
    pub idtr: Segment,
    /// 0x490.
    pub tr: Segment,
    _reserved1: [u8; 0x4CB - 0x4A0],
    /// 0x4CB: current privilege level.
    pub cpl: u8,
    _reserved2: u32,
    /// 0x4D0.
    pub efer: u64,
    _reserved3: [u8; 0x548 - 0x4D8],
    /// 0x548.
    pub cr4: u64,
    /// 0x550.
    pub cr3: u64,
    /// 0x558.
    pub cr0: u64,
    /// 0x560.
    pub dr7: u64,
    /// 0x568.
    pub dr6: u64,
    /// 0x570.
    pub rflags: u64,
    /// 0x578.
    pub rip: u64,
    _reserved4: [u8; 0x5D8 - 0x580],
    /// 0x5D8.
    pub rsp: u64,
    /// 0x5E0.
    pub s_cet: u64,
    /// 0x5E8.
    pub ssp: u64,
    /// 0x5F0.
    pub isst_addr: u64,
    /// 0x5F8.
    pub rax: u64,
    /// 0x600.
    pub star: u64,
    /// 0x608.
    pub lstar: u64,
    /// 0x610.
    pub cstar: u64,
    /// 0x618.
    pub sfmask: u64,
    /// 0x620.
    pub kernel_gs_base: u64,
    /// 0x628.
    pub sysenter_cs: u64,
    /// 0x630.
    pub sysenter_esp: u64,
    /// 0x638.
    pub sysenter_eip: u64,
    /// 0x640.
    pub cr2: u64,
    _reserved5: [u8; 0x668 - 0x648],
    /// 0x668: guest PAT.
    pub g_pat: u64,
    _reserved6: [u8; 0x1000 - 0x670],
}

/// The whole VMCB: one 4 KiB-aligned page.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
pub struct Vmcb {
    /// Control area.
    pub control: ControlArea,
    /// Guest state.
    pub save: StateSaveArea,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<Segment>() == 16);
    assert!(size_of::<ControlArea>() == 0x400);
    assert!(size_of::<StateSaveArea>() == 0xC00);
    assert!(size_of::<Vmcb>() == 0x1000);
    assert!(offset_of!(ControlArea, intercept_misc1) == 0x00C);
    assert!(offset_of!(ControlArea, pause_filter_threshold) == 0x03C);
    assert!(offset_of!(ControlArea, iopm_base_pa) == 0x040);
    assert!(offset_of!(ControlArea, guest_asid) == 0x058);
    assert!(offset_of!(ControlArea, tlb_control) == 0x05C);
    assert!(offset_of!(ControlArea, vintr) == 0x060);
    assert!(offset_of!(ControlArea, exit_code) == 0x070);
    assert!(offset_of!(ControlArea, np_enable) == 0x090);
    assert!(offset_of!(ControlArea, n_cr3) == 0x0B0);
    assert!(offset_of!(ControlArea, next_rip) == 0x0C8);
    assert!(offset_of!(ControlArea, insn_bytes) == 0x0D1);
    assert!(offset_of!(Vmcb, save) == 0x400);
    assert!(offset_of!(StateSaveArea, tr) == 0x090);
    assert!(offset_of!(StateSaveArea, cpl) == 0x0CB);
    assert!(offset_of!(StateSaveArea, efer) == 0x0D0);
    assert!(offset_of!(StateSaveArea, cr4) == 0x148);
    assert!(offset_of!(StateSaveArea, rip) == 0x178);
    assert!(offset_of!(StateSaveArea, rsp) == 0x1D8);
    assert!(offset_of!(StateSaveArea, rax) == 0x1F8);
    assert!(offset_of!(StateSaveArea, cr2) == 0x240);
    assert!(offset_of!(StateSaveArea, g_pat) == 0x268);
};

/// Bits of `intercept_misc1` (APM Table B-1, offset 0x00C).
pub mod intercept {
    /// Physical interrupt.
    pub const INTR: u32 = 1 << 0;
    /// NMI.
    pub const NMI: u32 = 1 << 1;
    /// RDPMC.
    pub const RDPMC: u32 = 1 << 15;
    /// CPUID.
    pub const CPUID: u32 = 1 << 18;
    /// INVD.
    pub const INVD: u32 = 1 << 22;
    /// HLT.
    pub const HLT: u32 = 1 << 24;
    /// IN/OUT through the I/O permission map.
    pub const IOIO_PROT: u32 = 1 << 27;
    /// RDMSR/WRMSR through the MSR permission map.
    pub const MSR_PROT: u32 = 1 << 28;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Bits of `intercept_misc2` (APM Table B-1, offset 0x010).
pub mod intercept2 {
    /// VMRUN: must be set, or VMRUN fails its consistency checks.
    pub const VMRUN: u32 = 1 << 0;
    /// VMMCALL.
    pub const VMMCALL: u32 = 1 << 1;
    /// VMLOAD: loads state from the host physical address in RAX.
    pub const VMLOAD: u32 = 1 << 2;
    /// VMSAVE: stores state to the host physical address in RAX.
    pub const VMSAVE: u32 = 1 << 3;
    /// STGI.
    pub const STGI: u32 = 1 << 4;
    /// CLGI: would hold off the host's interrupts for as long as it spins.
    pub const CLGI: u32 = 1 << 5;
    /// SKINIT.
    pub const SKINIT: u32 = 1 << 6;
    /// RDTSCP.
    pub const RDTSCP: u32 = 1 << 7;
    /// WBINVD.
    pub const WBINVD: u32 = 1 << 9;
    /// MONITOR.
    pub const MONITOR: u32 = 1 << 10;
    /// MWAIT (unconditionally).
    pub const MWAIT: u32 = 1 << 11;
    /// XSETBV.
    pub const XSETBV: u32 = 1 << 13;
}

/// What a guest's VMCB intercepts (`intercept_misc1`, `intercept_misc2`).
/// The guest runs with EFER.SVME set (VMRUN requires it), so every SVM
/// instruction is live in it unless intercepted: VMSAVE and VMLOAD with a
/// host physical address in RAX would read and write host memory, CLGI
/// would keep host interrupts from ever reaching the INTR intercept.
/// VT-x has no such hole: VMX instructions in a guest always exit. The
/// instructions of [`crate::Insn`] exit too, as on VT-x.
pub const GUEST_INTERCEPTS: (u32, u32) = (
    intercept::INTR
        | intercept::NMI
        | intercept::RDPMC
        | intercept::CPUID
        | intercept::INVD
        | intercept::HLT
        | intercept::IOIO_PROT
        | intercept::MSR_PROT
        | intercept::SHUTDOWN,
    intercept2::VMRUN
        | intercept2::VMMCALL
        | intercept2::VMLOAD
        | intercept2::VMSAVE
        | intercept2::STGI
        | intercept2::CLGI
        | intercept2::SKINIT
        | intercept2::RDTSCP
        | intercept2::WBINVD
        | intercept2::MONITOR
        | intercept2::MWAIT
        | intercept2::XSETBV,
);

/// Values of `tlb_control`.
pub mod tlb_control {
    /// Do nothing.
    pub const NOTHING: u8 = 0;
    /// Flush the entire TLB (every ASID).
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's ASID (needs the flush-by-ASID feature).
    pub const FLUSH_ASID: u8 = 3;
}

/// V_INTR_MASKING in `vintr`: the guest's RFLAGS.IF does not mask host
/// interrupts, so they always exit when INTR is intercepted.
pub const V_INTR_MASKING: u64 = 1 << 24;
/// V_TPR in `vintr`, the guest's CR8 (APM 15.21.1 "Virtualizing APIC.TPR"):
/// with V_INTR_MASKING, the guest's MOV to and from CR8 use it and leave the
/// host's TPR alone.
pub const V_TPR: u64 = 0xF;
/// EFER.SVME.
pub const EFER_SVME: u64 = 1 << 12;

/// EVENTINJ (VMCB 0x0A8) that delivers hardware exception `vector` at the
/// next VMRUN (APM 15.20): vector, type 3 (exception), EV if an error code
/// goes with it, V, the error code in bits 63:32.
pub fn event_exception(vector: u8, error_code: Option<u32>) -> u64 {
    let ev = if error_code.is_some() { 1 << 11 } else { 0 };
    (u64::from(error_code.unwrap_or(0)) << 32) | (1 << 31) | ev | (3 << 8) | u64::from(vector)
}

/// The EVENTINJ that finishes delivering the event an exit cut short, from
/// that exit's EXITINTINFO (same layout, APM 15.7.2), or 0 if there is
/// none. Hardware would have gone on delivering it (after the nested page
/// fault on the frame it was pushing, say), so it goes in again with the
/// next VMRUN. Not an INTn (type 4), INT3 (#BP) or INTO (#OF): their
/// instruction had not completed, so it runs again and raises them itself
/// (injecting them would need the instruction's length, which only NRIP
/// save reports).
pub fn redelivery(exit_int_info: u64) -> u64 {
    const VALID: u64 = 1 << 31;
    const SOFTWARE_INTERRUPT: u64 = 4;
    let (kind, vector) = ((exit_int_info >> 8) & 7, exit_int_info & 0xFF);
    let restarts = kind == SOFTWARE_INTERRUPT || (kind == 3 && (vector == 3 || vector == 4));
    if exit_int_info & VALID == 0 || restarts {
        return 0;
    }
    exit_int_info
}

/// Exit codes (APM Appendix C).
pub mod exit_code {
    /// Exception intercepts: 0x40 plus the vector.
    pub const EXCEPTION_FIRST: u64 = 0x40;
    /// The last of them (vector 31).
    pub const EXCEPTION_LAST: u64 = 0x5F;
    /// Physical interrupt.
    pub const INTR: u64 = 0x60;
    /// NMI.
    pub const NMI: u64 = 0x61;
    /// RDPMC.
    pub const RDPMC: u64 = 0x6F;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// INVD.
    pub const INVD: u64 = 0x76;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// IN/OUT.
    pub const IOIO: u64 = 0x7B;
    /// RDMSR/WRMSR.
    pub const MSR: u64 = 0x7C;
    /// Shutdown.
    pub const SHUTDOWN: u64 = 0x7F;
    /// VMRUN.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// RDTSCP.
    pub const RDTSCP: u64 = 0x87;
    /// WBINVD.
    pub const WBINVD: u64 = 0x89;
    /// MONITOR.
    pub const MONITOR: u64 = 0x8A;
    /// MWAIT.
    pub const MWAIT: u64 = 0x8B;
    /// XSETBV.
    pub const XSETBV: u64 = 0x8D;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// Invalid guest state: VMRUN's consistency checks failed.
    pub const INVALID: u64 = u64::MAX;
}

/// Decodes the exit fields of a VMCB after `#VMEXIT`.
pub fn decode_exit(control: &ControlArea) -> VmExit {
    let info1 = control.exit_info1;
    match control.exit_code {
        exit_code::IOIO => VmExit::Io {
            port: ((info1 >> 16) & 0xFFFF) as u16, // bits 31:16
            input: info1 & 1 != 0,
            size: match (info1 >> 4) & 0b111 {
                0b001 => 1,
                0b010 => 2,
                _ => 4,
            },
            string: info1 & (1 << 2) != 0,
            rep: info1 & (1 << 3) != 0,
            // Without NRIP save, EXITINFO2 still holds the next RIP for IOIO
            // (APM 15.10.2).
            next_rip: control.exit_info2,
        },
        exit_code::CPUID => VmExit::Cpuid,
        exit_code::MSR => VmExit::Msr { write: info1 & 1 != 0 },
        exit_code::HLT => VmExit::Hlt,
        exit_code::NPF => VmExit::NestedPageFault {
            gpa: control.exit_info2,
            // #PF-style error code in EXITINFO1: P[0], RW[1], US[2], RSV[3], ID[4].
            access: if info1 & (1 << 4) != 0 {
                Access::Execute
            } else if info1 & (1 << 1) != 0 {
                Access::Write
            } else {
                Access::Read
            },
            present: info1 & 1 != 0,
        },
        code @ exit_code::EXCEPTION_FIRST..=exit_code::EXCEPTION_LAST => {
            let vector = ((code - exit_code::EXCEPTION_FIRST) & 0x1F) as u8;
            // EXITINFO1 holds the error code of the vectors that push one.
            let error_code = crate::exit::has_error_code(vector).then_some((info1 & 0xFFFF_FFFF) as u32);
            VmExit::Exception { vector, error_code, resume_at: None }
        }
        exit_code::INTR | exit_code::NMI => VmExit::ExternalInterrupt,
        exit_code::SHUTDOWN => VmExit::Shutdown,
        exit_code::VMMCALL => VmExit::Hypercall,
        exit_code::INVD => VmExit::Insn(Insn::Invd),
        exit_code::WBINVD => VmExit::Insn(Insn::Wbinvd),
        exit_code::RDPMC => VmExit::Insn(Insn::Rdpmc),
        exit_code::RDTSCP => VmExit::Insn(Insn::Rdtscp),
        exit_code::MONITOR => VmExit::Insn(Insn::Monitor),
        exit_code::MWAIT => VmExit::Insn(Insn::Mwait),
        exit_code::XSETBV => VmExit::Insn(Insn::Xsetbv),
        // QEMU TCG writes VMEXIT_INVALID as a 32-bit -1.
        exit_code::INVALID | 0xFFFF_FFFF => {
            VmExit::EntryFailed { code: control.exit_code, reason: "VMRUN consistency checks failed (VMEXIT_INVALID)" }
        }
        other => VmExit::Unknown(other),
    }
}

/// Segment attributes for a flat 64-bit code segment (type 0xB, S, P, L, G).
pub const ATTR_CODE64: u16 = 0xA9B;
/// Segment attributes for a flat read/write data segment (type 0x3, S, P, D/B, G).
pub const ATTR_DATA: u16 = 0xC93;
/// Segment attributes for a busy 64-bit TSS.
pub const ATTR_TSS64: u16 = 0x8B;

impl Vmcb {
    /// A zeroed VMCB.
    pub const fn zeroed() -> Self {
        // SAFETY: every field is an integer or an array of integers, for
        // which all-zero bytes are a valid value.
        unsafe { core::mem::zeroed() }
    }

    /// Puts the guest in 64-bit mode at `rip` with the page tables at `cr3`
    /// (flat segments, paging on, interrupts off), the state our VMs start
    /// in. Intercepts and nested paging are set by the caller.
    pub fn set_long_mode_guest(&mut self, rip: u64, rsp: u64, cr3: u64) {
        let s = &mut self.save;
        let data = Segment { selector: 0x10, attrib: ATTR_DATA, limit: 0xFFFF_FFFF, base: 0 };
        s.cs = Segment { selector: 0x08, attrib: ATTR_CODE64, limit: 0xFFFF_FFFF, base: 0 };
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.fs = data;
        s.gs = data;
        s.tr = Segment { selector: 0x18, attrib: ATTR_TSS64, limit: 0x67, base: 0 };
        s.ldtr = Segment { selector: 0, attrib: 0x82, limit: 0, base: 0 };
        s.gdtr = Segment { selector: 0, attrib: 0, limit: 0x1F, base: 0 };
        s.idtr = Segment::default();
        s.cpl = 0;
        s.efer = EFER_SVME | (1 << 8) | (1 << 10); // SVME, LME, LMA
        s.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
        s.cr3 = cr3;
        s.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT: SSE
        s.dr6 = 0xFFFF_0FF0;
        s.dr7 = 0x400;
        s.rflags = 0x2;
        s.rip = rip;
        s.rsp = rsp;
        s.g_pat = 0x0007_0406_0007_0406;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_cut_short_is_delivered_again_unless_its_instruction_restarts() {
        // A #PF with error code 2 (EV), a #DB, an NMI, an external interrupt.
        for info in [
            (2u64 << 32) | (1 << 31) | (1 << 11) | (3 << 8) | 14,
            event_exception(1, None),
            (1 << 31) | (2 << 8) | 2,
            (1 << 31) | 0x30,
        ] {
            assert_eq!(redelivery(info), info, "{info:#x}");
        }
        // INT 0x80, INT3, INTO, and nothing at all.
        for info in [(1 << 31) | (4 << 8) | 0x80, event_exception(3, None), event_exception(4, None), 0, 14] {
            assert_eq!(redelivery(info), 0, "{info:#x}");
        }
    }

    fn control(code: u64, info1: u64, info2: u64) -> ControlArea {
        let mut v = Vmcb::zeroed();
        v.control.exit_code = code;
        v.control.exit_info1 = info1;
        v.control.exit_info2 = info2;
        v.control
    }

    #[test]
    fn a_guest_cannot_run_svm_instructions_or_invd_unseen() {
        // Found in review: only VMRUN and VMMCALL of the SVM instructions
        // were intercepted, so a guest (any peer can send one by migration)
        // could VMSAVE/VMLOAD at a host physical address or CLGI and spin.
        // Bit positions from APM vol. 2, table B-1 (offsets 0x00C, 0x010).
        let (misc1, misc2) = GUEST_INTERCEPTS;
        for (bit, what) in [(0, "INTR"), (1, "NMI"), (18, "CPUID"), (22, "INVD"), (24, "HLT"), (31, "SHUTDOWN")] {
            assert_ne!(misc1 & (1 << bit), 0, "{what} not intercepted");
        }
        for (bit, what) in [
            (0, "VMRUN"),
            (1, "VMMCALL"),
            (2, "VMLOAD"),
            (3, "VMSAVE"),
            (4, "STGI"),
            (5, "CLGI"),
            (6, "SKINIT"),
            (13, "XSETBV"),
        ] {
            assert_ne!(misc2 & (1 << bit), 0, "{what} not intercepted");
        }
    }

    #[test]
    fn decodes_out_byte_to_port_e0() {
        // OUT 0xE0, AL: type OUT (0), SZ8 (bit 4), port in 31:16.
        let exit = decode_exit(&control(exit_code::IOIO, (0xE0 << 16) | (1 << 4), 0x10042));
        assert_eq!(
            exit,
            VmExit::Io { port: 0xE0, input: false, size: 1, string: false, rep: false, next_rip: 0x10042 }
        );
    }

    #[test]
    fn decodes_rep_insd() {
        let exit = decode_exit(&control(exit_code::IOIO, (0x1F0 << 16) | (1 << 6) | 0b1101, 7));
        assert!(matches!(exit, VmExit::Io { port: 0x1F0, input: true, size: 4, string: true, rep: true, .. }));
    }

    #[test]
    fn decodes_nested_page_faults() {
        let w = decode_exit(&control(exit_code::NPF, 0b111, 0x1234_5000));
        assert_eq!(w, VmExit::NestedPageFault { gpa: 0x1234_5000, access: Access::Write, present: true });
        let x = decode_exit(&control(exit_code::NPF, 0b1_0100, 0x9000));
        assert_eq!(x, VmExit::NestedPageFault { gpa: 0x9000, access: Access::Execute, present: false });
        let r = decode_exit(&control(exit_code::NPF, 0b100, 0x9000));
        assert!(matches!(r, VmExit::NestedPageFault { access: Access::Read, .. }));
    }

    #[test]
    fn decodes_invalid_in_both_widths() {
        for code in [u64::MAX, 0xFFFF_FFFF] {
            assert!(matches!(decode_exit(&control(code, 0, 0)), VmExit::EntryFailed { .. }));
        }
    }

    #[test]
    fn decodes_the_simple_exits() {
        assert_eq!(decode_exit(&control(exit_code::INTR, 0, 0)), VmExit::ExternalInterrupt);
        assert_eq!(
            decode_exit(&control(0x41, 7, 0)),
            VmExit::Exception { vector: 1, error_code: None, resume_at: None }
        );
        assert_eq!(
            decode_exit(&control(0x51, 0, 0)),
            VmExit::Exception { vector: 17, error_code: Some(0), resume_at: None }
        );
        assert_eq!(event_exception(17, Some(0)), 0x8000_0B11);
        assert_eq!(event_exception(14, Some(2)), (2 << 32) | 0x8000_0B0E);
        assert_eq!(event_exception(1, None), 0x8000_0301);
        assert_eq!(decode_exit(&control(exit_code::SHUTDOWN, 0, 0)), VmExit::Shutdown);
        assert_eq!(decode_exit(&control(exit_code::HLT, 0, 0)), VmExit::Hlt);
        assert_eq!(decode_exit(&control(exit_code::CPUID, 0, 0)), VmExit::Cpuid);
        assert_eq!(decode_exit(&control(exit_code::MSR, 1, 0)), VmExit::Msr { write: true });
        for (code, insn) in [
            (0x76, Insn::Invd),
            (0x89, Insn::Wbinvd),
            (0x6F, Insn::Rdpmc),
            (0x87, Insn::Rdtscp),
            (0x8A, Insn::Monitor),
            (0x8B, Insn::Mwait),
            (0x8D, Insn::Xsetbv),
        ] {
            assert_eq!(decode_exit(&control(code, 0, 0)), VmExit::Insn(insn));
        }
        assert_eq!(decode_exit(&control(0x89, 0, 0)).name(), "wbinvd");
        assert_eq!(decode_exit(&control(0x79, 0, 0)), VmExit::Unknown(0x79)); // INVLPG
        assert_eq!(decode_exit(&control(0x79, 0, 0)).name(), "unknown");
    }

    #[test]
    fn long_mode_guest_state_is_consistent() {
        let mut v = Vmcb::zeroed();
        v.set_long_mode_guest(0x10000, 0x20000, 0x2000);
        let s = &v.save;
        assert_eq!(s.efer & (EFER_SVME | (1 << 8) | (1 << 10)), EFER_SVME | (1 << 8) | (1 << 10));
        assert!(s.cr0 & 1 != 0 && s.cr0 & (1 << 31) != 0 && s.cr4 & (1 << 5) != 0);
        // CS is a 64-bit code segment: L=1 and D=0.
        assert!(s.cs.attrib & (1 << 9) != 0 && s.cs.attrib & (1 << 10) == 0);
        assert_eq!((s.rip, s.rsp, s.cr3), (0x10000, 0x20000, 0x2000));
    }
}

//! Intel VMX: VMCS field encodings (as enums per width, the discriminant is
//! the encoding), control adjustment from the capability MSRs, exit
//! decoding and the VM-instruction error numbers in words.
//!
//! Follows Intel SDM Vol. 3D Appendix B "Field Encoding in VMCS", Appendix
//! A.3-A.5 (allowed settings of the controls), Appendix C "VMX Basic Exit
//! Reasons", and Vol. 3C 31.4 "VM Instruction Error Numbers". `VMREAD` and
//! `VMWRITE` themselves live in the kernel's `arch/vmx.rs`.

use crate::exit::{Access, Insn, VmExit};

/// 16-bit fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Field16 {
    Vpid = 0x0000,
    GuestEsSelector = 0x0800,
    GuestCsSelector = 0x0802,
    GuestSsSelector = 0x0804,
    GuestDsSelector = 0x0806,
    GuestFsSelector = 0x0808,
    GuestGsSelector = 0x080A,
    GuestLdtrSelector = 0x080C,
    GuestTrSelector = 0x080E,
    GuestPmlIndex = 0x0812,
    HostEsSelector = 0x0C00,
    HostCsSelector = 0x0C02,
    HostSsSelector = 0x0C04,
    HostDsSelector = 0x0C06,
    HostFsSelector = 0x0C08,
    HostGsSelector = 0x0C0A,
    HostTrSelector = 0x0C0C,
}

/// 64-bit fields (full encodings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Field64 {
    IoBitmapA = 0x2000,
    IoBitmapB = 0x2002,
    MsrBitmap = 0x2004,
    PmlAddress = 0x200E,
    TscOffset = 0x2010,
    VirtualApicAddress = 0x2012,
    EptPointer = 0x201A,
    GuestPhysicalAddress = 0x2400,
    VmcsLinkPointer = 0x2800,
    GuestIa32Debugctl = 0x2802,
    GuestIa32Pat = 0x2804,
    GuestIa32Efer = 0x2806,
    HostIa32Pat = 0x2C00,
    HostIa32Efer = 0x2C02,
}

/// 32-bit fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum Field32 {
    PinBasedControls = 0x4000,
    PrimaryProcControls = 0x4002,
    ExceptionBitmap = 0x4004,
    Cr3TargetCount = 0x400A,
    ExitControls = 0x400C,
    ExitMsrStoreCount = 0x400E,
    ExitMsrLoadCount = 0x4010,
    EntryControls = 0x4012,
    EntryMsrLoadCount = 0x4014,
    EntryInterruptionInfo = 0x4016,
    EntryExceptionErrorCode = 0x4018,
    TprThreshold = 0x401C,
    SecondaryProcControls = 0x401E,
    VmInstructionError = 0x4400,
    ExitReason = 0x4402,
    ExitInterruptionInfo = 0x4404,
    ExitInterruptionErrorCode = 0x4406,
    IdtVectoringInfo = 0x4408,
    IdtVectoringErrorCode = 0x440A,
    ExitInstructionLength = 0x440C,
    GuestEsLimit = 0x4800,
    GuestCsLimit = 0x4802,
    GuestSsLimit = 0x4804,
    GuestDsLimit = 0x4806,
    GuestFsLimit = 0x4808,
    GuestGsLimit = 0x480A,
    GuestLdtrLimit = 0x480C,
    GuestTrLimit = 0x480E,
    GuestGdtrLimit = 0x4810,
    GuestIdtrLimit = 0x4812,
    GuestEsAccessRights = 0x4814,
    GuestCsAccessRights = 0x4816,
    GuestSsAccessRights = 0x4818,
    GuestDsAccessRights = 0x481A,
    GuestFsAccessRights = 0x481C,
    GuestGsAccessRights = 0x481E,
    GuestLdtrAccessRights = 0x4820,
    GuestTrAccessRights = 0x4822,
    GuestInterruptibility = 0x4824,
    GuestActivityState = 0x4826,
    GuestSysenterCs = 0x482A,
    HostSysenterCs = 0x4C00,
}

/// Natural-width fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
#[allow(missing_docs)]
pub enum FieldN {
    Cr0GuestHostMask = 0x6000,
    Cr4GuestHostMask = 0x6002,
    Cr0ReadShadow = 0x6004,
    Cr4ReadShadow = 0x6006,
    ExitQualification = 0x6400,
    GuestCr0 = 0x6800,
    GuestCr3 = 0x6802,
    GuestCr4 = 0x6804,
    GuestEsBase = 0x6806,
    GuestCsBase = 0x6808,
    GuestSsBase = 0x680A,
    GuestDsBase = 0x680C,
    GuestFsBase = 0x680E,
    GuestGsBase = 0x6810,
    GuestLdtrBase = 0x6812,
    GuestTrBase = 0x6814,
    GuestGdtrBase = 0x6816,
    GuestIdtrBase = 0x6818,
    GuestDr7 = 0x681A,
    GuestRsp = 0x681C,
    GuestRip = 0x681E,
    GuestRflags = 0x6820,
    GuestPendingDebugExceptions = 0x6822,
    GuestSysenterEsp = 0x6824,
    GuestSysenterEip = 0x6826,
    HostCr0 = 0x6C00,
    HostCr3 = 0x6C02,
    HostCr4 = 0x6C04,
    HostFsBase = 0x6C06,
    HostGsBase = 0x6C08,
    HostTrBase = 0x6C0A,
    HostGdtrBase = 0x6C0C,
    HostIdtrBase = 0x6C0E,
    HostSysenterEsp = 0x6C10,
    HostSysenterEip = 0x6C12,
    HostRsp = 0x6C14,
    HostRip = 0x6C16,
}

/// Capability MSRs for the controls (SDM A.3-A.5). The TRUE_* variants
/// apply when IA32_VMX_BASIC[55] is set.
pub mod msr {
    /// IA32_VMX_BASIC.
    pub const BASIC: u32 = 0x480;
    /// IA32_VMX_PINBASED_CTLS.
    pub const PINBASED: u32 = 0x481;
    /// IA32_VMX_PROCBASED_CTLS.
    pub const PROCBASED: u32 = 0x482;
    /// IA32_VMX_EXIT_CTLS.
    pub const EXIT: u32 = 0x483;
    /// IA32_VMX_ENTRY_CTLS.
    pub const ENTRY: u32 = 0x484;
    /// IA32_VMX_CR0_FIXED0.
    pub const CR0_FIXED0: u32 = 0x486;
    /// IA32_VMX_CR0_FIXED1.
    pub const CR0_FIXED1: u32 = 0x487;
    /// IA32_VMX_CR4_FIXED0.
    pub const CR4_FIXED0: u32 = 0x488;
    /// IA32_VMX_CR4_FIXED1.
    pub const CR4_FIXED1: u32 = 0x489;
    /// IA32_VMX_PROCBASED_CTLS2.
    pub const PROCBASED2: u32 = 0x48B;
    /// IA32_VMX_TRUE_PINBASED_CTLS.
    pub const TRUE_PINBASED: u32 = 0x48D;
    /// IA32_VMX_TRUE_PROCBASED_CTLS.
    pub const TRUE_PROCBASED: u32 = 0x48E;
    /// IA32_VMX_TRUE_EXIT_CTLS.
    pub const TRUE_EXIT: u32 = 0x48F;
    /// IA32_VMX_TRUE_ENTRY_CTLS.
    pub const TRUE_ENTRY: u32 = 0x490;
    /// IA32_FEATURE_CONTROL.
    pub const FEATURE_CONTROL: u32 = 0x3A;
}

/// Control bits we use.
pub mod ctl {
    /// Pin-based: external-interrupt exiting.
    pub const PIN_EXTERNAL_INTERRUPT: u32 = 1 << 0;
    /// Pin-based: NMI exiting.
    pub const PIN_NMI: u32 = 1 << 3;
    /// Primary: use TSC offsetting.
    pub const PROC_TSC_OFFSET: u32 = 1 << 3;
    /// Primary: HLT exiting.
    pub const PROC_HLT: u32 = 1 << 7;
    /// Primary: MWAIT exiting.
    pub const PROC_MWAIT: u32 = 1 << 10;
    /// Primary: RDPMC exiting.
    pub const PROC_RDPMC: u32 = 1 << 11;
    /// Primary: CR3-load exiting.
    pub const PROC_CR3_LOAD: u32 = 1 << 15;
    /// Primary: CR3-store exiting.
    pub const PROC_CR3_STORE: u32 = 1 << 16;
    /// Primary: use TPR shadow (MOV to and from CR8 use the VTPR in the
    /// virtual-APIC page, not the processor's TPR).
    pub const PROC_TPR_SHADOW: u32 = 1 << 21;
    /// Primary: unconditional I/O exiting.
    pub const PROC_UNCOND_IO: u32 = 1 << 24;
    /// Primary: MONITOR exiting.
    pub const PROC_MONITOR: u32 = 1 << 29;
    /// Primary: activate secondary controls.
    pub const PROC_SECONDARY: u32 = 1 << 31;
    /// Secondary: enable EPT.
    pub const PROC2_EPT: u32 = 1 << 1;
    /// Secondary: WBINVD exiting.
    pub const PROC2_WBINVD: u32 = 1 << 6;
    /// Secondary: enable VPID.
    pub const PROC2_VPID: u32 = 1 << 5;
    /// Secondary: enable PML.
    pub const PROC2_PML: u32 = 1 << 17;
    /// Exit: save the guest's DR7 and IA32_DEBUGCTL (every exit then sets
    /// DR7 to 0x400).
    pub const EXIT_SAVE_DEBUG: u32 = 1 << 2;
    /// Exit: host address-space size (64-bit host).
    pub const EXIT_HOST_64: u32 = 1 << 9;
    /// Exit: save IA32_EFER.
    pub const EXIT_SAVE_EFER: u32 = 1 << 20;
    /// Exit: load IA32_EFER.
    pub const EXIT_LOAD_EFER: u32 = 1 << 21;
    /// Entry: load the guest's DR7 and IA32_DEBUGCTL.
    pub const ENTRY_LOAD_DEBUG: u32 = 1 << 2;
    /// Entry: IA-32e mode guest.
    pub const ENTRY_IA32E: u32 = 1 << 9;
    /// Entry: load IA32_EFER.
    pub const ENTRY_LOAD_EFER: u32 = 1 << 15;
}

/// Adjusts `desired` control bits to what the capability MSR value `cap`
/// allows: bits 31:0 are the allowed-0 settings (must be 1), bits 63:32
/// the allowed-1 settings (may be 1). Returns the value to write and the
/// desired bits that cannot be set.
pub fn adjust_controls(desired: u32, cap: u64) -> (u32, u32) {
    let must = (cap & 0xFFFF_FFFF) as u32;
    let may = (cap >> 32) as u32;
    ((desired | must) & may, desired & !may)
}

/// The VM-instruction error number in words (SDM Vol. 3C 31.4).
pub fn instruction_error(n: u64) -> &'static str {
    match n {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}

/// Basic exit reasons we handle (SDM Appendix C).
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u32 = 0;
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    /// Triple fault.
    pub const TRIPLE_FAULT: u32 = 2;
    /// CPUID.
    pub const CPUID: u32 = 10;
    /// HLT.
    pub const HLT: u32 = 12;
    /// INVD (always exits).
    pub const INVD: u32 = 13;
    /// RDPMC.
    pub const RDPMC: u32 = 15;
    /// VMCALL.
    pub const VMCALL: u32 = 18;
    /// Control-register access.
    pub const CR_ACCESS: u32 = 28;
    /// I/O instruction.
    pub const IO: u32 = 30;
    /// RDMSR.
    pub const RDMSR: u32 = 31;
    /// WRMSR.
    pub const WRMSR: u32 = 32;
    /// VM-entry failure: invalid guest state.
    pub const INVALID_GUEST_STATE: u32 = 33;
    /// VM-entry failure: MSR loading.
    pub const MSR_LOADING: u32 = 34;
    /// MWAIT.
    pub const MWAIT: u32 = 36;
    /// MONITOR.
    pub const MONITOR: u32 = 39;
    /// EPT violation.
    pub const EPT_VIOLATION: u32 = 48;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u32 = 49;
    /// WBINVD (or WBNOINVD).
    pub const WBINVD: u32 = 54;
    /// XSETBV (always exits).
    pub const XSETBV: u32 = 55;
    /// Page-modification log full.
    pub const PML_FULL: u32 = 62;
}

/// The exit fields the decoder needs, read by the kernel after an exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitFields {
    /// Exit reason (bit 31: VM-entry failure).
    pub reason: u32,
    /// Exit qualification.
    pub qualification: u64,
    /// Guest RIP of the exiting instruction.
    pub rip: u64,
    /// Length of the exiting instruction.
    pub instruction_length: u64,
    /// Guest-physical address (EPT violations).
    pub guest_physical: u64,
    /// VM-exit interruption information (exceptions and NMIs).
    pub interruption_info: u32,
    /// VM-exit interruption error code, when the information says valid.
    pub interruption_error: u32,
}

/// Interruption types in VM-exit and VM-entry interruption information
/// (SDM Vol. 3C 25.9.2, 25.8.3).
pub mod interruption {
    /// Bit 31: the field is valid.
    pub const VALID: u32 = 1 << 31;
    /// Bit 11: an error code is delivered (VM entry) or was pushed (exit).
    pub const ERROR_CODE: u32 = 1 << 11;
    /// Type (bits 10:8): NMI.
    pub const NMI: u32 = 2;
    /// Type: hardware exception.
    pub const HARDWARE_EXCEPTION: u32 = 3;
    /// Type: privileged software exception (ICEBP, the `INT1` opcode).
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
}

/// The VM-entry interruption information that finishes delivering the
/// event an exit cut short, from that exit's IDT-vectoring information
/// (SDM Vol. 3C 28.2.4; the layouts agree in bits 31, 11 and 10:0), or
/// `None`. Hardware would have gone on delivering it (after the EPT
/// violation on the frame it was pushing, say), so it goes in again with
/// the next entry, with the IDT-vectoring error code if bit 11 is set. Not
/// a software interrupt, ICEBP, INT3 or INTO (types 4-6): their
/// instruction had not completed, so it runs again and raises them itself.
pub fn redelivery(idt_vectoring_info: u32) -> Option<u32> {
    const TYPE_NMI_OR_EXCEPTION_OR_INTERRUPT: [u32; 3] = [0, interruption::NMI, interruption::HARDWARE_EXCEPTION];
    let kind = (idt_vectoring_info >> 8) & 7;
    let valid = idt_vectoring_info & interruption::VALID != 0;
    (valid && TYPE_NMI_OR_EXCEPTION_OR_INTERRUPT.contains(&kind))
        .then_some(idt_vectoring_info & (interruption::VALID | interruption::ERROR_CODE | 0x7FF))
}

/// VM-entry interruption information that delivers hardware exception
/// `vector`, with an error code or not.
pub fn entry_exception(vector: u8, error_code: bool) -> u32 {
    let code = if error_code { interruption::ERROR_CODE } else { 0 };
    interruption::VALID | (interruption::HARDWARE_EXCEPTION << 8) | code | u32::from(vector)
}

/// Decodes a VM exit.
pub fn decode_exit(f: &ExitFields) -> VmExit {
    let basic = f.reason & 0xFFFF;
    let q = f.qualification;
    if f.reason & (1 << 31) != 0 {
        let reason = match basic {
            reason::INVALID_GUEST_STATE => "VM entry failed: invalid guest state",
            reason::MSR_LOADING => "VM entry failed: MSR loading",
            _ => "VM entry failed",
        };
        return VmExit::EntryFailed { code: u64::from(basic), reason };
    }
    match basic {
        reason::EXCEPTION_NMI if (f.interruption_info >> 8) & 0b111 != interruption::NMI => {
            let info = f.interruption_info;
            VmExit::Exception {
                vector: (info & 0xFF) as u8,
                error_code: (info & interruption::ERROR_CODE != 0).then_some(f.interruption_error),
                resume_at: ((info >> 8) & 0b111 == interruption::PRIVILEGED_SOFTWARE_EXCEPTION)
                    .then(|| f.rip.wrapping_add(f.instruction_length)),
            }
        }
        reason::EXTERNAL_INTERRUPT | reason::EXCEPTION_NMI => VmExit::ExternalInterrupt,
        reason::TRIPLE_FAULT => VmExit::Shutdown,
        reason::CPUID => VmExit::Cpuid,
        reason::HLT => VmExit::Hlt,
        reason::VMCALL => VmExit::Hypercall,
        reason::RDMSR => VmExit::Msr { write: false },
        reason::WRMSR => VmExit::Msr { write: true },
        reason::IO => VmExit::Io {
            port: ((q >> 16) & 0xFFFF) as u16,
            input: q & (1 << 3) != 0,
            size: (q & 0b111) as u8 + 1,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            next_rip: f.rip.wrapping_add(f.instruction_length),
        },
        reason::EPT_VIOLATION => VmExit::NestedPageFault {
            gpa: f.guest_physical,
            access: if q & (1 << 2) != 0 {
                Access::Execute
            } else if q & (1 << 1) != 0 {
                Access::Write
            } else {
                Access::Read
            },
            present: q & 0b11_1000 != 0,
        },
        reason::PML_FULL => VmExit::PmlFull,
        reason::INVD => VmExit::Insn(Insn::Invd),
        reason::WBINVD => VmExit::Insn(Insn::Wbinvd),
        reason::RDPMC => VmExit::Insn(Insn::Rdpmc),
        reason::MONITOR => VmExit::Insn(Insn::Monitor),
        reason::MWAIT => VmExit::Insn(Insn::Mwait),
        reason::XSETBV => VmExit::Insn(Insn::Xsetbv),
        // MOV to CR4 (qualification: CR number 3:0, access type 5:4); with
        // only VMXE in the guest/host mask, it exits only to set VMXE.
        reason::CR_ACCESS if q & 0x3F == 4 => VmExit::Insn(Insn::MovCr4Vmxe),
        other => VmExit::Unknown(u64::from(other)),
    }
}

/// VMX access rights of a segment (SDM Vol. 3C 25.4.1, Table 25-2): the
/// SVM-style packed attributes (type, S, DPL, P at 7:0; AVL, L, D/B, G at
/// 11:8) moved to bits 7:0 and 15:12; bit 16 = unusable.
pub fn access_rights(svm_attrib: u16) -> u32 {
    let a = u32::from(svm_attrib);
    (a & 0xFF) | ((a & 0xF00) << 4)
}

/// Access rights of an unusable segment.
pub const UNUSABLE: u32 = 1 << 16;

/// The access rights of a segment with SVM-style attributes `attrib`: a
/// segment that is not present is unusable, and keeps its other bits (an
/// unusable SS's DPL is still the CPL, SDM Vol. 3C 28.3.2).
pub fn segment_access_rights(attrib: u16) -> u32 {
    let unusable = if attrib & (1 << 7) == 0 { UNUSABLE } else { 0 };
    access_rights(attrib) | unusable
}

/// The SVM-style attributes of a segment with VMX access rights `ar`
/// (the inverse of [`segment_access_rights`]): an unusable segment is not
/// present.
pub fn segment_attrib(ar: u32) -> u16 {
    let attrib = u16::try_from((ar & 0xFF) | ((ar >> 4) & 0xF00)).unwrap_or(0);
    if ar & UNUSABLE != 0 {
        attrib & !(1 << 7)
    } else {
        attrib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_attributes_and_access_rights_convert_both_ways() {
        use crate::svm::{ATTR_CODE64, ATTR_DATA, ATTR_TSS64};
        for attrib in [ATTR_CODE64, ATTR_DATA, ATTR_TSS64, 0x8B, 0xC93] {
            assert_eq!(segment_attrib(segment_access_rights(attrib)), attrib, "{attrib:#x}");
        }
        assert_eq!(segment_access_rights(0), UNUSABLE);
        // Unusable: present no more, the rest kept (an SS at DPL 3).
        assert_eq!(segment_access_rights(0x73), UNUSABLE | 0x73);
        assert_eq!(segment_attrib(UNUSABLE | 0xF3), 0x73);
        assert_eq!(segment_attrib(segment_access_rights(0x73)), 0x73);
        assert_eq!(segment_access_rights(ATTR_CODE64), 0xA09B);
    }

    #[test]
    fn an_event_cut_short_is_delivered_again_unless_its_instruction_restarts() {
        // A #PF with its error code, a #DB, an NMI, an external interrupt;
        // bit 12 (NMI unblocking) is not part of an entry's information.
        let pf = entry_exception(14, true);
        assert_eq!(redelivery(pf | 1 << 12), Some(pf));
        for info in [entry_exception(1, false), interruption::VALID | (2 << 8) | 2, interruption::VALID | 0x30] {
            assert_eq!(redelivery(info), Some(info), "{info:#x}");
        }
        // INT 0x80, ICEBP, INT3 (type 6), and nothing at all.
        for info in [
            interruption::VALID | (4 << 8) | 0x80,
            interruption::VALID | (5 << 8) | 1,
            interruption::VALID | (6 << 8) | 3,
            0,
            14,
        ] {
            assert_eq!(redelivery(info), None, "{info:#x}");
        }
    }

    #[test]
    fn controls_take_required_bits_and_drop_impossible_ones() {
        // must-be-1: bit 1; may-be-1: bits 0..=3.
        let cap = (0b1111u64 << 32) | 0b0010;
        assert_eq!(adjust_controls(0b0001, cap), (0b0011, 0));
        assert_eq!(adjust_controls(0b1_0001, cap), (0b0011, 0b1_0000));
    }

    #[test]
    fn decodes_io_with_instruction_length() {
        let f = ExitFields {
            reason: reason::IO,
            qualification: (0xE0 << 16),
            rip: 0x10040,
            instruction_length: 2,
            ..ExitFields::default()
        };
        assert_eq!(
            decode_exit(&f),
            VmExit::Io { port: 0xE0, input: false, size: 1, string: false, rep: false, next_rip: 0x10042 }
        );
        let f = ExitFields { qualification: (0x60 << 16) | (1 << 3) | 3, ..f };
        assert!(matches!(decode_exit(&f), VmExit::Io { port: 0x60, input: true, size: 4, .. }));
        // A guest's RIP is its own: at the top of the address space the
        // next one wraps (an overflow here halted a debug-built host).
        let f = ExitFields { rip: u64::MAX, instruction_length: 1, ..f };
        assert!(matches!(decode_exit(&f), VmExit::Io { next_rip: 0, .. }));
    }

    #[test]
    fn decodes_intercepted_exceptions_and_leaves_nmis_to_the_host() {
        let f = |info: u32, error: u32| ExitFields {
            reason: reason::EXCEPTION_NMI,
            rip: 0x1000,
            instruction_length: 1,
            interruption_info: info,
            interruption_error: error,
            ..ExitFields::default()
        };
        // #DB from single-stepping (hardware exception, no error code).
        assert_eq!(decode_exit(&f(0x8000_0301, 0)), VmExit::Exception { vector: 1, error_code: None, resume_at: None });
        // #AC pushes an error code (always 0).
        assert_eq!(
            decode_exit(&f(0x8000_0B11, 0)),
            VmExit::Exception { vector: 17, error_code: Some(0), resume_at: None }
        );
        // ICEBP: delivered after the instruction.
        assert_eq!(
            decode_exit(&f(0x8000_0501, 0)),
            VmExit::Exception { vector: 1, error_code: None, resume_at: Some(0x1001) }
        );
        // An NMI (type 2) is the host's.
        assert_eq!(decode_exit(&f(0x8000_0202, 0)), VmExit::ExternalInterrupt);
        assert_eq!(entry_exception(17, true), 0x8000_0B11);
        assert_eq!(entry_exception(1, false), 0x8000_0301);
    }

    #[test]
    fn decodes_ept_violations() {
        let f = ExitFields {
            reason: reason::EPT_VIOLATION,
            qualification: 0b1_1010, // write, translation readable+executable
            guest_physical: 0x4000_1234,
            ..ExitFields::default()
        };
        assert_eq!(decode_exit(&f), VmExit::NestedPageFault { gpa: 0x4000_1234, access: Access::Write, present: true });
        let f = ExitFields { qualification: 0b100, ..f };
        assert!(matches!(decode_exit(&f), VmExit::NestedPageFault { access: Access::Execute, present: false, .. }));
    }

    #[test]
    fn decodes_entry_failures_and_simple_exits() {
        let f = ExitFields { reason: (1 << 31) | reason::INVALID_GUEST_STATE, ..ExitFields::default() };
        assert_eq!(decode_exit(&f), VmExit::EntryFailed { code: 33, reason: "VM entry failed: invalid guest state" });
        let simple = |r| decode_exit(&ExitFields { reason: r, ..ExitFields::default() });
        assert_eq!(simple(reason::TRIPLE_FAULT), VmExit::Shutdown);
        assert_eq!(simple(reason::EXTERNAL_INTERRUPT), VmExit::ExternalInterrupt);
        assert_eq!(simple(reason::PML_FULL), VmExit::PmlFull);
        assert_eq!(simple(reason::WRMSR), VmExit::Msr { write: true });
        assert_eq!(simple(reason::INVD), VmExit::Insn(Insn::Invd));
        assert_eq!(simple(54), VmExit::Insn(Insn::Wbinvd));
        assert_eq!(simple(15), VmExit::Insn(Insn::Rdpmc));
        assert_eq!(simple(39), VmExit::Insn(Insn::Monitor));
        assert_eq!(simple(36), VmExit::Insn(Insn::Mwait));
        assert_eq!(simple(55), VmExit::Insn(Insn::Xsetbv));
        let cr = |q| decode_exit(&ExitFields { reason: reason::CR_ACCESS, qualification: q, ..ExitFields::default() });
        assert_eq!(cr(0x304), VmExit::Insn(Insn::MovCr4Vmxe), "MOV CR4, RBX");
        assert_eq!(cr(0x314), VmExit::Unknown(28), "MOV RBX, CR4");
        assert_eq!(cr(0x300), VmExit::Unknown(28), "MOV CR0, RBX");
        assert_eq!(simple(57), VmExit::Unknown(57));
    }

    #[test]
    fn instruction_errors_are_in_words() {
        assert_eq!(instruction_error(7), "VM entry with invalid control field(s)");
        assert_eq!(instruction_error(8), "VM entry with invalid host-state field(s)");
        assert_eq!(instruction_error(99), "unknown VM-instruction error");
    }

    #[test]
    fn access_rights_move_the_high_nibble() {
        assert_eq!(access_rights(crate::svm::ATTR_CODE64), 0xA09B);
        assert_eq!(access_rights(crate::svm::ATTR_DATA), 0xC093);
        assert_eq!(access_rights(crate::svm::ATTR_TSS64), 0x8B);
    }

    #[test]
    fn encodings_match_the_sdm() {
        assert_eq!(Field64::EptPointer as u32, 0x201A);
        assert_eq!(Field16::GuestPmlIndex as u32, 0x0812);
        assert_eq!(FieldN::HostRip as u32, 0x6C16);
        assert_eq!(Field32::VmInstructionError as u32, 0x4400);
    }
}

//! The vendor-neutral vCPU interface: one exit enum both backends decode
//! into, and the trait the VM run loop drives.

use crate::svm::Segment;

/// Why a guest stopped running, decoded from the backend's exit fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// `IN`/`OUT` on `port` (string and REP forms are reported as such and
    /// not emulated).
    Io {
        /// I/O port.
        port: u16,
        /// `IN` (true) or `OUT` (false).
        input: bool,
        /// Operand size in bytes: 1, 2 or 4.
        size: u8,
        /// INS/OUTS.
        string: bool,
        /// REP prefix.
        rep: bool,
        /// Guest RIP of the instruction after this one.
        next_rip: u64,
    },
    /// `CPUID`.
    Cpuid,
    /// `RDMSR` (`write` false) or `WRMSR` (true).
    Msr {
        /// WRMSR.
        write: bool,
    },
    /// `HLT`.
    Hlt,
    /// A second-level page fault (AMD #NPF, Intel EPT violation).
    NestedPageFault {
        /// The guest-physical address that faulted.
        gpa: u64,
        /// What the guest tried to do.
        access: Access,
        /// The translation existed but did not allow the access (as
        /// opposed to not being present at all).
        present: bool,
    },
    /// A host (physical) interrupt arrived while the guest ran.
    ExternalInterrupt,
    /// The guest triple-faulted (AMD SHUTDOWN intercept, Intel triple fault).
    Shutdown,
    /// `VMMCALL` / `VMCALL`.
    Hypercall,
    /// Intel: the PML buffer is full and must be drained.
    PmlFull,
    /// An instruction intercepted so that it does not reach the host's
    /// caches, counters, TSC_AUX or XCR0: the VM run loop runs it as a CPU
    /// whose CPUID offers nothing would.
    Insn(Insn),
    /// The guest raised an exception the hypervisor intercepts (#DB and
    /// #AC, whose endless chains would otherwise hold the CPU with no exit
    /// at all: CVE-2015-8104, CVE-2015-5307). Reflected back with
    /// [`Vcpu::inject_exception`].
    Exception {
        /// Vector.
        vector: u8,
        /// Its error code, for the vectors that push one.
        error_code: Option<u32>,
        /// Intel, ICEBP: the guest RIP after the instruction, where the
        /// exception is delivered (the exit reports the instruction's own).
        resume_at: Option<u64>,
    },
    /// The processor refused to enter the guest. `code` is the raw exit code
    /// (AMD) or VM-instruction error number (Intel); `reason` says it in words.
    EntryFailed {
        /// Raw code.
        code: u64,
        /// Decoded description.
        reason: &'static str,
    },
    /// Anything else: the raw exit code.
    Unknown(u64),
}

/// The instructions [`VmExit::Insn`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    /// `INVD`: would drop the host's dirty cache lines.
    Invd,
    /// `WBINVD`: would flush every cache of the machine, a stall for the
    /// host and every other guest.
    Wbinvd,
    /// `RDPMC`: would read the host's performance counters.
    Rdpmc,
    /// `RDTSCP` (AMD; VT-x raises #UD itself unless it is enabled): would
    /// read the host's TSC_AUX.
    Rdtscp,
    /// `MONITOR`: would arm the host's monitor hardware.
    Monitor,
    /// `MWAIT`: would put the host's processor to sleep.
    Mwait,
    /// `XSETBV` (exits on both vendors; reaches us only from a guest that
    /// set CR4.OSXSAVE, which its CPUID does not offer).
    Xsetbv,
    /// VT-x: a `MOV` to CR4 that sets VMXE, which the CR4 guest/host mask
    /// keeps (the host's VMX needs it; the guest reads it as 0). AMD has no
    /// such bit: there the processor raises #GP itself.
    MovCr4Vmxe,
}

impl Insn {
    /// Its mnemonic, the key of its exit counter.
    pub fn name(self) -> &'static str {
        match self {
            Insn::Invd => "invd",
            Insn::Wbinvd => "wbinvd",
            Insn::Rdpmc => "rdpmc",
            Insn::Rdtscp => "rdtscp",
            Insn::Monitor => "monitor",
            Insn::Mwait => "mwait",
            Insn::Xsetbv => "xsetbv",
            Insn::MovCr4Vmxe => "mov_cr4_vmxe",
        }
    }
}

/// Kind of access of a nested page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Execute,
}

impl VmExit {
    /// A short stable name, used as the key in per-reason exit counters.
    pub fn name(&self) -> &'static str {
        match self {
            VmExit::Io { .. } => "io",
            VmExit::Cpuid => "cpuid",
            VmExit::Msr { .. } => "msr",
            VmExit::Hlt => "hlt",
            VmExit::NestedPageFault { .. } => "npf",
            VmExit::ExternalInterrupt => "intr",
            VmExit::Shutdown => "shutdown",
            VmExit::Hypercall => "hypercall",
            VmExit::PmlFull => "pml_full",
            VmExit::Insn(insn) => insn.name(),
            VmExit::Exception { .. } => "exception",
            VmExit::EntryFailed { .. } => "entry_failed",
            VmExit::Unknown(_) => "unknown",
        }
    }
}

/// Guest general-purpose registers that the hardware does not keep in the
/// VMCB/VMCS. Layout is fixed: the entry stubs address it by offset
/// (index × 8, RAX first, in the order of the fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    /// RAX (SVM keeps the live value in the VMCB; this copy is synced by
    /// the backend).
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

/// Architectural state of a vCPU that migration and inspection need,
/// independent of the vendor's control structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: GuestRegs,
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// DR0-DR3, the breakpoint addresses.
    pub dr: [u64; 4],
    /// DR6, the debug status.
    pub dr6: u64,
    /// DR7, the debug control.
    pub dr7: u64,
    /// CR2, the last page-fault address.
    pub cr2: u64,
    /// IA32_KERNEL_GS_BASE, what `swapgs` exchanges with the GS base.
    pub kernel_gs_base: u64,
    /// The x87 and SSE registers, as FXSAVE stores them.
    pub fx: FxImage,
    /// An event waiting to be delivered at the next entry (a reflected
    /// exception, or one whose delivery an exit cut short), in the layout
    /// of SVM's EVENTINJ: vector (7:0), type (10:8: 0 interrupt, 2 NMI, 3
    /// exception), error code valid (11), valid (31), error code (63:32).
    /// 0: none.
    pub pending_event: u64,
    /// Blocking by STI (bit 0) or by MOV SS (bit 1): the instruction after
    /// one of them runs before any interrupt or (MOV SS) #DB. SVM has one
    /// interrupt shadow, carried as bit 0.
    pub interruptibility: u64,
    /// VT-x's pending debug exceptions (B0-B3, enabled breakpoint, BS,
    /// RTM), as the exit left them; SVM has none (0).
    pub pending_debug: u64,
    /// The registers the guest may change that set its mode and tables.
    pub system: SystemState,
}

/// The control registers, segment registers and descriptor tables a guest
/// may change (with MOV CR, segment loads, LGDT/LIDT/LTR/LLDT and
/// WRFSBASE/WRGSBASE). Segments are in the VMCB's form, attributes packed as
/// SVM packs them, with P clear for a segment VT-x calls unusable; GDTR and
/// IDTR use only base and limit. EFER and the MSRs are not here: every
/// guest WRMSR exits and is ignored, so they stay as the VM was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SystemState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4, as the guest sees it.
    pub cr4: u64,
    /// CR8, the task priority (0-15). Each guest has its own: SVM keeps it
    /// as the VMCB's V_TPR, VT-x in its virtual-APIC page (TPR shadow).
    pub cr8: u64,
    /// ES, CS, SS, DS, FS, GS, LDTR, TR, in that order.
    pub segments: [Segment; 8],
    /// GDTR.
    pub gdtr: Segment,
    /// IDTR.
    pub idtr: Segment,
}

impl Default for VcpuState {
    /// Zero registers with the reset values of DR6 (0xFFFF0FF0), DR7
    /// (0x400) and the x87/SSE state ([`FxImage::default`]).
    fn default() -> Self {
        VcpuState {
            regs: GuestRegs::default(),
            rip: 0,
            rsp: 0,
            rflags: 0,
            dr: [0; 4],
            dr6: 0xFFFF_0FF0,
            dr7: 0x400,
            cr2: 0,
            kernel_gs_base: 0,
            fx: FxImage::default(),
            pending_event: 0,
            interruptibility: 0,
            pending_debug: 0,
            system: SystemState::default(),
        }
    }
}

/// The 512 bytes FXSAVE stores in 64-bit mode (SDM Vol. 1 10.5.1): the x87
/// registers and their control, status and tag words, MXCSR, XMM0-XMM15.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FxImage(pub [u8; 512]);

impl FxImage {
    /// Offset of MXCSR in the image.
    pub const MXCSR: usize = 24;
    /// Offset of MXCSR_MASK, the MXCSR bits this CPU supports (0 there
    /// means 0xFFBF).
    pub const MXCSR_MASK: usize = 28;
    /// Offset of XMM0.
    pub const XMM0: usize = 160;

    /// MXCSR.
    pub fn mxcsr(&self) -> u32 {
        let m = Self::MXCSR;
        u32::from_le_bytes([self.0[m], self.0[m + 1], self.0[m + 2], self.0[m + 3]])
    }

    /// MXCSR_MASK, with 0 read as 0xFFBF (SDM Vol. 1 11.6.6).
    pub fn mxcsr_mask(&self) -> u32 {
        let m = Self::MXCSR_MASK;
        match u32::from_le_bytes([self.0[m], self.0[m + 1], self.0[m + 2], self.0[m + 3]]) {
            0 => 0xFFBF,
            mask => mask,
        }
    }
}

impl Default for FxImage {
    /// The state after FNINIT with SSE's reset MXCSR: x87 control word
    /// 0x037F (all exceptions masked, 64-bit precision), every register
    /// empty and zero, MXCSR 0x1F80 (all SIMD exceptions masked).
    fn default() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        a[Self::MXCSR..Self::MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
        FxImage(a)
    }
}

impl core::fmt::Debug for FxImage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let xmm0 = u128::from_le_bytes(self.0[Self::XMM0..Self::XMM0 + 16].try_into().unwrap_or([0; 16]));
        write!(f, "FxImage {{ mxcsr: {:#x}, xmm0: {xmm0:#x}, .. }}", self.mxcsr())
    }
}

/// One virtual CPU. The VM run loop is written against this trait only;
/// the SVM and VMX backends implement it.
pub trait Vcpu {
    /// Enters the guest and returns when it exits.
    fn run(&mut self) -> VmExit;
    /// The guest RIP (cheaper than all of [`Vcpu::state`], which exits that
    /// emulate an instruction need not build).
    fn rip(&self) -> u64;
    /// Moves the guest past an instruction the hypervisor emulated, to
    /// `next_rip`, as the processor would have completed it: any STI or
    /// MOV SS blocking ends (it covered that instruction), and under
    /// RFLAGS.TF the single-step #DB it owes is delivered at the next
    /// entry, with DR6.BS (an instruction that exits does not complete, so
    /// no trap is pending; KVM does the same).
    fn skip_instruction(&mut self, next_rip: u64);
    /// Current architectural state.
    fn state(&self) -> VcpuState;
    /// The general-purpose registers, to emulate an instruction.
    fn regs_mut(&mut self) -> &mut GuestRegs;
    /// Loads the whole state (an incoming migration); fails if the vCPU's
    /// control structure cannot be made current.
    fn set_state(&mut self, state: &VcpuState) -> Result<(), &'static str>;
    /// Enters the guest with `empty_root` (a zeroed page) as the root of
    /// its second-level page table, so that its first memory access exits
    /// before any instruction completes, and puts the real root back: what
    /// that entry does shows whether the state set by `set_state` enters at
    /// all (`VmExit::EntryFailed` if not), before anything depends on it.
    fn enter_without_memory(&mut self, empty_root: u64) -> VmExit;
    /// The guest's TSC now (host TSC plus the vCPU's offset).
    fn guest_tsc(&self, host_tsc: u64) -> u64;
    /// Sets the TSC offset so that the guest's TSC reads `guest_tsc` when
    /// the host's reads `host_tsc` (continuity across a migration).
    fn set_guest_tsc(&mut self, guest_tsc: u64, host_tsc: u64);
    /// Asks for a guest TLB flush before the next entry (after clearing
    /// second-level D or W bits).
    fn flush_tlb(&mut self);
    /// Delivers hardware exception `vector` (with `error_code` if it
    /// pushes one) to the guest at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
}

/// Exception vectors the hypervisor intercepts in every guest: #DB (1) and
/// #AC (17). A #DB raised while delivering a #DB (a data breakpoint on the
/// handler's stack), or an #AC while delivering an #AC (a misaligned stack
/// at CPL 3), repeats forever inside the guest without a VM exit: not even
/// the host's timer gets through, as KVM and Xen learned (CVE-2015-8104,
/// CVE-2015-5307). Intercepted, each one exits and is reflected back, so
/// the host's interrupts are taken between them.
pub const INTERCEPTED_EXCEPTIONS: u32 = (1 << 1) | (1 << 17);

/// RFLAGS.TF, the trap flag.
pub const RFLAGS_TF: u64 = 1 << 8;
/// DR6.BS: the #DB is a single-step trap.
pub const DR6_BS: u64 = 1 << 14;

/// Whether exception `vector` pushes an error code (SDM Vol. 3A 6.15).
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

//! The vendor-neutral vCPU interface: one exit enum both backends decode
//! into, and the trait the VM run loop drives.

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: GuestRegs,
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
}

/// One virtual CPU. The VM run loop is written against this trait only;
/// the SVM and VMX backends implement it.
pub trait Vcpu {
    /// Enters the guest and returns when it exits.
    fn run(&mut self) -> VmExit;
    /// Sets the guest RIP (after emulating an instruction).
    fn set_rip(&mut self, rip: u64);
    /// Current architectural state.
    fn state(&self) -> VcpuState;
    /// The general-purpose registers, to emulate an instruction.
    fn regs_mut(&mut self) -> &mut GuestRegs;
    /// Loads RIP, RSP, RFLAGS and the GPRs (an incoming migration).
    fn set_state(&mut self, state: &VcpuState);
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

/// Whether exception `vector` pushes an error code (SDM Vol. 3A 6.15).
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

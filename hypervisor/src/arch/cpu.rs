//! CPUID and MSR reads for the capability report.

use vmx::cpu::CpuReport;
use x86_64::registers::model_specific::Msr;

/// IA32_EFER.
pub const MSR_EFER: u32 = 0xC000_0080;

/// Executes CPUID.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Probes the processor. MSRs are read only for VMX capabilities, and
/// `CpuReport::probe` only asks for them when CPUID.1:ECX.VMX is set, which
/// guarantees the IA32_VMX_* MSRs exist.
pub fn report() -> CpuReport {
    CpuReport::probe(cpuid, |index| {
        // SAFETY: only called for IA32_VMX_* capability MSRs after CPUID
        // reported VMX support (see `CpuReport::probe`); reading them has no
        // side effects.
        unsafe { Msr::new(index).read() }
    })
}

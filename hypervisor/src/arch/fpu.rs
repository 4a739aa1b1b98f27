//! The x87/SSE register file of each vCPU. VMRUN, VM entry and VM exit
//! leave these registers alone, and the kernel (a soft-float target) never
//! touches them, so without a switch every guest ran on the previous
//! guest's x87, XMM and MXCSR state: one VM read another's registers and
//! computed with values another wrote. Each vCPU has an FXSAVE area that is
//! loaded just before it enters and stored just after it exits.
//!
//! Only the FXSAVE state is switched: XCR0 stays at its reset value (x87
//! only; the kernel never sets CR4.OSXSAVE and XSETBV exits), so AVX and
//! later state cannot be enabled in a guest.

use core::arch::asm;

use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};

/// The 512-byte FXSAVE/FXRSTOR area (SDM Vol. 1 10.5.1), 16-byte aligned.
#[repr(C, align(16))]
pub struct FxArea([u8; 512]);

impl FxArea {
    /// The state after FNINIT with SSE's reset MXCSR: x87 control word
    /// 0x037F (all exceptions masked, 64-bit precision), every register
    /// empty and zero, MXCSR 0x1F80 (all SIMD exceptions masked).
    pub fn reset() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        FxArea(a)
    }

    /// Loads this area into the x87/SSE registers.
    pub fn load(&self) {
        // SAFETY: `enable` set CR4.OSFXSR and cleared CR0.EM/TS, so FXRSTOR
        // neither faults nor skips the XMM registers; the area is 16-byte
        // aligned and was written by `reset` (valid MXCSR) or by FXSAVE.
        unsafe { asm!("fxrstor64 [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly, preserves_flags)) };
    }

    /// Stores the x87/SSE registers into this area.
    pub fn store(&mut self) {
        // SAFETY: as in `load`; FXSAVE writes the 512 bytes of the area.
        unsafe { asm!("fxsave64 [{}]", in(reg) self.0.as_mut_ptr(), options(nostack, preserves_flags)) };
    }
}

/// Lets FXSAVE/FXRSTOR carry the XMM registers (CR4.OSFXSR, with SIMD
/// exceptions reported as #XM: OSXMMEXCPT) and makes sure neither faults
/// (CR0.EM and TS clear, MP set). Called once, before any VM runs.
pub fn enable() {
    // SAFETY: these bits only govern x87/SSE instructions, which the
    // kernel does not use; paging and protection stay as they are.
    unsafe {
        Cr0::update(|f| {
            f.remove(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED);
            f.insert(Cr0Flags::MONITOR_COPROCESSOR);
        });
        Cr4::update(|f| f.insert(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE));
    }
}

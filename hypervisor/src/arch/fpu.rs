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
use core::sync::atomic::{AtomicU32, Ordering};

use vmx::FxImage;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};

/// The 512-byte FXSAVE/FXRSTOR area (SDM Vol. 1 10.5.1), 16-byte aligned.
#[repr(C, align(16))]
pub struct FxArea(FxImage);

impl FxArea {
    /// The state after FNINIT with SSE's reset MXCSR ([`FxImage::default`]).
    pub fn reset() -> Self {
        FxArea(FxImage::default())
    }

    /// The registers as last stored (what a migration carries).
    pub fn image(&self) -> FxImage {
        self.0
    }

    /// Replaces the registers the next [`FxArea::load`] loads. `image`'s
    /// MXCSR must have no bit outside [`mxcsr_mask`] (FXRSTOR faults on
    /// one): `migcmd::decode_vcpu` refuses such a state.
    pub fn set_image(&mut self, image: &FxImage) {
        self.0 = *image;
        // Kept loadable whatever the caller checked.
        let mxcsr = image.mxcsr() & mxcsr_mask();
        self.0 .0[FxImage::MXCSR..FxImage::MXCSR + 4].copy_from_slice(&mxcsr.to_le_bytes());
    }

    /// Loads this area into the x87/SSE registers.
    pub fn load(&self) {
        // SAFETY: `enable` set CR4.OSFXSR and cleared CR0.EM/TS, so FXRSTOR
        // neither faults nor skips the XMM registers; the area is 16-byte
        // aligned and was written by `reset` (valid MXCSR), by FXSAVE or by
        // `set_image`, which masks MXCSR with this CPU's MXCSR_MASK.
        unsafe { asm!("fxrstor64 [{}]", in(reg) self.0 .0.as_ptr(), options(nostack, readonly, preserves_flags)) };
    }

    /// Stores the x87/SSE registers into this area.
    pub fn store(&mut self) {
        // SAFETY: as in `load`; FXSAVE writes the 512 bytes of the area.
        unsafe { asm!("fxsave64 [{}]", in(reg) self.0 .0.as_mut_ptr(), options(nostack, preserves_flags)) };
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
    let mut probe = FxArea::reset();
    probe.store();
    MXCSR_MASK.store(probe.0.mxcsr_mask(), Ordering::Relaxed);
}

/// This CPU's MXCSR_MASK, read by [`enable`].
static MXCSR_MASK: AtomicU32 = AtomicU32::new(0xFFBF);

/// The MXCSR bits this CPU supports: FXRSTOR raises #GP for any other.
pub fn mxcsr_mask() -> u32 {
    MXCSR_MASK.load(Ordering::Relaxed)
}

//! Registers a vCPU owns that neither VMRUN nor VMX transitions switch and
//! the kernel never uses: the debug address registers DR0-DR3 on both
//! vendors, and on VT-x also DR6, CR2 and the KernelGsBase MSR (the VMCB
//! carries DR6 and CR2 for SVM, and VMLOAD/VMSAVE switch KernelGsBase).
//! Without a switch one guest read another's breakpoint addresses, last
//! page-fault address and kernel per-CPU base, and moved them under it: a
//! `swapgs` gave it the other guest's. Each vCPU keeps its values here;
//! they are loaded just before it enters and stored just after it exits.
//! (DR7, which arms the breakpoints, is in the VMCB and the VMCS, and is
//! 0x400 in the host after every exit.)

use core::arch::asm;

use x86_64::registers::model_specific::Msr;

/// IA32_KERNEL_GS_BASE, what `swapgs` exchanges with the GS base.
const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;

/// One vCPU's values of the registers this module switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unswitched {
    /// DR0-DR3.
    pub dr: [u64; 4],
    /// DR6 (VT-x; the VMCB holds SVM's).
    pub dr6: u64,
    /// CR2 (VT-x; the VMCB holds SVM's).
    pub cr2: u64,
    /// KernelGsBase (VT-x; the VMCB holds SVM's).
    pub kernel_gs_base: u64,
}

impl Default for Unswitched {
    /// The reset values: zero, and DR6's reserved bits set (0xFFFF0FF0).
    fn default() -> Self {
        Unswitched { dr: [0; 4], dr6: 0xFFFF_0FF0, cr2: 0, kernel_gs_base: 0 }
    }
}

/// DR7.GD: a guest's access to a debug register raises #DB. Delivering a
/// #DB clears it; a reflected one must too.
pub const DR7_GD: u64 = 1 << 13;

/// DR6's B0-B3, BD and BS: the status bits a #DB sets (bits 3:0, 13, 14).
const DR6_TRAP_BITS: u64 = 0x600F;

impl Unswitched {
    /// Loads DR0-DR3.
    pub fn load_debug(&self) {
        let [d0, d1, d2, d3] = self.dr;
        // SAFETY: writing the breakpoint addresses arms nothing: the host's
        // DR7 (0x400 after every exit) enables no breakpoint, and the
        // guest's DR7 applies only inside the guest.
        unsafe {
            asm!(
                "mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}",
                in(reg) d0, in(reg) d1, in(reg) d2, in(reg) d3,
                options(nomem, nostack, preserves_flags)
            );
        }
    }

    /// Stores DR0-DR3.
    pub fn store_debug(&mut self) {
        let (d0, d1, d2, d3): (u64, u64, u64, u64);
        // SAFETY: reading debug registers at CPL 0 has no side effect.
        unsafe {
            asm!(
                "mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3",
                out(reg) d0, out(reg) d1, out(reg) d2, out(reg) d3,
                options(nomem, nostack, preserves_flags)
            );
        }
        self.dr = [d0, d1, d2, d3];
    }

    /// VT-x: loads DR0-DR3, DR6, CR2 and KernelGsBase.
    pub fn load_vmx(&self) {
        self.load_debug();
        // SAFETY: the kernel never executes `swapgs` (it has no user
        // mode), so KernelGsBase is only ever the guest's; the value came
        // from the same MSR (`store_vmx`) or is the reset value 0, both
        // canonical.
        unsafe { Msr::new(MSR_KERNEL_GS_BASE).write(self.kernel_gs_base) };
        // SAFETY: DR6 holds only status bits, which nothing in the host
        // reads; CR2 is read by the kernel's page-fault handler only, and a
        // page fault in the kernel halts it after reporting CR2, which would
        // then name the guest's last fault address: no state depends on it.
        unsafe {
            asm!(
                "mov dr6, {}", "mov cr2, {}",
                in(reg) self.dr6, in(reg) self.cr2,
                options(nomem, nostack, preserves_flags)
            );
        }
    }

    /// VT-x: stores DR0-DR3, DR6, CR2 and KernelGsBase.
    pub fn store_vmx(&mut self) {
        self.store_debug();
        // SAFETY: the MSR exists on every 64-bit processor; reading it has
        // no side effect.
        self.kernel_gs_base = unsafe { Msr::new(MSR_KERNEL_GS_BASE).read() };
        let (dr6, cr2): (u64, u64);
        // SAFETY: reading DR6 and CR2 at CPL 0 has no side effect.
        unsafe {
            asm!("mov {}, dr6", "mov {}, cr2", out(reg) dr6, out(reg) cr2, options(nomem, nostack, preserves_flags));
        }
        (self.dr6, self.cr2) = (dr6, cr2);
    }

    /// VT-x: a #DB that exits leaves DR6 as it was and reports the status
    /// bits it would have set in the exit qualification (SDM Vol. 3C
    /// 27.1): they go into the guest's DR6 here, so the reflected #DB finds
    /// them. Added to those there, as a #DB adds them: the processor never
    /// clears BD and BS (SDM Vol. 3B 18.2.3; they used to be replaced), and
    /// an ICEBP, whose qualification has none, changes nothing.
    pub fn set_dr6_trap_bits(&mut self, qualification: u64) {
        self.dr6 |= qualification & DR6_TRAP_BITS;
    }
}

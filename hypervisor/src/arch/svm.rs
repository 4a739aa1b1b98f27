//! AMD SVM on the real processor: turning it on (EFER.SVME, the host save
//! area), the shared I/O and MSR permission maps, and `VMRUN` with the guest
//! registers the VMCB does not hold (APM Vol. 2, 15.4 "Enabling SVM", 15.5
//! "VMRUN Instruction", 15.10 "I/O Intercepts", 15.11 "MSR Intercepts").

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

use vmx::exit::{DR6_BS, INTERCEPTED_EXCEPTIONS, RFLAGS_TF};
use vmx::svm::{
    decode_exit, event_exception, redelivery, tlb_control, Segment, Vmcb, GUEST_INTERCEPTS, V_INTR_MASKING, V_TPR,
};
use vmx::{GuestRegs, SystemState, Vcpu, VcpuState, VmExit};
use x86_64::registers::model_specific::Msr;

use super::cpu::MSR_EFER;
use super::dr::{Unswitched, DR7_GD};
use super::fpu::FxArea;
use super::memory;

const MSR_VM_CR: u32 = 0xC001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;

/// Physical addresses of the all-ones permission maps every VM shares:
/// every port and every MSR access exits.
static IOPM_PA: AtomicU64 = AtomicU64::new(0);
/// Where VMSAVE keeps the host's own FS, GS, TR, LDTR, KernelGsBase and
/// SYSCALL/SYSENTER MSRs while a guest runs: VMRUN and #VMEXIT do not
/// switch them, so without this the guest ran on the host's TR, and a guest
/// `ltr` left the host's NMI and double-fault stacks (the TSS's IST) where
/// the guest chose.
static HOST_SAVE_PA: AtomicU64 = AtomicU64::new(0);
static MSRPM_PA: AtomicU64 = AtomicU64::new(0);
/// The VMCB that ran last; a different one must flush the TLB (our ASIDs
/// are few and reused).
static LAST_VMCB: AtomicU64 = AtomicU64::new(0);

/// Why SVM could not be enabled.
#[derive(Debug)]
pub enum SvmError {
    /// The firmware disabled SVM (VM_CR.SVMDIS).
    DisabledByFirmware,
    /// No memory for the host save area or permission maps.
    OutOfMemory,
}

/// Enables SVM on this processor. Call once, after memory is up, and only
/// when CPUID reported SVM.
pub fn enable() -> Result<(), SvmError> {
    // SAFETY: VM_CR exists on every processor with CPUID SVM (the caller
    // checked); reading it has no side effect.
    if unsafe { Msr::new(MSR_VM_CR).read() } & (1 << 4) != 0 {
        return Err(SvmError::DisabledByFirmware);
    }
    let hsave = memory::alloc_zeroed(1).ok_or(SvmError::OutOfMemory)?;
    let iopm = memory::alloc_zeroed(3).ok_or(SvmError::OutOfMemory)?;
    let msrpm = memory::alloc_zeroed(2).ok_or(SvmError::OutOfMemory)?;
    let host_save = memory::alloc_zeroed(1).ok_or(SvmError::OutOfMemory)?;
    HOST_SAVE_PA.store(host_save, Ordering::Relaxed);
    // SAFETY: both maps were just allocated (3 and 2 frames) and are reached
    // through the physical map; nothing else refers to them yet.
    unsafe {
        core::ptr::write_bytes(memory::phys_to_virt(iopm), 0xFF, 3 * 4096);
        core::ptr::write_bytes(memory::phys_to_virt(msrpm), 0xFF, 2 * 4096);
    }
    IOPM_PA.store(iopm, Ordering::Relaxed);
    MSRPM_PA.store(msrpm, Ordering::Relaxed);
    // SAFETY: setting EFER.SVME is allowed once VM_CR.SVMDIS is clear
    // (checked above); VM_HSAVE_PA gets a page-aligned frame owned by SVM
    // from now on.
    unsafe {
        let mut efer = Msr::new(MSR_EFER);
        efer.write(efer.read() | vmx::svm::EFER_SVME);
        Msr::new(MSR_VM_HSAVE_PA).write(hsave);
    }
    Ok(())
}

/// One SVM vCPU: its VMCB (a frame of its own) and the GPRs VMRUN leaves to
/// software.
pub struct SvmVcpu {
    vmcb_pa: u64,
    regs: GuestRegs,
    /// Its x87/SSE registers while another vCPU or the host runs.
    fpu: Box<FxArea>,
    /// Its DR0-DR3 likewise (the VMCB has DR6, DR7 and CR2).
    unswitched: Unswitched,
}

impl SvmVcpu {
    /// A vCPU in 64-bit mode at `rip`, on the nested page table `n_cr3`,
    /// tagged with `asid`.
    pub fn new(asid: u32, n_cr3: u64, rip: u64, rsp: u64, cr3: u64) -> Option<Self> {
        let vmcb_pa = memory::alloc_zeroed(1)?;
        let mut vcpu = SvmVcpu {
            vmcb_pa,
            regs: GuestRegs::default(),
            fpu: Box::new(FxArea::reset()),
            unswitched: Unswitched::default(),
        };
        let v = vcpu.vmcb_mut();
        *v = Vmcb::zeroed();
        (v.control.intercept_misc1, v.control.intercept_misc2) = GUEST_INTERCEPTS;
        v.control.intercept_exceptions = INTERCEPTED_EXCEPTIONS;
        v.control.iopm_base_pa = IOPM_PA.load(Ordering::Relaxed);
        v.control.msrpm_base_pa = MSRPM_PA.load(Ordering::Relaxed);
        v.control.guest_asid = asid;
        v.control.tlb_control = tlb_control::FLUSH_ALL;
        v.control.vintr = V_INTR_MASKING;
        v.control.np_enable = 1;
        v.control.n_cr3 = n_cr3;
        v.set_long_mode_guest(rip, rsp, cr3);
        Some(vcpu)
    }

    fn vmcb(&self) -> &Vmcb {
        // SAFETY: `vmcb_pa` is a frame this vCPU allocated and owns alone,
        // reached through the physical map; the borrow of `self` keeps any
        // `&mut` from `vmcb_mut` out while this one lives.
        unsafe { &*memory::phys_to_virt(self.vmcb_pa).cast::<Vmcb>() }
    }

    fn vmcb_mut(&mut self) -> &mut Vmcb {
        // SAFETY: as in `vmcb`; `&mut self` makes this the only reference.
        unsafe { &mut *memory::phys_to_virt(self.vmcb_pa).cast::<Vmcb>() }
    }

    /// Corrupts the guest state so the next VMRUN fails its consistency
    /// checks (hidden test hook: a failed entry must stop only this VM).
    pub fn break_state(&mut self) {
        self.vmcb_mut().save.efer &= !vmx::svm::EFER_SVME;
    }

    /// Frees the VMCB.
    pub fn destroy(self) {
        memory::free_frames(self.vmcb_pa, 1);
    }
}

unsafe extern "C" {
    /// VMRUN with the guest GPRs loaded from and saved back to `regs`.
    fn svm_run(vmcb_pa: u64, regs: *mut GuestRegs, host_save_pa: u64);
}

// Host callee-saved registers go on the stack; the guest's are loaded from
// `GuestRegs` (RAX lives in the VMCB). GIF is cleared around the switch so
// that a host interrupt arriving after STI is taken by the guest's INTR
// intercept, not by the host mid-switch (APM 15.17 "Global Interrupt Flag").
// VMRUN and #VMEXIT leave FS, GS, TR, LDTR, KernelGsBase and the
// SYSCALL/SYSENTER MSRs alone, so VMSAVE keeps the host's in its save page,
// VMLOAD gives the guest its own from the VMCB, and after the exit VMSAVE
// stores the guest's back and VMLOAD restores the host's (as KVM does).
// After #VMEXIT, RAX is the VMCB's address again (restored from the host
// save area VMRUN used).
core::arch::global_asm!(
    r#"
    .section .text.svm_run, "ax"
    .global svm_run
svm_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdx
    push rsi
    clgi
    mov rax, rdx
    vmsave rax
    mov rax, rdi
    vmload rax
    mov rbx, [rsi + 8]
    mov rcx, [rsi + 16]
    mov rdx, [rsi + 24]
    mov rdi, [rsi + 40]
    mov rbp, [rsi + 48]
    mov r8, [rsi + 56]
    mov r9, [rsi + 64]
    mov r10, [rsi + 72]
    mov r11, [rsi + 80]
    mov r12, [rsi + 88]
    mov r13, [rsi + 96]
    mov r14, [rsi + 104]
    mov r15, [rsi + 112]
    mov rsi, [rsi + 32]
    sti
    vmrun rax
    cli
    vmsave rax
    xchg rsi, [rsp]
    mov [rsi + 8], rbx
    mov [rsi + 16], rcx
    mov [rsi + 24], rdx
    mov [rsi + 40], rdi
    mov [rsi + 48], rbp
    mov [rsi + 56], r8
    mov [rsi + 64], r9
    mov [rsi + 72], r10
    mov [rsi + 80], r11
    mov [rsi + 88], r12
    mov [rsi + 96], r13
    mov [rsi + 104], r14
    mov [rsi + 112], r15
    pop rax
    mov [rsi + 32], rax
    pop rax
    vmload rax
    stgi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#
);

impl Vcpu for SvmVcpu {
    fn run(&mut self) -> VmExit {
        let (pa, rax) = (self.vmcb_pa, self.regs.rax);
        let v = self.vmcb_mut();
        if LAST_VMCB.swap(pa, Ordering::Relaxed) != pa {
            v.control.tlb_control = tlb_control::FLUSH_ALL;
        }
        v.save.rax = rax;
        self.fpu.load();
        self.unswitched.load_debug();
        // SAFETY: the VMCB is a valid, page-aligned, exclusively owned
        // control block set up by `new`; SVM was enabled by `enable`, which
        // also allocated the host save page VMSAVE/VMLOAD use (owned by SVM,
        // used by nothing else); `regs` is a live GuestRegs. Interrupts are
        // off on entry (the run loop calls this with IF=0) and off again on
        // return.
        unsafe { svm_run(pa, &mut self.regs, HOST_SAVE_PA.load(Ordering::Relaxed)) };
        self.unswitched.store_debug();
        self.fpu.store();
        self.regs.rax = self.vmcb().save.rax;
        let v = self.vmcb_mut();
        v.control.tlb_control = tlb_control::NOTHING;
        // An event injected with this VMRUN went in. One whose delivery
        // this exit cut short (EXITINTINFO) goes in again, as hardware
        // would have finished delivering it; an intercepted exception this
        // exit reports replaces it (`inject_exception`).
        v.control.event_inj = redelivery(v.control.exit_int_info);
        decode_exit(&v.control)
    }

    fn rip(&self) -> u64 {
        self.vmcb().save.rip
    }

    fn skip_instruction(&mut self, next_rip: u64) {
        let v = self.vmcb_mut();
        v.save.rip = next_rip;
        // Bit 0 is the shadow; bit 1 only reports RFLAGS.IF.
        v.control.interrupt_shadow &= !1;
        if v.save.rflags & RFLAGS_TF != 0 {
            v.save.dr6 |= DR6_BS;
            self.inject_exception(1, None);
        }
    }

    fn state(&self) -> VcpuState {
        let v = self.vmcb();
        VcpuState {
            regs: self.regs,
            rip: v.save.rip,
            rsp: v.save.rsp,
            rflags: v.save.rflags,
            dr: self.unswitched.dr,
            dr6: v.save.dr6,
            dr7: v.save.dr7,
            cr2: v.save.cr2,
            kernel_gs_base: v.save.kernel_gs_base,
            fx: self.fpu.image(),
            pending_event: v.control.event_inj,
            interruptibility: v.control.interrupt_shadow & 1,
            pending_debug: 0,
            system: SystemState {
                cr0: v.save.cr0,
                cr3: v.save.cr3,
                cr4: v.save.cr4,
                cr8: v.control.vintr & V_TPR,
                // The CPL travels as SS's DPL, which it equals but after
                // an AMD SYSRET (unreachable: EFER.SCE stays 0), as VT-x
                // defines it.
                segments: [
                    v.save.es,
                    v.save.cs,
                    Segment { attrib: (v.save.ss.attrib & !0x60) | (u16::from(v.save.cpl & 3) << 5), ..v.save.ss },
                    v.save.ds,
                    v.save.fs,
                    v.save.gs,
                    v.save.ldtr,
                    v.save.tr,
                ],
                gdtr: v.save.gdtr,
                idtr: v.save.idtr,
            },
        }
    }

    fn regs_mut(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn set_state(&mut self, state: &VcpuState) -> Result<(), &'static str> {
        let v = self.vmcb_mut();
        v.save.rip = state.rip;
        v.save.rsp = state.rsp;
        v.save.rflags = state.rflags;
        v.save.dr6 = state.dr6;
        v.save.dr7 = state.dr7;
        v.save.cr2 = state.cr2;
        v.save.kernel_gs_base = state.kernel_gs_base;
        v.control.event_inj = state.pending_event;
        v.control.interrupt_shadow = u64::from(state.interruptibility != 0);
        let sys = &state.system;
        (v.save.cr0, v.save.cr3, v.save.cr4) = (sys.cr0, sys.cr3, sys.cr4);
        v.control.vintr = (v.control.vintr & !V_TPR) | (sys.cr8 & V_TPR);
        [v.save.es, v.save.cs, v.save.ss, v.save.ds, v.save.fs, v.save.gs, v.save.ldtr, v.save.tr] = sys.segments;
        (v.save.gdtr, v.save.idtr) = (sys.gdtr, sys.idtr);
        // The CPL travels as SS's DPL (see `state`).
        v.save.cpl = ((v.save.ss.attrib >> 5) & 3) as u8;
        self.regs = state.regs;
        self.unswitched.dr = state.dr;
        self.fpu.set_image(&state.fx);
        Ok(())
    }

    fn enter_without_memory(&mut self, empty_root: u64) -> VmExit {
        let root = self.vmcb().control.n_cr3;
        let v = self.vmcb_mut();
        v.control.n_cr3 = empty_root;
        v.control.tlb_control = tlb_control::FLUSH_ALL;
        let exit = self.run();
        self.vmcb_mut().control.n_cr3 = root;
        self.flush_tlb();
        exit
    }

    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.vmcb().control.tsc_offset)
    }

    fn set_guest_tsc(&mut self, guest_tsc: u64, host_tsc: u64) {
        self.vmcb_mut().control.tsc_offset = guest_tsc.wrapping_sub(host_tsc);
    }

    fn flush_tlb(&mut self) {
        self.vmcb_mut().control.tlb_control = tlb_control::FLUSH_ALL;
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let v = self.vmcb_mut();
        v.control.event_inj = event_exception(vector, error_code);
        if vector == 1 {
            // As delivering a #DB does: else a handler's first access to a
            // debug register would raise the next (DR7.GD).
            v.save.dr7 &= !DR7_GD;
        }
    }
}

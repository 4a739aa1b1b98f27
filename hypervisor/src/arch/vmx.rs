//! Intel VMX on the real processor: VMXON, VMCS set-up for our long-mode
//! guests, VMREAD/VMWRITE, INVEPT, and VMLAUNCH/VMRESUME with the guest
//! registers (Intel SDM Vol. 3C chapters 24 "Introduction to VMX", 25 "VMCS",
//! 27 "VM Entries", 28 "VM Exits", 29.3 "EPT" and 29.3.6 "PML").

use alloc::boxed::Box;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use ept::DirtyBitmap;
use vmx::cpu::CpuReport;
use vmx::exit::{DR6_BS, INTERCEPTED_EXCEPTIONS, RFLAGS_TF};
use vmx::svm::{Segment, ATTR_CODE64, ATTR_DATA, ATTR_TSS64};
use vmx::vmcs::{
    access_rights, adjust_controls, ctl, decode_exit, entry_exception, instruction_error, msr, redelivery,
    segment_access_rights, segment_attrib, ExitFields, Field16, Field32, Field64, FieldN, UNUSABLE,
};
use vmx::{GuestRegs, SystemState, Vcpu, VcpuState, VmExit};
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::Msr;

use super::cpu::MSR_EFER;
use super::dr::{Unswitched, DR7_GD};
use super::fpu::FxArea;
use super::{gdt, memory};

const MSR_FS_BASE: u32 = 0xC000_0100;
const MSR_GS_BASE: u32 = 0xC000_0101;

/// The VMCS that is current on this processor (VMPTRLD), 0 for none.
static CURRENT_VMCS: AtomicU64 = AtomicU64::new(0);
/// VMCS revision identifier (IA32_VMX_BASIC[30:0]).
static REVISION: AtomicU64 = AtomicU64::new(0);
/// Whether the TRUE_* capability MSRs apply.
static TRUE_CONTROLS: AtomicU64 = AtomicU64::new(0);

/// Why VMX could not be used (printed through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
pub enum VmxError {
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled.
    DisabledByFirmware,
    /// No memory for the VMXON region or a VMCS.
    OutOfMemory,
    /// A VMX instruction failed; the text says which and why.
    Instruction(&'static str),
    /// A control we need is not offered: (which control, missing bits).
    Unsupported(&'static str, u32),
}

fn revision() -> u32 {
    u32::try_from(REVISION.load(Ordering::Relaxed)).unwrap_or(0)
}

fn rdmsr(index: u32) -> u64 {
    // SAFETY: only called for architectural MSRs that exist on every
    // processor with VMX (the IA32_VMX_* capabilities, FEATURE_CONTROL, EFER,
    // FS/GS base); reading them has no side effect.
    unsafe { Msr::new(index).read() }
}

/// Runs a VMX instruction's flag check: CF=1 is VMfailInvalid, ZF=1 is
/// VMfailValid (the VMCS holds an error number).
fn check(cf: u8, zf: u8, what: &'static str) -> Result<(), VmxError> {
    match (cf, zf) {
        (0, 0) => Ok(()),
        (1, _) => Err(VmxError::Instruction(what)),
        _ => Err(VmxError::Instruction(instruction_error(vmread(Field32::VmInstructionError as u32)))),
    }
}

/// Runs a VMX instruction that takes the physical address of a region as
/// a memory operand (VMXON, VMCLEAR, VMPTRLD) and checks its flags.
macro_rules! region_insn {
    ($insn:literal, $pa:expr, $what:literal) => {{
        let pa: &u64 = $pa;
        let (cf, zf): (u8, u8);
        // SAFETY: every caller passes a 4 KiB-aligned region it owns, carrying
        // the VMCS revision id (see the call sites); the instruction only
        // changes VMX state, which this module tracks.
        unsafe {
            asm!(concat!($insn, " [{p}]"), "setc {cf}", "setz {zf}", p = in(reg) pa, cf = out(reg_byte) cf, zf = out(reg_byte) zf)
        };
        check(cf, zf, $what)
    }};
}

fn vmread(field: u32) -> u64 {
    let value: u64;
    // SAFETY: VMREAD of a field of the current VMCS only reads it; callers
    // make the right VMCS current first. An unsupported field fails without
    // side effects and leaves 0.
    unsafe { asm!("vmread {v}, {f}", f = in(reg) u64::from(field), v = out(reg) value, options(nostack)) };
    value
}

fn vmwrite(field: u32, value: u64) {
    // SAFETY: VMWRITE of a field of the current VMCS changes only that VMCS,
    // which the caller owns and has made current.
    unsafe { asm!("vmwrite {f}, {v}", f = in(reg) u64::from(field), v = in(reg) value, options(nostack)) };
}

fn write16(f: Field16, v: u16) {
    vmwrite(f as u32, u64::from(v));
}
fn write32(f: Field32, v: u32) {
    vmwrite(f as u32, u64::from(v));
}
fn write64(f: Field64, v: u64) {
    vmwrite(f as u32, v);
}
fn write_n(f: FieldN, v: u64) {
    vmwrite(f as u32, v);
}

/// Enters VMX operation on this processor (CR4.VMXE, FEATURE_CONTROL,
/// fixed CR0/CR4 bits, VMXON). Call once, when CPUID reported VMX.
pub fn enable() -> Result<(), VmxError> {
    let fc = rdmsr(msr::FEATURE_CONTROL);
    if fc & 1 != 0 && fc & (1 << 2) == 0 {
        return Err(VmxError::DisabledByFirmware);
    }
    if fc & 1 == 0 {
        // SAFETY: the MSR is unlocked; enabling VMX outside SMX and locking
        // it is what firmware would do and affects nothing else.
        unsafe { Msr::new(msr::FEATURE_CONTROL).write(fc | 1 | (1 << 2)) };
    }
    let basic = rdmsr(msr::BASIC);
    REVISION.store(basic & 0x7FFF_FFFF, Ordering::Relaxed);
    TRUE_CONTROLS.store(u64::from(basic & (1 << 55) != 0), Ordering::Relaxed);
    // SAFETY: setting the bits the fixed-bit MSRs require (NE, and VMXE in
    // CR4) keeps the kernel's paging and protection as they are.
    unsafe {
        let cr0 = (Cr0::read_raw() | rdmsr(msr::CR0_FIXED0)) & rdmsr(msr::CR0_FIXED1);
        Cr0::write_raw(cr0);
        let cr4 = (Cr4::read_raw() | (1 << 13) | rdmsr(msr::CR4_FIXED0)) & rdmsr(msr::CR4_FIXED1);
        Cr4::write_raw(cr4);
    }
    let region = memory::alloc_zeroed(1).ok_or(VmxError::OutOfMemory)?;
    // SAFETY: the region is a fresh frame; its first word takes the revision.
    unsafe { memory::phys_to_virt(region).cast::<u32>().write(revision()) };
    // CR0/CR4 fixed bits are satisfied and FEATURE_CONTROL enabled above.
    region_insn!("vmxon", &region, "VMXON failed")
}

fn controls(desired: u32, plain: u32, true_msr: u32, name: &'static str, required: u32) -> Result<u32, VmxError> {
    let cap = if TRUE_CONTROLS.load(Ordering::Relaxed) != 0 { rdmsr(true_msr) } else { rdmsr(plain) };
    let (value, missing) = adjust_controls(desired, cap);
    if missing & required != 0 {
        return Err(VmxError::Unsupported(name, missing & required));
    }
    Ok(value)
}

/// Offset of the VTPR, the guest's task priority, in the virtual-APIC page
/// (SDM Vol. 3C 30.1 "Virtual APIC state"): CR8 is its bits 7:4.
const VTPR: u64 = 0x80;

/// One VMX vCPU: its VMCS, the GPRs, and its EPT/PML state.
pub struct VmxVcpu {
    vmcs_pa: u64,
    regs: GuestRegs,
    launched: bool,
    eptp: u64,
    flush_pending: bool,
    pml_pa: u64,
    /// The virtual-APIC page, where the guest's CR8 lives (TPR shadow):
    /// without it, MOV to CR8 wrote the processor's TPR, which every
    /// other guest then read.
    vapic_pa: u64,
    proc2: u32,
    pml_supported: bool,
    /// INVEPT type: 1 single-context (this EPTP only), 2 all-context.
    invept_type: u64,
    /// Its x87/SSE registers while another vCPU or the host runs.
    fpu: Box<FxArea>,
    /// Its DR0-DR3, DR6, CR2 and KernelGsBase likewise.
    unswitched: Unswitched,
}

unsafe extern "C" {
    /// VMLAUNCH (`launched` = 0) or VMRESUME with the guest GPRs from and
    /// back to `regs`. Returns 0 after a VM exit, 1 for VMfailInvalid, 2 for
    /// VMfailValid.
    fn vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
}

core::arch::global_asm!(
    r#"
    .section .text.vmx_run, "ax"
    .global vmx_run
    .global vmx_exit
vmx_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, {host_rsp}
    vmwrite rax, rsp
    test rsi, rsi
    mov rax, [rdi]
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 56]
    mov r9, [rdi + 64]
    mov r10, [rdi + 72]
    mov r11, [rdi + 80]
    mov r12, [rdi + 88]
    mov r13, [rdi + 96]
    mov r14, [rdi + 104]
    mov r15, [rdi + 112]
    mov rdi, [rdi + 40]
    jnz vmx_resume
    vmlaunch
    jmp vmx_failed
vmx_resume:
    vmresume
vmx_failed:
    mov eax, 2
    jnc vmx_fail_valid
    mov eax, 1
vmx_fail_valid:
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret

vmx_exit:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi], rax
    mov [rdi + 8], rbx
    mov [rdi + 16], rcx
    mov [rdi + 24], rdx
    mov [rdi + 32], rsi
    mov [rdi + 48], rbp
    mov [rdi + 56], r8
    mov [rdi + 64], r9
    mov [rdi + 72], r10
    mov [rdi + 80], r11
    mov [rdi + 88], r12
    mov [rdi + 96], r13
    mov [rdi + 104], r14
    mov [rdi + 112], r15
    pop rax
    mov [rdi + 40], rax
    pop rdi
    xor eax, eax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#,
    host_rsp = const FieldN::HostRsp as u32,
);

unsafe extern "C" {
    static vmx_exit: u8;
}

impl VmxVcpu {
    /// A vCPU in 64-bit mode at `rip`, on the EPT `eptp`, tagged `vpid`.
    pub fn new(cpu: &CpuReport, vpid: u16, eptp: u64, rip: u64, rsp: u64, cr3: u64) -> Result<Self, VmxError> {
        let vmcs_pa = memory::alloc_zeroed(1).ok_or(VmxError::OutOfMemory)?;
        let Some(pml_pa) = memory::alloc_zeroed(1) else {
            memory::free_frames(vmcs_pa, 1);
            return Err(VmxError::OutOfMemory);
        };
        let Some(vapic_pa) = memory::alloc_zeroed(1) else {
            memory::free_frames(vmcs_pa, 1);
            memory::free_frames(pml_pa, 1);
            return Err(VmxError::OutOfMemory);
        };
        // SAFETY: the VMCS frame is fresh; its first word takes the revision.
        unsafe { memory::phys_to_virt(vmcs_pa).cast::<u32>().write(revision()) };
        let mut vcpu = VmxVcpu {
            vmcs_pa,
            regs: GuestRegs::default(),
            launched: false,
            eptp,
            flush_pending: true,
            pml_pa,
            vapic_pa,
            proc2: 0,
            pml_supported: cpu.pml,
            invept_type: if cpu.invept_single { 1 } else { 2 },
            fpu: Box::new(FxArea::reset()),
            unswitched: Unswitched::default(),
        };
        let ready = region_insn!("vmclear", &vmcs_pa, "VMCLEAR failed")
            .and_then(|()| vcpu.make_current())
            .and_then(|()| vcpu.setup(cpu, vpid, rip, rsp, cr3));
        match ready {
            Ok(()) => Ok(vcpu),
            Err(e) => {
                // A control this processor refuses failed every `vm create`
                // and leaked its frames each time.
                vcpu.destroy();
                Err(e)
            }
        }
    }

    fn make_current(&self) -> Result<(), VmxError> {
        if CURRENT_VMCS.load(Ordering::Relaxed) == self.vmcs_pa {
            return Ok(());
        }
        region_insn!("vmptrld", &self.vmcs_pa, "VMPTRLD failed")?;
        CURRENT_VMCS.store(self.vmcs_pa, Ordering::Relaxed);
        Ok(())
    }

    fn setup(&mut self, cpu: &CpuReport, vpid: u16, rip: u64, rsp: u64, cr3: u64) -> Result<(), VmxError> {
        let pin = controls(
            ctl::PIN_EXTERNAL_INTERRUPT | ctl::PIN_NMI,
            msr::PINBASED,
            msr::TRUE_PINBASED,
            "pin-based",
            ctl::PIN_EXTERNAL_INTERRUPT,
        )?;
        // The exits of `vmx::Insn` (INVD always exits; RDTSCP raises #UD
        // without the "enable RDTSCP" control).
        let insns = ctl::PROC_RDPMC | ctl::PROC_MWAIT | ctl::PROC_MONITOR;
        let proc = controls(
            ctl::PROC_HLT
                | ctl::PROC_UNCOND_IO
                | ctl::PROC_SECONDARY
                | ctl::PROC_TSC_OFFSET
                | ctl::PROC_TPR_SHADOW
                | insns,
            msr::PROCBASED,
            msr::TRUE_PROCBASED,
            "processor-based",
            ctl::PROC_UNCOND_IO | ctl::PROC_SECONDARY | ctl::PROC_TPR_SHADOW | insns,
        )?;
        let want2 = ctl::PROC2_EPT | ctl::PROC2_WBINVD | if cpu.vpid { ctl::PROC2_VPID } else { 0 };
        let proc2 = controls(want2, msr::PROCBASED2, msr::PROCBASED2, "secondary", ctl::PROC2_EPT | ctl::PROC2_WBINVD)?;
        // The guest's DR7 lives in the VMCS across exits (each exit sets
        // DR7 to 0x400): without these, a guest's breakpoints vanished at
        // its next exit.
        let exit = controls(
            ctl::EXIT_HOST_64 | ctl::EXIT_SAVE_EFER | ctl::EXIT_LOAD_EFER | ctl::EXIT_SAVE_DEBUG,
            msr::EXIT,
            msr::TRUE_EXIT,
            "VM-exit",
            ctl::EXIT_HOST_64 | ctl::EXIT_LOAD_EFER | ctl::EXIT_SAVE_DEBUG,
        )?;
        let entry = controls(
            ctl::ENTRY_IA32E | ctl::ENTRY_LOAD_EFER | ctl::ENTRY_LOAD_DEBUG,
            msr::ENTRY,
            msr::TRUE_ENTRY,
            "VM-entry",
            ctl::ENTRY_IA32E | ctl::ENTRY_LOAD_EFER | ctl::ENTRY_LOAD_DEBUG,
        )?;
        self.proc2 = proc2;
        write32(Field32::PinBasedControls, pin);
        write32(Field32::PrimaryProcControls, proc);
        write32(Field32::SecondaryProcControls, proc2);
        write32(Field32::ExitControls, exit);
        write32(Field32::EntryControls, entry);
        write32(Field32::ExceptionBitmap, INTERCEPTED_EXCEPTIONS);
        write32(Field32::Cr3TargetCount, 0);
        write32(Field32::ExitMsrStoreCount, 0);
        write32(Field32::ExitMsrLoadCount, 0);
        write32(Field32::EntryMsrLoadCount, 0);
        write32(Field32::EntryInterruptionInfo, 0);
        write64(Field64::EptPointer, self.eptp);
        write64(Field64::PmlAddress, self.pml_pa);
        // No exit for a lowered priority: with threshold 0, none is below.
        write64(Field64::VirtualApicAddress, self.vapic_pa);
        write32(Field32::TprThreshold, 0);
        write64(Field64::TscOffset, 0);
        write16(Field16::GuestPmlIndex, 511);
        if cpu.vpid {
            write16(Field16::Vpid, vpid.max(1));
        }

        // Host state: what the kernel runs with now.
        let (code, data, tss, tss_base) = gdt::host_segments();
        write_n(FieldN::HostCr0, Cr0::read_raw());
        write_n(FieldN::HostCr3, Cr3::read_raw().0.start_address().as_u64());
        write_n(FieldN::HostCr4, Cr4::read_raw());
        for f in [Field16::HostDsSelector, Field16::HostEsSelector, Field16::HostSsSelector] {
            write16(f, data);
        }
        write16(Field16::HostFsSelector, 0);
        write16(Field16::HostGsSelector, 0);
        write16(Field16::HostCsSelector, code);
        write16(Field16::HostTrSelector, tss);
        write_n(FieldN::HostFsBase, rdmsr(MSR_FS_BASE));
        write_n(FieldN::HostGsBase, rdmsr(MSR_GS_BASE));
        write_n(FieldN::HostTrBase, tss_base);
        write_n(FieldN::HostGdtrBase, x86_64::instructions::tables::sgdt().base.as_u64());
        write_n(FieldN::HostIdtrBase, x86_64::instructions::tables::sidt().base.as_u64());
        write32(Field32::HostSysenterCs, 0);
        write_n(FieldN::HostSysenterEsp, 0);
        write_n(FieldN::HostSysenterEip, 0);
        write64(Field64::HostIa32Efer, rdmsr(MSR_EFER));
        write_n(FieldN::HostRip, core::ptr::addr_of!(vmx_exit) as u64);

        // Guest state: flat 64-bit mode, the same as the SVM guest gets.
        let cr0 = (0x8005_0033 | rdmsr(msr::CR0_FIXED0)) & rdmsr(msr::CR0_FIXED1);
        // PAE; OSFXSR and OSXMMEXCPT, so the guest has SSE (its registers
        // are its own: `fpu`).
        let cr4 = ((1 << 5) | (1 << 9) | (1 << 10) | rdmsr(msr::CR4_FIXED0)) & rdmsr(msr::CR4_FIXED1);
        write_n(FieldN::GuestCr0, cr0);
        write_n(FieldN::GuestCr3, cr3);
        write_n(FieldN::GuestCr4, cr4);
        write_n(FieldN::Cr0ReadShadow, cr0);
        write_n(FieldN::Cr4ReadShadow, cr4 & !(1 << 13));
        write_n(FieldN::Cr4GuestHostMask, 1 << 13);
        let segs = [
            (Field16::GuestEsSelector, Field32::GuestEsLimit, Field32::GuestEsAccessRights, FieldN::GuestEsBase),
            (Field16::GuestSsSelector, Field32::GuestSsLimit, Field32::GuestSsAccessRights, FieldN::GuestSsBase),
            (Field16::GuestDsSelector, Field32::GuestDsLimit, Field32::GuestDsAccessRights, FieldN::GuestDsBase),
            (Field16::GuestFsSelector, Field32::GuestFsLimit, Field32::GuestFsAccessRights, FieldN::GuestFsBase),
            (Field16::GuestGsSelector, Field32::GuestGsLimit, Field32::GuestGsAccessRights, FieldN::GuestGsBase),
        ];
        for (sel, limit, ar, base) in segs {
            write16(sel, 0x10);
            write32(limit, 0xFFFF_FFFF);
            write32(ar, access_rights(ATTR_DATA));
            write_n(base, 0);
        }
        write16(Field16::GuestCsSelector, 0x08);
        write32(Field32::GuestCsLimit, 0xFFFF_FFFF);
        write32(Field32::GuestCsAccessRights, access_rights(ATTR_CODE64));
        write_n(FieldN::GuestCsBase, 0);
        write16(Field16::GuestTrSelector, 0x18);
        write32(Field32::GuestTrLimit, 0x67);
        write32(Field32::GuestTrAccessRights, access_rights(ATTR_TSS64));
        write_n(FieldN::GuestTrBase, 0);
        write16(Field16::GuestLdtrSelector, 0);
        write32(Field32::GuestLdtrLimit, 0);
        write32(Field32::GuestLdtrAccessRights, UNUSABLE);
        write_n(FieldN::GuestLdtrBase, 0);
        write32(Field32::GuestGdtrLimit, 0x1F);
        write_n(FieldN::GuestGdtrBase, 0);
        write32(Field32::GuestIdtrLimit, 0);
        write_n(FieldN::GuestIdtrBase, 0);
        write_n(FieldN::GuestDr7, 0x400);
        write64(Field64::GuestIa32Debugctl, 0);
        // IF=1: Bochs delivers a host interrupt as an external-interrupt exit
        // only while the guest's IF is set (see EMULATORS notes in README).
        write_n(FieldN::GuestRflags, 0x202);
        write_n(FieldN::GuestRip, rip);
        write_n(FieldN::GuestRsp, rsp);
        write64(Field64::GuestIa32Efer, (1 << 8) | (1 << 10));
        write64(Field64::VmcsLinkPointer, u64::MAX);
        write32(Field32::GuestInterruptibility, 0);
        write32(Field32::GuestActivityState, 0);
        write32(Field32::GuestSysenterCs, 0);
        write_n(FieldN::GuestSysenterEsp, 0);
        write_n(FieldN::GuestSysenterEip, 0);
        Ok(())
    }

    /// Turns page-modification logging on or off (secondary control bit 17)
    /// and empties the log.
    pub fn set_pml(&mut self, on: bool) -> bool {
        if on && !self.pml_supported || self.make_current().is_err() {
            return false;
        }
        self.proc2 = if on { self.proc2 | ctl::PROC2_PML } else { self.proc2 & !ctl::PROC2_PML };
        write32(Field32::SecondaryProcControls, self.proc2);
        write16(Field16::GuestPmlIndex, 511);
        true
    }

    /// Moves the logged GPAs into `out` and empties the log.
    pub fn drain_pml(&mut self, out: &mut DirtyBitmap) -> usize {
        if self.make_current().is_err() {
            return 0;
        }
        let index = (vmread(Field16::GuestPmlIndex as u32) & 0xFFFF) as u16;
        // SAFETY: the PML page is this vCPU's own frame; the CPU writes it
        // only while the guest runs, which it does not now.
        let log = unsafe { &*memory::phys_to_virt(self.pml_pa).cast::<[u64; 512]>() };
        let n = ept::drain_pml(log, index, out);
        write16(Field16::GuestPmlIndex, 511);
        n
    }

    /// Breaks the controls so the next entry fails (hidden test hook).
    pub fn break_state(&mut self) {
        if self.make_current().is_ok() {
            write32(Field32::PinBasedControls, 0);
        }
    }

    /// Frees the VMCS, the PML page and the virtual-APIC page.
    pub fn destroy(self) {
        // The EPT's frames go back to the allocator with the VM: no
        // translation of them may outlive it (a later table, or a trial
        // entry's empty root, could sit at the same address).
        let _ = self.invept();
        // VMCLEAR makes our VMCS inactive before its frame goes back to the
        // allocator; a failure leaves nothing to undo.
        let _ = region_insn!("vmclear", &self.vmcs_pa, "VMCLEAR failed");
        let _ = CURRENT_VMCS.compare_exchange(self.vmcs_pa, 0, Ordering::Relaxed, Ordering::Relaxed);
        memory::free_frames(self.vmcs_pa, 1);
        memory::free_frames(self.pml_pa, 1);
        memory::free_frames(self.vapic_pa, 1);
    }

    /// The guest's VTPR, in its virtual-APIC page.
    fn vtpr(&self) -> *mut u32 {
        memory::phys_to_virt(self.vapic_pa + VTPR).cast::<u32>()
    }

    /// Drops the cached translations of this vCPU's EPT (or of all EPTs
    /// where the processor has no single-context INVEPT).
    fn invept(&self) -> Result<(), VmxError> {
        self.invept_of(self.eptp)
    }

    /// As [`Self::invept`], for the EPT `eptp`.
    fn invept_of(&self, eptp: u64) -> Result<(), VmxError> {
        let descriptor: [u64; 2] = [eptp, 0];
        let (cf, zf): (u8, u8);
        // SAFETY: the CPU report said INVEPT and this type exist (without
        // them there is no EPT backend); the descriptor names this vCPU's
        // EPTP, and either type only drops cached translations.
        unsafe {
            asm!(
                "invept {t}, [{d}]", "setc {cf}", "setz {zf}",
                t = in(reg) self.invept_type, d = in(reg) &descriptor, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
                options(nostack)
            )
        };
        check(cf, zf, "INVEPT failed")
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> VmExit {
        if let Err(VmxError::Instruction(reason)) = self.make_current() {
            return VmExit::EntryFailed { code: 0, reason };
        }
        if self.flush_pending {
            // Entering with stale translations would let the guest write
            // pages dirty tracking believes protected or clean.
            if let Err(VmxError::Instruction(reason)) = self.invept() {
                return VmExit::EntryFailed { code: 0, reason };
            }
            self.flush_pending = false;
        }
        self.fpu.load();
        self.unswitched.load_vmx();
        // SAFETY: this vCPU's VMCS is current and fully set up; `regs` is a
        // live GuestRegs; host state points at `vmx_exit` and the stack
        // pointer is written by the stub itself. Interrupts are off.
        let status = unsafe { vmx_run(&mut self.regs, u64::from(self.launched)) };
        self.unswitched.store_vmx();
        self.fpu.store();
        match status {
            0 => {
                self.launched = true;
                let f = ExitFields {
                    reason: (vmread(Field32::ExitReason as u32) & 0xFFFF_FFFF) as u32,
                    qualification: vmread(FieldN::ExitQualification as u32),
                    rip: vmread(FieldN::GuestRip as u32),
                    instruction_length: vmread(Field32::ExitInstructionLength as u32),
                    guest_physical: vmread(Field64::GuestPhysicalAddress as u32),
                    interruption_info: (vmread(Field32::ExitInterruptionInfo as u32) & 0xFFFF_FFFF) as u32,
                    interruption_error: (vmread(Field32::ExitInterruptionErrorCode as u32) & 0xFFFF_FFFF) as u32,
                };
                let exit = decode_exit(&f);
                // An event whose delivery this exit cut short goes in again
                // with the next entry, as hardware would have finished
                // delivering it (an intercepted exception this exit reports
                // replaces it: `inject_exception`).
                let vectoring = (vmread(Field32::IdtVectoringInfo as u32) & 0xFFFF_FFFF) as u32;
                if let Some(info) = redelivery(vectoring) {
                    write32(Field32::EntryInterruptionInfo, info);
                    let code = vmread(Field32::IdtVectoringErrorCode as u32) & 0xFFFF_FFFF;
                    write32(Field32::EntryExceptionErrorCode, code as u32);
                    // If the exit kept STI or MOV SS blocking with TF set,
                    // the entry needs BS pending, as for a reflected #DB.
                    prepare_db_reflection(None);
                }
                if let VmExit::Exception { vector: 1, resume_at, .. } = exit {
                    self.unswitched.set_dr6_trap_bits(f.qualification);
                    prepare_db_reflection(resume_at);
                }
                exit
            }
            1 => VmExit::EntryFailed { code: 0, reason: "VMLAUNCH/VMRESUME failed: no valid current VMCS" },
            _ => {
                let n = vmread(Field32::VmInstructionError as u32);
                VmExit::EntryFailed { code: n, reason: instruction_error(n) }
            }
        }
    }

    fn rip(&self) -> u64 {
        let _ = self.make_current();
        vmread(FieldN::GuestRip as u32)
    }

    fn skip_instruction(&mut self, next_rip: u64) {
        if self.make_current().is_err() {
            return;
        }
        complete_instruction(next_rip);
        if vmread(FieldN::GuestRflags as u32) & RFLAGS_TF != 0 {
            // Bochs 2.7 saves the step as pending at the exit, and would
            // deliver it again after ours.
            let pending = vmread(FieldN::GuestPendingDebugExceptions as u32);
            if pending & DR6_BS != 0 {
                write_n(FieldN::GuestPendingDebugExceptions, pending & !DR6_BS);
            }
            self.unswitched.dr6 |= DR6_BS;
            self.inject_exception(1, None);
        }
    }

    fn state(&self) -> VcpuState {
        let _ = self.make_current();
        VcpuState {
            regs: self.regs,
            rip: vmread(FieldN::GuestRip as u32),
            rsp: vmread(FieldN::GuestRsp as u32),
            rflags: vmread(FieldN::GuestRflags as u32),
            dr: self.unswitched.dr,
            dr6: self.unswitched.dr6,
            dr7: vmread(FieldN::GuestDr7 as u32),
            cr2: self.unswitched.cr2,
            kernel_gs_base: self.unswitched.kernel_gs_base,
            fx: self.fpu.image(),
            pending_event: pending_event(
                vmread(Field32::EntryInterruptionInfo as u32),
                vmread(Field32::EntryExceptionErrorCode as u32),
            ),
            interruptibility: vmread(Field32::GuestInterruptibility as u32) & BLOCKING_BY_STI_OR_MOV_SS,
            pending_debug: vmread(FieldN::GuestPendingDebugExceptions as u32),
            system: SystemState {
                cr0: vmread(FieldN::GuestCr0 as u32),
                cr3: vmread(FieldN::GuestCr3 as u32),
                // VMXE is the host's (guest/host mask); the guest reads 0.
                cr4: vmread(FieldN::GuestCr4 as u32) & !CR4_VMXE,
                // SAFETY: the virtual-APIC page is this vCPU's own frame, in
                // the physical map; the guest, which alone writes it, does
                // not run now.
                cr8: u64::from(unsafe { self.vtpr().read_volatile() } >> 4) & 0xF,
                segments: SEGMENT_FIELDS.map(|(sel, limit, ar, base)| Segment {
                    selector: (vmread(sel as u32) & 0xFFFF) as u16,
                    attrib: segment_attrib((vmread(ar as u32) & 0xFFFF_FFFF) as u32),
                    limit: (vmread(limit as u32) & 0xFFFF_FFFF) as u32,
                    base: vmread(base as u32),
                }),
                gdtr: table(Field32::GuestGdtrLimit, FieldN::GuestGdtrBase),
                idtr: table(Field32::GuestIdtrLimit, FieldN::GuestIdtrBase),
            },
        }
    }

    fn regs_mut(&mut self) -> &mut GuestRegs {
        &mut self.regs
    }

    fn set_state(&mut self, state: &VcpuState) -> Result<(), &'static str> {
        // Else RIP, RSP, RFLAGS, DR7 and the event would go into another
        // VM's VMCS, or nowhere, and the VM start from its old ones.
        self.make_current().map_err(|_| "VMPTRLD of the vCPU's VMCS failed")?;
        write_n(FieldN::GuestRip, state.rip);
        write_n(FieldN::GuestRsp, state.rsp);
        write_n(FieldN::GuestRflags, state.rflags);
        write_n(FieldN::GuestDr7, state.dr7);
        // The layouts agree in the low 32 bits (vector, type, error code
        // valid, valid); the error code is in the high ones.
        write32(Field32::EntryInterruptionInfo, (state.pending_event & 0x8000_0FFF) as u32);
        write32(Field32::EntryExceptionErrorCode, (state.pending_event >> 32) as u32);
        write32(Field32::GuestInterruptibility, (state.interruptibility & BLOCKING_BY_STI_OR_MOV_SS) as u32);
        write_n(FieldN::GuestPendingDebugExceptions, state.pending_debug);
        let sys = &state.system;
        write_n(FieldN::GuestCr0, sys.cr0);
        write_n(FieldN::Cr0ReadShadow, sys.cr0);
        write_n(FieldN::GuestCr3, sys.cr3);
        write_n(FieldN::GuestCr4, sys.cr4 | CR4_VMXE);
        write_n(FieldN::Cr4ReadShadow, sys.cr4 & !CR4_VMXE);
        let vtpr = u32::try_from(sys.cr8 & 0xF).unwrap_or(0) << 4;
        // SAFETY: as in `state`. Bits 3:0 stay 0, as MOV to CR8 leaves them.
        unsafe { self.vtpr().write_volatile(vtpr) };
        for ((sel, limit, ar, base), seg) in SEGMENT_FIELDS.into_iter().zip(sys.segments) {
            write16(sel, seg.selector);
            write32(limit, seg.limit);
            write32(ar, segment_access_rights(seg.attrib));
            write_n(base, seg.base);
        }
        write32(Field32::GuestGdtrLimit, sys.gdtr.limit);
        write_n(FieldN::GuestGdtrBase, sys.gdtr.base);
        write32(Field32::GuestIdtrLimit, sys.idtr.limit);
        write_n(FieldN::GuestIdtrBase, sys.idtr.base);
        self.regs = state.regs;
        self.unswitched =
            Unswitched { dr: state.dr, dr6: state.dr6, cr2: state.cr2, kernel_gs_base: state.kernel_gs_base };
        self.fpu.set_image(&state.fx);
        Ok(())
    }

    fn enter_without_memory(&mut self, empty_root: u64) -> VmExit {
        if let Err(VmxError::Instruction(reason)) = self.make_current() {
            return VmExit::EntryFailed { code: 0, reason };
        }
        // Whatever was cached for a table once at this address goes first
        // (every walk of the empty one stops at its first entry).
        let trial = (self.eptp & 0xFFF) | empty_root;
        if let Err(VmxError::Instruction(reason)) = self.invept_of(trial) {
            return VmExit::EntryFailed { code: 0, reason };
        }
        write64(Field64::EptPointer, trial);
        let exit = self.run();
        let _ = self.make_current();
        write64(Field64::EptPointer, self.eptp);
        exit
    }

    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        let _ = self.make_current();
        host_tsc.wrapping_add(vmread(Field64::TscOffset as u32))
    }

    fn set_guest_tsc(&mut self, guest_tsc: u64, host_tsc: u64) {
        if self.make_current().is_ok() {
            write64(Field64::TscOffset, guest_tsc.wrapping_sub(host_tsc));
        }
    }

    fn flush_tlb(&mut self) {
        self.flush_pending = true;
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        if self.make_current().is_ok() {
            write32(Field32::EntryInterruptionInfo, entry_exception(vector, error_code.is_some()));
            write32(Field32::EntryExceptionErrorCode, error_code.unwrap_or(0));
            if vector == 1 {
                // As delivering a #DB does: else a handler's first access
                // to a debug register would raise the next (DR7.GD).
                let dr7 = vmread(FieldN::GuestDr7 as u32);
                write_n(FieldN::GuestDr7, dr7 & !DR7_GD);
            }
        }
    }
}

/// CR4.VMXE, which VMX operation requires in the guest's CR4 and the
/// guest/host mask hides from it.
const CR4_VMXE: u64 = 1 << 13;

/// The VMCS fields of ES, CS, SS, DS, FS, GS, LDTR and TR, in
/// `SystemState::segments`' order: selector, limit, access rights, base.
const SEGMENT_FIELDS: [(Field16, Field32, Field32, FieldN); 8] = [
    (Field16::GuestEsSelector, Field32::GuestEsLimit, Field32::GuestEsAccessRights, FieldN::GuestEsBase),
    (Field16::GuestCsSelector, Field32::GuestCsLimit, Field32::GuestCsAccessRights, FieldN::GuestCsBase),
    (Field16::GuestSsSelector, Field32::GuestSsLimit, Field32::GuestSsAccessRights, FieldN::GuestSsBase),
    (Field16::GuestDsSelector, Field32::GuestDsLimit, Field32::GuestDsAccessRights, FieldN::GuestDsBase),
    (Field16::GuestFsSelector, Field32::GuestFsLimit, Field32::GuestFsAccessRights, FieldN::GuestFsBase),
    (Field16::GuestGsSelector, Field32::GuestGsLimit, Field32::GuestGsAccessRights, FieldN::GuestGsBase),
    (Field16::GuestLdtrSelector, Field32::GuestLdtrLimit, Field32::GuestLdtrAccessRights, FieldN::GuestLdtrBase),
    (Field16::GuestTrSelector, Field32::GuestTrLimit, Field32::GuestTrAccessRights, FieldN::GuestTrBase),
];

/// GDTR or IDTR from the current VMCS, as a `Segment` (base and limit).
fn table(limit: Field32, base: FieldN) -> Segment {
    Segment { selector: 0, attrib: 0, limit: (vmread(limit as u32) & 0xFFFF_FFFF) as u32, base: vmread(base as u32) }
}

/// `VcpuState::pending_event` (EVENTINJ's layout) from the VM-entry
/// interruption information and exception error code.
fn pending_event(info: u64, error_code: u64) -> u64 {
    let info = info & 0x8000_0FFF;
    if info & u64::from(vmx::vmcs::interruption::VALID) == 0 {
        return 0;
    }
    (error_code & 0xFFFF_FFFF) << 32 | info
}

/// Blocking by STI and by MOV SS in the guest interruptibility state.
const BLOCKING_BY_STI_OR_MOV_SS: u64 = 0b11;

/// Moves the current VMCS's guest past the instruction it exited on, to
/// `next_rip`: having run, the instruction ends any STI or MOV SS
/// blocking (the blocking covered it).
fn complete_instruction(next_rip: u64) {
    write_n(FieldN::GuestRip, next_rip);
    let blocking = vmread(Field32::GuestInterruptibility as u32);
    if blocking & BLOCKING_BY_STI_OR_MOV_SS != 0 {
        write32(Field32::GuestInterruptibility, (blocking & !BLOCKING_BY_STI_OR_MOV_SS & 0xFFFF_FFFF) as u32);
    }
}

/// Readies the current VMCS to reflect the #DB that just exited (as KVM
/// does), or to deliver again an event an exit cut short (`resume_at`
/// `None`). An ICEBP's exit reports the instruction itself: the #DB goes to
/// `resume_at`, as the instruction completed (`complete_instruction`).
/// Any other exit under STI or MOV SS blocking with RFLAGS.TF set has a
/// single step to come, which the exit may not have recorded in the pending
/// debug exceptions; VM entry then requires their BS bit (SDM Vol. 3C
/// 26.3.1.5), else it fails.
fn prepare_db_reflection(resume_at: Option<u64>) {
    if let Some(rip) = resume_at {
        complete_instruction(rip);
        return;
    }
    let blocking = vmread(Field32::GuestInterruptibility as u32);
    if blocking & BLOCKING_BY_STI_OR_MOV_SS != 0 && vmread(FieldN::GuestRflags as u32) & RFLAGS_TF != 0 {
        let pending = vmread(FieldN::GuestPendingDebugExceptions as u32);
        write_n(FieldN::GuestPendingDebugExceptions, pending | DR6_BS);
    }
}

//! GDT with a kernel code/data segment and a TSS whose interrupt stack table
//! gives double faults, NMIs and machine checks stacks of their own, so a
//! kernel stack overflow is reported instead of becoming a triple fault.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot for #DF.
pub const DOUBLE_FAULT_IST: u16 = 0;
/// IST slot for NMI.
pub const NMI_IST: u16 = 1;
/// IST slot for #MC.
pub const MACHINE_CHECK_IST: u16 = 2;

const IST_STACK: usize = 16 * 1024;

#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; IST_STACK]);

static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK]) }; 3];

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, SegmentSelector, SegmentSelector, SegmentSelector)> = Once::new();

/// Host selectors and the TSS base, for the VMCS host-state area:
/// (code, data, TSS selector, TSS base).
pub fn host_segments() -> (u16, u16, u16, u64) {
    let (_, code, data, tss) = GDT.get().expect("gdt::init ran at boot");
    let base = TSS.get().map_or(0, |t| core::ptr::from_ref(t) as u64);
    (code.0, data.0, tss.0, base)
}

/// The task register's selector now: the host's TSS, unless a guest's
/// state leaked into the host (hidden `vm ltr` checks it does not).
pub fn task_register() -> u16 {
    let tr: u16;
    // SAFETY: STR only reads the task register into a general register.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    tr
}

/// Builds and loads the GDT and TSS, and reloads the segment registers.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for i in 0..3 {
            // SAFETY: only the address of the static stacks is taken; the CPU
            // is their only user, through the IST.
            let base = unsafe { core::ptr::addr_of!(IST_STACKS[i]) };
            tss.interrupt_stack_table[i] = VirtAddr::from_ptr(base) + IST_STACK as u64;
        }
        tss
    });
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which
    // lives in a static and so is never freed.
    unsafe {
        CS::set_reg(*code);
        DS::set_reg(*data);
        ES::set_reg(*data);
        SS::set_reg(*data);
        load_tss(*tss_sel);
    }
}

//! Exception handlers: every CPU exception is reported on the console with
//! vector, mnemonic, error code, RIP, RSP and CR2. `#BP` returns (it is used
//! to prove the path works); everything else halts the machine after the
//! report, so a fault never becomes a silent triple fault.

use core::fmt::Write;
use core::sync::atomic::Ordering;

use spin::Once;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

use super::gdt::{DOUBLE_FAULT_IST, MACHINE_CHECK_IST, NMI_IST};
use super::serial::{RawWriter, JSON_EVENTS};

static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Writes the one-line report of an exception.
fn report(vector: u8, mnemonic: &str, error: Option<u64>, frame: &InterruptStackFrame) {
    let cr2 = Cr2::read_raw();
    let rip = frame.instruction_pointer.as_u64();
    let rsp = frame.stack_pointer.as_u64();
    let mut w = RawWriter;
    if JSON_EVENTS.load(Ordering::Relaxed) {
        let _ = write!(w, "{{\"event\":\"exception\",\"vector\":{vector},\"name\":\"{mnemonic}\",\"error\":");
        let _ = match error {
            Some(e) => write!(w, "{e}"),
            None => write!(w, "null"),
        };
        let _ = write!(w, ",\"rip\":\"{rip:#x}\",\"rsp\":\"{rsp:#x}\",\"cr2\":\"{cr2:#x}\"}}\r\n");
    } else {
        let _ = write!(w, "\r\nEXCEPTION {mnemonic} (vector {vector})");
        if let Some(e) = error {
            let _ = write!(w, " error={e:#x}");
        }
        let _ = write!(w, " rip={rip:#x} rsp={rsp:#x} cr2={cr2:#x}\r\n");
    }
}

fn fatal(vector: u8, mnemonic: &str, error: Option<u64>, frame: &InterruptStackFrame) -> ! {
    report(vector, mnemonic, error, frame);
    // In json mode every line is JSON, this one too.
    let halted = if JSON_EVENTS.load(Ordering::Relaxed) { "{\"event\":\"halted\"}" } else { "kernel halted" };
    let _ = write!(RawWriter, "{halted}\r\n");
    super::power::halt_forever()
}

macro_rules! fatal_handler {
    ($name:ident, $vector:expr, $mnemonic:expr) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame) {
            fatal($vector, $mnemonic, None, &frame)
        }
    };
    ($name:ident, $vector:expr, $mnemonic:expr, error) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame, error: u64) {
            fatal($vector, $mnemonic, Some(error), &frame)
        }
    };
}

fatal_handler!(divide_error, 0, "#DE");
fatal_handler!(debug, 1, "#DB");
fatal_handler!(nmi, 2, "NMI");
fatal_handler!(overflow, 4, "#OF");
fatal_handler!(bound_range, 5, "#BR");
fatal_handler!(invalid_opcode, 6, "#UD");
fatal_handler!(device_not_available, 7, "#NM");
fatal_handler!(invalid_tss, 10, "#TS", error);
fatal_handler!(segment_not_present, 11, "#NP", error);
fatal_handler!(stack_segment, 12, "#SS", error);
fatal_handler!(general_protection, 13, "#GP", error);
fatal_handler!(x87_floating_point, 16, "#MF");
fatal_handler!(alignment_check, 17, "#AC", error);
fatal_handler!(simd_floating_point, 19, "#XM");
fatal_handler!(virtualization, 20, "#VE");
fatal_handler!(control_protection, 21, "#CP", error);
fatal_handler!(hv_injection, 28, "#HV");
fatal_handler!(vmm_communication, 29, "#VC", error);
fatal_handler!(security, 30, "#SX", error);

extern "x86-interrupt" fn breakpoint(frame: InterruptStackFrame) {
    report(3, "#BP", None, &frame);
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, error: PageFaultErrorCode) {
    fatal(14, "#PF", Some(error.bits()), &frame)
}

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, error: u64) -> ! {
    fatal(8, "#DF", Some(error), &frame)
}

extern "x86-interrupt" fn machine_check(frame: InterruptStackFrame) -> ! {
    fatal(18, "#MC", None, &frame)
}

/// Builds and loads the IDT. Call after `gdt::init` (the IST indices refer
/// to its TSS).
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        idt.divide_error.set_handler_fn(divide_error);
        idt.debug.set_handler_fn(debug);
        idt.breakpoint.set_handler_fn(breakpoint);
        idt.overflow.set_handler_fn(overflow);
        idt.bound_range_exceeded.set_handler_fn(bound_range);
        idt.invalid_opcode.set_handler_fn(invalid_opcode);
        idt.device_not_available.set_handler_fn(device_not_available);
        idt.invalid_tss.set_handler_fn(invalid_tss);
        idt.segment_not_present.set_handler_fn(segment_not_present);
        idt.stack_segment_fault.set_handler_fn(stack_segment);
        idt.general_protection_fault.set_handler_fn(general_protection);
        idt.page_fault.set_handler_fn(page_fault);
        idt.x87_floating_point.set_handler_fn(x87_floating_point);
        idt.alignment_check.set_handler_fn(alignment_check);
        idt.simd_floating_point.set_handler_fn(simd_floating_point);
        idt.virtualization.set_handler_fn(virtualization);
        idt.cp_protection_exception.set_handler_fn(control_protection);
        idt.hv_injection_exception.set_handler_fn(hv_injection);
        idt.vmm_communication_exception.set_handler_fn(vmm_communication);
        idt.security_exception.set_handler_fn(security);
        let base = super::timer::PIC_BASE;
        for (line, handler) in (0u8..).zip(super::timer::LINE_HANDLERS.iter()) {
            idt[base + line].set_handler_fn(*handler);
        }
        idt[base].set_handler_fn(super::timer::timer_interrupt);
        idt[base + 4].set_handler_fn(super::timer::serial_interrupt);
        // SAFETY: the IST indices name stacks that `gdt::init` installed in
        // the TSS; they are used by no other handler.
        unsafe {
            idt.double_fault.set_handler_fn(double_fault).set_stack_index(DOUBLE_FAULT_IST);
            idt.non_maskable_interrupt.set_handler_fn(nmi).set_stack_index(NMI_IST);
            idt.machine_check.set_handler_fn(machine_check).set_stack_index(MACHINE_CHECK_IST);
        }
        idt
    });
    idt.load();
}

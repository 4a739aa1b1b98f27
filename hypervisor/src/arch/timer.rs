//! The host's periodic timer: 8259 PICs remapped to vectors 0x20-0x2F, PIT
//! channel 0 at 100 Hz on IRQ 0 (1000 Hz while VMs run or a migration
//! shares the CPU with them, see [`set_hz`]), and COM1's receive interrupt
//! on IRQ 4 (it only wakes the console loop from `hlt`; bytes are read by
//! polling).
//!
//! While a guest runs, the same interrupts make it exit (SVM INTR intercept,
//! VMX external-interrupt exiting), which is how VMs share the CPU.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;
use x86_64::structures::idt::InterruptStackFrame;

/// First vector of the master PIC.
pub const PIC_BASE: u8 = 0x20;
/// Timer frequency with no VM running and no migration.
pub const HZ: u64 = 100;
/// Timer frequency while VMs run or a migration runs: a halted guest wakes
/// at the first tick past its wake time, and a migration gets the CPU back
/// from a VM after 1 ms, often enough to keep the link busy.
pub const FAST_HZ: u64 = 1000;
const PIT_HZ: u64 = 1_193_182;

static TICKS: AtomicU64 = AtomicU64::new(0);
static CURRENT_HZ: AtomicU64 = AtomicU64::new(0);

fn outb(port: u16, value: u8) {
    // SAFETY: only called with the PIC (0x20/0x21/0xA0/0xA1) and PIT
    // (0x40/0x43) ports, which this module alone programs.
    unsafe { Port::<u8>::new(port).write(value) };
}

/// Remaps the PICs, starts the PIT, unmasks IRQ 0 and 4. Interrupts stay
/// disabled until the caller enables them.
pub fn init() {
    // ICW1: init + ICW4 needed; ICW2: vector base; ICW3: cascade on IRQ 2;
    // ICW4: 8086 mode (8259A datasheet).
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, PIC_BASE);
    outb(0xA1, PIC_BASE + 8);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, !((1 << 0) | (1 << 4))); // IRQ 0 (timer) and 4 (COM1)
    outb(0xA1, 0xFF);
    set_hz(HZ);
}

/// Reprograms PIT channel 0 to `hz` interrupts per second (no-op when it
/// already runs at that rate).
pub fn set_hz(hz: u64) {
    if CURRENT_HZ.swap(hz, Ordering::Relaxed) == hz {
        return;
    }
    let divisor = u16::try_from(PIT_HZ / hz.max(19)).unwrap_or(u16::MAX);
    let [lo, hi] = divisor.to_le_bytes();
    outb(0x43, 0b0011_0100); // channel 0, lobyte/hibyte, mode 2 (rate generator)
    outb(0x40, lo);
    outb(0x40, hi);
}

/// Timer interrupts so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Lets a pending host interrupt (the one that made a guest exit) be
/// delivered now, then disables interrupts again.
pub fn service_pending() {
    x86_64::instructions::interrupts::enable();
    x86_64::instructions::nop();
    x86_64::instructions::interrupts::disable();
}

/// Sleeps until the next interrupt (a frame, a timer tick, a console
/// byte), then disables interrupts again.
pub fn wait_for_interrupt() {
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}

/// Unmasks PIC line `irq` (a PCI device's interrupt line), and the cascade
/// line when it is on the slave PIC.
pub fn unmask_irq(irq: u8) {
    MASKED.fetch_and(!(1 << u32::from(irq & 15)), Ordering::Relaxed);
    fn inb(port: u16) -> u8 {
        // SAFETY: reading a PIC's mask register has no side effect.
        unsafe { Port::<u8>::new(port).read() }
    }
    match irq {
        0..=7 => outb(0x21, inb(0x21) & !(1 << irq)),
        8..=15 => {
            outb(0xA1, inb(0xA1) & !(1 << (irq - 8)));
            outb(0x21, inb(0x21) & !(1 << 2));
        }
        _ => {}
    }
}

/// Whether `irq`'s handler has run and masked the line since the driver
/// last unmasked it (see [`unmask_irq`]).
pub fn irq_masked(irq: u8) -> bool {
    MASKED.load(Ordering::Relaxed) & (1 << u32::from(irq & 15)) != 0
}

fn end_of_interrupt() {
    outb(0x20, 0x20);
}

/// IRQ 0.
pub extern "x86-interrupt" fn timer_interrupt(_frame: InterruptStackFrame) {
    TICKS.fetch_add(1, Ordering::Relaxed);
    end_of_interrupt();
}

/// IRQ 4: a byte arrived on COM1; the console loop reads it.
pub extern "x86-interrupt" fn serial_interrupt(_frame: InterruptStackFrame) {
    end_of_interrupt();
}

/// Lines whose handler masked them until their driver has polled.
static MASKED: AtomicU64 = AtomicU64::new(0);

/// A device interrupt (PCI INTx lines are level-triggered): mask the line
/// and acknowledge it; the main loop polls the device, which deasserts the
/// line, and then calls [`unmask_irq`]. Without the mask, a level-triggered
/// line would fire again the moment the handler returns.
fn device_interrupt(irq: u8) {
    fn inb(port: u16) -> u8 {
        // SAFETY: reading a PIC's mask register has no side effect.
        unsafe { Port::<u8>::new(port).read() }
    }
    if irq >= 8 {
        outb(0xA1, inb(0xA1) | (1 << (irq - 8)));
        outb(0xA0, 0x20);
    } else {
        outb(0x21, inb(0x21) | (1 << irq));
    }
    MASKED.fetch_or(1 << irq, Ordering::Relaxed);
    end_of_interrupt();
}

macro_rules! line_handlers {
    ($($name:ident = $irq:expr),* $(,)?) => {
        $(extern "x86-interrupt" fn $name(_frame: InterruptStackFrame) {
            device_interrupt($irq);
        })*
        /// Handlers for PIC lines 0-15 (0 and 4 are replaced by the timer
        /// and serial handlers).
        pub const LINE_HANDLERS: [extern "x86-interrupt" fn(InterruptStackFrame); 16] = [$($name),*];
    };
}

line_handlers!(
    line0 = 0,
    line1 = 1,
    line2 = 2,
    line3 = 3,
    line4 = 4,
    line5 = 5,
    line6 = 6,
    line7 = 7,
    line8 = 8,
    line9 = 9,
    line10 = 10,
    line11 = 11,
    line12 = 12,
    line13 = 13,
    line14 = 14,
    line15 = 15,
);

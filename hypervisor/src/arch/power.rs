//! Powering off: QEMU's `isa-debug-exit` device, then the Bochs shutdown
//! port, then halting for good.

use x86_64::instructions::port::Port;

/// Value written to `isa-debug-exit` (iobase 0xf4) on a clean shutdown; QEMU
/// exits with status `(value << 1) | 1` = 33, which the boot tool and the
/// scripts read as success.
pub const QEMU_EXIT_SUCCESS: u32 = 0x10;

/// Powers the machine off, after the console has sent its last byte.
pub fn shutdown() -> ! {
    super::serial::drain();
    // Emulators pass a byte on to their backend some time after the UART
    // reports it sent; 20 ms more is plenty for QEMU and Bochs.
    let until = super::clock::uptime_us() + 20_000;
    while super::clock::uptime_us() < until {
        core::hint::spin_loop();
    }
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit (the boot tool always adds
    // it); on machines without it the write goes nowhere.
    unsafe { Port::<u32>::new(0xf4).write(QEMU_EXIT_SUCCESS) };
    // Bochs: writing "Shutdown" to port 0x8900 stops the simulation
    // (iodev/unmapped.cc).
    let mut bochs: Port<u8> = Port::new(0x8900);
    for b in *b"Shutdown" {
        // SAFETY: 0x8900 is an unassigned port on PCs; Bochs uses it only for
        // this shutdown handshake.
        unsafe { bochs.write(b) };
    }
    halt_forever()
}

/// Disables interrupts and halts, forever.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

//! PCI configuration space through the legacy I/O ports 0xCF8/0xCFC
//! (configuration mechanism #1, PCI Local Bus spec 3.0, 3.2.2.3.2).

use drivers::pci::ConfigSpace;
use x86_64::instructions::port::Port;

/// Configuration mechanism #1.
pub struct PortConfig;

fn address(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(device & 0x1F) << 11)
        | (u32::from(function & 0x7) << 8)
        | u32::from(offset & 0xFC)
}

impl ConfigSpace for PortConfig {
    fn read32(&mut self, bus: u8, device: u8, function: u8, offset: u8) -> u32 {
        // SAFETY: 0xCF8/0xCFC are the PCI configuration ports on every PC;
        // only this module uses them, and a read has no side effect on the
        // registers we touch.
        unsafe {
            Port::<u32>::new(0xCF8).write(address(bus, device, function, offset));
            Port::<u32>::new(0xCFC).read()
        }
    }

    fn write32(&mut self, bus: u8, device: u8, function: u8, offset: u8, value: u32) {
        // SAFETY: as above; writes go to the configuration register the
        // drivers crate chose (BAR sizing, command register).
        unsafe {
            Port::<u32>::new(0xCF8).write(address(bus, device, function, offset));
            Port::<u32>::new(0xCFC).write(value);
        }
    }
}

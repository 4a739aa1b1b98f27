//! PCI enumeration: owns the bus scan, header decoding, BAR sizing and the
//! command-register enable bits.
//!
//! Follows the PCI Local Bus Specification 3.0, chapter 6 "Configuration
//! Space": the type-00h header layout (6.1), the command register (6.2.2),
//! the header-type multi-function bit (6.2.1) and base address register
//! sizing by writing all ones and reading back the writable bits (6.2.5.1).
//! Raw configuration cycles are the kernel's business ([`ConfigSpace`], ports
//! 0xCF8/0xCFC); this module only decides what to read and write.

use alloc::vec::Vec;

/// PCI configuration space access (the kernel implements it with ports
/// 0xCF8/0xCFC). `offset` is a byte offset, always dword aligned here.
pub trait ConfigSpace {
    /// Reads the dword at `offset` of the function's configuration space.
    fn read32(&mut self, bus: u8, device: u8, function: u8, offset: u8) -> u32;
    /// Writes the dword at `offset` of the function's configuration space.
    fn write32(&mut self, bus: u8, device: u8, function: u8, offset: u8, value: u32);
}

/// A decoded base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Not implemented, or the upper half of the preceding 64-bit BAR.
    None,
    /// Memory space BAR.
    Memory {
        /// Physical base address as programmed by firmware.
        base: u64,
        /// Size in bytes (a power of two).
        size: u64,
        /// Prefetchable bit (bit 3).
        prefetchable: bool,
        /// 64-bit BAR (type 10b); it occupies this slot and the next.
        is_64: bool,
    },
    /// I/O space BAR.
    Io {
        /// Base I/O port.
        port: u16,
        /// Size in ports (a power of two).
        size: u32,
    },
}

/// One PCI function found by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
    /// Vendor ID (offset 0x00).
    pub vendor_id: u16,
    /// Device ID (offset 0x02).
    pub device_id: u16,
    /// Base class code (offset 0x0B).
    pub class: u8,
    /// Sub-class code (offset 0x0A).
    pub subclass: u8,
    /// Programming interface (offset 0x09).
    pub prog_if: u8,
    /// Raw header type register (offset 0x0E), including the multi-function
    /// bit 7; the layout is `header_type & 0x7F` (0 = device, 1 = bridge).
    pub header_type: u8,
    /// Interrupt line (offset 0x3C) as routed by firmware.
    pub interrupt_line: u8,
    /// Base address registers; all [`Bar::None`] for non-type-0 headers.
    pub bars: [Bar; 6],
}

const REG_ID: u8 = 0x00;
const REG_COMMAND: u8 = 0x04;
const REG_CLASS: u8 = 0x08;
const REG_HEADER: u8 = 0x0C;
const REG_BAR0: u8 = 0x10;
const REG_INTERRUPT: u8 = 0x3C;

const CMD_IO: u16 = 1 << 0;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_BUS_MASTER: u16 = 1 << 2;

const VENDOR_ABSENT: u16 = 0xFFFF;
const HEADER_MULTI_FUNCTION: u8 = 0x80;

/// Byte `index` (0 = least significant) of a dword.
#[allow(clippy::cast_possible_truncation)] // masked to 8 bits
fn byte(value: u32, index: u32) -> u8 {
    ((value >> (index * 8)) & 0xFF) as u8
}

/// Low (`half` 0) or high (`half` 1) 16 bits of a dword.
#[allow(clippy::cast_possible_truncation)] // masked to 16 bits
fn half(value: u32, half: u32) -> u16 {
    ((value >> (half * 16)) & 0xFFFF) as u16
}

/// Scans all buses (0..=255), devices 0..32, functions 0..8 (functions 1..8
/// only if header type bit 7 says multi-function; vendor 0xFFFF = absent).
///
/// Sizes each BAR of header-type-0 devices by writing all ones and restoring
/// the original value (64-bit BARs take two slots; the second slot is
/// [`Bar::None`]). Memory and I/O decode are disabled in the command register
/// while sizing and the command register is restored afterwards.
pub fn scan(cfg: &mut impl ConfigSpace) -> Vec<PciDevice> {
    let mut found = Vec::new();
    for bus in 0..=255u8 {
        for device in 0..32u8 {
            let Some(first) = probe(cfg, bus, device, 0) else {
                continue;
            };
            let multi = first.header_type & HEADER_MULTI_FUNCTION != 0;
            found.push(first);
            if multi {
                for function in 1..8u8 {
                    if let Some(dev) = probe(cfg, bus, device, function) {
                        found.push(dev);
                    }
                }
            }
        }
    }
    found
}

/// Sets memory space (bit 1), I/O space (bit 0) and bus master (bit 2) in
/// the command register for each flag that is `true`; bits whose flag is
/// `false` are left as they are.
pub fn enable(cfg: &mut impl ConfigSpace, dev: &PciDevice, memory: bool, io: bool, bus_master: bool) {
    let mut bits = 0u16;
    if memory {
        bits |= CMD_MEMORY;
    }
    if io {
        bits |= CMD_IO;
    }
    if bus_master {
        bits |= CMD_BUS_MASTER;
    }
    let command = read_command(cfg, dev.bus, dev.device, dev.function);
    write_command(cfg, dev.bus, dev.device, dev.function, command | bits);
}

/// The command register (low half of offset 0x04).
fn read_command(cfg: &mut impl ConfigSpace, bus: u8, device: u8, function: u8) -> u16 {
    half(cfg.read32(bus, device, function, REG_COMMAND), 0)
}

/// Writes the command register. The status half of the dword is written as
/// zero: its error bits are write-one-to-clear, so writing back what was
/// read would clear them.
fn write_command(cfg: &mut impl ConfigSpace, bus: u8, device: u8, function: u8, command: u16) {
    cfg.write32(bus, device, function, REG_COMMAND, u32::from(command));
}

/// Reads one function's header, or `None` if no function answers.
fn probe(cfg: &mut impl ConfigSpace, bus: u8, device: u8, function: u8) -> Option<PciDevice> {
    let id = cfg.read32(bus, device, function, REG_ID);
    let vendor_id = half(id, 0);
    if vendor_id == VENDOR_ABSENT {
        return None;
    }
    let class = cfg.read32(bus, device, function, REG_CLASS);
    let header = cfg.read32(bus, device, function, REG_HEADER);
    let header_type = byte(header, 2);
    let interrupt = cfg.read32(bus, device, function, REG_INTERRUPT);
    let bars =
        if header_type & !HEADER_MULTI_FUNCTION == 0 { size_bars(cfg, bus, device, function) } else { [Bar::None; 6] };
    Some(PciDevice {
        bus,
        device,
        function,
        vendor_id,
        device_id: half(id, 1),
        class: byte(class, 3),
        subclass: byte(class, 2),
        prog_if: byte(class, 1),
        header_type,
        interrupt_line: byte(interrupt, 0),
        bars,
    })
}

/// Decodes and sizes the six BARs of a type-0 header with decode disabled.
fn size_bars(cfg: &mut impl ConfigSpace, bus: u8, device: u8, function: u8) -> [Bar; 6] {
    let command = read_command(cfg, bus, device, function);
    write_command(cfg, bus, device, function, command & !(CMD_IO | CMD_MEMORY));

    let mut bars = [Bar::None; 6];
    let mut slot = 0usize;
    while slot < bars.len() {
        let (bar, slots) = size_bar(cfg, bus, device, function, slot);
        if let Some(entry) = bars.get_mut(slot) {
            *entry = bar;
        }
        slot += slots;
    }

    write_command(cfg, bus, device, function, command);
    bars
}

/// Config-space offset of BAR `slot` (0..6).
fn bar_offset(slot: usize) -> u8 {
    // `slot` < 6, so the offset is at most 0x24.
    REG_BAR0 + 4 * u8::try_from(slot).unwrap_or(0)
}

/// Writes all ones to a BAR dword, reads the writable bits back and restores
/// the original value.
fn probe_mask(cfg: &mut impl ConfigSpace, bus: u8, device: u8, function: u8, offset: u8) -> (u32, u32) {
    let original = cfg.read32(bus, device, function, offset);
    cfg.write32(bus, device, function, offset, 0xFFFF_FFFF);
    let mask = cfg.read32(bus, device, function, offset);
    cfg.write32(bus, device, function, offset, original);
    (original, mask)
}

/// Sizes BAR `slot`; returns it and how many slots it occupies (1 or 2).
fn size_bar(cfg: &mut impl ConfigSpace, bus: u8, device: u8, function: u8, slot: usize) -> (Bar, usize) {
    let offset = bar_offset(slot);
    let (original, mask) = probe_mask(cfg, bus, device, function, offset);

    if original & 1 == 1 {
        // I/O BAR: bits 31:2 are the address; devices may hardwire the upper
        // 16 bits to zero (6.2.5.1), so treat them as set for sizing.
        let mut bits = mask & 0xFFFF_FFFC;
        if bits == 0 {
            return (Bar::None, 1);
        }
        if bits & 0xFFFF_0000 == 0 {
            bits |= 0xFFFF_0000;
        }
        let size = (!bits).wrapping_add(1);
        let port = half(original & 0xFFFC, 0);
        return (Bar::Io { port, size }, 1);
    }

    let prefetchable = original & 0x8 != 0;
    let is_64 = (original >> 1) & 0x3 == 0x2 && slot + 1 < 6;
    let low_bits = u64::from(mask & 0xFFFF_FFF0);
    let (base, bits) = if is_64 {
        let (original_high, mask_high) = probe_mask(cfg, bus, device, function, offset + 4);
        (u64::from(original_high) << 32 | u64::from(original & 0xFFFF_FFF0), u64::from(mask_high) << 32 | low_bits)
    } else {
        (u64::from(original & 0xFFFF_FFF0), 0xFFFF_FFFF_0000_0000 | low_bits)
    };
    let slots = if is_64 { 2 } else { 1 };
    let implemented = if is_64 { bits != 0 } else { low_bits != 0 };
    if !implemented {
        return (Bar::None, slots);
    }
    let size = (!bits).wrapping_add(1);
    (Bar::Memory { base, size, prefetchable, is_64 }, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// One fake function: 64 dwords of config space plus, per BAR slot, the
    /// mask of writable bits (0 = BAR not implemented).
    struct FakeFunction {
        regs: [u32; 64],
        bar_masks: [u32; 6],
    }

    #[derive(Default)]
    struct FakeConfig {
        functions: HashMap<(u8, u8, u8), FakeFunction>,
        /// Set if a BAR was written with all ones while decode was enabled.
        sized_while_decoding: bool,
        reads: usize,
    }

    impl FakeConfig {
        fn add(&mut self, bdf: (u8, u8, u8), id: u32, class: u32, header_type: u8) -> &mut FakeFunction {
            let mut regs = [0u32; 64];
            regs[0] = id;
            regs[2] = class;
            regs[3] = u32::from(header_type) << 16;
            regs[15] = 0x0000_010B; // interrupt pin A, line 11
            self.functions.insert(bdf, FakeFunction { regs, bar_masks: [0; 6] });
            self.functions.get_mut(&bdf).unwrap()
        }

        fn reg(&self, bdf: (u8, u8, u8), offset: u8) -> u32 {
            self.functions[&bdf].regs[usize::from(offset / 4)]
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read32(&mut self, bus: u8, device: u8, function: u8, offset: u8) -> u32 {
            self.reads += 1;
            match self.functions.get(&(bus, device, function)) {
                Some(f) => f.regs[usize::from(offset / 4)],
                None => 0xFFFF_FFFF,
            }
        }

        fn write32(&mut self, bus: u8, device: u8, function: u8, offset: u8, value: u32) {
            let Some(f) = self.functions.get_mut(&(bus, device, function)) else {
                return;
            };
            let index = usize::from(offset / 4);
            match offset {
                REG_COMMAND => {
                    // Command is read/write; status bits are write-one-to-clear.
                    let status = (f.regs[1] >> 16) & !(value >> 16);
                    f.regs[1] = status << 16 | (value & 0xFFFF);
                }
                0x10..=0x24 => {
                    let mask = f.bar_masks[index - 4];
                    if value == 0xFFFF_FFFF && f.regs[1] & 0x3 != 0 {
                        self.sized_while_decoding = true;
                    }
                    f.regs[index] = (value & mask) | (f.regs[index] & !mask);
                }
                _ => f.regs[index] = value,
            }
        }
    }

    const E1000_BDF: (u8, u8, u8) = (0, 3, 0);
    const SECOND_BDF: (u8, u8, u8) = (0, 3, 1);
    const MEM_BASE: u64 = 0x0000_0008_F000_0000;

    /// Bus 0 device 3: a multi-function device. Function 0 has a 64-bit
    /// prefetchable 128 KiB memory BAR (slots 0/1) and a 64-port I/O BAR
    /// (slot 2); function 1 has no BARs. Bus 2 device 5 is single-function,
    /// but its function 1 answers too (must be ignored).
    fn fake_bus() -> FakeConfig {
        let mut cfg = FakeConfig::default();
        let f0 = cfg.add(E1000_BDF, 0x100E_8086, 0x0200_0000, 0x80);
        f0.regs[1] = 0x2000_0007; // status: received master abort (RW1C); decode + BM on
        f0.regs[4] = 0xF000_0000 | 0xC; // 64-bit, prefetchable
        f0.regs[5] = 0x0000_0008;
        f0.bar_masks[0] = 0xFFFE_0000;
        f0.bar_masks[1] = 0xFFFF_FFFF;
        f0.regs[6] = 0xC041; // I/O at 0xC040
        f0.bar_masks[2] = 0xFFFF_FFC0;
        cfg.add(SECOND_BDF, 0x7010_8086, 0x0101_8000, 0x00);
        cfg.add((2, 5, 0), 0x1234_1AF4, 0x0300_0000, 0x00).regs[4] = 0xFD00_0000;
        cfg.functions.get_mut(&(2, 5, 0)).unwrap().bar_masks[0] = 0xFF00_0000;
        cfg.add((2, 5, 1), 0x5678_1AF4, 0x0300_0000, 0x00);
        cfg
    }

    #[test]
    fn scan_finds_multifunction_device_and_skips_absent_slots() {
        let mut cfg = fake_bus();
        let devs = scan(&mut cfg);
        let bdfs: Vec<_> = devs.iter().map(|d| (d.bus, d.device, d.function)).collect();
        assert_eq!(bdfs, vec![E1000_BDF, SECOND_BDF, (2, 5, 0)]);
        let e = &devs[0];
        assert_eq!((e.vendor_id, e.device_id), (0x8086, 0x100E));
        assert_eq!((e.class, e.subclass, e.prog_if), (0x02, 0x00, 0x00));
        assert_eq!(e.header_type, 0x80);
        assert_eq!(e.interrupt_line, 11);
        assert_eq!((devs[1].class, devs[1].subclass, devs[1].prog_if), (0x01, 0x01, 0x80));
        assert_eq!(devs[1].bars, [Bar::None; 6]);
    }

    #[test]
    fn scan_sizes_64_bit_memory_and_io_bars() {
        let mut cfg = fake_bus();
        let devs = scan(&mut cfg);
        let bars = devs[0].bars;
        assert_eq!(bars[0], Bar::Memory { base: MEM_BASE, size: 128 * 1024, prefetchable: true, is_64: true });
        assert_eq!(bars[1], Bar::None);
        assert_eq!(bars[2], Bar::Io { port: 0xC040, size: 64 });
        assert_eq!(&bars[3..], &[Bar::None; 3]);
        assert_eq!(
            devs[2].bars[0],
            Bar::Memory { base: 0xFD00_0000, size: 16 << 20, prefetchable: false, is_64: false }
        );
    }

    #[test]
    fn scan_restores_bars_and_command_and_disables_decode_while_sizing() {
        let mut cfg = fake_bus();
        scan(&mut cfg);
        assert!(!cfg.sized_while_decoding);
        assert_eq!(cfg.reg(E1000_BDF, 0x10), 0xF000_000C);
        assert_eq!(cfg.reg(E1000_BDF, 0x14), 0x0000_0008);
        assert_eq!(cfg.reg(E1000_BDF, 0x18), 0xC041);
        assert_eq!(cfg.reg((2, 5, 0), 0x10), 0xFD00_0000);
        // Command restored and the RW1C status bit not cleared by our writes.
        assert_eq!(cfg.reg(E1000_BDF, 0x04), 0x2000_0007);
    }

    #[test]
    fn scan_of_empty_bus_returns_nothing() {
        let mut cfg = FakeConfig::default();
        assert!(scan(&mut cfg).is_empty());
        // Only function 0 of each slot is probed when nothing answers.
        assert_eq!(cfg.reads, 256 * 32);
    }

    #[test]
    fn enable_sets_requested_command_bits_only() {
        let mut cfg = fake_bus();
        let devs = scan(&mut cfg);
        let dev = &devs[2];
        assert_eq!(cfg.reg((2, 5, 0), 0x04) & 0x7, 0);
        enable(&mut cfg, dev, true, false, true);
        assert_eq!(cfg.reg((2, 5, 0), 0x04) & 0x7, 0b110);
        enable(&mut cfg, dev, false, true, false);
        assert_eq!(cfg.reg((2, 5, 0), 0x04) & 0x7, 0b111);
    }

    #[test]
    fn enable_preserves_write_one_to_clear_status_bits() {
        let mut cfg = fake_bus();
        let devs = scan(&mut cfg);
        enable(&mut cfg, &devs[0], true, true, true);
        assert_eq!(cfg.reg(E1000_BDF, 0x04), 0x2000_0007);
    }
}

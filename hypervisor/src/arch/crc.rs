//! CRC32C on the SSE4.2 `crc32` instruction, installed into the migration
//! protocol (which forbids `unsafe` and so cannot issue it itself). Under
//! QEMU's TCG the instruction is one helper call per 8 bytes, against about
//! ten table loads for the protocol's portable slicing-by-8.

use core::arch::asm;

use super::cpu;

/// Installs the instruction-based CRC32C if the CPU has SSE4.2 and the
/// result agrees with the portable one (`migration::crc::install` checks).
pub fn init() -> bool {
    let sse42 = cpu::cpuid(1, 0)[2] & (1 << 20) != 0;
    sse42 && migration::crc::install(update)
}

/// `migration::crc::update` on the `crc32` instruction.
fn update(crc: u32, data: &[u8]) -> u32 {
    let mut c = u64::from(!crc);
    let (words, rest) = data.as_chunks::<8>();
    for w in words {
        // SAFETY: `crc32` reads and writes only these registers; `init`
        // installs this function only after CPUID reported SSE4.2.
        unsafe {
            asm!("crc32 {c}, {w}", c = inout(reg) c, w = in(reg) u64::from_le_bytes(*w), options(pure, nomem, nostack));
        }
    }
    for &b in rest {
        // SAFETY: as above.
        unsafe { asm!("crc32 {c:e}, {b}", c = inout(reg) c, b = in(reg_byte) b, options(pure, nomem, nostack)) };
    }
    !u32::try_from(c & 0xFFFF_FFFF).unwrap_or(0)
}

//! CRC32C on the SSE4.2 `crc32` instruction, installed into the migration
//! protocol (which forbids `unsafe` and so cannot issue it itself) when it
//! beats the protocol's portable slicing-by-8 tables on this CPU.
//!
//! It does not always: QEMU's TCG runs the instruction as a helper that
//! shifts one bit at a time, 64 steps per 8 bytes, and measured 6× slower
//! than the tables (11.5–13 ms against 1.9 ms per MiB). Bochs and real
//! CPUs run it fast. So the boot times both.

use alloc::vec;
use core::arch::asm;

use super::{clock, cpu};

/// How `init` chose, with the time per 64 KiB of each (TSC cycles; the
/// instruction's is 0 without SSE4.2).
pub struct Choice {
    /// Whether the instruction was installed.
    pub instruction: bool,
    /// Best of three runs of the instruction.
    pub instruction_cycles: u64,
    /// Best of three runs of the tables.
    pub tables_cycles: u64,
}

/// Installs the instruction-based CRC32C if the CPU has SSE4.2, it is the
/// faster of the two here, and its result agrees with the portable one
/// (`migration::crc::install` checks).
pub fn init() -> Choice {
    let buf = vec![0x5Au8; 64 * 1024];
    // Nothing is installed yet, so this runs the tables.
    let tables_cycles = clock::best_of_three(|| {
        core::hint::black_box(migration::crc::crc32c(&buf));
    });
    let sse42 = cpu::cpuid(1, 0)[2] & (1 << 20) != 0;
    let instruction_cycles = if sse42 {
        clock::best_of_three(|| {
            core::hint::black_box(update(0, &buf));
        })
    } else {
        0
    };
    let instruction = sse42 && instruction_cycles < tables_cycles && migration::crc::install(update);
    Choice { instruction, instruction_cycles, tables_cycles }
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

//! Return addresses of the current call stack, for the panic report. The
//! kernel is built with frame pointers (`.cargo/config.toml`), so each frame
//! starts with the caller's RBP and, above it, the return address.

use core::arch::asm;

/// Most frames reported.
pub const MAX_FRAMES: usize = 24;
/// A caller's frame lies above its callee's and within this distance.
const MAX_FRAME_BYTES: u64 = 256 * 1024;

/// Fills `out` with the return addresses of the callers of this function,
/// innermost first, and returns how many it found. The walk stops at the
/// first frame pointer that is not 8-aligned, does not move up the stack,
/// or jumps further than a frame could be, so it never reads outside the
/// part of the stack that the chain has already proven to be live.
pub fn return_addresses(out: &mut [u64; MAX_FRAMES]) -> usize {
    let mut rbp: u64;
    // SAFETY: reads a register; no memory is touched.
    unsafe { asm!("mov {}, rbp", out(reg) rbp, options(nomem, nostack, preserves_flags)) };
    let mut n = 0;
    while n < MAX_FRAMES && rbp != 0 && rbp.is_multiple_of(8) {
        // SAFETY: `rbp` is this function's frame pointer or one the chain
        // reached from it by the checks below: a live frame of the current
        // stack, whose first two words are the saved RBP and the return
        // address.
        let (next, ret) = unsafe {
            let frame = rbp as *const u64;
            (frame.read(), frame.add(1).read())
        };
        if ret == 0 {
            break;
        }
        out[n] = ret;
        n += 1;
        if next <= rbp || next - rbp > MAX_FRAME_BYTES {
            break;
        }
        rbp = next;
    }
    n
}

//! The kernel's `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`,
//! replacing the weak definitions in `compiler_builtins` (which use `rep
//! movsq`/`rep stosq`, slow under QEMU's TCG, and compare byte by byte; see
//! `hypervisor::mem`). [`calibrate`] times the
//! string instructions against the loops at boot and keeps the faster.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, Ordering};

use hypervisor::mem;

use super::clock;

/// Use `rep movsb`/`rep stosb` rather than the loops.
static USE_REP: AtomicBool = AtomicBool::new(false);

/// The C `memcpy`.
///
/// # Safety
/// `src..src+n` readable, `dst..dst+n` writable, not overlapping.
// Aligned like the receive path's code (drivers' e1000, "Code placement"):
// each received frame is copied and its payload compared through these.
#[unsafe(no_mangle)]
#[rustc_align(512)]
pub unsafe extern "C" fn memcpy(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { mem::copy_forward(dst.cast(), src.cast(), n, USE_REP.load(Ordering::Relaxed)) };
    dst
}

/// The C `memmove`.
///
/// # Safety
/// `src..src+n` readable, `dst..dst+n` writable; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { mem::copy(dst.cast(), src.cast(), n, USE_REP.load(Ordering::Relaxed)) };
    dst
}

/// The C `memset`.
///
/// # Safety
/// `dst..dst+n` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut c_void, c: c_int, n: usize) -> *mut c_void {
    // SAFETY: forwarded contract. C converts `c` to unsigned char.
    unsafe { mem::fill(dst.cast(), c.to_le_bytes()[0], n, USE_REP.load(Ordering::Relaxed)) };
    dst
}

/// The C `memcmp`.
///
/// # Safety
/// `a..a+n` and `b..b+n` readable.
#[unsafe(no_mangle)]
#[rustc_align(512)]
pub unsafe extern "C" fn memcmp(a: *const c_void, b: *const c_void, n: usize) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { mem::compare(a.cast(), b.cast(), n) }
}

/// `bcmp` (zero if equal), which the compiler emits for slice equality.
///
/// # Safety
/// `a..a+n` and `b..b+n` readable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const c_void, b: *const c_void, n: usize) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { mem::compare(a.cast(), b.cast(), n) }
}

/// Times both copy methods over `scratch` and keeps the faster. Returns the
/// name of the one chosen and the best times (TSC cycles) of the string
/// instruction and of the loop.
pub fn calibrate(scratch: &mut [u8]) -> (&'static str, u64, u64) {
    let half = scratch.len() / 2;
    let (a, b) = scratch.split_at_mut(half);
    let mut time = |rep: bool| {
        USE_REP.store(rep, Ordering::Relaxed);
        clock::best_of_three(|| {
            b.copy_from_slice(a);
            a.copy_from_slice(b);
        })
    };
    let looped = time(false);
    let rep = time(true);
    USE_REP.store(rep < looped, Ordering::Relaxed);
    (if rep < looped { "rep movsb" } else { "8-byte loop" }, rep, looped)
}

//! The copy and fill loops behind the kernel's `memcpy`, `memmove` and
//! `memset` (exported by `arch::mem`, replacing the weak definitions in
//! `compiler_builtins`). Host-tested here, where they are not exported.
//!
//! Those use `rep movsq` / `rep stosq`. On hardware that is fast, but QEMU's
//! TCG runs a `rep` string instruction one iteration per pass through its
//! dispatcher: copying 4 MiB took 30 ms (about 140 MB/s), and a migration
//! copies every byte about ten times between the guest, the protocol and
//! the NIC rings. A plain loop of 8-byte moves, 32 bytes per pass, runs as
//! one translated block. Both are kept (`rep` = true picks the string
//! instruction); the kernel times each at boot and keeps the faster.
//!
//! The loops are inline assembly, so the compiler cannot turn them back
//! into calls to `memcpy`.

use core::arch::asm;

/// Put before each loop of at most 64 bytes: a loop that straddles a 4 KiB
/// page runs as two translated blocks under QEMU's TCG, which cannot chain
/// a jump from one page into another, so every pass takes the slow lookup.
/// `memcmp`'s 32-byte loop straddling a page made `net bench` (which
/// compares every byte it receives) 40 % slower after an unrelated change
/// had moved the code by 96 bytes. The Rust loops get the same from
/// `-align-loops=64` (`.cargo/config.toml`).
macro_rules! align_loop {
    () => {
        ".p2align 6"
    };
}
/// The same for the 64-byte copy loop (80 bytes of code).
macro_rules! align_big_loop {
    () => {
        ".p2align 7"
    };
}

/// Copies `n` bytes forward, 64 at a time, then 8 at a time, then the
/// tail byte by byte.
///
/// # Safety
/// `src..src+n` readable, `dst..dst+n` writable; if they overlap, `dst`
/// must not be above `src`.
pub unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize, rep: bool) {
    if rep {
        // SAFETY: the caller's contract; a forward `rep movsb` (DF is
        // clear in the kernel, as the ABI requires) handles dst <= src.
        unsafe {
            asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack));
        }
        return;
    }
    // SAFETY: the caller's contract; every load of a 32-byte block happens
    // before its stores, so a dst below an overlapping src is safe. Each
    // loop tests its count at the bottom, so a pass is one translated block.
    unsafe {
        asm!(
            "cmp rcx, 64",
            "jb 3f",
            align_big_loop!(),
            "2:",
            "mov rax, [rsi]",
            "mov rdx, [rsi + 8]",
            "mov r8, [rsi + 16]",
            "mov r9, [rsi + 24]",
            "mov [rdi], rax",
            "mov [rdi + 8], rdx",
            "mov [rdi + 16], r8",
            "mov [rdi + 24], r9",
            "mov rax, [rsi + 32]",
            "mov rdx, [rsi + 40]",
            "mov r8, [rsi + 48]",
            "mov r9, [rsi + 56]",
            "mov [rdi + 32], rax",
            "mov [rdi + 40], rdx",
            "mov [rdi + 48], r8",
            "mov [rdi + 56], r9",
            "add rsi, 64",
            "add rdi, 64",
            "sub rcx, 64",
            "cmp rcx, 64",
            "jae 2b",
            "3:",
            "cmp rcx, 8",
            "jb 5f",
            align_loop!(),
            "6:",
            "mov rax, [rsi]",
            "mov [rdi], rax",
            "add rsi, 8",
            "add rdi, 8",
            "sub rcx, 8",
            "cmp rcx, 8",
            "jae 6b",
            "5:",
            "test rcx, rcx",
            "jz 4f",
            align_loop!(),
            "7:",
            "mov al, [rsi]",
            "mov [rdi], al",
            "inc rsi",
            "inc rdi",
            "dec rcx",
            "jnz 7b",
            "4:",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") n => _,
            out("rax") _,
            out("rdx") _,
            out("r8") _,
            out("r9") _,
            options(nostack),
        );
    }
}

/// Copies `n` bytes backward (for a `dst` above an overlapping `src`).
///
/// # Safety
/// `src..src+n` readable, `dst..dst+n` writable.
pub unsafe fn copy_backward(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller's contract; each 8-byte word is loaded before it
    // is stored, highest first, so a dst above src never overwrites bytes
    // not yet read.
    unsafe {
        asm!(
            align_loop!(),
            "2:",
            "cmp rcx, 8",
            "jb 3f",
            "sub rcx, 8",
            "mov rax, [rsi + rcx]",
            "mov [rdi + rcx], rax",
            "jmp 2b",
            align_loop!(),
            "3:",
            "test rcx, rcx",
            "jz 4f",
            "dec rcx",
            "mov al, [rsi + rcx]",
            "mov [rdi + rcx], al",
            "jmp 3b",
            "4:",
            in("rdi") dst,
            in("rsi") src,
            inout("rcx") n => _,
            out("rax") _,
            options(nostack),
        );
    }
}

/// Fills `n` bytes with `byte`.
///
/// # Safety
/// `dst..dst+n` writable.
pub unsafe fn fill(dst: *mut u8, byte: u8, n: usize, rep: bool) {
    if rep {
        // SAFETY: the caller's contract.
        unsafe {
            asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") byte, options(nostack));
        }
        return;
    }
    let word = u64::from(byte) * 0x0101_0101_0101_0101;
    // SAFETY: the caller's contract.
    unsafe {
        asm!(
            align_loop!(),
            "2:",
            "cmp rcx, 32",
            "jb 3f",
            "mov [rdi], rax",
            "mov [rdi + 8], rax",
            "mov [rdi + 16], rax",
            "mov [rdi + 24], rax",
            "add rdi, 32",
            "sub rcx, 32",
            "jmp 2b",
            align_loop!(),
            "3:",
            "test rcx, rcx",
            "jz 4f",
            "mov [rdi], al",
            "inc rdi",
            "dec rcx",
            "jmp 3b",
            "4:",
            inout("rdi") dst => _,
            inout("rcx") n => _,
            in("rax") word,
            options(nostack),
        );
    }
}

/// `memmove`: forward unless `dst` is above an overlapping `src`.
///
/// # Safety
/// `src..src+n` readable, `dst..dst+n` writable; they may overlap.
pub unsafe fn copy(dst: *mut u8, src: *const u8, n: usize, rep: bool) {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst below src, or no overlap: forward is safe.
        // SAFETY: forwarded contract.
        unsafe { copy_forward(dst, src, n, rep) };
    } else {
        // SAFETY: forwarded contract.
        unsafe { copy_backward(dst, src, n) };
    }
}

/// `memcmp`: the difference of the first unequal bytes (as unsigned),
/// or 0. Compares 32 bytes at a time, then 8, then byte by byte (and
/// byte by byte within the first block that differs).
///
/// # Safety
/// `a..a+n` and `b..b+n` readable.
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    let diff: i32;
    // SAFETY: the caller's contract; only loads inside the two ranges.
    unsafe {
        asm!(
            "cmp rcx, 32",
            "jb 3f",
            align_loop!(),
            "2:",
            "mov rax, [rdi]",
            "xor rax, [rsi]",
            "mov rdx, [rdi + 8]",
            "xor rdx, [rsi + 8]",
            "or rax, rdx",
            "mov rdx, [rdi + 16]",
            "xor rdx, [rsi + 16]",
            "or rax, rdx",
            "mov rdx, [rdi + 24]",
            "xor rdx, [rsi + 24]",
            "or rax, rdx",
            "jnz 7f",
            "add rdi, 32",
            "add rsi, 32",
            "sub rcx, 32",
            "cmp rcx, 32",
            "jae 2b",
            "3:",
            "cmp rcx, 8",
            "jb 5f",
            align_loop!(),
            "6:",
            "mov rax, [rdi]",
            "cmp rax, [rsi]",
            "jne 8f",
            "add rdi, 8",
            "add rsi, 8",
            "sub rcx, 8",
            "cmp rcx, 8",
            "jae 6b",
            "jmp 5f",
            "7:",
            "mov rcx, 32", // the difference is in these 32 bytes
            "jmp 5f",
            "8:",
            "mov rcx, 8", // the difference is in these 8 bytes
            "5:",
            "test rcx, rcx",
            "jz 4f",
            align_loop!(),
            "9:",
            "movzx eax, byte ptr [rdi]",
            "movzx edx, byte ptr [rsi]",
            "sub eax, edx",
            "jnz 19f",
            "inc rdi",
            "inc rsi",
            "dec rcx",
            "jnz 9b",
            "4:",
            "xor eax, eax",
            "19:",
            inout("rdi") a => _,
            inout("rsi") b => _,
            inout("rcx") n => _,
            out("eax") diff,
            out("edx") _,
            options(nostack, readonly),
        );
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic xorshift for sizes, offsets and contents.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn copies_and_fills_match_the_reference_at_every_size_and_overlap() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        for rep in [false, true] {
            for _ in 0..3000 {
                let len = 1 + (rng(&mut seed) % 600) as usize;
                let mut buf: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
                let n = (rng(&mut seed) as usize) % (len + 1);
                let src = (rng(&mut seed) as usize) % (len - n + 1);
                let dst = (rng(&mut seed) as usize) % (len - n + 1);
                let mut want = buf.clone();
                want.copy_within(src..src + n, dst);
                let p = buf.as_mut_ptr();
                // SAFETY: src..src+n and dst..dst+n lie inside `buf`.
                unsafe { copy(p.add(dst), p.add(src), n, rep) };
                assert_eq!(buf, want, "copy {n} bytes {src} -> {dst} (rep {rep})");
                let byte = rng(&mut seed) as u8;
                want[dst..dst + n].fill(byte);
                // SAFETY: dst..dst+n lies inside `buf`.
                unsafe { fill(p.add(dst), byte, n, rep) };
                assert_eq!(buf, want, "fill {n} bytes at {dst} (rep {rep})");
            }
        }
    }

    #[test]
    fn compare_orders_like_memcmp() {
        let mut seed = 0x1234_5678_9ABC_DEF1;
        for _ in 0..5000 {
            let len = (rng(&mut seed) % 300) as usize;
            let a: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            let mut b = a.clone();
            if len > 0 && !rng(&mut seed).is_multiple_of(4) {
                let at = (rng(&mut seed) as usize) % len;
                b[at] = rng(&mut seed) as u8;
            }
            // SAFETY: both vectors hold `len` bytes.
            let got = unsafe { compare(a.as_ptr(), b.as_ptr(), len) };
            assert_eq!(got.signum(), a.cmp(&b) as i32, "{a:?} vs {b:?}");
            if got != 0 {
                let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
                assert_eq!(got, i32::from(a[i]) - i32::from(b[i]));
            }
        }
    }

    #[test]
    fn forward_copy_between_separate_buffers() {
        let src: Vec<u8> = (0..=255).cycle().take(4096 + 31).collect();
        for rep in [false, true] {
            let mut dst = vec![0u8; src.len()];
            // SAFETY: both buffers hold src.len() bytes and do not overlap.
            unsafe { copy_forward(dst.as_mut_ptr(), src.as_ptr(), src.len(), rep) };
            assert_eq!(dst, src);
        }
    }
}

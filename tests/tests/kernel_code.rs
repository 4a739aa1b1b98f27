//! Checks on the kernel's machine code that a compiler upgrade or a
//! refactor could undo without any test of behaviour noticing.

use std::path::PathBuf;
use std::process::Command;

/// `llvm-objdump` from the pinned toolchain's `llvm-tools` component.
fn objdump() -> PathBuf {
    let rustc = |arg: &str| {
        let out = Command::new("rustc").arg(arg).output().expect("running rustc");
        String::from_utf8(out.stdout).expect("rustc prints UTF-8")
    };
    let sysroot = rustc("--print=sysroot");
    let host =
        rustc("-vV").lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_owned();
    let tool = PathBuf::from(sysroot.trim()).join("lib/rustlib").join(host).join("bin/llvm-objdump");
    assert!(tool.exists(), "{} is missing: the llvm-tools component (scripts/setup.sh installs it)", tool.display());
    tool
}

/// The instructions of the kernel function `name` (demangled, no hash).
fn disassembly(name: &str) -> Vec<String> {
    let kernel = &tests::images().kernel;
    let out = Command::new(objdump())
        .args(["-d", "--no-show-raw-insn", "--demangle"])
        .arg(kernel)
        .output()
        .expect("running llvm-objdump");
    assert!(out.status.success(), "llvm-objdump failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let header = format!("<{name}>:");
    let body: Vec<String> = text
        .lines()
        .skip_while(|l| !l.ends_with(&header))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert!(!body.is_empty(), "no function {name} in {}", kernel.display());
    body
}

#[test]
fn copy_page_hashed_reads_each_page_once() {
    // Both hosts of a migration copy every full page through it. Written
    // as a 32-byte block copy, LLVM made it a `memcpy` of the page plus a
    // hashing loop that read the page again (it was so in the kernel
    // that measured "one pass"); the loop must load, hash and store.
    let body = disassembly("migration::copy_page_hashed");
    let calls: Vec<_> = body.iter().filter(|l| l.contains("call")).collect();
    assert!(calls.is_empty(), "copy_page_hashed calls out (a memcpy?): {calls:?}");
    let stores = body.iter().filter(|l| l.contains("mov") && l.trim_end().ends_with(')')).count();
    let multiplies = body.iter().filter(|l| l.contains("imul")).count();
    assert!(stores >= 4 && multiplies >= 4, "no loop of stores and multiplies:\n{}", body.join("\n"));
}

/// The backward jumps of a disassembled function (its loops): for each,
/// the address jumped to and the address after the jump.
fn loops(body: &[String]) -> Vec<(u64, u64)> {
    let addr = |l: &str| u64::from_str_radix(l.trim().split(':').next().unwrap_or(""), 16).ok();
    let mut found = Vec::new();
    for (i, line) in body.iter().enumerate() {
        let Some(at) = addr(line) else { continue };
        let mut words = line.split_whitespace().skip(1);
        let (Some(op), Some(target)) = (words.next(), words.next()) else { continue };
        let Some(target) = target.strip_prefix("0x").and_then(|t| u64::from_str_radix(t, 16).ok()) else { continue };
        if op.starts_with('j') && target <= at {
            let end = body.get(i + 1).and_then(|l| addr(l)).unwrap_or(at + 6);
            found.push((target, end));
        }
    }
    found
}

#[test]
fn hot_loops_never_straddle_a_page() {
    // Under TCG a loop that straddles a 4 KiB page is two translated
    // blocks that cannot chain into each other, and every pass takes
    // QEMU's slow lookup: memcmp's loop straddling a page after an
    // unrelated change made `net bench` 40 % slower. The kernel's copy
    // loops are aligned to a power of two at least their size (so no
    // layout can make them straddle), the Rust ones by -align-loops=64,
    // and the page hash functions whole (`rustc_align`), since a loop
    // over 64 bytes long can still straddle: `page_hash`'s did after the
    // e1000 receive path grew.
    for name in ["memcpy", "memmove", "memset", "memcmp"] {
        let found = loops(&disassembly(name));
        assert!(!found.is_empty(), "no loop found in {name}");
        for (start, end) in found {
            let align = (end - start).next_power_of_two();
            assert_eq!(start % align, 0, "{name}: loop {start:#x}..{end:#x} not aligned to {align}");
        }
    }
    for name in ["migration::copy_page_hashed", "migration::page_hash"] {
        let found = loops(&disassembly(name));
        assert!(!found.is_empty(), "no loop found in {name}");
        for (start, end) in found {
            assert_eq!(start / 4096, (end - 1) / 4096, "{name}: loop {start:#x}..{end:#x} straddles a page");
            assert_eq!(start % 64, 0, "{name}: loop at {start:#x} not aligned to 64 (-align-loops)");
        }
    }
}

/// Instruction addresses of a disassembled function.
fn addresses(body: &[String]) -> Vec<u64> {
    body.iter().filter_map(|l| u64::from_str_radix(l.trim().split(':').next().unwrap_or(""), 16).ok()).collect()
}

#[test]
fn per_frame_code_has_no_instruction_across_a_page() {
    // Under TCG an instruction across a 4 KiB page starts a translated
    // block spanning both pages, which QEMU 7.2 never chains into: each
    // time the code runs it goes back through QEMU's main loop. These
    // functions run for every received frame; they are aligned to a power
    // of two at least their size (drivers' e1000, "Code placement"). If
    // one grows past its alignment, raise the alignment.
    let per_frame = [
        "<drivers::e1000::RxRing>::coalesce",
        "<drivers::e1000::RxRing>::next_good",
        "drivers::e1000::lro_segment",
        "drivers::e1000::tcp_checksum_ok",
        "drivers::e1000::diverted_payload",
        "<drivers::e1000::E1000<hypervisor::arch::nic::Mmio> as smoltcp::phy::Device>::receive",
        "memcpy",
        "memcmp",
    ];
    for name in per_frame {
        // llvm-objdump counts the int3 padding up to the next symbol in.
        let mut body = disassembly(name);
        while body.last().is_some_and(|l| l.trim_end().ends_with("int3")) {
            body.pop();
        }
        let at = addresses(&body);
        let (first, last) = (at[0], at[at.len() - 1]);
        // (The last instruction, a return or a jump, ends a few bytes on.)
        let end = last + 1;
        let align = (end - first).next_power_of_two().min(4096);
        assert_eq!(first % align, 0, "{name}: {first:#x}..{end:#x} not aligned to {align}");
        let across: Vec<_> = at.windows(2).filter(|w| w[0] / 4096 != (w[1] - 1) / 4096).collect();
        assert!(across.is_empty(), "{name}: instructions across a page at {across:x?}");
    }
}

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

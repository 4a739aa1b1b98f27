//! The hypervisor kernel binary: boot entries, then the console loop.
//!
//! Everything hardware-facing lives in `arch/`; the console, shell and boot
//! information parsing come from this crate's library half, which is tested
//! on the host. Built only for `x86_64-unknown-none`; on the host this file
//! compiles to an empty program so that `cargo test` at the root works.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![cfg_attr(target_os = "none", feature(abi_x86_interrupt))]
// `rustc_align` on `memcpy` and `memcmp` (see `arch::mem`).
#![cfg_attr(target_os = "none", feature(fn_align))]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor kernel builds for x86_64-unknown-none; see scripts/build.sh");
}

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod kernel;
#[cfg(target_os = "none")]
mod migrate;
#[cfg(target_os = "none")]
mod net;
#[cfg(target_os = "none")]
mod vm;

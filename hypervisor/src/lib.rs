//! The hypervisor's machine-independent parts: console line editor and shell,
//! JSON replies, boot information, ACPI processor count and the physical
//! frame allocator. The kernel binary (`main.rs` and `arch/`) ties them to
//! the hardware; everything here also builds and is tested on the host.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

extern crate alloc;

pub mod acpi;
pub mod bootinfo;
pub mod frames;
pub mod guest;
pub mod json;
pub mod line;
#[cfg(target_arch = "x86_64")]
pub mod mem;
pub mod migcmd;
pub mod netcmd;
pub mod shell;
pub mod vmcmd;

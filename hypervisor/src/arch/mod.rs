//! Hardware leaf modules. Every privileged instruction, port access and raw
//! pointer of the kernel lives below this module; each `unsafe` block names
//! the invariant it relies on.

pub mod backtrace;
pub mod clock;
pub mod cpu;
pub mod crc;
pub mod dr;
pub mod entry;
pub mod fpu;
pub mod gdt;
pub mod guest_memory;
pub mod idt;
pub mod mem;
pub mod memory;
pub mod nic;
pub mod pci;
pub mod power;
pub mod serial;
pub mod svm;
pub mod timer;
pub mod vmx;

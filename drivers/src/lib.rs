//! Device drivers of the hypervisor: PCI enumeration ([`pci`]) and the Intel
//! 8254x gigabit NIC ([`e1000`], with a `smoltcp` device). Built in the
//! networking issue (#6).
//!
//! Everything here is `no_std` + `alloc` and reaches hardware only through
//! small traits the kernel implements (PCI configuration space, MMIO
//! registers, DMA memory), so the drivers are unit-tested on the host against
//! fake devices.
#![cfg_attr(not(test), no_std)]
// `rustc_align` keeps the per-frame receive code off page boundaries (see
// `e1000`'s "Code placement").
#![feature(fn_align)]

extern crate alloc;

pub mod e1000;
pub mod pci;

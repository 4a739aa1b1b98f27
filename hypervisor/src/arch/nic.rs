//! The e1000's hardware side: its MMIO registers over the uncached BAR 0
//! mapping, and DMA memory from the frame allocator.

use core::ptr::NonNull;

use drivers::e1000::{Dma, Registers};

use super::memory;

/// The e1000 register window.
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// # Safety
    /// `base` must be the virtual address of the device's BAR 0, mapped
    /// uncached for at least 128 KiB, and used by nothing else.
    pub unsafe fn new(base: u64) -> Self {
        Mmio { base }
    }
}

impl Registers for Mmio {
    fn read(&self, offset: u32) -> u32 {
        // SAFETY: `new`'s contract: the window is mapped and ours; offsets
        // come from the driver's register table (all below 128 KiB, 4-aligned).
        unsafe { ((self.base + u64::from(offset)) as *const u32).read_volatile() }
    }

    fn write(&mut self, offset: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + u64::from(offset)) as *mut u32).write_volatile(value) }
    }
}

/// DMA memory: zeroed physically contiguous frames, never freed.
pub struct KernelDma;

impl Dma for KernelDma {
    fn alloc(&mut self, bytes: usize) -> Option<(NonNull<u8>, u64)> {
        let pa = memory::alloc_zeroed((bytes as u64).div_ceil(4096))?;
        NonNull::new(memory::phys_to_virt(pa)).map(|p| (p, pa))
    }
}

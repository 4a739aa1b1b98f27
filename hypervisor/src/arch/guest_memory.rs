//! Guest-physical memory: 2 MiB chunks of host frames, and the only place
//! that turns a guest-physical address into a host pointer. Also the
//! `ept::FrameAccess` the second-level tables are built with.

use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;

use ept::{FrameAccess, Hpa};

use super::memory::{self, phys_to_virt};

const CHUNK: u64 = 2 << 20;
const CHUNK_BYTES: usize = 2 << 20;

/// A VM's memory: `chunks[i]` backs GPAs `[i * 2 MiB, (i + 1) * 2 MiB)`.
pub struct GuestMemory {
    chunks: Vec<u64>,
}

impl GuestMemory {
    /// Allocates `bytes` (a multiple of 2 MiB) of guest memory, zeroed if
    /// `zeroed`, or frees what it got and returns `None`. Only an incoming
    /// migration's skeleton skips the zeroing: the destination does not let
    /// the VM run before round 0 wrote every page exactly once, and a
    /// skeleton that fails is freed without ever running.
    pub fn new(bytes: u64, zeroed: bool) -> Option<Self> {
        let mut mem = GuestMemory { chunks: Vec::new() };
        for _ in 0..bytes / CHUNK {
            let Some(pa) = memory::alloc_2m() else {
                mem.free();
                return None;
            };
            mem.chunks.push(pa);
            if zeroed {
                // SAFETY: the chunk was just allocated for this VM alone and
                // is reached through the physical map.
                unsafe { core::ptr::write_bytes(phys_to_virt(pa), 0, CHUNK_BYTES) };
            }
        }
        Some(mem)
    }

    /// Host-physical addresses of the chunks, in GPA order.
    pub fn chunks(&self) -> &[u64] {
        &self.chunks
    }

    fn ptr(&self, gpa: u64) -> Option<*mut u64> {
        let chunk = self.chunks.get(usize::try_from(gpa / CHUNK).ok()?)?;
        gpa.is_multiple_of(8).then(|| phys_to_virt(chunk + gpa % CHUNK).cast::<u64>())
    }

    /// Reads the aligned u64 at `gpa` (0 outside guest memory).
    pub fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: `ptr` only returns aligned pointers into this VM's chunks;
        // the guest may write the word concurrently only while it runs, and
        // it never runs while the host inspects it (one CPU).
        self.ptr(gpa).map_or(0, |p| unsafe { p.read_volatile() })
    }

    /// Writes the aligned u64 at `gpa` (ignored outside guest memory).
    pub fn write_u64(&mut self, gpa: u64, value: u64) {
        if let Some(p) = self.ptr(gpa) {
            // SAFETY: as in `read_u64`; and `&mut self` means no host
            // reference into this memory (`page_bytes`) is alive.
            unsafe { p.write_volatile(value) };
        }
    }

    /// The 4 KiB page at `gfn`, for reading or stamping.
    pub fn page_mut(&mut self, gfn: u64) -> Option<&mut [u64; 512]> {
        let p = self.ptr(gfn.checked_mul(4096)?)?;
        // SAFETY: the page lies inside one chunk (chunks are 4 KiB-aligned
        // multiples), is owned by this VM, and `&mut self` keeps the
        // reference unique on the host side; the guest is not running.
        Some(unsafe { &mut *p.cast::<[u64; 512]>() })
    }

    /// The 4 KiB page at `gfn` as bytes.
    pub fn page_bytes(&self, gfn: u64) -> Option<&[u8; 4096]> {
        let p = self.ptr(gfn.checked_mul(4096)?)?;
        // SAFETY: as in `page_mut`; shared, and the guest is not running
        // while the host reads (one CPU).
        Some(unsafe { &*p.cast::<[u8; 4096]>() })
    }

    /// The 4 KiB page at `gfn` as bytes, for writing.
    pub fn page_bytes_mut(&mut self, gfn: u64) -> Option<&mut [u8; 4096]> {
        self.page_mut(gfn).map(|p| {
            let p: *mut [u64; 512] = p;
            // SAFETY: same memory as the `[u64; 512]` view, which `&mut self`
            // keeps unique; u8 has no alignment or validity requirements.
            unsafe { &mut *p.cast::<[u8; 4096]>() }
        })
    }

    /// Copies `bytes` into guest memory at `gpa` (within one chunk).
    pub fn write_bytes(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        let Some(p) = self.ptr(gpa & !7) else { return false };
        if !gpa.is_multiple_of(8) || gpa % CHUNK + bytes.len() as u64 > CHUNK {
            return false;
        }
        // SAFETY: the destination range lies inside one chunk owned by this
        // VM (checked above) and does not overlap the kernel's `bytes`.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast::<u8>(), bytes.len()) };
        true
    }

    /// The migration protocol's memory digest (the wrapping sum of
    /// `migration::page_hash` over all pages), read in place.
    pub fn digest(&self) -> u64 {
        let mut sum = 0u64;
        for (c, &chunk) in self.chunks.iter().enumerate() {
            // SAFETY: each chunk is 2 MiB of this VM's memory in the physical
            // map; the guest is not running while the host reads it.
            let bytes = unsafe { core::slice::from_raw_parts(phys_to_virt(chunk), CHUNK_BYTES) };
            let (pages, _) = bytes.as_chunks::<{ migration::PAGE_SIZE }>();
            for (i, page) in pages.iter().enumerate() {
                sum = sum.wrapping_add(migration::page_hash((c * 512 + i) as u64, page));
            }
        }
        sum
    }

    /// Returns the memory to the host.
    pub(crate) fn free(&mut self) {
        for pa in self.chunks.drain(..) {
            memory::free_frames(pa, 512);
        }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        self.free();
    }
}

/// Page-table frames for `ept::Slat`, from the kernel's frame allocator.
pub struct KernelFrames;

impl FrameAccess for KernelFrames {
    fn alloc_table(&mut self) -> Option<Hpa> {
        memory::alloc_zeroed(1).map(Hpa)
    }

    fn free_table(&mut self, hpa: Hpa) {
        memory::free_frames(hpa.0, 1);
    }

    fn table(&self, hpa: Hpa) -> &[AtomicU64; 512] {
        // SAFETY: `ept::Slat` only passes table frames it got from
        // `alloc_table` (aligned, owned, in the physical map); atomics make
        // concurrent A/D updates by the CPU sound.
        unsafe { &*phys_to_virt(hpa.0).cast::<[AtomicU64; 512]>() }
    }
}

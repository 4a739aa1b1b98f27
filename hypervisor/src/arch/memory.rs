//! Physical memory: the frame bitmap, placed in the first usable region big
//! enough for it, and the kernel heap, mapped page by page at a fixed virtual
//! address through the `x86_64` crate's `OffsetPageTable`.

use core::sync::atomic::{AtomicU64, Ordering};

use hypervisor::bootinfo::{BootInfo, BootRoute};
use hypervisor::frames::{words_for, FrameBitmap, FRAME};
use linked_list_allocator::LockedHeap;
use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Where all physical memory is mapped, on every boot route (the bootloader
/// is configured for it; the Multiboot2 stub maps the first 64 GiB there).
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;
/// Physical memory the Multiboot2 stub maps; memory above it is not used on
/// that route.
pub const MULTIBOOT_MAPPED: u64 = 64 << 30;
/// Kernel heap: virtual base and size.
pub const HEAP_START: u64 = 0xffff_9000_0000_0000;
/// Smallest kernel heap: the console, VM bookkeeping and the NIC's sockets.
pub const MIN_HEAP: u64 = 16 << 20;
/// Largest kernel heap.
pub const MAX_HEAP: u64 = 128 << 20;

/// The heap takes a quarter of usable RAM within [MIN_HEAP, MAX_HEAP]: a
/// migration keeps socket buffers and a page cache for deltas on it.
pub fn heap_size_for(total: u64) -> u64 {
    (total / 4).clamp(MIN_HEAP, MAX_HEAP) & !0xFFF
}

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static FRAMES: Mutex<Option<FrameBitmap<'static>>> = Mutex::new(None);
static TOTAL_BYTES: AtomicU64 = AtomicU64::new(0);
/// One past the highest physical address the physical map covers.
static MAPPED_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Records how much of physical memory the boot route mapped at
/// [`PHYS_OFFSET`]; `read_phys` refuses anything above it.
pub fn set_mapped_limit(limit: u64) {
    MAPPED_LIMIT.store(limit, Ordering::Relaxed);
}

/// Why memory could not be set up.
#[derive(Debug)]
pub enum MemoryError {
    /// No usable region can hold the frame bitmap.
    NoRoomForBitmap,
    /// Ran out of frames while mapping the heap.
    OutOfFrames,
    /// The heap range was already mapped.
    HeapMapping,
}

/// Returns a pointer to physical address `pa` through the physical map.
pub fn phys_to_virt(pa: u64) -> *mut u8 {
    (PHYS_OFFSET + pa) as *mut u8
}

struct BitmapAllocator<'a, 'b>(&'a mut FrameBitmap<'b>);

// SAFETY: frames come from the bitmap, which hands each free frame out once.
unsafe impl FrameAllocator<Size4KiB> for BitmapAllocator<'_, '_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        self.0.alloc().map(|pa| PhysFrame::containing_address(PhysAddr::new(pa)))
    }
}

/// Sets up the frame bitmap from the boot memory map, reserving
/// `reserved` physical ranges (kernel image, boot structures), then maps and
/// initializes the heap.
pub fn init(info: &BootInfo, reserved: &[(u64, u64)]) -> Result<(), MemoryError> {
    let limit = if info.route == BootRoute::Multiboot2 { MULTIBOOT_MAPPED } else { u64::MAX };
    let usable = || info.usable().iter().map(|r| (r.start, r.end.min(limit))).filter(|(s, e)| s < e);
    let max_addr = usable().map(|(_, e)| e).max().unwrap_or(0);
    let words = words_for(max_addr);
    let bytes = (words as u64 * 8).div_ceil(FRAME) * FRAME;
    let overlaps = |s: u64, e: u64| reserved.iter().any(|&(rs, re)| s < re && rs < e);
    let (store_pa, _) = usable()
        .map(|(s, e)| (s.max(1 << 20).div_ceil(FRAME) * FRAME, e))
        .find(|&(s, e)| s + bytes <= e && !overlaps(s, s + bytes))
        .ok_or(MemoryError::NoRoomForBitmap)?;
    // SAFETY: [store_pa, store_pa + bytes) lies in a usable region that no
    // reserved range overlaps, is mapped through the physical map, and is
    // reserved in the bitmap below, so nothing else will ever use it.
    let store = unsafe { core::slice::from_raw_parts_mut(phys_to_virt(store_pa).cast::<u64>(), words) };
    let mut frames = FrameBitmap::new(store);
    for (s, e) in usable() {
        frames.release_range(s, e);
    }
    frames.reserve_range(0, 1 << 20); // real-mode area, BIOS data, option ROMs
    frames.reserve_range(store_pa, store_pa + bytes);
    for &(s, e) in reserved {
        frames.reserve_range(s, e);
    }
    TOTAL_BYTES.store(usable().map(|(s, e)| e - s).sum(), Ordering::Relaxed);

    map_heap(&mut frames, heap_size_for(TOTAL_BYTES.load(Ordering::Relaxed)))?;
    *FRAMES.lock() = Some(frames);
    Ok(())
}

fn map_heap(frames: &mut FrameBitmap<'static>, size: u64) -> Result<(), MemoryError> {
    let (l4_frame, _) = Cr3::read();
    let l4_ptr = phys_to_virt(l4_frame.start_address().as_u64()).cast::<PageTable>();
    // SAFETY: CR3 points at the active level-4 table, which the physical map
    // makes reachable at PHYS_OFFSET; this is the only reference made to it
    // and it does not outlive this function.
    let mut mapper = unsafe { OffsetPageTable::new(&mut *l4_ptr, VirtAddr::new(PHYS_OFFSET)) };
    let mut alloc = BitmapAllocator(frames);
    let first = Page::<Size4KiB>::containing_address(VirtAddr::new(HEAP_START));
    let last = Page::<Size4KiB>::containing_address(VirtAddr::new(HEAP_START + size - 1));
    for page in Page::range_inclusive(first, last) {
        let frame = alloc.allocate_frame().ok_or(MemoryError::OutOfFrames)?;
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
        // SAFETY: the heap range is used by nothing else and the frame is
        // freshly allocated, so the new mapping aliases no other memory.
        unsafe { mapper.map_to(page, frame, flags, &mut alloc) }.map_err(|_| MemoryError::HeapMapping)?.flush();
    }
    // SAFETY: the range was just mapped writable and is given to the
    // allocator alone.
    unsafe { HEAP.lock().init(HEAP_START as *mut u8, usize::try_from(size).unwrap_or(0)) };
    Ok(())
}

/// Allocates `count` contiguous frames, zeroed; returns the physical address.
pub fn alloc_zeroed(count: u64) -> Option<u64> {
    let pa = FRAMES.lock().as_mut()?.alloc_contiguous(count)?;
    // SAFETY: the frames were just allocated, so nothing else uses them, and
    // they lie in the physical map.
    unsafe { core::ptr::write_bytes(phys_to_virt(pa), 0, usize::try_from(count * FRAME).ok()?) };
    Some(pa)
}

/// Allocates a 2 MiB-aligned run of 2 MiB (guest memory chunks), not zeroed.
pub fn alloc_2m() -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc_aligned(512, 512)
}

/// Frees `count` frames starting at `pa`.
pub fn free_frames(pa: u64, count: u64) {
    if let Some(frames) = FRAMES.lock().as_mut() {
        for i in 0..count {
            frames.free(pa + i * FRAME);
        }
    }
}

/// Virtual base of device (MMIO) mappings.
const MMIO_BASE: u64 = 0xffff_b000_0000_0000;
static MMIO_NEXT: AtomicU64 = AtomicU64::new(MMIO_BASE);

/// Maps `size` bytes of device memory at physical `pa` uncached (PCD|PWT)
/// and returns the virtual address.
pub fn map_mmio(pa: u64, size: u64) -> Option<u64> {
    let pages = size.div_ceil(FRAME).max(1);
    let virt = MMIO_NEXT.fetch_add(pages * FRAME, Ordering::Relaxed);
    let mut guard = FRAMES.lock();
    let frames = guard.as_mut()?;
    let (l4_frame, _) = Cr3::read();
    let l4_ptr = phys_to_virt(l4_frame.start_address().as_u64()).cast::<PageTable>();
    // SAFETY: as in `map_heap`: the active level-4 table through the
    // physical map, referenced only here while the frame lock is held.
    let mut mapper = unsafe { OffsetPageTable::new(&mut *l4_ptr, VirtAddr::new(PHYS_OFFSET)) };
    let mut alloc = BitmapAllocator(frames);
    let flags =
        PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH;
    for i in 0..pages {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt + i * FRAME));
        let frame = PhysFrame::containing_address(PhysAddr::new(pa + i * FRAME));
        // SAFETY: the virtual range is fresh (bump allocated above) and the
        // frame is device memory named by a BAR, which no RAM user owns.
        unsafe { mapper.map_to(page, frame, flags, &mut alloc) }.ok()?.flush();
    }
    Some(virt + pa % FRAME)
}

/// Usable RAM reported at boot, in bytes.
pub fn total_bytes() -> u64 {
    TOTAL_BYTES.load(Ordering::Relaxed)
}

/// Free physical memory, in bytes.
pub fn free_bytes() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |f| f.free_frames() * FRAME)
}

/// Heap size and bytes in use.
pub fn heap_usage() -> (u64, u64) {
    let heap = HEAP.lock();
    (heap.size() as u64, heap.used() as u64)
}

/// Copies physical memory into `buf`; false if the range is outside the
/// physical map.
pub fn read_phys(pa: u64, buf: &mut [u8]) -> bool {
    let Some(end) = pa.checked_add(buf.len() as u64) else { return false };
    if end > MAPPED_LIMIT.load(Ordering::Relaxed) {
        return false;
    }
    // SAFETY: the range lies below the limit the boot route mapped at
    // PHYS_OFFSET (checked above), and the copy only reads it.
    unsafe { core::ptr::copy_nonoverlapping(phys_to_virt(pa), buf.as_mut_ptr(), buf.len()) };
    true
}

/// Least time between two reloads by [`refresh_tlb`].
const TLB_REFRESH_US: u64 = 5_000;
/// When [`refresh_tlb`] last reloaded CR3.
static TLB_REFRESHED_US: AtomicU64 = AtomicU64::new(0);

/// Reloads CR3 with the value it holds, at most once per 5 ms; the network
/// poll calls it, so it runs while data streams through the host.
///
/// On hardware this drops the TLB's non-global entries, a refill every
/// 5 ms. Under QEMU's TCG it is what lets the emulated TLB grow: QEMU
/// sizes that software TLB (direct-mapped; 256 entries, 1 MiB of 4 KiB
/// pages, at first) only when the guest flushes it, doubling it when more
/// than 70 % of it was used since the last flush (`accel/tcg/cputlb.c`,
/// `tlb_mmu_resize_locked`). A host that runs no VM never flushes, keeps
/// the first size, and misses on every page when it copies through more
/// than 1 MiB (a socket's 4 MiB receive buffer, a migrating VM's pages):
/// timed at boot, memcpy over 8 MiB took 1068 µs per MiB, and 201 µs
/// after twelve reloads had let the TLB grow. See README, "Learned".
pub fn refresh_tlb() {
    let now = super::clock::uptime_us();
    if now.wrapping_sub(TLB_REFRESHED_US.load(Ordering::Relaxed)) < TLB_REFRESH_US {
        return;
    }
    TLB_REFRESHED_US.store(now, Ordering::Relaxed);
    let (frame, flags) = Cr3::read();
    // SAFETY: the same top-level table and flags: every mapping stays as
    // it is, only cached translations are dropped.
    unsafe { Cr3::write(frame, flags) };
}

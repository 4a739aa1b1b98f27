//! Physical frame allocator: one bit per 4 KiB frame (set = in use) over the
//! whole physical address range the boot loader reported.
//!
//! The bitmap's storage is handed in, so the kernel can place it in a usable
//! region before its heap exists and the host tests can use a `Vec`.

/// Size of a frame.
pub const FRAME: u64 = 4096;

/// A bitmap frame allocator.
#[derive(Debug)]
pub struct FrameBitmap<'a> {
    bits: &'a mut [u64],
    frames: u64,
    free: u64,
    next: u64,
}

/// Words of storage needed to track physical addresses up to `max_addr`.
pub fn words_for(max_addr: u64) -> usize {
    usize::try_from(max_addr.div_ceil(FRAME).div_ceil(64)).unwrap_or(usize::MAX)
}

impl<'a> FrameBitmap<'a> {
    /// A bitmap over `bits.len() * 64` frames, all in use.
    pub fn new(bits: &'a mut [u64]) -> Self {
        bits.fill(u64::MAX);
        let frames = bits.len() as u64 * 64;
        FrameBitmap { bits, frames, free: 0, next: 0 }
    }

    fn set(&mut self, frame: u64, used: bool) {
        let (word, bit) = ((frame / 64) as usize, frame % 64);
        let Some(w) = self.bits.get_mut(word) else { return };
        let was_used = *w & (1 << bit) != 0;
        match (was_used, used) {
            (true, false) => {
                *w &= !(1 << bit);
                self.free += 1;
            }
            (false, true) => {
                *w |= 1 << bit;
                self.free -= 1;
            }
            _ => {}
        }
    }

    /// Marks every whole frame inside `[start, end)` free.
    pub fn release_range(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(FRAME);
        let last = (end / FRAME).min(self.frames);
        for f in first..last {
            self.set(f, false);
        }
    }

    /// Marks every frame touching `[start, end)` in use.
    pub fn reserve_range(&mut self, start: u64, end: u64) {
        let first = start / FRAME;
        let last = end.div_ceil(FRAME).min(self.frames);
        for f in first..last {
            self.set(f, true);
        }
    }

    /// Allocates one frame; returns its physical address.
    pub fn alloc(&mut self) -> Option<u64> {
        self.alloc_contiguous(1)
    }

    /// Allocates `count` physically contiguous frames (next fit); returns the
    /// physical address of the first.
    pub fn alloc_contiguous(&mut self, count: u64) -> Option<u64> {
        self.alloc_aligned(count, 1)
    }

    fn is_used(&self, frame: u64) -> bool {
        self.bits[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    /// Allocates `count` contiguous frames whose first frame number is a
    /// multiple of `align` (512 for a 2 MiB-aligned run). Next fit: searches
    /// from where the last allocation ended, then from the bottom.
    pub fn alloc_aligned(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || align == 0 || count > self.free {
            return None;
        }
        for from in [self.next, 0] {
            let mut start = from.div_ceil(align) * align;
            while start + count <= self.frames {
                match (start..start + count).rev().find(|&f| self.is_used(f)) {
                    None => {
                        for f in start..start + count {
                            self.set(f, true);
                        }
                        self.next = start + count;
                        return Some(start * FRAME);
                    }
                    Some(used) => start = (used + 1).div_ceil(align) * align,
                }
            }
        }
        None
    }

    /// Returns a frame allocated before.
    pub fn free(&mut self, addr: u64) {
        self.set(addr / FRAME, false);
    }

    /// Free frames.
    pub fn free_frames(&self) -> u64 {
        self.free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn only_released_frames_are_handed_out() {
        let mut store = vec![0u64; words_for(1 << 20)];
        let mut fb = FrameBitmap::new(&mut store);
        assert_eq!(fb.alloc(), None);
        fb.release_range(0x1800, 0x5000); // frames 2,3,4 (0x1000 partly outside)
        assert_eq!(fb.free_frames(), 3);
        let got: vec::Vec<u64> = (0..3).filter_map(|_| fb.alloc()).collect();
        assert_eq!(got, [0x2000, 0x3000, 0x4000]);
        assert_eq!(fb.alloc(), None);
        fb.free(0x3000);
        assert_eq!(fb.alloc(), Some(0x3000));
    }

    #[test]
    fn reserve_covers_partial_frames() {
        let mut store = vec![0u64; 1];
        let mut fb = FrameBitmap::new(&mut store);
        fb.release_range(0, 64 * FRAME);
        fb.reserve_range(0x1fff, 0x3001);
        assert_eq!(fb.free_frames(), 64 - 3);
    }

    #[test]
    fn contiguous_runs_skip_holes_and_never_wrap() {
        let mut store = vec![0u64; 2];
        let mut fb = FrameBitmap::new(&mut store);
        fb.release_range(0, 128 * FRAME);
        fb.reserve_range(5 * FRAME, 6 * FRAME);
        assert_eq!(fb.alloc_contiguous(8), Some(6 * FRAME));
        assert_eq!(fb.alloc_contiguous(200), None);
        assert_eq!(fb.alloc_contiguous(5), Some(14 * FRAME));
        // 114 frames are free, but the longest run is 19..128 (109 frames).
        assert_eq!(fb.alloc_contiguous(110), None);
        assert_eq!(fb.alloc_contiguous(109), Some(19 * FRAME));
        // Next fit wraps around the top and finds the low frames.
        assert_eq!(fb.alloc_contiguous(5), Some(0));
        assert_eq!(fb.alloc_contiguous(0), None);
    }

    #[test]
    fn aligned_runs_start_on_the_alignment() {
        let mut store = vec![0u64; 64];
        let mut fb = FrameBitmap::new(&mut store);
        fb.release_range(0, 64 * 64 * FRAME);
        fb.reserve_range(0, 3 * FRAME);
        assert_eq!(fb.alloc_aligned(512, 512), Some(512 * FRAME));
        fb.reserve_range(1100 * FRAME, 1101 * FRAME);
        assert_eq!(fb.alloc_aligned(512, 512), Some(1536 * FRAME));
        assert_eq!(fb.alloc_aligned(4, 4), Some(2048 * FRAME));
        // Second pass from the bottom finds the run below the last one.
        assert_eq!(fb.alloc_aligned(512, 512), Some(2560 * FRAME));
        assert_eq!(fb.alloc_aligned(512, 512), Some(3072 * FRAME));
        assert_eq!(fb.alloc_aligned(512, 512), Some(3584 * FRAME));
        assert_eq!(fb.alloc_aligned(512, 512), None, "only 0..512 and 1024..1536 are left, both holed");
        assert_eq!(fb.alloc_aligned(8, 0), None);
    }

    #[test]
    fn ranges_beyond_the_bitmap_are_ignored() {
        let mut store = vec![0u64; 1];
        let mut fb = FrameBitmap::new(&mut store);
        fb.release_range(0, u64::MAX);
        assert_eq!(fb.free_frames(), 64);
        fb.reserve_range(63 * FRAME, u64::MAX);
        assert_eq!(fb.free_frames(), 63);
    }
}

//! Intel page-modification logging (SDM Vol 3C 29.3.6 "Page-Modification
//! Logging"): decoding the 512-entry log the processor fills with the
//! guest-physical addresses of pages whose EPT D bit it set. This module owns
//! only the decoding; enabling PML (VMCS PML address and index, the
//! "enable PML" secondary control) belongs to the VMX backend.
//!
//! The processor writes entry `index` and decrements the index, starting at
//! 511; the log is full when the index has wrapped below 0 (0xFFFF), which
//! causes a "page-modification log full" exit before the next logging.

use crate::addr::Gfn;
use crate::bitmap::DirtyBitmap;

/// Intel PML: decode a 512-entry page-modification log. Valid entries are
/// `index+1 ..= 511` after an exit, all 512 when the index wrapped (any value
/// above 511, normally 0xFFFF). Entries hold GPAs whose low 12 bits are
/// masked here (Bochs logs the offset too). Sets bits in `out`, ignores GPAs
/// beyond `out.pages()`; returns the number of entries read.
pub fn drain_pml(log: &[u64; 512], index: u16, out: &mut DirtyBitmap) -> usize {
    let first = if index >= 512 { 0 } else { usize::from(index) + 1 };
    for &gpa in &log[first..] {
        out.set(Gfn(gpa >> 12));
    }
    512 - first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(entries: &[(usize, u64)]) -> [u64; 512] {
        let mut log = [0xDEAD_B000u64; 512]; // stale garbage below the index
        for &(i, gpa) in entries {
            log[i] = gpa;
        }
        log
    }

    #[test]
    fn partial_log_reads_entries_above_the_index() {
        // Three writes logged at 511, 510, 509; the index is now 508.
        let log = log_with(&[(511, 0x1000), (510, 0x5000), (509, 0x3000)]);
        let mut out = DirtyBitmap::new(1 << 20);
        assert_eq!(drain_pml(&log, 508, &mut out), 3);
        assert_eq!(out.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 3, 5]);
    }

    #[test]
    fn empty_log_reads_nothing() {
        let log = log_with(&[]);
        let mut out = DirtyBitmap::new(1 << 20);
        assert_eq!(drain_pml(&log, 511, &mut out), 0);
        assert_eq!(out.count(), 0);
    }

    #[test]
    fn full_log_with_wrapped_index_reads_all_512() {
        let mut log = [0u64; 512];
        for (i, e) in log.iter_mut().enumerate() {
            *e = (i as u64 + 100) << 12;
        }
        let mut out = DirtyBitmap::new(1 << 20);
        assert_eq!(drain_pml(&log, 0xFFFF, &mut out), 512);
        assert_eq!(out.count(), 512);
        assert!(out.get(Gfn(100)) && out.get(Gfn(611)) && !out.get(Gfn(99)));
    }

    #[test]
    fn index_zero_means_one_free_slot_left() {
        let log = [0x7000u64; 512];
        let mut out = DirtyBitmap::new(16);
        assert_eq!(drain_pml(&log, 0, &mut out), 511);
        assert_eq!(out.iter().map(|g| g.0).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn page_offsets_are_masked() {
        let log = log_with(&[(511, 0x2FFF), (510, 0x4123)]);
        let mut out = DirtyBitmap::new(100);
        assert_eq!(drain_pml(&log, 509, &mut out), 2);
        assert_eq!(out.iter().map(|g| g.0).collect::<Vec<_>>(), [2, 4]);
    }

    #[test]
    fn gpas_beyond_the_bitmap_are_ignored_but_counted() {
        let log = log_with(&[(511, 0x1000), (510, 100 << 12), (509, u64::MAX)]);
        let mut out = DirtyBitmap::new(100);
        assert_eq!(drain_pml(&log, 508, &mut out), 3);
        assert_eq!(out.iter().map(|g| g.0).collect::<Vec<_>>(), [1]);
    }
}

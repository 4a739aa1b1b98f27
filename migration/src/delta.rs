//! Delta encoding of a page against the version sent before.
//!
//! The source XORs the new page with the copy it sent last time; unchanged
//! bytes become zero, and runs of zeros are not sent. The destination XORs
//! the literal bytes into its current copy of the page, which is exactly the
//! version sent last time.
//!
//! ```text
//! delta := op*                        at most MAX_DELTA (2048) bytes
//! op    := skip: u16 LE               unchanged bytes before the literal
//!          len:  u16 LE               literal length
//!          xor:  [u8; len]            old ^ new for those bytes
//! ```
//! Offsets accumulate: op `k` starts at the end of op `k - 1` plus its
//! skip. Bytes after the last op are unchanged. The decoder checks every run
//! against [`PAGE_SIZE`] before touching the page. Zero-runs shorter than
//! [`MIN_GAP`] (the 4-byte op overhead) are folded into the literal. A page
//! whose delta would exceed [`MAX_DELTA`] is sent in full instead: beyond
//! half a page the saving no longer pays for the read-modify-write.

use crate::wire::{FrameBuf, Reader, WireError};
use crate::PAGE_SIZE;

/// Largest delta on the wire, in bytes.
pub const MAX_DELTA: usize = PAGE_SIZE / 2;
/// Equal bytes needed to end a literal run (the size of an op header).
pub const MIN_GAP: usize = 4;

/// Offset of the first byte at or after `from` where the pages differ.
fn next_diff(old: &[u8], new: &[u8], from: usize) -> Option<usize> {
    let (o, n) = (old.get(from..)?, new.get(from..)?);
    let equal_words = o.as_chunks::<8>().0.iter().zip(n.as_chunks::<8>().0).take_while(|(a, b)| a == b).count();
    let skip = equal_words * 8;
    let p = o.get(skip..)?.iter().zip(n.get(skip..)?).position(|(a, b)| a != b)?;
    Some(from + skip + p)
}

/// End of the literal starting at `start`: just after the last differing
/// byte that is followed by at least `MIN_GAP` equal bytes (or the page end).
fn literal_end(old: &[u8], new: &[u8], start: usize) -> usize {
    let mut end = start;
    let mut equal = 0;
    for (i, (a, b)) in old.iter().zip(new).enumerate().skip(start) {
        if a == b {
            equal += 1;
            if equal >= MIN_GAP {
                break;
            }
        } else {
            equal = 0;
            end = i + 1;
        }
    }
    end
}

/// Appends the delta from `old` to `new` to `out`. Returns `false`, with
/// `out` unchanged, if the delta would be longer than [`MAX_DELTA`].
pub fn encode(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], out: &mut impl FrameBuf) -> bool {
    let start_len = out.len();
    let mut pos = 0;
    while let Some(start) = next_diff(old, new, pos) {
        let end = literal_end(old, new, start);
        let (Some(o), Some(n)) = (old.get(start..end), new.get(start..end)) else { break };
        if out.len() - start_len + 4 + o.len() > MAX_DELTA {
            out.truncate(start_len);
            return false;
        }
        // Both values are at most PAGE_SIZE (4096), so they fit a u16.
        out.extend_from_slice(&u16::try_from(start - pos).unwrap_or(u16::MAX).to_le_bytes());
        out.extend_from_slice(&u16::try_from(o.len()).unwrap_or(u16::MAX).to_le_bytes());
        // Past the end of a caller's slice `append` lends nothing and the
        // frame fails when finished.
        if let Some(d) = out.append(o.len()) {
            for ((d, a), b) in d.iter_mut().zip(o).zip(n) {
                *d = a ^ b;
            }
        }
        pos = end;
    }
    true
}

/// Walks the ops of `delta`, calling `f(offset, xor_bytes)` for each literal
/// after checking it lies within the page.
fn walk(delta: &[u8], mut f: impl FnMut(usize, &[u8])) -> Result<(), WireError> {
    if delta.len() > MAX_DELTA {
        return Err(WireError::DeltaTooLong(delta.len()));
    }
    let mut r = Reader::new(delta);
    let mut pos = 0usize;
    while r.has_more() {
        pos += usize::from(r.u16("delta skip")?);
        let len = usize::from(r.u16("delta length")?);
        if pos + len > PAGE_SIZE {
            return Err(WireError::DeltaPastPage(pos + len));
        }
        f(pos, r.take(len, "delta bytes")?);
        pos += len;
    }
    Ok(())
}

/// Checks that `delta` is well formed without applying it.
pub fn validate(delta: &[u8]) -> Result<(), WireError> {
    walk(delta, |_, _| {})
}

/// Applies `delta` to `page` (the version sent last time). On error the
/// page is left unchanged.
pub fn apply(page: &mut [u8; PAGE_SIZE], delta: &[u8]) -> Result<(), WireError> {
    validate(delta)?;
    walk(delta, |at, xor| {
        if let Some(dst) = page.get_mut(at..at + xor.len()) {
            dst.iter_mut().zip(xor).for_each(|(d, x)| *d ^= x);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn page(seed: u8) -> [u8; PAGE_SIZE] {
        core::array::from_fn(|i| (i as u8).wrapping_mul(31) ^ seed)
    }

    fn round_trip(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE]) -> Option<Vec<u8>> {
        let mut d = Vec::new();
        if !encode(old, new, &mut d) {
            assert!(d.is_empty());
            return None;
        }
        let mut p = *old;
        apply(&mut p, &d).unwrap();
        assert_eq!(&p, new);
        Some(d)
    }

    #[test]
    fn identical_pages_encode_to_nothing() {
        assert_eq!(round_trip(&page(1), &page(1)), Some(vec![]));
    }

    #[test]
    fn scattered_changes_round_trip_compactly() {
        let old = page(3);
        let mut new = old;
        for i in [0, 1, 5, 100, 101, 102, 2000, 4095] {
            new[i] ^= 0xA5;
        }
        let d = round_trip(&old, &new).unwrap();
        // 0..=5 is one literal (gap of 3 < MIN_GAP), then 100..=102, 2000, 4095.
        assert_eq!(d.len(), 4 * 4 + 6 + 3 + 1 + 1);
    }

    #[test]
    fn mostly_changed_page_falls_back_to_full() {
        assert_eq!(round_trip(&page(0), &page(0xFF)), None);
        let mut out = vec![7];
        assert!(!encode(&page(0), &page(0xFF), &mut out));
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn delta_runs_past_4096_are_rejected() {
        let mut p = page(0);
        let skip_past = [0x01, 0x10, 0, 0]; // skip 4097
        assert_eq!(apply(&mut p, &skip_past), Err(WireError::DeltaPastPage(4097)));
        let mut literal_past = vec![0xFF, 0x0F, 2, 0]; // skip 4095, 2 bytes
        literal_past.extend([1, 1]);
        assert_eq!(apply(&mut p, &literal_past), Err(WireError::DeltaPastPage(4097)));
        let sums_past = [0x00, 0x08, 0, 0, 0x00, 0x08, 1, 0, 9]; // 2048 + 2048 + 1
        assert_eq!(apply(&mut p, &sums_past), Err(WireError::DeltaPastPage(4097)));
        assert_eq!(p, page(0), "a failed delta leaves the page unchanged");
    }

    #[test]
    fn truncated_delta_ops_are_rejected() {
        let mut p = page(0);
        assert_eq!(apply(&mut p, &[1, 0, 5]), Err(WireError::Truncated("delta length")));
        assert_eq!(apply(&mut p, &[1, 0, 5, 0, 1, 2]), Err(WireError::Truncated("delta bytes")));
        assert_eq!(apply(&mut p, &vec![0; MAX_DELTA + 4]), Err(WireError::DeltaTooLong(MAX_DELTA + 4)));
    }
}

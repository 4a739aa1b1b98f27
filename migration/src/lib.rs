//! The live-migration protocol: wire format and the source/destination
//! state machines, without I/O. Built in the migration issue (#7).
//!
//! Source host A streams a running VM to destination host B over one
//! reliable byte stream (TCP), after the Hyper-V live-migration design:
//! setup, iterative pre-copy of memory, stop-and-copy, and a two-phase
//! switchover. Both sides are sans-IO: bytes and events go in, bytes and
//! actions come out, and time is a parameter (`now_us`), never read. The
//! source can also write its page batches into a slice the caller lends
//! it ([`Source::poll_into`]): a host hands it the free space of its
//! socket's send buffer, and each page is copied once on its way out.
//!
//! Modules:
//! - [`wire`]: frame header, record types, incremental [`FrameDecoder`], [`WireError`].
//! - [`record`]: the records and their payload encodings.
//! - [`delta`]: XOR-and-zero-run page deltas.
//! - [`crc`]: CRC32C (table-driven, slicing-by-8).
//! - [`converge`]: the pure convergence decision.
//! - [`source`], [`dest`]: the two state machines.
//!
//! # Wire format
//!
//! Every record is one frame: a 16-byte little-endian header and a payload.
//!
//! ```text
//! 0        4        6        8            12           16
//! +--------+--------+--------+------------+------------+-----------------+
//! | magic  |version | type   | length     | crc32c     | payload ...     |
//! | "HIVM" |  u16=2 |  u16   | u32 <= lim | of payload*| (length bytes)  |
//! +--------+--------+--------+------------+------------+-----------------+
//! ```
//!
//! Types (`lim` = payload limit, checked before any payload is buffered;
//! all limits are below `MAX_PAYLOAD` = 1 MiB + 64 KiB):
//!
//! ```text
//!  0 (invalid)   never valid          7 DeviceState  <= 65536 A→B
//!  1 Hello       <= 71       A→B      8 Verify       8       A→B
//!  2 Accept      0           B→A      9 Ready        0       B→A
//!  3 Reject      <= 258      B→A     10 Commit       0       A→B
//!  4 PageBatch   <= 1052934  A→B     11 Resumed      0       B→A
//!  5 RoundEnd    36          A→B     12 Cancel       <= 258  both
//!  6 VcpuState   <= 4096     A→B     13 Error        <= 258  both
//! ```
//!
//! `*` A PageBatch's CRC leaves out the data of its full pages, each of
//! which carries its own 64-bit `page_hash` ([`record::frame_crc`]). The
//! destination checks the rest of the batch before it writes any page, and
//! each page's hash while it copies the page into the skeleton; a mismatch
//! fails the migration, and the skeleton with it.
//!
//! Unknown types are errors: every record is mandatory to understand.
//! Payload layouts are in [`record`], the delta encoding in [`delta`].
//!
//! # Sequence
//!
//! ```text
//!   kernel A          Source (A)                  Destination (B)        kernel B
//!      |  new(Hello)      |                              |                   |
//!      |                  |--------- Hello ------------->| check vendor,     |
//!      |                  |                              | features, memory  |
//!      |                  |                              |--- CreateVm ----->|
//!      |                  |<-------- Accept -------------|  (or Reject)      |
//!      |   round 0: every page (zero pages as a flag)    |                   |
//!      |                  |------ PageBatch × n -------->| write_page        |
//!      |<- HarvestDirty --|                              |                   |
//!      |-- on_dirty ----->|------ RoundEnd ------------->| check page count  |
//!      |   rounds 1..k: pages dirtied meanwhile (delta against the last send)
//!      |   … until decide() says StopAndCopy (maybe after SetThrottle) …
//!      |<--- PauseVm -----|                              |                   |
//!      |-- on_vm_paused ->|  (vCPU and device state)     |                   |
//!      |<- HarvestDirty --|                              |                   |
//!      |-- on_dirty ----->|------ PageBatch × m -------->|                   |
//!      |                  |------ RoundEnd ------------->|                   |
//!      |                  |------ Verify (optional) ---->| compare digest    |
//!      |                  |------ VcpuState × vcpus ---->|--- SetVcpuState ->|
//!      |                  |------ DeviceState ---------->|--- SetDeviceState>|
//!      |                  |<-------- Ready --------------|                   |
//!      |                  |--------- Commit ------------>|  point of no return
//!      |                  |                              |--- ResumeVm ----->|
//!      |                  |<-------- Resumed ------------|--- Finished ----->|
//!      |<- Finished ------|  (A frees the VM)            |                   |
//! ```
//!
//! # Destination (receiver) states
//!
//! ```text
//!             Hello ok                     DeviceState (all vCPUs in,
//!  AwaitHello ────────> Receiving ───────> any Verify matched) ──> AwaitCommit
//!     │  Hello bad        │ PageBatch, RoundEnd,                   │ Commit (after
//!     v                   │ Verify, VcpuState                      v  Ready went out)
//!  Rejected               │ (loop)                              Resumed
//!                         │                                    (abort ignored)
//!  any state before Resumed: bad frame, unexpected record, peer Cancel/Error,
//!  on_abort, on_host_error ──> Failed (DestroyVm if CreateVm was handed
//!  out; Error sent to the peer when this side detected the problem)
//! ```
//!
//! # Safety rules (never two running copies)
//!
//! - Before Commit leaves the source, any failure (operator cancel, link
//!   cut, peer Reject/Error, timeout, checksum or record error, policy
//!   Abort) ends in `Failed { vm_running: true }`: the source asks for
//!   `SetThrottle(0)` and `ResumeVm` if it had throttled or paused, and the
//!   destination destroys its skeleton.
//! - Commit is handed out by `Source::poll`; from then on the source never
//!   asks for `ResumeVm`. If Resumed does not arrive (timeout, link cut,
//!   anything else), the source reports `InDoubt`: its copy stays paused and
//!   must not be destroyed or resumed without an operator.
//! - The destination resumes only on Commit, and only once `poll` handed
//!   out Ready: the host has loaded (or refused, failing the migration)
//!   the vCPU and device state by then. After Commit it ignores aborts.
//! - Round 0 carries every page, in full or as a zero page: the skeleton's
//!   memory is not cleared, so a delta there would build on another VM's
//!   old frames.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
// `rustc_align` on the page hash loops: see `page_hash`.
#![feature(fn_align)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

extern crate alloc;

pub mod converge;
pub mod crc;
pub mod delta;
pub mod dest;
pub mod record;
pub mod source;
pub mod wire;

#[cfg(test)]
mod e2e;
#[cfg(test)]
pub(crate) mod testmem;

pub use converge::{decide, Decision, Policy};
pub use dest::{DestAction, DestProgress, DestState, Destination};
pub use record::{Hello, Page, PageBatch, PageData, Record, RoundEnd, VmConfig};
pub use source::{Polled, Report, Source, SourceAction, SourceConfig, Stage, Status};
pub use wire::{Frame, FrameDecoder, RecordType, WireError, MAX_PAYLOAD, PROTOCOL_VERSION};

/// Guest page size; the only one the protocol supports.
pub const PAGE_SIZE: usize = 4096;

/// Guest memory as the state machines see it. The kernel implements it over
/// the VM's real memory; tests over a `Vec<u8>`.
pub trait GuestMemory {
    /// Number of 4 KiB pages.
    fn pages(&self) -> u64;
    /// Copies page `gfn` (`< pages()`) into `out`.
    fn read_page(&self, gfn: u64, out: &mut [u8; PAGE_SIZE]);
    /// Overwrites page `gfn` (`< pages()`).
    fn write_page(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]);
    /// Overwrites page `gfn` (`< pages()`) and returns
    /// [`page_hash`]`(gfn, data)`. Memory that can lend its pages should
    /// hash while it copies ([`copy_page_hashed`]): the destination checks
    /// every full page this way.
    fn write_page_hashed(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> u64 {
        self.write_page(gfn, data);
        page_hash(gfn, data)
    }
    /// Calls `f` with page `gfn` (`< pages()`). Memory that can lend its
    /// pages should, so the source copies each page only into its frame.
    fn with_page(&self, gfn: u64, f: &mut dyn FnMut(&[u8; PAGE_SIZE])) {
        let mut page = [0; PAGE_SIZE];
        self.read_page(gfn, &mut page);
        f(&page);
    }
    /// The memory digest Verify carries: the wrapping sum of [`page_hash`]
    /// over all pages. Implementations may compute it without copying, but
    /// must give this value.
    fn digest(&self) -> u64 {
        let mut page = [0; PAGE_SIZE];
        (0..self.pages()).fold(0u64, |sum, gfn| {
            self.read_page(gfn, &mut page);
            sum.wrapping_add(page_hash(gfn, &page))
        })
    }
}

/// The hash of page `gfn` holding `page`, whose wrapping sum over all pages
/// is the memory digest. A sum of per-page terms, so the destination keeps
/// it up to date as pages arrive (subtract the old term, add the new) and
/// need not read its whole memory again while the VM is paused; the source
/// reads all of its memory once, at the pause, so a page the dirty log
/// missed still shows.
///
/// Four FNV-style lanes over alternating words, so their multiplications
/// overlap instead of each waiting for the last (one lane took about 1.35x
/// as long under TCG: 964k against 714k cycles per MiB, best of three).
/// Every step is a bijection of a lane, and the lanes
/// combine linearly with odd factors, so changing any one 8-byte word
/// always changes the hash.
///
/// This and [`copy_page_hashed`] run for every page a migration moves: each
/// is aligned to a power of two at least its size, so no layout of the
/// kernel puts its loop across a 4 KiB page (under QEMU's TCG such a loop
/// cannot chain its translated blocks; `tests/tests/kernel_code.rs`).
#[rustc_align(256)]
pub fn page_hash(gfn: u64, page: &[u8; PAGE_SIZE]) -> u64 {
    let mut lanes = HASH_LANES;
    for quad in page.as_chunks::<32>().0 {
        hash_quad(&mut lanes, quad);
    }
    finish_hash(gfn, lanes)
}

/// Copies `src` (page `gfn`) into `dst` and returns [`page_hash`]`(gfn,
/// src)`, in one pass over the page: each word is hashed while it is in a
/// register on its way to `dst`, so the page is read once, not twice (once
/// to hash, once to copy).
#[rustc_align(256)]
pub fn copy_page_hashed(gfn: u64, src: &[u8; PAGE_SIZE], dst: &mut [u8; PAGE_SIZE]) -> u64 {
    let mut lanes = HASH_LANES;
    for (from, to) in src.as_chunks::<32>().0.iter().zip(dst.as_chunks_mut::<32>().0) {
        hash_quad(&mut lanes, from);
        // Four word stores, not one 32-byte copy: LLVM's loop idiom pass
        // turned the 32-byte copy (a `memcpy` of the block's size at the
        // block's stride) into one `memcpy` of the page before the hashing
        // loop, so the page was read twice. A store of 8 bytes every 32 is
        // not a `memcpy` to it. After changing this, check the kernel's
        // disassembly: no `call` in `copy_page_hashed`.
        if let ([t0, t1, t2, t3], [f0, f1, f2, f3]) = (to.as_chunks_mut::<8>().0, from.as_chunks::<8>().0) {
            (*t0, *t1, *t2, *t3) = (*f0, *f1, *f2, *f3);
        }
    }
    finish_hash(gfn, lanes)
}

/// The four lanes' starting value (FNV-1a's offset basis).
const HASH_LANES: [u64; 4] = [0xCBF2_9CE4_8422_2325; 4];

/// One step of each lane, over the four words of `quad`.
#[inline(always)]
fn hash_quad(lanes: &mut [u64; 4], quad: &[u8; 32]) {
    const PRIME: u64 = 0x0100_0000_01B3;
    for (lane, w) in lanes.iter_mut().zip(quad.as_chunks::<8>().0) {
        *lane = (*lane ^ u64::from_le_bytes(*w)).wrapping_mul(PRIME);
    }
}

/// Combines the lanes and mixes in the page number.
fn finish_hash(gfn: u64, lanes: [u64; 4]) -> u64 {
    let h = lanes.iter().fold(0u64, |h, &lane| h.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(lane));
    // Mix in the page number, so equal pages at different places differ.
    let h = (h ^ gfn.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_hash_changes_with_any_one_word_and_with_the_page_number() {
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 131 % 251) as u8;
        }
        let h = page_hash(7, &page);
        assert_ne!(page_hash(8, &page), h);
        for word in 0..PAGE_SIZE / 8 {
            for delta in [1u64, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF] {
                let mut p = page;
                let at = word * 8;
                let w = u64::from_le_bytes(p[at..at + 8].try_into().unwrap()) ^ delta;
                p[at..at + 8].copy_from_slice(&w.to_le_bytes());
                assert_ne!(page_hash(7, &p), h, "word {word}, xor {delta:#x}");
            }
        }
        // Two words swapped between lanes differ too (lanes are not summed).
        let mut p = page;
        p.swap(0, 8);
        assert_ne!(page_hash(7, &p), h);
    }

    #[test]
    fn page_hash_is_pinned_because_it_travels_on_the_wire() {
        // Worked out independently (a few lines of Python over the same
        // page); a change here breaks migration between versions.
        let page: [u8; PAGE_SIZE] = core::array::from_fn(|i| (i * 131 % 251) as u8);
        assert_eq!(page_hash(7, &page), 0xCFB8_5919_2E76_CC58);
    }

    #[test]
    fn copy_page_hashed_copies_and_gives_page_hash() {
        for seed in 0..8u64 {
            let src: [u8; PAGE_SIZE] = core::array::from_fn(|i| ((i as u64 * (2 * seed + 1)) >> 3) as u8);
            let mut dst = [0xA5; PAGE_SIZE];
            assert_eq!(copy_page_hashed(seed, &src, &mut dst), page_hash(seed, &src));
            assert_eq!(dst, src);
        }
    }
}

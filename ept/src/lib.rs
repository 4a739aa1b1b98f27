//! Second-level page tables in the Intel EPT and AMD NPT formats and the
//! dirty-page tracking built on them. Built in the AMD-V issue (#4).
//!
//! Everything here is computed without hardware: the tables live in frames the
//! caller hands out through [`FrameAccess`], so the same code runs in the
//! kernel over real memory and in host unit tests over a fake memory.
//!
//! Manual sections followed: Intel SDM Vol 3C 29.3 "The Extended Page Table
//! Mechanism (EPT)" (29.3.2 entry formats, 29.3.5 accessed and dirty flags,
//! 29.3.6 page-modification logging); AMD APM Vol 2 15.25 "Nested Paging"
//! (nested tables use the long-mode page-table format of 5.3/5.4).
//!
//! Modules:
//! - [`addr`]: address newtypes and page sizes.
//! - [`entry`]: the two entry formats and permissions.
//! - [`slat`]: the table tree: map, unmap, translate, split, protect.
//! - [`track`]: dirty tracking over the tree (D bits and write protection).
//! - [`bitmap`]: the dirty bitmap.
//! - [`pml`]: decoding Intel's page-modification log.
//! - `sim` (tests only, also included by `benches/harvest.rs`): fake memory
//!   and a fake processor walk.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

extern crate alloc;

pub mod addr;
pub mod bitmap;
pub mod entry;
pub mod pml;
pub mod slat;
pub mod track;

#[cfg(test)]
pub(crate) mod sim;

pub use addr::{Gfn, Gpa, Hpa, PageSize, PAGE_2M, PAGE_4K};
pub use bitmap::DirtyBitmap;
pub use entry::{Format, Perms};
pub use pml::drain_pml;
pub use slat::{FrameAccess, Slat, SlatError, TlbFlush};

//! Test guest memory over a `Vec<u8>` (also included by `benches/engine.rs`).
#![allow(dead_code)]

use crate::{copy_page_hashed, GuestMemory, PAGE_SIZE};

/// Guest memory in a vector (the trait's own digest).
#[derive(Clone, PartialEq, Eq)]
pub struct VecMemory {
    pub bytes: Vec<u8>,
}

impl core::fmt::Debug for VecMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VecMemory({} pages, digest {:#x})", self.pages(), self.digest())
    }
}

impl VecMemory {
    pub fn new(pages: u64) -> Self {
        VecMemory { bytes: vec![0; pages as usize * PAGE_SIZE] }
    }

    pub fn page_mut(&mut self, gfn: u64) -> &mut [u8] {
        let at = gfn as usize * PAGE_SIZE;
        &mut self.bytes[at..at + PAGE_SIZE]
    }
}

impl GuestMemory for VecMemory {
    fn pages(&self) -> u64 {
        (self.bytes.len() / PAGE_SIZE) as u64
    }
    fn read_page(&self, gfn: u64, out: &mut [u8; PAGE_SIZE]) {
        let at = gfn as usize * PAGE_SIZE;
        out.copy_from_slice(&self.bytes[at..at + PAGE_SIZE]);
    }
    fn write_page(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) {
        self.page_mut(gfn).copy_from_slice(data);
    }
    fn write_page_hashed(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> u64 {
        let page = self.page_mut(gfn).as_mut_array().expect("a page is PAGE_SIZE bytes");
        copy_page_hashed(gfn, data, page)
    }
}

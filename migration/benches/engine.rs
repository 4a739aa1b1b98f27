//! Page-batch engine benchmark: encode (zero check, delta, CRC32C, framing)
//! and decode (framing, CRC32C, parsing, writing the pages) of one full batch
//! of 256 pages (1 MiB of guest data) for three workloads: every page full of
//! random bytes, half the pages zero, and deltas with 1% of the bytes
//! changed. Baseline in the same run: a plain copy of the same 1 MiB.
//! Throughput counts guest bytes (1 MiB per batch). Median of 31 runs.
#![allow(clippy::cast_possible_truncation, clippy::unwrap_used, clippy::indexing_slicing)]

use std::hint::black_box;
use std::time::Instant;

use migration::record::{PageBatchView, PageBatchWriter, PageDataRef};
use migration::{copy_page_hashed, FrameDecoder, GuestMemory, PAGE_SIZE};

#[path = "../src/testmem.rs"]
mod testmem;

use testmem::VecMemory;

const PAGES: usize = 256;
const RUNS: usize = 31;
const REPS: usize = 16;
const MIB: f64 = (PAGES * PAGE_SIZE) as f64 / (1024.0 * 1024.0);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn page(&mut self) -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for w in p.as_chunks_mut::<8>().0 {
            *w = self.next().to_le_bytes();
        }
        p
    }
}

/// MiB/s of guest data, median over RUNS runs of REPS calls.
fn mib_per_s(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..REPS {
                f();
            }
            start.elapsed().as_secs_f64() / REPS as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    MIB / t[RUNS / 2]
}

fn encode(pages: &[Box<[u8; PAGE_SIZE]>], previous: Option<&[Box<[u8; PAGE_SIZE]>]>) -> Vec<u8> {
    let mut w = PageBatchWriter::new(1, PAGES);
    for (gfn, p) in pages.iter().enumerate() {
        w.push_page(gfn as u64, p, previous.map(|prev| &*prev[gfn])).unwrap();
    }
    w.finish().unwrap()
}

fn decode(frame: &[u8], mem: &mut VecMemory, scratch: &mut [u8; PAGE_SIZE]) {
    let mut d = FrameDecoder::new();
    d.push(frame).unwrap();
    let f = d.next_frame().unwrap();
    // As the destination does it: each full page's hash is checked while
    // the page is copied into memory.
    let b = PageBatchView::parse_leaving_hashes(&f.payload).unwrap();
    for (gfn, data) in b.pages() {
        match data {
            PageDataRef::Zero => mem.write_page(gfn, &[0; PAGE_SIZE]),
            PageDataRef::Full(data, hash) => assert_eq!(mem.write_page_hashed(gfn, data), hash),
            PageDataRef::Delta(delta) => {
                mem.read_page(gfn, scratch);
                migration::delta::apply(scratch, delta).unwrap();
                mem.write_page(gfn, scratch);
            }
        }
    }
}

fn main() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let full: Vec<_> = (0..PAGES).map(|_| rng.page()).collect();
    let half_zero: Vec<_> =
        (0..PAGES).map(|i| if i % 2 == 0 { Box::new([0; PAGE_SIZE]) } else { rng.page() }).collect();
    let old: Vec<_> = (0..PAGES).map(|_| rng.page()).collect();
    let new: Vec<_> = old
        .iter()
        .map(|p| {
            let mut q = p.clone();
            for _ in 0..PAGE_SIZE / 100 {
                let at = rng.next() as usize % PAGE_SIZE;
                q[at] ^= 1 + (rng.next() % 255) as u8;
            }
            q
        })
        .collect();

    let src: Vec<u8> = full.iter().flat_map(|p| p.iter().copied()).collect();
    let mut dst = vec![0u8; src.len()];
    let memcpy = mib_per_s(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    println!("memcpy of {MIB} MiB: {memcpy:8.0} MiB/s");
    println!(
        "{:<24} {:>9} {:>11} {:>11} {:>15} {:>12}",
        "batch of 256 pages", "wire KiB", "encode", "decode", "encode+decode", "vs memcpy"
    );

    type Pages<'a> = &'a [Box<[u8; PAGE_SIZE]>];
    let cases: [(&str, Pages, Option<Pages>); 3] =
        [("all full", &full, None), ("50% zero", &half_zero, None), ("delta, 1% bytes changed", &new, Some(&old))];
    for (name, pages, previous) in cases {
        let frame = encode(pages, previous);
        let mut mem = VecMemory::new(PAGES as u64);
        for (gfn, p) in previous.unwrap_or(pages).iter().enumerate() {
            mem.write_page(gfn as u64, p);
        }
        let mut scratch = [0u8; PAGE_SIZE];
        // Check once: decoding yields the pages.
        decode(&frame, &mut mem, &mut scratch);
        for (gfn, p) in pages.iter().enumerate() {
            mem.read_page(gfn as u64, &mut scratch);
            assert_eq!(&scratch, &**p, "{name}: page {gfn}");
        }
        let enc = mib_per_s(|| {
            black_box(encode(black_box(pages), previous));
        });
        // Deltas XOR: applying one twice restores the page, so repeating is fine.
        let dec = mib_per_s(|| decode(black_box(&frame), &mut mem, &mut scratch));
        let both = 1.0 / (1.0 / enc + 1.0 / dec);
        println!(
            "{name:<24} {:>9.1} {enc:>6.0} MiB/s {dec:>6.0} MiB/s {both:>10.0} MiB/s {:>11.2}x",
            frame.len() as f64 / 1024.0,
            both / memcpy
        );
    }
}

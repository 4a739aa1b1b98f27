//! Dirty-harvest benchmark over the fake memory: a 1 GiB guest of 4 KiB
//! leaves (262144 leaves), `harvest_dirty` with 0%, 10% and 100% of the pages
//! dirty and `wp_harvest` with 10% written, against two baselines measured in
//! the same run: a plain scan of as many u64 words as there are leaves, and a
//! scan of a bitmap-sized array (one bit per page). Plain std timing, median
//! of 15 runs; the dirtying before each run is not timed.
#![allow(clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::time::{Duration, Instant};

// `FrameAccess` is used by the included `sim` module (through `crate::`).
use ept::{DirtyBitmap, Format, FrameAccess, Gpa, Hpa, PageSize, Perms, Slat};

#[path = "../src/sim.rs"]
mod sim;

use sim::{guest_write, FakeMemory, Fault};

const GIB: u64 = 1 << 30;
const PAGES: u64 = GIB / 4096;
const HOST: u64 = 0x10_0000_0000;
const RUNS: usize = 15;

/// Median in milliseconds of `RUNS` calls of `case`, which prepares and times
/// itself.
fn median_ms(mut case: impl FnMut() -> Duration) -> f64 {
    let mut t: Vec<f64> = (0..RUNS).map(|_| case().as_secs_f64() * 1e3).collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2]
}

fn timed<T>(f: impl FnOnce() -> T) -> Duration {
    let start = Instant::now();
    black_box(f());
    start.elapsed()
}

fn scan(words: &[u64]) -> u64 {
    let mut sum = 0u64;
    for w in black_box(words) {
        sum = sum.wrapping_add(*w);
    }
    sum
}

/// The guest write the hypervisor sees under write-protect tracking.
fn write_wp(slat: &mut Slat, fa: &mut FakeMemory, gpa: Gpa) {
    if let Err(Fault::Write(_)) = guest_write(slat, fa, gpa) {
        let (tracked, flush) = slat.wp_fault(fa, gpa).unwrap();
        assert!(tracked);
        flush.done();
        guest_write(slat, fa, gpa).unwrap();
    }
}

fn run(format: Format) {
    let mut fa = FakeMemory::new();
    let mut slat = Slat::new(format, &mut fa, Gpa(GIB)).unwrap();
    for gfn in 0..PAGES {
        let gpa = gfn * 4096;
        slat.map(&mut fa, Gpa(gpa), Hpa(HOST + gpa), PageSize::Size4K, Perms::RWX).unwrap().done();
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let tenth: Vec<Gpa> = (0..PAGES)
        .filter(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.is_multiple_of(10)
        })
        .map(|gfn| Gpa(gfn * 4096))
        .collect();
    let all: Vec<Gpa> = (0..PAGES).map(|gfn| Gpa(gfn * 4096)).collect();

    let leaves: Vec<u64> = (0..PAGES).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let words = vec![0x5555u64; (PAGES / 64) as usize];
    let leaf_scan = median_ms(|| timed(|| scan(&leaves)));
    let bitmap_scan = median_ms(|| timed(|| scan(&words)));

    let mut out = DirtyBitmap::new(PAGES);
    let mut harvest = |dirty: &[Gpa], expect: usize| {
        median_ms(|| {
            for &gpa in dirty {
                guest_write(&slat, &fa, gpa).unwrap();
            }
            out.clear_all();
            let mut n = 0;
            let d = timed(|| {
                let (marked, flush) = slat.harvest_dirty(&fa, &mut out);
                flush.done();
                n = marked;
            });
            assert_eq!(n, expect);
            d
        })
    };
    let d0 = harvest(&[], 0);
    let d10 = harvest(&tenth, tenth.len());
    let d100 = harvest(&all, all.len());

    slat.wp_arm(&fa).done();
    let wp10 = median_ms(|| {
        for &gpa in &tenth {
            write_wp(&mut slat, &mut fa, gpa);
        }
        out.clear_all();
        let mut n = 0;
        let d = timed(|| {
            let (marked, flush) = slat.wp_harvest(&fa, &mut out);
            flush.done();
            n = marked;
        });
        assert_eq!(n, tenth.len());
        d
    });
    slat.wp_disarm(&fa).done();

    let tables = fa.live();
    slat.destroy(&mut fa);
    assert_eq!(fa.live(), 0);

    println!("{format:?}: 1 GiB guest, {PAGES} 4 KiB leaves, {tables} table frames, median of {RUNS} runs");
    let line = |name: &str, ms: f64| {
        println!(
            "  {name:<28} {:>9.1} us/GiB  {:>6.2}x leaf scan  {:>8.1}x bitmap scan",
            ms * 1000.0,
            ms / leaf_scan,
            ms / bitmap_scan
        );
    };
    line("baseline: leaf-sized scan", leaf_scan);
    line("baseline: bitmap-sized scan", bitmap_scan);
    line("harvest_dirty   0% dirty", d0);
    line("harvest_dirty  10% dirty", d10);
    line("harvest_dirty 100% dirty", d100);
    line("wp_harvest     10% written", wp10);
}

fn main() {
    let start = Instant::now();
    run(Format::Ept);
    run(Format::Npt);
    println!("total {:.1} s", start.elapsed().as_secs_f64());
}

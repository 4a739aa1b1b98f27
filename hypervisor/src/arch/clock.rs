//! Monotonic clock: the TSC, calibrated once at boot against PIT channel 2
//! (Intel 8254 datasheet, mode 0 "interrupt on terminal count"; the gate and
//! OUT2 are bits 0 and 5 of port 0x61).

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 20 ms worth of PIT ticks (fits the 16-bit counter).
const WINDOW_TICKS: u16 = 23_864;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

/// The host TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter (CR4.TSD is clear in
    // ring 0 anyway).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures the TSC frequency over one PIT window, three times, and keeps
/// the median. Returns the frequency in Hz.
/// The fewest TSC cycles `f` took in three runs (the boot's choices
/// between two implementations of a routine).
pub fn best_of_three(mut f: impl FnMut()) -> u64 {
    (0..3)
        .map(|_| {
            let t = rdtsc();
            f();
            rdtsc() - t
        })
        .min()
        .unwrap_or(u64::MAX)
}

pub fn calibrate() -> u64 {
    let mut runs = [measure_once(), measure_once(), measure_once()];
    runs.sort_unstable();
    let hz = runs[1];
    TSC_HZ.store(hz, Ordering::Relaxed);
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
    hz
}

fn measure_once() -> u64 {
    let mut gate: Port<u8> = Port::new(0x61);
    let mut command: Port<u8> = Port::new(0x43);
    let mut channel2: Port<u8> = Port::new(0x42);
    let [lo, hi] = WINDOW_TICKS.to_le_bytes();
    // SAFETY: programming PIT channel 2 (the speaker channel, unused by this
    // kernel) and its gate in port 0x61 affects nothing else; the speaker
    // data bit (1) is kept off.
    let (start, end) = unsafe {
        let g = gate.read() & !0x03;
        gate.write(g); // gate low: counter holds
        command.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        channel2.write(lo);
        channel2.write(hi);
        gate.write(g | 0x01); // gate high: counting starts
        let start = rdtsc();
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let end = rdtsc();
        gate.write(g);
        (start, end)
    };
    (end - start) * PIT_HZ / u64::from(WINDOW_TICKS)
}

/// The calibrated TSC frequency (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Microseconds since calibration (0 before it).
pub fn uptime_us() -> u64 {
    let hz = tsc_hz();
    if hz == 0 {
        return 0;
    }
    let ticks = rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(hz)).unwrap_or(u64::MAX)
}

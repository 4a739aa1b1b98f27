//! Dirty tracking is exact against the guest's own record: between two
//! harvests the guest bumps the generation of every page it rewrites, and
//! the harvest must report every one of them, in D-bit and in
//! write-protect mode. Extras (guest page tables, stack, the generation
//! table itself) are counted separately.

use std::time::Duration;

use serde_json::Value;
use tests::{boot_json, qemu, Console, Firmware, HostConfig, REPLY};

fn ok(c: &mut Console, cmd: &str) -> Value {
    let v = c.json(cmd, REPLY).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn rounds(c: &mut Console, vm: &str, mode: &str, n: usize) -> (u64, u64) {
    let base = ok(c, &format!("vm dirty {vm} {mode}"));
    assert_eq!(base["baseline"], true, "{base}");
    let (mut written, mut extra) = (0, 0);
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(300));
        let r = ok(c, &format!("vm dirty {vm}"));
        assert_eq!(r["mode"], mode);
        assert_eq!(r["missed"], 0, "a written page was not reported: {r}");
        let w = r["written"].as_u64().unwrap();
        assert!(r["count"].as_u64().unwrap() >= w, "{r}");
        assert!(r["in_flight"].as_u64().unwrap() <= 1, "{r}");
        written += w;
        extra += r["extra_data"].as_u64().unwrap();
    }
    assert!(written > 0, "the guest wrote nothing in {mode} mode");
    (written, extra)
}

fn exact_in(workload: &str) {
    let mut h = boot_json(&HostConfig { mem_mib: 256, ..qemu(Firmware::Bios) }).expect("host boots");
    let c = h.console();
    ok(c, &format!("vm create d mem=32 workload={workload} rate=4000"));
    ok(c, "vm start d");
    for mode in ["dbit", "wp", "dbit"] {
        let (written, extra) = rounds(c, "d", mode, 4);
        println!("{workload} {mode}: {written} pages written, all reported; {extra} extra data pages");
        // Extra data pages come only from a page in flight at the previous
        // harvest: at most one per round.
        assert!(extra <= 4, "{extra} unexplained extra data pages in {mode}");
    }
    let info = ok(c, "vm info d");
    assert_eq!(info["dirty_mode"], "dbit");
    assert_eq!(ok(c, "vm verify d")["verified"], true);
}

#[test]
fn dirty_tracking_is_exact_for_random_writes() {
    exact_in("random");
}

#[test]
fn dirty_tracking_is_exact_for_a_sweep() {
    exact_in("sweep");
}

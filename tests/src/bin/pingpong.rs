//! Migrates one busy guest back and forth between two lab hosts, several
//! times in one boot, and prints each migration's total time and downtime,
//! then their mean and median. One boot gives many samples, so two builds
//! can be compared by alternating runs (`HV_IMAGES` points each run at a
//! copy of one build's `target/images`). Needs root.
//!
//! Usage: `pingpong [MiB] [migrations]` (default 512 MiB, 6 migrations).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::lab::{self, Lab};
use tests::{boot_json, Console};

const REPLY: Duration = Duration::from_secs(30);
const USAGE: &str = "usage: pingpong [MiB] [migrations]";

fn ok(c: &mut Console, cmd: &str) -> Result<Value> {
    tests::command(c, cmd, REPLY)
}

fn main() -> Result<()> {
    if !lab::available() {
        bail!("pingpong needs root: it builds a network namespace with a bridge");
    }
    let mut args = std::env::args().skip(1);
    let mem: u64 = args.next().map_or(Ok(512), |a| a.parse()).context(USAGE)?;
    let n: usize = args.next().map_or(Ok(6), |a| a.parse()).context(USAGE)?;
    if mem == 0 || n == 0 || args.next().is_some() {
        bail!(USAGE);
    }
    let mut lab = Lab::new()?;
    let base = tests::qemu_for_guest(mem)?;
    let mut hosts = [boot_json(&lab.host(&base)?)?, boot_json(&lab.host(&base)?)?];
    let ips = ["10.77.0.11", "10.77.0.12"];
    for (h, ip) in hosts.iter_mut().zip(ips) {
        ok(h.console(), &format!("net ip {ip}/24"))?;
    }
    ok(hosts[0].console(), "ping 10.77.0.12 1")?;
    ok(hosts[0].console(), &format!("vm create demo mem={mem} workload=random rate=1000"))?;
    ok(hosts[0].console(), "vm start demo")?;
    std::thread::sleep(Duration::from_secs(1));
    let mut totals = Vec::new();
    for i in 0..n {
        let (from, to) = (i % 2, 1 - i % 2);
        ok(hosts[from].console(), &format!("migrate demo {} share=50 verify", ips[to]))?;
        let every = Duration::from_millis(200);
        let report = tests::wait_migration(hosts[from].console(), Duration::from_secs(600), REPLY, every);
        if report["stage"] != "done" {
            bail!("migration {i} did not finish: {report}");
        }
        let ms = |k: &str| report[k].as_u64().unwrap_or(0) / 1000;
        println!(
            "migration {i} ({} -> {}): total {} ms, downtime {} ms",
            ips[from],
            ips[to],
            ms("total_us"),
            ms("downtime_us")
        );
        totals.push(ms("total_us"));
        // Let the guest settle on its new host before the next move.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let mean = totals.iter().sum::<u64>() / totals.len() as u64;
    let mut sorted = totals.clone();
    sorted.sort_unstable();
    let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2;
    println!("totals_ms {totals:?} mean {mean} median {median}");
    drop(hosts);
    drop(lab); // removes the namespace, the bridge and the TAPs
    Ok(())
}

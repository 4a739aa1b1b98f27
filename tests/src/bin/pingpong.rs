//! Migrates one guest back and forth between two lab hosts, several times
//! in one boot, and prints each migration's total time and downtime, then
//! their mean and median. One boot gives many samples, so two builds can be
//! compared by alternating runs (`HV_IMAGES` points each run at a copy of
//! one build's `target/images`). Needs root.
//!
//! Right before each migration, a `net bench` runs in the same direction
//! over the same link, as many bytes as the guest has, and the migration's
//! goodput (bytes on the wire over its total time) is printed as a ratio
//! to it: the two halves of each ratio are measured seconds apart and
//! over about as long, so the shared machine's swings mostly cancel.
//!
//! Usage: `pingpong [MiB] [migrations] [--workload W] [--no-verify]`
//! (default 512 MiB, 6 migrations, workload `random`, `verify` on).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::lab::{self, Lab};
use tests::{boot_json, Console};

const REPLY: Duration = Duration::from_secs(30);
const USAGE: &str = "usage: pingpong [MiB] [migrations] [--workload W] [--no-verify]";
/// The largest bench run; up to it, each is as large as the guest, so the
/// bench and the migration it is compared with last about as long (in one
/// boot, ten 256 MiB benches ran at 204-294 MB/s, ten 1 GiB ones at
/// 220-265).
const BENCH_MIB: u64 = 1024;

fn ok(c: &mut Console, cmd: &str) -> Result<Value> {
    tests::command(c, cmd, REPLY)
}

fn main() -> Result<()> {
    if !lab::available() {
        bail!("pingpong needs root: it builds a network namespace with a bridge");
    }
    let (mut numbers, mut workload, mut verify) = (Vec::new(), String::from("random"), true);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--workload" => workload = args.next().context(USAGE)?,
            "--no-verify" => verify = false,
            n => numbers.push(n.parse::<u64>().with_context(|| format!("{n:?}: {USAGE}"))?),
        }
    }
    let (mem, n) = match numbers[..] {
        [] => (512, 6),
        [mem] => (mem, 6),
        [mem, n] => (mem, usize::try_from(n)?),
        _ => bail!(USAGE),
    };
    if mem == 0 || n == 0 {
        bail!(USAGE);
    }
    let bench_mib = mem.min(BENCH_MIB);
    let mut lab = Lab::new()?;
    let base = tests::qemu_for_guest(mem)?;
    let mut hosts = [boot_json(&lab.host(&base)?)?, boot_json(&lab.host(&base)?)?];
    let ips = ["10.77.0.11", "10.77.0.12"];
    for (h, ip) in hosts.iter_mut().zip(ips) {
        ok(h.console(), &format!("net ip {ip}/24"))?;
    }
    ok(hosts[0].console(), "ping 10.77.0.12 1")?;
    ok(hosts[0].console(), &format!("vm create demo mem={mem} workload={workload} rate=1000"))?;
    ok(hosts[0].console(), "vm start demo")?;
    std::thread::sleep(Duration::from_secs(1));
    let (mut totals, mut ratios) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (from, to) = (i % 2, 1 - i % 2);
        ok(hosts[to].console(), "net bench listen")?;
        ok(hosts[from].console(), &format!("net bench send {} {bench_mib}", ips[to]))?;
        let bench = tests::bench_result(hosts[to].console(), bench_mib)?;
        let verify = if verify { " verify" } else { "" };
        ok(hosts[from].console(), &format!("migrate demo {} share=50{verify}", ips[to]))?;
        let every = Duration::from_millis(200);
        let report = tests::wait_migration(hosts[from].console(), Duration::from_secs(600), REPLY, every);
        if report["stage"] != "done" {
            bail!("migration {i} did not finish: {report}");
        }
        let ms = |k: &str| report[k].as_u64().unwrap_or(0) / 1000;
        let goodput = report["goodput_bytes_per_s"].as_u64().unwrap_or(0) as f64 / 1e6;
        let ratio = goodput / bench;
        println!(
            "migration {i} ({} -> {}): total {} ms, downtime {} ms, {goodput:.1} MB/s, net bench {bench:.1} MB/s, ratio {ratio:.3}",
            ips[from],
            ips[to],
            ms("total_us"),
            ms("downtime_us")
        );
        totals.push(ms("total_us"));
        ratios.push(ratio);
        // Let the guest settle on its new host before the next move.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let mean = totals.iter().sum::<u64>() / totals.len() as u64;
    let mut sorted = totals.clone();
    sorted.sort_unstable();
    let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2;
    println!("totals_ms {totals:?} mean {mean} median {median}");
    ratios.sort_by(f64::total_cmp);
    let mid = (ratios[(ratios.len() - 1) / 2] + ratios[ratios.len() / 2]) / 2.0;
    let below = ratios.iter().filter(|&&r| r < 0.9).count();
    println!(
        "goodput_to_net_bench min {:.3} median {mid:.3} max {:.3}; {below} of {} below 0.9",
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len()
    );
    drop(hosts);
    drop(lab); // removes the namespace, the bridge and the TAPs
    Ok(())
}

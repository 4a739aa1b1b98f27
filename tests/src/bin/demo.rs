//! The demo: two hypervisor hosts in a lab network namespace; the test
//! guest runs on A with a dirtying workload and is live-migrated to B with a
//! progress bar; its heartbeat goes on on B; the report is printed and
//! written to `target/demo/report.json`. Needs root (network namespaces).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tests::lab::{self, Lab};
use tests::{boot_json, qemu, Console, Firmware, HostConfig};

const REPLY: Duration = Duration::from_secs(30);

fn ok(c: &mut Console, cmd: &str) -> Result<Value> {
    let v = c.json(cmd, REPLY)?;
    if v["ok"] != true {
        bail!("{cmd}: {}", v["error"]);
    }
    Ok(v)
}

fn main() -> Result<()> {
    if !lab::available() {
        bail!("the demo needs root: it builds a network namespace with a bridge");
    }
    let mem: u64 = std::env::args().nth(1).map_or(Ok(64), |s| s.parse()).context("guest MiB")?;
    println!("== building images and booting two hosts on a lab bridge");
    let mut lab = Lab::new()?;
    let base = HostConfig { mem_mib: 512, ..qemu(Firmware::Bios) };
    let mut a = boot_json(&lab.host(&base)?)?;
    let mut b = boot_json(&lab.host(&base)?)?;
    ok(a.console(), "net ip 10.77.0.11/24")?;
    ok(b.console(), "net ip 10.77.0.12/24")?;
    ok(a.console(), "ping 10.77.0.12 1")?;
    println!("== host A 10.77.0.11, host B 10.77.0.12; starting a {mem} MiB guest on A (random writes, 1000 pages/s)");
    ok(a.console(), &format!("vm create demo mem={mem} workload=random rate=1000"))?;
    ok(a.console(), "vm start demo")?;
    std::thread::sleep(Duration::from_secs(1));
    let ticks_before = ok(a.console(), "vm info demo")?["ticks"].as_u64().unwrap_or(0);
    println!("   guest heartbeat on A: {ticks_before} ticks");
    ok(a.console(), "migrate demo 10.77.0.12 verify")?;
    let start = Instant::now();
    let report = loop {
        let s = ok(a.console(), "migrate status")?;
        let stage = s["stage"].as_str().unwrap_or("").to_string();
        if ["done", "failed", "in_doubt"].contains(&stage.as_str()) {
            println!();
            break s;
        }
        let sent = s["pages_sent"].as_u64().unwrap_or(0);
        let left = s["pages_remaining"].as_u64().unwrap_or(0);
        let total = (sent + left).max(1);
        let width = 40;
        let filled = usize::try_from(sent * width / total).unwrap_or(0).min(40);
        print!(
            "\r   [{}{}] {stage:<10} round {:>2}  sent {sent:>7}  left {left:>6}  {:>6.1} MB/s  throttle {:>2}%",
            "#".repeat(filled),
            ".".repeat(40 - filled),
            s["round"].as_u64().unwrap_or(0),
            s["bandwidth_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            s["throttle"].as_u64().unwrap_or(0)
        );
        std::io::stdout().flush()?;
        if start.elapsed() > Duration::from_secs(600) {
            bail!("migration still running after 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let status = report["stage"].as_str().unwrap_or("?").to_string();
    let mut ticks_after = 0;
    if status == "done" {
        let t1 = ok(b.console(), "vm info demo")?["ticks"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_secs(1));
        ticks_after = ok(b.console(), "vm info demo")?["ticks"].as_u64().unwrap_or(0);
        println!("== the guest runs on B: heartbeat {t1} -> {ticks_after} ticks over one second");
        let v = ok(b.console(), "vm verify demo")?;
        println!("   guest self-check on B: {} of {} pages bad", v["bad_pages"], v["pages"]);
        let gone = a.console().json("vm info demo", REPLY)?;
        println!("   on A: {}", gone["error"]);
    }
    let out = json!({
        "status": status,
        "total_ms": report["total_us"].as_u64().unwrap_or(0) / 1000,
        "downtime_ms": report["downtime_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
        "setup_ms": report["setup_us"].as_u64().unwrap_or(0) / 1000,
        "rounds": report["rounds"],
        "bytes_sent": report["bytes_on_wire"],
        "zero_pages": report["zero_pages"],
        "delta_pages": report["delta_pages"],
        "full_pages": report["full_pages"],
        "guest_bytes": mem << 20,
        "verified": report["verified"],
        "guest_ticks_before": ticks_before,
        "guest_ticks_after": ticks_after,
        "error": report.get("error"),
    });
    println!("== report\n{}", serde_json::to_string_pretty(&out)?);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&out)?)?;
    println!("   written to target/demo/report.json");
    drop(lab);
    if status != "done" {
        bail!("migration {status}");
    }
    Ok(())
}

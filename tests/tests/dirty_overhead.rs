//! Measurement, not a pass/fail timing test: the guest's page-write rate
//! with dirty tracking off, with D-bit harvests and with write protection,
//! each harvested every 200 ms, as ratios to "off" measured in the same run
//! on the same host. Run with `--nocapture` to see the numbers.

use std::time::Duration;

use serde_json::Value;
use tests::{bochs, boot_json, qemu, Console, Firmware, HostConfig};

const REPLY: Duration = Duration::from_secs(60);

fn ok(c: &mut Console, cmd: &str) -> Value {
    let v = c.json(cmd, REPLY).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn writes_and_time(c: &mut Console) -> (u64, u64) {
    let w = ok(c, "vm info d")["writes"].as_u64().unwrap();
    (w, ok(c, "uptime")["uptime_us"].as_u64().unwrap())
}

fn measure(label: &str, config: &HostConfig, mem: u32, modes: &[&str]) {
    let mut h = boot_json(config).expect("host boots");
    let c = h.console();
    ok(c, &format!("vm create d mem={mem} workload=random rate=0"));
    ok(c, "vm start d");
    let mut rates = Vec::new();
    for &mode in modes {
        ok(c, &format!("vm dirty d {mode}"));
        let (w0, t0) = writes_and_time(c);
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(200));
            if mode != "off" {
                assert_eq!(ok(c, "vm dirty d")["missed"], 0);
            }
        }
        let (w1, t1) = writes_and_time(c);
        let rate = (w1 - w0) as f64 * 1e6 / (t1 - t0) as f64;
        assert!(rate > 0.0, "no writes in mode {mode}");
        rates.push((mode, rate));
    }
    let offs: Vec<f64> = rates.iter().filter(|(m, _)| *m == "off").map(|(_, r)| *r).collect();
    let off = offs.iter().sum::<f64>() / offs.len() as f64;
    for (mode, rate) in &rates {
        println!("dirty_overhead {label}: {mode:>4}: {rate:>9.0} pages/s  ratio to off {:.2}", rate / off);
    }
}

#[test]
fn guest_write_rate_per_tracking_mode_qemu_npt() {
    measure("qemu/npt 64MiB", &HostConfig { mem_mib: 256, ..qemu(Firmware::Bios) }, 64, &["off", "dbit", "wp", "off"]);
}

#[test]
fn guest_write_rate_per_tracking_mode_bochs_ept() {
    measure("bochs/ept 16MiB", &bochs(), 16, &["off", "dbit", "wp", "pml", "off"]);
}

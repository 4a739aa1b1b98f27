//! Benchmark, printed in one run on the same lab link: TCP goodput between
//! two hosts, the raw frame throughput of the same link (the driver blasting
//! frames with no TCP; counted by the receiving driver between its first and
//! last frame), and their ratio, at MTU 1500 and 9000. At MTU 1500 also the
//! ceiling for TCP on this link: TCP-shaped frames (`net blast ... tcp`:
//! 64 KiB segments the NIC cuts and checksums, the receiving driver checks
//! and drops) with no TCP stack at either end, its payload rate against the
//! raw frames. Run with `--nocapture`; it asserts only that the
//! measurements happened.

use std::time::Duration;

use serde_json::Value;
use tests::lab::{self, Lab};
use tests::{boot_json, qemu, Console, Firmware, HostConfig, REPLY};

const LONG: Duration = Duration::from_secs(180);

fn ok(c: &mut Console, cmd: &str, t: Duration) -> Value {
    let v = c.json(cmd, t).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn rate(v: &Value) -> f64 {
    v["mb_per_s"].as_str().unwrap().parse().unwrap()
}

#[test]
fn tcp_goodput_against_raw_frame_throughput() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let base = HostConfig { mem_mib: 256, ..qemu(Firmware::Bios) };
    let mut a = boot_json(&lab.host(&base).unwrap()).unwrap();
    let mut b = boot_json(&lab.host(&base).unwrap()).unwrap();
    ok(a.console(), "net ip 10.77.0.11/24", REPLY);
    ok(b.console(), "net ip 10.77.0.12/24", REPLY);
    // Teach the bridge both MACs before blasting unknown-unicast frames.
    ok(a.console(), "ping 10.77.0.12 2", REPLY);
    for mtu in [1500, 9000] {
        if mtu == 9000 {
            lab.set_mtu(9000).unwrap();
            ok(a.console(), "net mtu 9000", REPLY);
            ok(b.console(), "net mtu 9000", REPLY);
        }
        // Runs of each, long enough to leave slow start behind, one of each
        // kind after another; the medians give the ratios (the two cores
        // are shared and noisy: one run in several loses a third). Seven at
        // 1500, where the target is set.
        let mib: u32 = 128;
        let runs = if mtu == 1500 { 7 } else { 3 };
        let (mut tcp_rates, mut raw_rates, mut shaped_rates) = (Vec::new(), Vec::new(), Vec::new());
        let mut run_ratios = Vec::new();
        for _ in 0..runs {
            ok(b.console(), "net bench listen", REPLY);
            let (a0, drops0) = (ok(a.console(), "net status", REPLY), lab.tap_drops(2).unwrap());
            ok(a.console(), &format!("net bench send 10.77.0.12 {mib}"), LONG);
            // This transfer's result, all of it intact (a fixed wait could
            // read the previous run's).
            let tcp = tests::bench_result(b.console(), u64::from(mib)).unwrap();
            let a1 = ok(a.console(), "net status", REPLY);
            let sent_bytes =
                a1["counters"]["tx_bytes"].as_u64().unwrap() - a0["counters"]["tx_bytes"].as_u64().unwrap();
            println!(
                "network_bench MTU {mtu} TCP run: A sent {:.3}x the payload (headers and retransmissions); the bridge dropped {} frames toward B",
                sent_bytes as f64 / f64::from(mib << 20),
                lab.tap_drops(2).unwrap() - drops0
            );
            let before = ok(b.console(), "net blast result", REPLY);
            let sent = ok(a.console(), &format!("net blast 52:54:00:77:00:02 {mib}"), LONG);
            std::thread::sleep(Duration::from_millis(500));
            let raw = ok(b.console(), "net blast result", REPLY);
            let frames = raw["frames"].as_u64().unwrap() - before["frames"].as_u64().unwrap();
            assert!(frames > 0, "no raw frame arrived");
            println!(
                "network_bench MTU {mtu} run: TCP {:.1} MB/s; raw sent {:.1} MB/s, received {:.1} MB/s ({frames} of {} frames)",
                tcp,
                rate(&sent),
                rate(&raw),
                sent["frames"]
            );
            tcp_rates.push(tcp);
            raw_rates.push(rate(&raw));
            // At 9000 the NIC would cut these at 1460 bytes: no SYN told
            // it the peer's MSS.
            if mtu == 1500 {
                let bad0 = ok(b.console(), "net status", REPLY)["counters"]["rx_bad_checksum"].as_u64().unwrap();
                let sent = ok(a.console(), &format!("net blast 52:54:00:77:00:02 {mib} tcp"), LONG);
                std::thread::sleep(Duration::from_millis(500));
                let shaped = ok(b.console(), "net blast result", REPLY);
                let bad = ok(b.console(), "net status", REPLY)["counters"]["rx_bad_checksum"].as_u64().unwrap() - bad0;
                let got = shaped["payload_bytes"].as_u64().unwrap();
                assert!(got > 0, "no TCP-shaped frame arrived");
                let payload: f64 = shaped["payload_mb_per_s"].as_str().unwrap().parse().unwrap();
                println!(
                    "network_bench MTU {mtu} run: TCP-shaped frames, no stack: sent {:.1} MB/s, payload received {payload:.1} MB/s ({got} of {} bytes; {bad} bad checksums)",
                    rate(&sent),
                    sent["bytes"]
                );
                shaped_rates.push(payload);
                run_ratios.push(payload / rate(&raw));
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (tcp_rate, raw_rate) = (median(&mut tcp_rates), median(&mut raw_rates));
        let nic = ok(b.console(), "net status", REPLY);
        println!(
            "network_bench MTU {mtu}: TCP goodput {tcp_rate:.1} MB/s, raw frames received {raw_rate:.1} MB/s (medians of {runs}); ratio TCP/raw {:.2}; B's counters {}",
            tcp_rate / raw_rate,
            nic["counters"]
        );
        if mtu == 1500 {
            let shaped = median(&mut shaped_rates);
            println!(
                "network_bench MTU {mtu}: TCP-shaped frames with no stack {shaped:.1} MB/s of payload (median of {runs}): ceiling for TCP over this link {:.2} of raw (median of the runs' own ratios {:.2}); TCP reached {:.2} of it",
                shaped / raw_rate,
                median(&mut run_ratios),
                tcp_rate / shaped
            );
        }
        ok(b.console(), "net blast result", REPLY);
    }
}

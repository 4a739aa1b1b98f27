//! Live migration on Intel VT-x with EPT: two Bochs hosts (our VMX backend)
//! in one lab, each with an e1000 on a TAP of the lab bridge. A 16 MiB VM
//! running the self-checking guest with a light random workload moves from
//! A to B, arrives intact (digest compared at the switchover, then the
//! guest's own full verify), keeps ticking on B and is gone from A.
//!
//! Bochs interprets every instruction (`ips=50000000`, and slower than
//! that in practice), so replies get a minute and the migration ten.
//! Networked Bochs hosts run with `clock: sync=slowdown` (see
//! `bochs_clock_sync` in `boot/src/lib.rs`): both hosts' clocks stay at or
//! below the wall clock, so one host's timeouts mean about as much to the
//! other.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::lab::{self, Lab};
use tests::{bochs, boot_json, Console, Host};

/// Budget for one console reply under Bochs.
const SLOW: Duration = Duration::from_secs(60);

fn ok(c: &mut Console, cmd: &str) -> Value {
    let v = c.json(cmd, SLOW).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

/// The host's own clock (its TSC), in seconds since boot.
fn uptime_s(c: &mut Console) -> f64 {
    ok(c, "uptime")["uptime_us"].as_f64().unwrap() / 1e6
}

fn ticks(c: &mut Console, vm: &str) -> u64 {
    ok(c, &format!("vm info {vm}"))["ticks"].as_u64().unwrap()
}

/// Boots one Bochs host on the lab bridge and checks that it runs VMs on
/// VT-x with EPT and found its e1000.
fn boot_host(lab: &mut Lab, name: &str, ip: &str) -> Host {
    let config = lab.host(&bochs()).unwrap();
    let mut h = boot_json(&config).unwrap_or_else(|e| panic!("Bochs host {name} boots: {e:#}"));
    let cpu = ok(h.console(), "cpuinfo");
    assert!(
        cpu["vmx"] == true && cpu["ept"] == true && cpu["backend"] == "vmx",
        "host {name}: Bochs must offer VT-x with EPT and the kernel must pick its VMX backend; cpuinfo: {cpu}"
    );
    let net = h.console().json("net status", SLOW).unwrap();
    assert_eq!(
        net["ok"],
        true,
        "host {name} has no working e1000 under Bochs: {net}; console: {:?}",
        h.console().tail()
    );
    println!("host {name}: {} {}, net {net}", cpu["brand"], cpu["backend"]);
    ok(h.console(), &format!("net ip {ip}/24"));
    h
}

/// Polls `migrate status` until the migration has ended.
fn wait_end(c: &mut Console, limit: Duration) -> Value {
    tests::wait_migration(c, limit, SLOW, Duration::from_millis(500))
}

/// Polls until the VM's heartbeat count on `c` exceeds `than`.
fn ticks_past(c: &mut Console, vm: &str, than: u64, limit: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let t = ticks(c, vm);
        if t > than {
            return t;
        }
        assert!(start.elapsed() < limit, "VM {vm} still at {t} ticks (want > {than}) after {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_vm_live_migrates_between_two_vmx_hosts() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let t0 = Instant::now();
    let mut lab = Lab::new().unwrap();
    let mut a = boot_host(&mut lab, "A", "10.77.0.11");
    let mut b = boot_host(&mut lab, "B", "10.77.0.12");
    let booted = t0.elapsed();
    let ping = ok(a.console(), "ping 10.77.0.12 3");
    println!("ping A -> B: {ping}");
    assert!(ping["received"].as_u64().unwrap_or(0) >= 1, "{ping}");

    ok(a.console(), "vm create m mem=16 workload=random rate=200");
    ok(a.console(), "vm start m");
    let before = ticks_past(a.console(), "m", 10, Duration::from_secs(60));
    // Registers the vCPU state must carry besides the GPRs (x87/SSE, the
    // debug registers, CR2, KernelGsBase; they arrived at reset values).
    tests::registers_hold(a.console(), "m", 0, 1111, SLOW).unwrap();
    // And its own GDT and task register (hidden `vm ltr`): the control
    // registers, segments and tables must arrive as they are.
    assert_eq!(ok(a.console(), "vm ltr m")["done"], true);
    let system = ok(a.console(), "vm info m")["system"].clone();
    assert_eq!(system["tr"], 0x28, "{system}");

    let clocks0 = [uptime_s(a.console()), uptime_s(b.console())];
    let m0 = Instant::now();
    ok(a.console(), "migrate m 10.77.0.12 verify");
    let report = wait_end(a.console(), Duration::from_secs(600));
    let migrated = m0.elapsed();
    println!("migration report: {report}");
    if report["stage"] != "done" {
        for (n, h) in [("A", &mut a), ("B", &mut b)] {
            println!("host {n}: net {}; console: {:?}", ok(h.console(), "net status"), h.console().tail());
        }
    }
    let clocks1 = [uptime_s(a.console()), uptime_s(b.console())];
    println!(
        "host clocks while migrating: A's advanced {:.1} s, B's {:.1} s, in {:.1} s of wall clock",
        clocks1[0] - clocks0[0],
        clocks1[1] - clocks0[1],
        migrated.as_secs_f64()
    );
    println!(
        "downtime {:.1} ms, total {:.1} ms (host A's clock), rounds {}, {} bytes on the wire; {:.1} s wall clock",
        report["downtime_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        report["total_us"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        report["rounds"],
        report["bytes_on_wire"],
        migrated.as_secs_f64(),
    );
    assert_eq!(report["stage"], "done", "{report}");
    assert_eq!(report["verified"], true, "{report}");
    assert!(report["rounds"].as_array().is_some_and(|r| !r.is_empty()), "{report}");
    assert!(report["downtime_us"].as_u64().unwrap() > 0, "{report}");
    // A's stream left through Bochs's e1000 segmentation offload.
    let counters = ok(a.console(), "net status")["counters"].clone();
    println!("host A's NIC after the migration: {counters}");
    assert!(counters["tx_segmented"].as_u64().unwrap() > 0, "{counters}");

    // Gone from A, running on B, still ticking and intact.
    let e = a.console().json("vm info m", SLOW).unwrap();
    assert_eq!(e["error"], "no VM named 'm'", "{e}");
    let info = ok(b.console(), "vm info m");
    assert_eq!(info["state"], "running", "{info}");
    // Before `vm regs` below changes CR8.
    assert_eq!(info["system"], system, "the system registers changed on the way");
    let t1 = info["ticks"].as_u64().unwrap();
    assert!(t1 >= before, "guest time went backwards: {before} on A, {t1} on B");
    let t2 = ticks_past(b.console(), "m", t1, Duration::from_secs(60));
    println!("ticks: {before} on A before, {t1} on B after, then {t2}");
    let v = ok(b.console(), "vm verify m");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["check_errors"], 0, "{v}");
    tests::registers_hold(b.console(), "m", 1111, 2222, SLOW).unwrap();
    println!(
        "wall clock: {:.1} s to boot both hosts, {:.1} s migrating, {:.1} s in all",
        booted.as_secs_f64(),
        migrated.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

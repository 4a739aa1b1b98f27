//! Live migration between two hypervisor hosts on the lab bridge: a VM
//! running the self-checking guest moves from A to B while it writes,
//! arrives intact (digest compared at switchover, then the guest's own full
//! verify), keeps ticking on B and is gone from A. Failures before the
//! switchover leave it running on A, and B keeps nothing.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::lab::{self, Lab};
use tests::{boot_json, qemu, Console, Firmware, Host, HostConfig, REPLY};

fn ok(c: &mut Console, cmd: &str) -> Value {
    let v = c.json(cmd, REPLY).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn ticks(c: &mut Console, vm: &str) -> u64 {
    ok(c, &format!("vm info {vm}"))["ticks"].as_u64().unwrap()
}

fn pair(lab: &mut Lab) -> (Host, Host) {
    let base = HostConfig { mem_mib: 512, ..qemu(Firmware::Bios) };
    let mut a = boot_json(&lab.host(&base).unwrap()).expect("host a");
    let mut b = boot_json(&lab.host(&base).unwrap()).expect("host b");
    ok(a.console(), "net ip 10.77.0.11/24");
    ok(b.console(), "net ip 10.77.0.12/24");
    assert_eq!(ok(a.console(), "ping 10.77.0.12 1")["received"], 1);
    (a, b)
}

/// Runs a host-side Python client in the lab namespace and returns what it
/// printed, which must contain `marker` (the client got that far).
fn client(lab: &Lab, what: &str, script: &str, marker: &str) -> String {
    let out = lab.exec(&["python3", "-c", script]).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains(marker), "{what}: {out:?}");
    stdout
}

/// Polls `migrate status` until the migration has ended.
fn wait_end(c: &mut Console, limit: Duration) -> Value {
    tests::wait_migration(c, limit, REPLY, Duration::from_millis(200))
}

#[test]
fn a_writing_vm_moves_to_the_peer_intact_and_keeps_running() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = pair(&mut lab);
    ok(a.console(), "vm create m mem=64 workload=random rate=1000");
    ok(a.console(), "vm start m");
    std::thread::sleep(Duration::from_millis(1000));
    let before = ticks(a.console(), "m");
    // Registers the vCPU state must carry besides the GPRs (x87/SSE, the
    // debug registers, CR2, KernelGsBase; they arrived at reset values).
    tests::registers_hold(a.console(), "m", 0, 1111, REPLY).unwrap();
    // And its own GDT and task register (hidden `vm ltr`): the control
    // registers, segments and tables must arrive as they are.
    assert_eq!(ok(a.console(), "vm ltr m")["done"], true);
    let system = ok(a.console(), "vm info m")["system"].clone();
    assert_eq!(system["tr"], 0x28, "{system}");
    ok(a.console(), "migrate m 10.77.0.12 verify");
    let e = a.console().json("migrate m 10.77.0.12", REPLY).unwrap();
    assert!(e["ok"] == false, "a second migration must be refused: {e}");
    let report = wait_end(a.console(), Duration::from_secs(120));
    println!("migration report: {report}");
    assert_eq!(report["stage"], "done", "{report}");
    assert_eq!(report["verified"], true, "{report}");
    let rounds = report["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "pre-copy and stop-and-copy rounds: {report}");
    assert!(report["zero_pages"].as_u64().unwrap() > 0 && report["full_pages"].as_u64().unwrap() > 0);
    assert!(report["downtime_us"].as_u64().unwrap() > 0);
    // The expected downtime counts the verify read of all memory (64 MiB,
    // some 20 ms under TCG): estimated from a sample, so within a factor.
    let (expected, verify) = (report["expected_downtime_us"].as_u64().unwrap(), report["verify_us"].as_u64().unwrap());
    assert!(expected * 3 >= verify, "the expected downtime leaves out the verify read: {report}");
    // Gone from A, running on B, still ticking and intact.
    let e = a.console().json("vm info m", REPLY).unwrap();
    assert_eq!(e["error"], "no VM named 'm'");
    let info = ok(b.console(), "vm info m");
    assert_eq!(info["state"], "running", "{info}");
    // Before `vm regs` below changes CR8.
    assert_eq!(info["system"], system, "the system registers changed on the way");
    let (t1, w1) = (info["ticks"].as_u64().unwrap(), info["writes"].as_u64().unwrap());
    assert!(t1 >= before, "guest time went backwards: {before} on A, {t1} on B");
    std::thread::sleep(Duration::from_millis(1000));
    let info = ok(b.console(), "vm info m");
    assert!(info["ticks"].as_u64().unwrap() > t1, "the VM does not tick on B: {info}");
    // The count lives in guest memory and came along: only its growth
    // shows the guest writing on B.
    assert!(info["writes"].as_u64().unwrap() > w1, "the VM does not write on B: {info}");
    let v = ok(b.console(), "vm verify m");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["check_errors"], 0, "{v}");
    tests::registers_hold(b.console(), "m", 1111, 2222, REPLY).unwrap();
}

#[test]
fn failures_before_switchover_leave_the_vm_running_on_the_source() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = pair(&mut lab);
    ok(a.console(), "vm create m mem=64 workload=sweep rate=2000");
    ok(a.console(), "vm start m");
    // Nobody listening: refused, VM untouched.
    ok(b.console(), "migrate listen off");
    ok(a.console(), "migrate m 10.77.0.12");
    let s = wait_end(a.console(), Duration::from_secs(60));
    assert_eq!(s["stage"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap_or("").contains("connection refused"), "{s}");
    assert_eq!(s["vm_running_here"], true);
    // B takes migrations from another host only: refused before any page,
    // with the reason; the VM runs on at A, B creates nothing.
    let l = ok(b.console(), "migrate listen from=10.77.0.99,10.77.0.98");
    assert_eq!(l["from"], serde_json::json!(["10.77.0.99", "10.77.0.98"]), "{l}");
    ok(a.console(), "migrate m 10.77.0.12");
    let s = wait_end(a.console(), Duration::from_secs(60));
    assert_eq!(s["stage"], "failed", "{s}");
    let why = s["error"].as_str().unwrap_or("");
    assert!(why.contains("rejected: 10.77.0.11 may not migrate to this host"), "{s}");
    assert_eq!(s["vm_running_here"], true);
    let st = ok(b.console(), "migrate status");
    assert_eq!(st["last_refused"]["peer"], "10.77.0.11", "{st}");
    assert_eq!(st["listening_from"], serde_json::json!(["10.77.0.99", "10.77.0.98"]), "{st}");
    assert_eq!(ok(b.console(), "vm list")["vms"], serde_json::json!([]));
    ok(b.console(), "migrate listen off");
    // Nobody at that address: no answer, which is not a refusal.
    ok(a.console(), "migrate m 10.77.0.99");
    let s = wait_end(a.console(), Duration::from_secs(60));
    assert!(s["error"].as_str().unwrap_or("").contains("no answer from the destination"), "{s}");
    assert_eq!(s["vm_running_here"], true);
    let info = ok(a.console(), "vm info m");
    assert_eq!((info["state"].as_str(), info["migrating"].as_bool()), (Some("running"), Some(false)), "{info}");
    // The tracking armed for the migration is gone again.
    assert_eq!(info["dirty_mode"], "off", "{info}");
    // A VM its operator paused stays paused when its migration fails.
    ok(a.console(), "vm pause m");
    ok(a.console(), "migrate m 10.77.0.12");
    let s = wait_end(a.console(), Duration::from_secs(60));
    assert_eq!(s["stage"], "failed");
    assert_eq!((s["vm_running_here"].as_bool(), s["vm_state"].as_str()), (Some(false), Some("paused")), "{s}");
    assert_eq!(ok(a.console(), "vm info m")["state"], "paused");
    ok(a.console(), "vm resume m");
    // Cancelled in round 2 (a capped link keeps it in pre-copy): the VM
    // keeps running on A, B drops its skeleton.
    ok(b.console(), "migrate listen");
    // The operator tracks dirty pages too: the migration's harvests must
    // not turn into pages reported missed afterwards.
    ok(a.console(), "vm dirty m wp");
    std::thread::sleep(Duration::from_millis(300));
    ok(a.console(), "migrate m 10.77.0.12 bandwidth=100");
    let start = Instant::now();
    loop {
        let s = ok(a.console(), "migrate status");
        if s["round"].as_u64() == Some(2) {
            break;
        }
        assert!(["setup", "precopy"].contains(&s["stage"].as_str().unwrap_or("")), "{s}");
        assert!(start.elapsed() < Duration::from_secs(90), "no round 2 after 90 s: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ok(b.console(), "vm info m")["state"], "incoming");
    // B shows the incoming migration's progress, and later how it ended.
    let inc = ok(b.console(), "migrate status")["incoming"].clone();
    assert_eq!((inc["vm"].as_str(), inc["state"].as_str()), (Some("m"), Some("receiving")), "{inc}");
    assert!(inc["peer"].as_str().unwrap_or("").starts_with("10.77.0.11:"), "{inc}");
    assert!(inc["round"].as_u64().unwrap() >= 1 && inc["pages_received"].as_u64().unwrap() > 0, "{inc}");
    let e = b.console().json("vm destroy m", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("still arriving by migration"), "{e}");
    // One migration at a time between two hosts, either way: B may not
    // send A a VM while one arrives from A.
    ok(b.console(), "vm create r mem=16");
    ok(b.console(), "vm start r");
    let e = b.console().json("migrate r 10.77.0.11", REPLY).unwrap();
    let why = e["error"].as_str().unwrap_or("");
    assert!(why.contains("m is arriving here from 10.77.0.11; one migration at a time between two hosts"), "{e}");
    ok(b.console(), "vm destroy r");
    // On A, commands that would take the migration's dirty pages or run
    // the guest outside it are refused.
    for (cmd, why) in [
        ("vm dirty m", "being migrated"),
        ("vm dirty m wp", "being migrated"),
        ("vm verify m", "a migration is running"),
    ] {
        let e = a.console().json(cmd, REPLY).unwrap();
        assert!(e["error"].as_str().unwrap_or("").contains(why), "{cmd}: {e}");
    }
    ok(a.console(), "migrate cancel");
    let s = wait_end(a.console(), Duration::from_secs(60));
    assert_eq!(s["stage"], "failed", "{s}");
    let t = ticks(a.console(), "m");
    std::thread::sleep(Duration::from_millis(700));
    assert!(ticks(a.console(), "m") > t, "VM stopped ticking on A after the cancel");
    std::thread::sleep(Duration::from_millis(1500));
    let e = b.console().json("vm info m", REPLY).unwrap();
    assert_eq!(e["error"], "no VM named 'm'", "B kept a skeleton: {e}");
    let last = ok(b.console(), "migrate status")["last_incoming"].clone();
    assert_eq!((last["vm"].as_str(), last["state"].as_str()), (Some("m"), Some("failed")), "{last}");
    assert!(last["reason"].as_str().unwrap_or("").contains("cancelled"), "{last}");
    // Cancelled at full speed, its Cancel waits behind a full send buffer
    // of pages: it still reaches B (B read "connection lost" before).
    ok(a.console(), "vm create c mem=192");
    ok(a.console(), "vm start c");
    ok(a.console(), "migrate c 10.77.0.12");
    std::thread::sleep(Duration::from_millis(400));
    ok(a.console(), "migrate cancel");
    assert_eq!(wait_end(a.console(), Duration::from_secs(60))["stage"], "failed");
    std::thread::sleep(Duration::from_millis(1500));
    let last = ok(b.console(), "migrate status")["last_incoming"].clone();
    assert_eq!(last["vm"], "c", "{last}");
    assert!(last["reason"].as_str().unwrap_or("").contains("cancelled"), "{last}");
    ok(a.console(), "vm destroy c");
    assert_eq!(ok(a.console(), "vm verify m")["verified"], true);
    let d = ok(a.console(), "vm dirty m");
    assert_eq!(d["mode"], "wp", "{d}");
    assert!(d["written"].as_u64().unwrap() > 0 && d["missed"] == 0, "after the cancel: {d}");
    // A VM that crashes during pre-copy is not moved: it would have been
    // started again on B.
    ok(a.console(), "migrate m 10.77.0.12 bandwidth=100");
    std::thread::sleep(Duration::from_millis(500));
    ok(a.console(), "vm crash m");
    let s = wait_end(a.console(), Duration::from_secs(120));
    assert_eq!(s["stage"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap_or("").contains("stopped during the migration"), "{s}");
    assert_eq!((s["vm_running_here"].as_bool(), s["vm_state"].as_str()), (Some(false), Some("stopped")), "{s}");
    std::thread::sleep(Duration::from_millis(1500));
    let e = b.console().json("vm info m", REPLY).unwrap();
    assert_eq!(e["error"], "no VM named 'm'", "B kept or started a copy: {e}");
    // A write the host makes for a paused guest during pre-copy (here the
    // crash request in its config page) reaches B: no D bit, fault or PML
    // entry saw it, and B kept the page as round 0 had sent it.
    ok(a.console(), "vm create q mem=32");
    ok(a.console(), "vm start q");
    ok(a.console(), "vm pause q");
    ok(a.console(), "migrate q 10.77.0.12 bandwidth=100");
    std::thread::sleep(Duration::from_millis(700));
    ok(a.console(), "vm crash q");
    let s = wait_end(a.console(), Duration::from_secs(120));
    assert_eq!(s["stage"], "done", "{s}");
    assert_eq!(ok(b.console(), "vm info q")["state"], "paused");
    ok(b.console(), "vm resume q");
    std::thread::sleep(Duration::from_millis(500));
    let info = ok(b.console(), "vm info q");
    assert!(info["state"].as_str().unwrap_or("").starts_with("stopped"), "B did not get the crash request: {info}");
}

#[test]
fn ping_pong_and_garbage_on_the_migration_port() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = pair(&mut lab);
    // Garbage and a truncated stream from a host-side client: refused, and
    // the destination keeps working.
    let garbage = r#"
import socket, struct, os, sys, time
def connect():
    # The listener is re-armed after each connection ends: retry briefly.
    for attempt in range(50):
        try:
            return socket.create_connection(("10.77.0.12", 7070), timeout=5)
        except ConnectionRefusedError:
            time.sleep(0.1)
def send(data):
    s = connect()
    s.sendall(data)
    try:
        s.settimeout(3); s.recv(4096)
    except Exception:
        pass
    s.close()
send(os.urandom(4096))
send(struct.pack("<IHHII", 0x4D564948, 1, 1, 71, 0) + b"\x01\x00" + b"trunc")
send(struct.pack("<IHHII", 0x4D564948, 1, 4, 0x7FFFFFFF, 0))
# Port scans: connect and hang up at once.
for _ in range(10):
    connect().close()
# A client that half closes and stays connected: B must not keep its
# port for it (it did, until the client went away).
s = connect()
s.shutdown(socket.SHUT_WR)
if os.fork() == 0:
    os.close(1); os.close(2)
    time.sleep(20)
    os._exit(0)
print("sent")
"#;
    client(&lab, "garbage client", garbage, "sent");
    // A flood of clients that send garbage and stay connected without
    // reading: each of B's failed connections waits out its FIN with a
    // 4 MiB buffer while the port opens anew. They filled B's heap until a
    // failed allocation halted it.
    let flood = r#"
import socket, time
held, t0 = [], time.time()
while time.time() - t0 < 4:
    try:
        s = socket.create_connection(("10.77.0.12", 7070), timeout=2)
        s.sendall(b"garbage garbage!")
        held.append(s)
    except OSError:
        time.sleep(0.005)
print("held", len(held))
"#;
    let out = client(&lab, "flooding client", flood, "held ");
    let held: u32 = out.trim().trim_start_matches("held ").parse().unwrap_or(0);
    println!("flood: {held} connections in 4 s");
    assert!(held >= 20, "too few connections to load B: {out}");
    assert_eq!(ok(b.console(), "version")["name"], "hypervisor");
    let heap = ok(b.console(), "mem")["heap_used_bytes"].as_u64().unwrap();
    assert!(heap < 32 << 20, "B's heap after the flood: {heap}");
    // A client that connects and says nothing is no migration: B's
    // commands that a migration refuses still run meanwhile, and B drops
    // it after 5 s without a Hello (it held B's one incoming slot, so
    // the migration below was refused, for 30 s).
    let silent = r#"
import os, socket, time
s = socket.create_connection(("10.77.0.12", 7070), timeout=5)
if os.fork() == 0:
    os.close(1); os.close(2)
    time.sleep(15)
    os._exit(0)
print("connected")
"#;
    client(&lab, "silent client", silent, "connected");
    assert_eq!(ok(b.console(), "ping 10.77.0.11 1")["received"], 1);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(ok(b.console(), "vm list")["vms"], serde_json::json!([]), "a skeleton was left behind");
    assert_eq!(ok(b.console(), "version")["name"], "hypervisor");
    // A SYN from an address nobody has: B's SYN-ACK goes nowhere. The
    // half-open connection held B's port for 8 s, refusing migrations.
    let half_open = r#"
import socket, struct
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
src, dst = socket.inet_aton("10.77.0.99"), socket.inet_aton("10.77.0.12")
tcp = struct.pack("!HHIIBBHHH", 40000, 7070, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(ip + tcp, ("10.77.0.12", 0))
print("sent")
"#;
    client(&lab, "half-open SYN", half_open, "sent");
    std::thread::sleep(Duration::from_secs(3));
    // A to B and back to A.
    ok(a.console(), "vm create p mem=32 workload=sweep rate=500");
    ok(a.console(), "vm start p");
    ok(a.console(), "migrate p 10.77.0.12 verify");
    let r = wait_end(a.console(), Duration::from_secs(180));
    assert_eq!((r["stage"].as_str(), r["verified"].as_bool()), (Some("done"), Some(true)), "{r}");
    assert_eq!(ok(b.console(), "vm info p")["state"], "running");
    // Back to A paused by its operator: it stays paused on the way and
    // arrives paused.
    ok(b.console(), "vm pause p");
    ok(b.console(), "migrate p 10.77.0.11 verify");
    let r = wait_end(b.console(), Duration::from_secs(180));
    assert_eq!((r["stage"].as_str(), r["verified"].as_bool()), (Some("done"), Some(true)), "{r}");
    assert_eq!(ok(a.console(), "vm info p")["state"], "paused");
    ok(a.console(), "vm resume p");
    let t = ticks(a.console(), "p");
    std::thread::sleep(Duration::from_millis(800));
    assert!(ticks(a.console(), "p") > t, "the VM does not tick back on A");
    assert_eq!(ok(a.console(), "vm verify p")["verified"], true);
    assert_eq!(b.console().json("vm info p", REPLY).unwrap()["error"], "no VM named 'p'");
}

#[test]
fn a_vm_dirtying_faster_than_the_link_converges_by_throttling() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = pair(&mut lab);
    ok(a.console(), "vm create h mem=32 workload=random rate=8000");
    ok(a.console(), "vm start h");
    // 80 Mbit/s is 2441 pages/s: about a third of what the guest writes.
    ok(a.console(), "migrate h 10.77.0.12 bandwidth=80 verify");
    let r = wait_end(a.console(), Duration::from_secs(300));
    println!("migration report: {r}");
    assert_eq!((r["stage"].as_str(), r["verified"].as_bool()), (Some("done"), Some(true)), "{r}");
    assert!(r["max_throttle"].as_u64().unwrap() >= 20, "the guest was never throttled: {r}");
    assert_eq!(r["stop_reason"], "budget", "converged by throttling, not forced at the round limit: {r}");
    let t = ticks(b.console(), "h");
    std::thread::sleep(Duration::from_millis(800));
    assert!(ticks(b.console(), "h") > t, "the VM does not tick on B");
    let v = ok(b.console(), "vm verify h");
    assert_eq!((v["verified"].as_bool(), v["check_errors"].as_u64()), (Some(true), Some(0)), "{v}");
}

#[test]
fn cutting_the_link_mid_round_leaves_the_vm_on_the_source() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = pair(&mut lab);
    ok(a.console(), "vm create m mem=32 workload=random rate=1000");
    ok(a.console(), "vm create i mem=32 workload=idle");
    ok(a.console(), "vm start m");
    ok(a.console(), "vm start i");
    // A slow link keeps the migration in pre-copy long enough to cut it.
    ok(a.console(), "migrate m 10.77.0.12 bandwidth=40");
    let start = Instant::now();
    loop {
        let s = ok(a.console(), "migrate status");
        if s["round"].as_u64().unwrap_or(0) >= 1 && s["pages_sent"].as_u64().unwrap_or(0) > 8192 {
            break;
        }
        assert!(["setup", "precopy"].contains(&s["stage"].as_str().unwrap_or("")), "{s}");
        assert!(start.elapsed() < Duration::from_secs(60), "no round 1 after a minute: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Verify runs a guest for up to a minute without polling the network,
    // which would let this migration's link time out.
    let e = a.console().json("vm verify i", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("a migration is running"), "{e}");
    // So would a ping to a silent host (2 s a request), a bench or a blast,
    // on either end.
    for (host, cmd) in [(&mut a, "ping 10.77.0.99 100"), (&mut b, "net bench send 10.77.0.11 64")] {
        let e = host.console().json(cmd, REPLY).unwrap();
        assert!(e["error"].as_str().unwrap_or("").contains("a migration is running"), "{cmd}: {e}");
    }
    lab.ip(&["link", "set", "tap2", "down"]).unwrap(); // B's port on the switch
    let s = wait_end(a.console(), Duration::from_secs(60));
    println!("after the cut: {s}");
    assert_eq!((s["stage"].as_str(), s["vm_running_here"].as_bool()), (Some("failed"), Some(true)), "{s}");
    let info = ok(a.console(), "vm info m");
    assert_eq!((info["state"].as_str(), info["migrating"].as_bool()), (Some("running"), Some(false)), "{info}");
    let t = ticks(a.console(), "m");
    std::thread::sleep(Duration::from_millis(700));
    assert!(ticks(a.console(), "m") > t, "VM stopped ticking on A after the cut");
    assert_eq!(ok(a.console(), "vm verify m")["verified"], true);
    // B notices on its own (its connection times out) and drops its copy.
    let start = Instant::now();
    while ok(b.console(), "vm list")["vms"] != serde_json::json!([]) {
        assert!(start.elapsed() < Duration::from_secs(30), "B kept the half-migrated VM");
        std::thread::sleep(Duration::from_millis(300));
    }
    // With the link back, an idle VM migrates intact.
    lab.ip(&["link", "set", "tap2", "up"]).unwrap();
    assert_eq!(ok(a.console(), "ping 10.77.0.12 3")["received"].as_u64().map(|n| n > 0), Some(true));
    ok(a.console(), "migrate i 10.77.0.12 verify");
    let r = wait_end(a.console(), Duration::from_secs(120));
    println!("idle VM: {r}");
    assert_eq!((r["stage"].as_str(), r["verified"].as_bool()), (Some("done"), Some(true)), "{r}");
    let t = ticks(b.console(), "i");
    std::thread::sleep(Duration::from_millis(700));
    assert!(ticks(b.console(), "i") > t, "the idle VM does not tick on B");
    assert_eq!(a.console().json("vm info i", REPLY).unwrap()["error"], "no VM named 'i'");
    assert_eq!(ok(a.console(), "vm info m")["state"], "running");
    // A lost `Resumed`: B runs the VM, A never hears so. A keeps its copy
    // paused and in doubt, and neither `vm resume` nor another migration
    // may run it without the operator saying so (both made a second
    // running copy: the second migration's failure also cleared the doubt).
    ok(b.console(), "migrate lose-resumed");
    ok(a.console(), "migrate m 10.77.0.12");
    let r = wait_end(a.console(), Duration::from_secs(120));
    assert_eq!(r["stage"], "in_doubt", "{r}");
    let info = ok(a.console(), "vm info m");
    assert_eq!((info["state"].as_str(), info["in_doubt"].as_bool()), (Some("paused"), Some(true)), "{info}");
    assert_eq!(ok(b.console(), "vm info m")["state"], "running");
    let e = a.console().json("vm resume m", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("in doubt after a migration"), "{e}");
    let e = a.console().json("migrate m 10.77.0.12", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("in doubt after a migration"), "{e}");
    assert_eq!(ok(a.console(), "vm info m")["in_doubt"], true);
    // The operator finds it does not run on B (destroyed there), and
    // resumes A's copy.
    ok(b.console(), "vm destroy m");
    assert_eq!(ok(a.console(), "vm resume m force")["state"], "running");
    assert_eq!(ok(a.console(), "vm info m")["in_doubt"], false);
    let t = ticks(a.console(), "m");
    std::thread::sleep(Duration::from_millis(700));
    assert!(ticks(a.console(), "m") > t, "the resumed VM does not tick on A");
}

//! Two hypervisor hosts on the lab bridge (a Linux bridge in a network
//! namespace of its own): ping both ways and from a host-side client, the
//! bridge learns each MAC on its own port, 64 MiB of TCP arrive intact at
//! MTU 1500 and 9000, and a barrage of bad frames leaves a host answering.
//! Needs root (network namespaces); without it the tests say so and fail.

use std::time::Duration;

use serde_json::Value;
use tests::lab::{self, Lab};
use tests::{boot_json, qemu, Console, Firmware, Host, HostConfig, REPLY};

const BENCH: Duration = Duration::from_secs(180);

fn ok(c: &mut Console, cmd: &str, t: Duration) -> Value {
    let v = c.json(cmd, t).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn two_hosts(lab: &mut Lab) -> (Host, Host) {
    let base = HostConfig { mem_mib: 256, ..qemu(Firmware::Bios) };
    let mut a = boot_json(&lab.host(&base).unwrap()).expect("host a");
    let mut b = boot_json(&lab.host(&base).unwrap()).expect("host b");
    ok(a.console(), "net ip 10.77.0.11/24", REPLY);
    ok(b.console(), "net ip 10.77.0.12/24", REPLY);
    (a, b)
}

fn transfer(a: &mut Host, b: &mut Host, mib: u32) -> (String, String) {
    ok(b.console(), "net bench listen", REPLY);
    let sent = a.console().json(&format!("net bench send 10.77.0.12 {mib}"), BENCH).unwrap();
    if sent["ok"] != true {
        let sa = a.console().json("net status", REPLY).unwrap();
        let sb = b.console().json("net status", REPLY).unwrap();
        panic!("bench send failed: {sent}\nsender: {sa}\nreceiver: {sb}");
    }
    assert_eq!(sent["bytes"].as_u64(), Some(u64::from(mib) << 20), "{sent}");
    // The receiver records the result once the sender's FIN arrives.
    let mut got = Value::Null;
    for _ in 0..50 {
        got = b.console().json("net bench result", REPLY).unwrap();
        if got["ok"] == true && got["bytes"].as_u64() == Some(u64::from(mib) << 20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(got["bytes"].as_u64(), Some(u64::from(mib) << 20), "receiver: {got}");
    assert_eq!(got["intact"], true, "payload corrupted: {got}");
    (sent["mb_per_s"].as_str().unwrap().to_string(), got["mb_per_s"].as_str().unwrap().to_string())
}

#[test]
fn lab_hosts_ping_each_other_and_the_bridge_learns_their_macs() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = two_hosts(&mut lab);
    let st = ok(a.console(), "net status", REPLY);
    assert_eq!((st["link"].as_bool(), st["mtu"].as_u64()), (Some(true), Some(1500)), "{st}");
    assert_eq!(st["mac"], "52:54:00:77:00:01");
    let p = ok(a.console(), "ping 10.77.0.12 3", REPLY);
    assert_eq!(p["received"], 3, "{p}");
    let p = ok(b.console(), "ping 10.77.0.11 2", REPLY);
    assert_eq!(p["received"], 2, "{p}");
    // A host-side client in the namespace reaches both hypervisors.
    for ip in ["10.77.0.11", "10.77.0.12"] {
        let out = lab.exec(&["ping", "-c", "3", "-W", "2", ip]).expect("host-side ping");
        assert!(String::from_utf8_lossy(&out.stdout).contains("3 received"), "{out:?}");
    }
    let p = ok(a.console(), &format!("ping {} 2", lab::MGMT_IP), REPLY);
    assert_eq!(p["received"], 2);
    let fdb = String::from_utf8_lossy(&lab.exec(&["bridge", "fdb", "show", "br", "br0"]).unwrap().stdout).to_string();
    assert!(fdb.lines().any(|l| l.starts_with("52:54:00:77:00:01 dev tap1")), "{fdb}");
    assert!(fdb.lines().any(|l| l.starts_with("52:54:00:77:00:02 dev tap2")), "{fdb}");
    let st = ok(a.console(), "net status", REPLY);
    assert!(st["counters"]["rx_frames"].as_u64().unwrap() >= 5 && st["counters"]["tx_frames"].as_u64().unwrap() >= 5);
    // Errors are clear.
    let e = a.console().json("ping 10.77.0.99 1", Duration::from_secs(10)).unwrap();
    assert_eq!(e["ok"], false);
    assert!(e["error"].as_str().unwrap().contains("no reply from 10.77.0.99"), "{e}");
    // ...and leave ping working: the request to the absent host stayed
    // queued, and every later ping waited behind it.
    let p = ok(a.console(), "ping 10.77.0.12 1", REPLY);
    assert_eq!(p["received"], 1, "{p}");
    // A bench to nobody gives up after 5 s (it held the console for the
    // transfer's whole budget: 20 s plus 0.5 s per MiB).
    let start = std::time::Instant::now();
    let e = a.console().json("net bench send 10.77.0.99 4096", Duration::from_secs(30)).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("no answer from 10.77.0.99"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
    reset_before_the_last_bytes_fails_the_bench(&lab, &mut a);
    // One port, one listener: smoltcp hands a connection to whichever
    // socket listening on its port comes first, so a migration could have
    // landed in the bench, or a bench in the migration.
    let e = a.console().json("net bench listen 7070", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("is the migration port"), "{e}");
    ok(a.console(), "net bench listen 7100", REPLY);
    let e = a.console().json("migrate listen 7100", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("taken by 'net bench listen'"), "{e}");
    assert_eq!(ok(a.console(), "migrate status", REPLY)["listening"], 7070);
    // An address that would have halted the kernel (smoltcp panics on it).
    let e = a.console().json("net ip 224.0.0.1/24", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("multicast"), "{e}");
    assert_eq!(ok(a.console(), "version", REPLY)["name"], "hypervisor");
}

/// A host-side receiver reads 7 of 8 MiB, then resets the connection. The
/// sender has handed all 8 MiB to its socket by then (1 MiB of buffer), and
/// took the reset, which empties the socket, for a finished transfer.
fn reset_before_the_last_bytes_fails_the_bench(lab: &Lab, a: &mut Host) {
    let receiver = r#"
import socket, struct, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
# A small receive buffer: the kernel acknowledges little beyond what is read.
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.bind(("10.77.0.1", 5300))
s.listen(1)
s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(60)
got = 0
while got < 7 << 20:
    d = c.recv(65536)
    if not d:
        break
    got += len(d)
time.sleep(0.5)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
print("reset after", got, flush=True)
"#;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", lab.ns(), "python3", "-c", receiver])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("host-side receiver");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let e = a.console().json(&format!("net bench send {} 8 5300", lab::MGMT_IP), BENCH).unwrap();
    let status = child.wait().unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(status.success() && line.starts_with("reset after"), "receiver: {status} {line}");
    assert_eq!(e["ok"], false, "a reset transfer was reported done: {e}");
    assert!(e["error"].as_str().unwrap_or("").contains("connection reset after"), "{e}");
}

#[test]
fn lab_64_mib_arrive_intact_at_mtu_1500_and_9000() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = two_hosts(&mut lab);
    // A connection that hangs up without a byte (a port scan) does not
    // keep the bench port: before, it refused every later connection.
    ok(b.console(), "net bench listen", REPLY);
    let scan = r#"
import socket, time
connected = 0
for _ in range(3):
    try:
        socket.create_connection(("10.77.0.12", 5201), timeout=5).close()
        connected += 1
    except OSError:
        pass
    time.sleep(0.2)
print("connected", connected)
"#;
    let out = lab.exec(&["python3", "-c", scan]).expect("port scan");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("connected 0"), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    let sent = a.console().json("net bench send 10.77.0.12 8", BENCH).unwrap();
    assert_eq!(sent["ok"], true, "after a port scan: {sent}");
    let heap = |b: &mut Host| ok(b.console(), "mem", REPLY)["heap_used_bytes"].as_u64().unwrap();
    ok(b.console(), "net bench listen", REPLY);
    let listening = heap(&mut b);
    let (tx, rx) = transfer(&mut a, &mut b, 64);
    println!("network: MTU 1500, 64 MiB: sender {tx} MB/s, receiver {rx} MB/s");
    // The finished connection's socket (a 4 MiB buffer) is freed within
    // its 2 s of grace, not only at the next `net bench listen`.
    std::thread::sleep(Duration::from_secs(3));
    let after = heap(&mut b);
    assert!(after < listening + (1 << 20), "heap {listening} listening, {after} after the transfer");
    lab.set_mtu(9000).unwrap();
    ok(a.console(), "net mtu 9000", REPLY);
    ok(b.console(), "net mtu 9000", REPLY);
    let before = ok(b.console(), "net status", REPLY)["counters"].clone();
    let (tx, rx) = transfer(&mut a, &mut b, 64);
    println!("network: MTU 9000, 64 MiB: sender {tx} MB/s, receiver {rx} MB/s");
    let st = ok(b.console(), "net status", REPLY);
    assert_eq!(st["mtu"], 9000);
    // The TCP segments used the jumbo MTU (TCP's MSS follows `net mtu`):
    // 64 MiB in 1460-byte segments would be 46k frames, 1514 bytes each;
    // the tail of a segment cut by the NIC may be short.
    let count = |c: &Value, k: &str| c[k].as_u64().unwrap();
    let frames = count(&st["counters"], "rx_frames") - count(&before, "rx_frames");
    let bytes = count(&st["counters"], "rx_bytes") - count(&before, "rx_bytes");
    assert!(bytes / frames > 6000, "{frames} frames for {bytes} bytes: TCP ignored MTU 9000");
    // B back at 1500 on the 9000 link: A, which cuts its segments on the
    // NIC, must cut them to the MSS B announces.
    ok(b.console(), "net mtu 1500", REPLY);
    let (tx, rx) = transfer(&mut a, &mut b, 16);
    println!("network: A at MTU 9000 to B at 1500, 16 MiB: sender {tx} MB/s, receiver {rx} MB/s");
    let st = ok(b.console(), "net status", REPLY);
    assert_eq!(st["counters"]["rx_oversize"], 0, "{st}");
}

#[test]
fn lab_bad_frame_barrage_leaves_the_host_answering() {
    assert!(lab::available(), "the lab needs root for network namespaces");
    let mut lab = Lab::new().unwrap();
    let (mut a, mut b) = two_hosts(&mut lab);
    // Jumbo on the bridge, standard MTU on the host: oversized frames reach
    // the NIC and must be dropped there.
    lab.set_mtu(9000).unwrap();
    ok(b.console(), "net bench listen", REPLY);
    let before = ok(b.console(), "net status", REPLY);
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/barrage.py");
    let kinds = std::env::var("BARRAGE_KINDS").unwrap_or_default();
    let mut args = vec!["python3", tool, "mgmt0", "52:54:00:77:00:02", "10.77.0.12", "200"];
    if !kinds.is_empty() {
        args.push(&kinds);
    }
    let out = lab.exec(&args).expect("barrage");
    let sent: Value = serde_json::from_slice(&out.stdout).expect("barrage prints JSON");
    println!("barrage sent: {sent}");
    assert_eq!(sent["syn_flood"], 200);
    // Still answering: console, the peer's ping, a host-side ping, and TCP.
    assert_eq!(ok(b.console(), "version", REPLY)["name"], "hypervisor");
    assert_eq!(ok(a.console(), "ping 10.77.0.12 3", REPLY)["received"], 3);
    let out = lab.exec(&["ping", "-c", "2", "-W", "2", "10.77.0.12"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 received"));
    std::thread::sleep(Duration::from_millis(500)); // half-open flood connections expire
    transfer(&mut a, &mut b, 8);
    let after = ok(b.console(), "net status", REPLY);
    let c = &after["counters"];
    println!("after barrage: {c}");
    assert!(c["rx_frames"].as_u64() > before["counters"]["rx_frames"].as_u64());
    assert!(c["rx_oversize"].as_u64().unwrap() >= 200, "the 200 oversized frames were counted as dropped: {c}");
    if kinds.is_empty() || kinds.contains("bad_tcp_checksum") {
        let bad = c["rx_bad_checksum"].as_u64().unwrap();
        assert!(bad >= sent["bad_tcp_checksum"].as_u64().unwrap(), "bad TCP checksums dropped by the driver: {c}");
    }
}

#[test]
fn point_to_point_socket_link_without_root() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = HostConfig { mem_mib: 256, ..qemu(Firmware::Bios) };
    let mut a = boot_json(&HostConfig {
        nic: Some(boot::Nic::Listen { port, mac: "52:54:00:99:00:01".into() }),
        ..base.clone()
    })
    .unwrap();
    let mut b =
        boot_json(&HostConfig { nic: Some(boot::Nic::Connect { port, mac: "52:54:00:99:00:02".into() }), ..base })
            .unwrap();
    // TCP-shaped frames carry the sender's address, so they need one.
    let e = a.console().json("net blast 52:54:00:99:00:02 1 tcp", REPLY).unwrap();
    assert!(e["error"].as_str().unwrap_or("").contains("no IP address"), "{e}");
    ok(a.console(), "net ip 10.77.0.11/24", REPLY);
    ok(b.console(), "net ip 10.77.0.12/24", REPLY);
    assert_eq!(ok(a.console(), "ping 10.77.0.12 2", REPLY)["received"], 2);
    transfer(&mut a, &mut b, 16);
}

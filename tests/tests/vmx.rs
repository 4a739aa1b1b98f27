//! The same VMs on Intel VT-x with EPT, under Bochs (`corei7_skylake_x`):
//! lifecycle, two VMs, a triple-faulting guest and a failed VM entry
//! contained, and exact dirty tracking with EPT D bits, write protection
//! and PML. Guests are 16 MiB so the interpreter keeps up.

use std::time::Duration;

use serde_json::Value;
use tests::{bochs, boot_json, Console, REPLY};

/// Bochs interprets every instruction; give replies more time.
const SLOW: Duration = Duration::from_secs(60);

fn ok(c: &mut Console, cmd: &str) -> Value {
    let v = c.json(cmd, SLOW).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn ticks(c: &mut Console, name: &str) -> u64 {
    ok(c, &format!("vm info {name}"))["ticks"].as_u64().unwrap()
}

#[test]
fn vmx_lifecycle_containment_and_entry_failure() {
    let mut h = boot_json(&bochs()).expect("Bochs host boots");
    let c = h.console();
    ok(c, "vm create a mem=16 workload=sweep rate=2000");
    ok(c, "vm create b mem=16 workload=idle");
    ok(c, "vm start a");
    ok(c, "vm start b");
    std::thread::sleep(Duration::from_millis(2500));
    let (a1, b1) = (ticks(c, "a"), ticks(c, "b"));
    assert!(a1 > 0 && b1 > 0, "both VMs tick: a {a1}, b {b1}");
    ok(c, "vm pause a");
    let p = ticks(c, "a");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(ticks(c, "a"), p, "paused VM ticked");
    ok(c, "vm resume a");
    // A triple fault stops only its VM.
    ok(c, "vm crash b");
    std::thread::sleep(Duration::from_millis(1000));
    let b = ok(c, "vm info b");
    assert_eq!((b["state"].as_str(), b["stop_reason"].as_str()), (Some("stopped"), Some("triple fault")), "{b}");
    // A broken VMCS: the entry fails with the VM-instruction error in words.
    ok(c, "vm create x mem=16");
    ok(c, "vm start x");
    ok(c, "vm break x");
    std::thread::sleep(Duration::from_millis(1000));
    let x = ok(c, "vm info x");
    assert_eq!(x["state"], "stopped", "{x}");
    let why = x["stop_reason"].as_str().unwrap();
    assert!(why.contains("VM entry with invalid control field(s)"), "{why}");
    let a2 = ticks(c, "a");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ticks(c, "a") > a2, "VM a stopped ticking after the others failed");
    let v = ok(c, "vm verify a");
    assert_eq!(v["verified"], true, "{v}");
    ok(c, "vm create d mem=16 workload=idle");
    ok(c, "vm start d");
    tests::unswitched_registers_are_each_guests_own(c, "a", "d").unwrap();
    let r = tests::instructions_are_answered_as_cpuid_says(c, "d", &[]).unwrap();
    println!("vm insns under Bochs's VT-x: {r}");
    let d = ticks(c, "d");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ticks(c, "d") > d, "the guest stopped after vm insns");
    trap_exits_and_reaches_the_guests_handler(c, "a");
    // A guest in an endless chain of #DB exceptions (a write breakpoint on
    // its #DB stack: each delivery raises the next, so no interrupt exit
    // ever comes) must not hold the host's CPU. (QEMU 7.2 TCG aborts on
    // this guest, so only Bochs runs it.)
    ok(c, "vm create k mem=16 workload=idle");
    ok(c, "vm start k");
    ok(c, "vm dbchain k");
    std::thread::sleep(Duration::from_millis(2000));
    let a3 = ticks(c, "a");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ticks(c, "a") > a3, "a stopped ticking while k chained #DBs");
    let k = ok(c, "vm info k");
    assert_eq!(k["state"], "running", "{k}");
    assert!(k["exits"]["exception"].as_u64().unwrap() > 100, "k's #DBs did not all exit: {k}");
    ok(c, "vm destroy k");
    assert_eq!(c.json("version", REPLY).unwrap()["ok"], true);
}

/// `vm trap` twice (`tests::single_steps_reach_the_guests_handler`), the
/// second time under write-protect dirty tracking: pushing the #DB's frame
/// on a page nothing had written since (guest::TRAP_STACK) exits, which
/// cuts the delivery short, and the #DB must go in again after it (lost,
/// the guest went on single-stepping, and a second #DB exited). The VM runs
/// on.
fn trap_exits_and_reaches_the_guests_handler(c: &mut Console, vm: &str) {
    tests::single_steps_reach_the_guests_handler(c, vm, 0).unwrap();
    assert_eq!(ok(c, &format!("vm dirty {vm} wp"))["baseline"], true);
    tests::single_steps_reach_the_guests_handler(c, vm, 2).unwrap();
    ok(c, &format!("vm dirty {vm} off"));
    let t = ticks(c, vm);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ticks(c, vm) > t, "the VM stopped after its #DB");
}

#[test]
fn vmx_dirty_tracking_is_exact_in_every_mode() {
    let mut h = boot_json(&bochs()).expect("Bochs host boots");
    let c = h.console();
    ok(c, "vm create d mem=16 workload=random rate=3000");
    ok(c, "vm start d");
    for mode in ["pml", "dbit", "wp"] {
        let base = ok(c, &format!("vm dirty d {mode}"));
        assert_eq!(base["baseline"], true);
        let mut written = 0;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            let r = ok(c, "vm dirty d");
            assert_eq!(r["mode"], mode);
            assert_eq!(r["missed"], 0, "{mode}: a written page was not reported: {r}");
            assert!(r["extra_data"].as_u64().unwrap() <= 1, "{mode}: {r}");
            written += r["written"].as_u64().unwrap();
        }
        println!("bochs {mode}: {written} pages written between harvests, every one reported");
        assert!(written > 0, "guest wrote nothing in {mode} mode");
    }
    let info = ok(c, "vm info d");
    assert!(info["exits"]["npf"].as_u64().unwrap_or(0) > 0, "wp mode takes EPT violations: {info}");
    assert_eq!(ok(c, "vm verify d")["verified"], true);
}

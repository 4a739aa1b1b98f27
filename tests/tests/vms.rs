//! VMs on AMD-V with nested paging under QEMU TCG: lifecycle, two VMs at
//! once, a crashing guest contained, clear memory errors, guest verify and
//! memory digests.

use std::time::Duration;

use serde_json::Value;
use tests::{boot_json, qemu, Console, Firmware, HostConfig, REPLY};

fn ok(c: &mut Console, cmd: &str) -> Value {
    let v = c.json(cmd, REPLY).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], true, "{cmd}: {v}");
    v
}

fn err(c: &mut Console, cmd: &str) -> String {
    let v = c.json(cmd, REPLY).unwrap_or_else(|e| panic!("{cmd}: {e:#}"));
    assert_eq!(v["ok"], false, "{cmd} should fail: {v}");
    v["error"].as_str().unwrap().to_string()
}

fn ticks(c: &mut Console, name: &str) -> u64 {
    ok(c, &format!("vm info {name}"))["ticks"].as_u64().unwrap()
}

fn host() -> tests::Host {
    boot_json(&HostConfig { mem_mib: 256, ..qemu(Firmware::Bios) }).expect("host boots")
}

#[test]
fn lifecycle_and_ticks_only_while_running() {
    let mut h = host();
    let c = h.console();
    let v = ok(c, "vm create a mem=16 workload=sweep rate=2000");
    assert_eq!(v["mem_mib"], 16);
    let info = ok(c, "vm info a");
    assert_eq!((info["state"].as_str(), info["ticks"].as_u64()), (Some("created"), Some(0)));
    assert_eq!(info["dirty_mode"], "off");
    assert!(err(c, "vm pause a").contains("it is created"));
    ok(c, "vm start a");
    std::thread::sleep(Duration::from_millis(1500));
    let t1 = ticks(c, "a");
    assert!(t1 >= 3, "guest ticked {t1} times in 1.5 s");
    ok(c, "vm pause a");
    let p1 = ticks(c, "a");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(ticks(c, "a"), p1, "ticks advanced while paused");
    assert!(err(c, "vm start a").contains("started already"));
    ok(c, "vm resume a");
    std::thread::sleep(Duration::from_millis(700));
    assert!(ticks(c, "a") > p1, "ticks did not advance after resume");
    let info = ok(c, "vm info a");
    assert!(info["writes"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["check_errors"], 0, "{info}");
    // Port I/O and HLT exits come from the guest program itself. An
    // external-interrupt exit needs a timer tick while the guest runs,
    // which a guest that halts between writes may never meet (CI once saw
    // none), so it is not required.
    let exits = |kind: &str| info["exits"][kind].as_u64().unwrap_or(0);
    assert!(exits("io") > 0 && exits("hlt") > 0, "{info}");
    let list = ok(c, "vm list");
    assert_eq!(list["vms"][0]["name"], "a");
    ok(c, "vm stop a");
    assert!(err(c, "vm resume a").contains("is stopped (stopped by the operator)"));
    ok(c, "vm destroy a");
    assert_eq!(err(c, "vm info a"), "no VM named 'a'");
    assert_eq!(ok(c, "vm list")["vms"], serde_json::json!([]));
}

#[test]
fn two_vms_run_and_a_triple_fault_stops_only_its_vm() {
    let mut h = host();
    let c = h.console();
    ok(c, "vm create a mem=16 workload=hot:8 rate=500");
    ok(c, "vm create b mem=16");
    ok(c, "vm start a");
    ok(c, "vm start b");
    std::thread::sleep(Duration::from_millis(1000));
    let (a1, b1) = (ticks(c, "a"), ticks(c, "b"));
    assert!(a1 > 0 && b1 > 0, "both run: a {a1}, b {b1}");
    ok(c, "vm crash a");
    std::thread::sleep(Duration::from_millis(500));
    let a = ok(c, "vm info a");
    assert_eq!(a["state"], "stopped", "{a}");
    assert_eq!(a["stop_reason"], "triple fault");
    assert_eq!(a["exits"]["shutdown"], 1);
    let b2 = ticks(c, "b");
    std::thread::sleep(Duration::from_millis(700));
    assert!(ticks(c, "b") > b2, "b stopped ticking after a crashed");
    assert_eq!(ok(c, "version")["name"], "hypervisor");
    // A VMCB that fails VMRUN's consistency checks stops only its VM.
    ok(c, "vm create x mem=16");
    ok(c, "vm start x");
    ok(c, "vm break x");
    std::thread::sleep(Duration::from_millis(500));
    let x = ok(c, "vm info x");
    assert_eq!(x["state"], "stopped", "{x}");
    assert!(x["stop_reason"].as_str().unwrap().contains("VMEXIT_INVALID"), "{x}");
    let b3 = ticks(c, "b");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks(c, "b") > b3, "b stopped ticking after x failed to enter");
    // An SVM instruction in a guest exits: VMSAVE would otherwise store
    // host state at the host physical address in RAX (here 0), and the VM
    // went on running.
    ok(c, "vm create s mem=16");
    ok(c, "vm start s");
    ok(c, "vm vmsave s");
    std::thread::sleep(Duration::from_millis(500));
    let vm = ok(c, "vm info s");
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert!(vm["stop_reason"].as_str().unwrap().contains("0x83"), "VMSAVE's exit code: {vm}");
    assert_eq!(ok(c, "version")["name"], "hypervisor");
    // A guest that loads a TSS of its own leaves the host's task register
    // alone: VMRUN does not switch TR, so the guest ran on the host's, and
    // its `ltr` left the host's interrupt stacks in a TSS the guest chose.
    ok(c, "vm create t mem=16");
    ok(c, "vm start t");
    let r = ok(c, "vm ltr t");
    assert_eq!(r["done"], true, "{r}");
    assert_eq!(r["host_tr"], r["host_tss"], "the guest's TR reached the host: {r}");
    let t1 = ticks(c, "t");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks(c, "t") > t1, "the guest stopped after its ltr");
    // A #DB exits (a guest's endless chain of them would otherwise hold
    // the CPU without one exit: CVE-2015-8104) and is reflected back to
    // the guest's own handler; the VM runs on.
    tests::single_steps_reach_the_guests_handler(c, "t", 0).unwrap();
    // Again with write-protect dirty tracking: pushing the #DB's frame on a
    // page nothing had written since (guest::TRAP_STACK) exits, which cuts
    // the delivery short. The #DB must go in again after it: lost, the
    // guest went on single-stepping, and a second #DB exited.
    assert_eq!(ok(c, "vm dirty t wp")["baseline"], true);
    tests::single_steps_reach_the_guests_handler(c, "t", 2).unwrap();
    ok(c, "vm dirty t off");
    let t2 = ticks(c, "t");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks(c, "t") > t2, "the guest stopped after its #DB");
    ok(c, "vm create u mem=16 workload=idle");
    ok(c, "vm start u");
    tests::unswitched_registers_are_each_guests_own(c, "u", "t").unwrap();
    let r = tests::instructions_are_answered_as_cpuid_says(c, "u", &["rdtscp", "xsetbv", "mov_cr4_vmxe"]).unwrap();
    println!("vm insns under QEMU's SVM: {r}");
    let u = ticks(c, "u");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks(c, "u") > u, "the guest stopped after vm insns");
    for vm in ["a", "b", "x", "s", "t", "u"] {
        ok(c, &format!("vm destroy {vm}"));
    }
}

#[test]
fn creation_errors_are_clear() {
    let mut h = host();
    let c = h.console();
    assert!(err(c, "vm create a mem=8").contains("from 16 to 4096"));
    let e = err(c, "vm create big mem=1024");
    assert!(e.starts_with("not enough host memory for mem=1024:") && e.contains("MiB free"), "{e}");
    assert!(err(c, "vm create a").contains("needs mem="));
    assert!(err(c, "vm create a mem=16 workload=hot:999999").contains("data pages"));
    ok(c, "vm create a mem=16");
    assert_eq!(err(c, "vm create a mem=16"), "a VM named 'a' already exists");
    assert!(err(c, "vm start nosuch").contains("no VM named 'nosuch'"));
    assert!(err(c, "vm dirty a pml").contains("pml needs Intel"));
    assert!(err(c, "vm verify a").contains("only a started VM"));
    // A failed create leaves nothing behind: the host can still give the
    // memory to a VM that fits.
    let free = ok(c, "mem")["free_bytes"].as_u64().unwrap();
    ok(c, "vm create b mem=64");
    ok(c, "vm destroy b");
    assert_eq!(ok(c, "mem")["free_bytes"].as_u64().unwrap(), free, "destroy returns all memory");
}

#[test]
fn guest_verify_and_digests() {
    let mut h = host();
    let c = h.console();
    ok(c, "vm create v mem=16 workload=random rate=3000");
    ok(c, "vm start v");
    std::thread::sleep(Duration::from_millis(800));
    let v = ok(c, "vm verify v");
    assert_eq!((v["verified"].as_bool(), v["bad_pages"].as_u64()), (Some(true), Some(0)), "{v}");
    ok(c, "vm pause v");
    let d1 = ok(c, "vm digest v")["digest"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ok(c, "vm digest v")["digest"], d1.as_str(), "memory changed while paused");
    // Verify on a paused VM runs it just long enough to check.
    assert_eq!(ok(c, "vm verify v")["verified"], true);
    ok(c, "vm resume v");
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(ok(c, "vm digest v")["digest"], d1.as_str(), "a writing guest changes its memory");
    // The check can fail: one word flipped behind an idle guest's back is
    // found, in that page and no other. No test showed this before, so a
    // verify that checked nothing would have passed them all.
    ok(c, "vm create w mem=16");
    ok(c, "vm start w");
    let v = ok(c, "vm verify w");
    assert_eq!((v["verified"].as_bool(), v["pages_checked"].clone()), (Some(true), v["pages"].clone()), "{v}");
    ok(c, "vm poke w 1234");
    let v = ok(c, "vm verify w");
    assert_eq!((v["verified"].as_bool(), v["bad_pages"].as_u64()), (Some(false), Some(1)), "{v}");
    assert_eq!(v["first_bad"], 1234, "{v}");
    assert!(err(c, "vm poke w 99999").contains("data pages"));
}

/// A guest waiting for its next heartbeat or page write executes `HLT`,
/// and the host runs it again at its wake time: an idle guest leaves the
/// CPU to the host (`uptime`'s `cpu`), and a paced guest still writes at
/// its rate and ticks on time.
#[test]
fn halting_guests_give_the_cpu_back_and_keep_their_pace() {
    let mut h = host();
    let c = h.console();
    ok(c, "vm create idle mem=16");
    ok(c, "vm create paced mem=16 workload=random rate=500");
    ok(c, "vm start idle");
    ok(c, "vm start paced");
    std::thread::sleep(Duration::from_millis(500));
    let cpu = |c: &mut Console| {
        let u = ok(c, "uptime");
        (u["uptime_us"].as_u64().unwrap(), u["cpu"]["vms_us"].as_u64().unwrap())
    };
    let writes = |c: &mut Console| ok(c, "vm info paced")["writes"].as_u64().unwrap();
    let (t0, v0, w0, k0) = {
        let (t, v) = cpu(c);
        (t, v, writes(c), ticks(c, "idle"))
    };
    std::thread::sleep(Duration::from_secs(3));
    let (t1, v1) = cpu(c);
    let (w1, k1) = (writes(c), ticks(c, "idle"));
    let wall_s = (t1 - t0) as f64 / 1e6;
    let vm_share = (v1 - v0) as f64 / (t1 - t0) as f64;
    let rate = (w1 - w0) as f64 / wall_s;
    println!("two halting guests: {:.0} % of the CPU in VMs; paced guest {rate:.0} writes/s; idle guest {} ticks in {wall_s:.1} s", vm_share * 100.0, k1 - k0);
    // A spinning guest pair took all of it (vms_us = wall time).
    assert!(vm_share < 0.5, "VMs took {:.0} % of the CPU", vm_share * 100.0);
    assert!(rate > 400.0 && rate < 600.0, "paced guest wrote {rate:.0} pages/s, not 500");
    assert!((k1 - k0) as f64 >= 9.0 * wall_s, "idle guest ticked {} times in {wall_s:.1} s", k1 - k0);
    let info = ok(c, "vm info idle");
    assert!(info["exits"]["hlt"].as_u64().unwrap() > 0, "{info}");
    let v = ok(c, "vm verify paced");
    assert_eq!(v["bad_pages"], 0, "{v}");
}

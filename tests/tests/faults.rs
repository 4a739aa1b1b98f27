//! CPU exceptions are reported on the console with vector, error code, RIP
//! and CR2 — never a silent triple fault. `#BP` returns to the console.

use std::time::Duration;

use tests::{boot_json, qemu, Firmware, REPLY};

#[test]
fn breakpoint_is_reported_and_the_console_carries_on() -> anyhow::Result<()> {
    let mut host = boot_json(&qemu(Firmware::Bios))?;
    let c = host.console();
    assert_eq!(c.json("fault bp", REPLY)?["fault"], "bp");
    let event = c.wait_for("\"event\":\"exception\"", REPLY)?;
    let v: serde_json::Value = serde_json::from_str(&event)?;
    assert_eq!((v["vector"].as_u64(), v["name"].as_str()), (Some(3), Some("#BP")));
    assert!(v["rip"].as_str().unwrap().starts_with("0xffffffff8"), "{v}");
    assert_eq!(c.json("version", REPLY)?["ok"], true);
    Ok(())
}

#[test]
fn page_fault_is_reported_with_cr2_then_the_kernel_halts() -> anyhow::Result<()> {
    let mut host = boot_json(&qemu(Firmware::Bios))?;
    let c = host.console();
    c.send_line("fault pf")?;
    let event = c.wait_for("\"event\":\"exception\"", REPLY)?;
    let v: serde_json::Value = serde_json::from_str(&event)?;
    assert_eq!((v["vector"].as_u64(), v["name"].as_str()), (Some(14), Some("#PF")));
    assert_eq!(v["cr2"], "0xffffa000dead0000");
    assert_eq!(v["error"], 0, "a read of a non-present page: {v}");
    // In json mode the last line is JSON too (it was "kernel halted").
    let halted: serde_json::Value = serde_json::from_str(&c.wait_for("halted", REPLY)?)?;
    assert_eq!(halted["event"], "halted");
    // The machine did not reset or exit (-no-reboot would end QEMU on a triple fault).
    std::thread::sleep(Duration::from_millis(500));
    assert!(host.wait_exit(Duration::from_millis(200)).is_err(), "QEMU exited after a reported fault");
    Ok(())
}

#[test]
fn invalid_opcode_is_reported() -> anyhow::Result<()> {
    let mut host = boot_json(&qemu(Firmware::Bios))?;
    let c = host.console();
    c.send_line("fault ud")?;
    let v: serde_json::Value = serde_json::from_str(&c.wait_for("\"event\":\"exception\"", REPLY)?)?;
    assert_eq!((v["vector"].as_u64(), v["name"].as_str()), (Some(6), Some("#UD")));
    Ok(())
}

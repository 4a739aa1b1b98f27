//! The console under QEMU (BIOS route): every command, every kind of bad
//! input, json mode, and a clean shutdown.

use std::time::Duration;

use tests::{boot_json, qemu, shutdown, Emulator, Firmware, REPLY};

#[test]
fn console_commands_and_bad_input() -> anyhow::Result<()> {
    let mut host = boot_json(&qemu(Firmware::Bios))?;
    let c = host.console();

    let help = c.json("help", REPLY)?;
    assert_eq!(help["ok"], true);
    let usages: Vec<&str> = help["commands"].as_array().unwrap().iter().map(|c| c["usage"].as_str().unwrap()).collect();
    for cmd in ["help", "version", "cpuinfo", "mem", "uptime", "log", "mode", "shutdown"] {
        assert!(usages.iter().any(|u| u.starts_with(cmd)), "help lacks {cmd}: {usages:?}");
    }

    let v = c.json("version", REPLY)?;
    assert_eq!((v["ok"].as_bool(), v["name"].as_str()), (Some(true), Some("hypervisor")));

    let cpu = c.json("cpuinfo", REPLY)?;
    assert_eq!(cpu["vendor"], "AuthenticAMD", "{cpu}");
    assert_eq!(
        (cpu["svm"].as_bool(), cpu["npt"].as_bool(), cpu["vmx"].as_bool()),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(cpu["backend"], "svm");
    assert!(cpu["asids"].as_u64().unwrap() >= 1, "{cpu}");
    assert_eq!(cpu["boot"], "bios");
    assert_eq!(cpu["processors"], 1);
    let tsc = cpu["tsc_hz"].as_u64().unwrap();
    assert!(tsc > 10_000_000, "TSC {tsc} Hz is implausible");

    let mem = c.json("mem", REPLY)?;
    let (total, free) = (mem["total_bytes"].as_u64().unwrap(), mem["free_bytes"].as_u64().unwrap());
    assert!(total > 200 << 20 && total <= 256 << 20, "QEMU has 256 MiB; kernel saw {total}");
    // The heap takes a quarter of RAM (at least 16 MiB); the rest is free
    // but for the kernel image, page tables, NIC buffers and the bitmap.
    let heap = mem["heap_bytes"].as_u64().unwrap();
    assert!(heap >= 16 << 20 && heap <= total / 4 + (1 << 20), "heap {heap} of {total}");
    assert!(free < total - heap && free > total - heap - (24 << 20), "free {free} of {total}, heap {heap}");

    let t0 = c.json("uptime", REPLY)?["uptime_us"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t1 = c.json("uptime", REPLY)?["uptime_us"].as_u64().unwrap();
    assert!(t1 > t0 + 100_000, "uptime went from {t0} to {t1} over 300 ms");

    // Bad input: one clear error each, and nothing changes.
    let e = c.json("frobnicate", REPLY)?;
    assert_eq!(e["ok"], false);
    assert!(e["error"].as_str().unwrap().contains("unknown command 'frobnicate'"), "{e}");
    let e = c.json("mode xml", REPLY)?;
    assert!(e["error"].as_str().unwrap().starts_with("usage: mode"), "{e}");
    let e = c.json("log loud", REPLY)?;
    assert!(e["error"].as_str().unwrap().starts_with("usage: log"), "{e}");
    let e = c.json("mem extra", REPLY)?;
    assert_eq!(e["error"], "'mem' takes no arguments");
    c.send_line(&"x".repeat(400))?;
    let e = c.next_reply(REPLY)?;
    assert_eq!(e["error"], "line too long (at most 256 bytes)");
    c.send_raw(b"ver\x00\xff\x01sion\r")?;
    let e = c.next_reply(REPLY)?;
    assert!(e["error"].as_str().unwrap().contains("non-printable byte 0x00"), "{e}");
    // Line editing: backspace and DEL erase, escape sequences are ignored.
    c.send_raw(b"verz\x08sionn\x7f\x1b[A\r")?;
    assert_eq!(c.next_reply(REPLY)?["name"], "hypervisor");
    // Still answering, still in json mode, log level unchanged.
    assert_eq!(c.json("mode", REPLY)?["mode"], "json");
    assert_eq!(c.json("log", REPLY)?["level"], "info");
    assert_eq!(c.json("log debug", REPLY)?["level"], "debug");
    assert_eq!(c.json("log info", REPLY)?["level"], "info");

    shutdown(host, Emulator::Qemu)
}

#[test]
fn human_mode_prints_prose_and_errors() -> anyhow::Result<()> {
    let mut host = tests::Host::launch(tests::images(), &qemu(Firmware::Bios))?;
    let c = host.console();
    boot::wait_ready(c, tests::BOOT)?;
    c.send_line("uptime")?;
    c.wait_for("up ", REPLY)?;
    c.send_line("nonsense")?;
    let line = c.wait_for("error:", REPLY)?;
    assert!(line.contains("unknown command 'nonsense'"), "{line}");
    c.send_line("mem")?;
    c.wait_for("heap:", REPLY)?;
    c.send_line("shutdown")?;
    c.wait_for("powering off", REPLY)?;
    assert_eq!(host.wait_exit(Duration::from_secs(30))?, Some(boot::QEMU_CLEAN_EXIT));
    Ok(())
}

//! The same kernel behaves the same on every boot route: bootloader BIOS and
//! UEFI under QEMU, GRUB Multiboot2 under QEMU and under Bochs (VT-x).

use tests::{bochs, boot_json, qemu, shutdown, Firmware, HostConfig, REPLY};

fn check_route(config: &HostConfig, route: &str) -> anyhow::Result<serde_json::Value> {
    let mut host = boot_json(config)?;
    let c = host.console();
    let cpu = c.json("cpuinfo", REPLY)?;
    assert_eq!(cpu["ok"], true);
    assert_eq!(cpu["boot"], route, "{cpu}");
    // The migration CRC32C is whichever routine was faster at boot.
    let cycles = &cpu["crc32c_cycles_64k"];
    let (instruction, tables) = (cycles["instruction"].as_u64().unwrap(), cycles["tables"].as_u64().unwrap());
    assert!(tables > 0, "{cpu}");
    let faster = if instruction > 0 && instruction < tables { "crc32 instruction" } else { "tables" };
    assert_eq!(cpu["crc32c"], faster, "{cpu}");
    let mem = c.json("mem", REPLY)?;
    let total = mem["total_bytes"].as_u64().unwrap();
    let expect = u64::from(config.mem_mib) << 20;
    assert!(total > expect * 3 / 4 && total <= expect, "{route}: {total} usable of {expect}");
    assert!(mem["free_bytes"].as_u64().unwrap() < total);
    let e = c.json("bogus", REPLY)?;
    assert_eq!(e["ok"], false);
    shutdown(host, config.emulator)?;
    Ok(cpu)
}

#[test]
fn uefi_route_boots() -> anyhow::Result<()> {
    let cpu = check_route(&qemu(Firmware::Uefi), "uefi")?;
    assert_eq!(cpu["backend"], "svm");
    // TCG runs `crc32` bit by bit in a helper: 6× slower than the tables.
    assert_eq!(cpu["crc32c"], "tables", "{cpu}");
    Ok(())
}

#[test]
fn grub_multiboot2_route_boots_under_qemu() -> anyhow::Result<()> {
    let cpu = check_route(&HostConfig { cpus: 2, ..qemu(Firmware::Grub) }, "multiboot2")?;
    assert_eq!(cpu["backend"], "svm");
    assert_eq!(cpu["processors"], 2, "MADT should list both processors: {cpu}");
    Ok(())
}

#[test]
fn bochs_reports_vmx_with_ept_ad_and_pml() -> anyhow::Result<()> {
    let cpu = check_route(&bochs(), "multiboot2")?;
    assert_eq!(cpu["vendor"], "GenuineIntel");
    for f in ["vmx", "ept", "ept_ad", "pml", "vpid", "unrestricted_guest"] {
        assert_eq!(cpu[f], true, "{f} in {cpu}");
    }
    assert_eq!(cpu["svm"], false);
    assert_eq!(cpu["backend"], "vmx");
    assert_eq!(cpu["invept"], "single");
    assert_eq!(cpu["tlb_tags"], 65535);
    Ok(())
}

//! Shared harness for the integration tests: builds the images once per test
//! binary, boots hosts, and waits for their consoles.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub mod lab;

use anyhow::{bail, Result};
pub use boot::{Console, Emulator, Firmware, Host, HostConfig, Images};

/// Budget for one console reply under QEMU TCG.
pub const REPLY: Duration = Duration::from_secs(20);
/// Budget for a host to boot to "hypervisor ready".
pub const BOOT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The boot images, built (once per test binary) by `scripts/build.sh`.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let status = Command::new(root().join("scripts/build.sh")).status().expect("running scripts/build.sh");
        assert!(status.success(), "scripts/build.sh failed: {status}");
        let out = root().join("target/images");
        Images::at(&out.join("iso/boot/kernel.elf"), &out)
    })
}

/// Boots a host, waits for "hypervisor ready" and switches it to json mode.
pub fn boot_json(config: &HostConfig) -> Result<Host> {
    let mut host = Host::launch(images(), config)?;
    boot::wait_ready(host.console(), BOOT)?;
    host.console().enter_json(REPLY)?;
    Ok(host)
}

/// A QEMU host on the given firmware route.
pub fn qemu(firmware: Firmware) -> HostConfig {
    HostConfig { emulator: Emulator::Qemu, firmware, ..HostConfig::default() }
}

/// A Bochs host (VT-x with EPT), kept small.
pub fn bochs() -> HostConfig {
    HostConfig { emulator: Emulator::Bochs, mem_mib: 128, ..HostConfig::default() }
}

/// Sends `shutdown` and checks that the emulator exits cleanly: QEMU with
/// the isa-debug-exit status, Bochs after the kernel's "powering off".
pub fn shutdown(mut host: Host, emulator: Emulator) -> Result<()> {
    let reply = host.console().json("shutdown", REPLY)?;
    if reply["ok"] != true {
        bail!("shutdown refused: {reply}");
    }
    host.console().wait_for("powering off", REPLY)?;
    let code = host.wait_exit(Duration::from_secs(30))?;
    match emulator {
        Emulator::Qemu if code != Some(boot::QEMU_CLEAN_EXIT) => bail!("QEMU exited with {code:?}"),
        _ => Ok(()),
    }
}

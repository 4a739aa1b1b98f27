//! The lab network: a network namespace of its own holding a Linux bridge
//! (the switch), one TAP per emulated host, and a management veth with
//! address 10.77.0.1/24 for host-side clients. The emulators (QEMU or
//! Bochs) run inside the namespace. Everything is removed on drop;
//! namespaces left by a killed or aborted run are removed by the next lab,
//! which first kills the emulators still running in them. A lab's drop
//! kills what still runs in its namespace. Traffic
//! never leaves the namespace.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use boot::{Emulator, HostConfig, Nic};

/// Address of the management interface inside the lab namespace.
pub const MGMT_IP: &str = "10.77.0.1";
const PREFIX: &str = "hvlab";

/// One lab namespace.
pub struct Lab {
    ns: String,
    taps: u32,
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Whether labs can be built here (root, and `ip netns` works).
pub fn available() -> bool {
    // SAFETY-free check: effective uid through `id -u`.
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// Removes lab namespaces whose creating process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Its emulators outlive a harness that aborted (the dev profile
            // panics by aborting, so no Drop ran): stop them first, or they
            // keep their RAM and the cores.
            kill_all_in(name);
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Kills every process still running in namespace `ns` (emulators, and
/// the host-side clients a test forked to hold connections). Through
/// bash's `kill` builtin: a fresh machine may lack procps.
fn kill_all_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return };
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
    if !pids.is_empty() {
        let _ = Command::new("bash").arg("-c").arg(format!("kill -KILL {} 2>/dev/null", pids.join(" "))).status();
    }
}

impl Lab {
    /// Creates a lab namespace with its bridge and management interface.
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let ns = format!("{PREFIX}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &ns])?;
        let lab = Lab { ns, taps: 0 };
        lab.ip(&["link", "set", "lo", "up"])?;
        lab.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["link", "set", "br0", "up"])?;
        lab.ip(&["link", "add", "mgmt0", "type", "veth", "peer", "name", "mgmt0p"])?;
        lab.ip(&["link", "set", "mgmt0p", "master", "br0", "up"])?;
        lab.ip(&["addr", "add", &format!("{MGMT_IP}/24"), "dev", "mgmt0"])?;
        lab.ip(&["link", "set", "mgmt0", "up"])?;
        Ok(lab)
    }

    /// The namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Runs `ip -n NS ...`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["netns", "exec", &self.ns]).args(cmd))
    }

    /// Adds a TAP port to the bridge and returns `base` (a QEMU or a Bochs
    /// configuration) set to run in the namespace with an e1000 on that
    /// TAP. Host `n` gets MAC 52:54:00:77:00:0n. QEMU then has its console
    /// on a Unix socket; Bochs keeps TCP, to a listener the harness opens
    /// inside the namespace (`boot::tcp_listener_in_netns`). Bochs frames
    /// are at most 1514 bytes, so [`Lab::set_mtu`] above 1500 is for QEMU
    /// labs only.
    pub fn host(&mut self, base: &HostConfig) -> Result<HostConfig> {
        self.taps += 1;
        let tap = format!("tap{}", self.taps);
        self.ip(&["tuntap", "add", &tap, "mode", "tap"])?;
        self.ip(&["link", "set", &tap, "master", "br0", "up"])?;
        let mac = format!("52:54:00:77:00:{:02x}", self.taps);
        let mut config = base.clone();
        // A gdbstub per QEMU host for scripts/guest-profile.py.
        if let (Ok(dir), Emulator::Qemu) = (std::env::var("LAB_GDB"), config.emulator) {
            config.qemu_args.extend([String::from("-gdb"), format!("unix:{dir}/{tap}.sock,server=on,wait=off")]);
        }
        Ok(HostConfig { nic: Some(Nic::Tap { ifname: tap, mac }), netns: Some(self.ns.clone()), ..config })
    }

    /// Frames the switch dropped toward host `n` so far: its TAP's queue
    /// was full because the host's emulator did not read them in time.
    pub fn tap_drops(&self, n: u32) -> Result<u64> {
        let out = self.ip(&["-s", "-j", "link", "show", &format!("tap{n}")])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link show")?;
        v[0]["stats64"]["tx"]["dropped"].as_u64().context("no tx dropped counter")
    }

    /// Sets the MTU of the bridge, its ports and the management interface.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        let mut ifs = vec![String::from("mgmt0"), String::from("mgmt0p")];
        ifs.extend((1..=self.taps).map(|n| format!("tap{n}")));
        ifs.push(String::from("br0"));
        for i in ifs {
            self.ip(&["link", "set", &i, "mtu", &mtu])?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The hosts' own Drop stopped their emulators; a client a test
        // forked (or left behind by failing) would outlive the namespace.
        kill_all_in(&self.ns);
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

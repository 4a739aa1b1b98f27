//! Shared harness for the integration tests: builds the images once per test
//! binary, boots hosts, and waits for their consoles.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub mod lab;

use anyhow::{bail, Context, Result};
pub use boot::{Console, Emulator, Firmware, Host, HostConfig, Images};

/// Budget for one console reply under QEMU TCG.
pub const REPLY: Duration = Duration::from_secs(20);
/// Budget for a host to boot to "hypervisor ready".
pub const BOOT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The boot images, built (once per test binary) by `scripts/build.sh`;
/// or, when `HV_IMAGES` names a directory, the images already in it (a
/// copy of `target/images` from another build, to compare two builds).
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let out = match std::env::var_os("HV_IMAGES") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let status = Command::new(root().join("scripts/build.sh")).status().expect("running scripts/build.sh");
                assert!(status.success(), "scripts/build.sh failed: {status}");
                root().join("target/images")
            }
        };
        Images::at(&out.join("iso/boot/kernel.elf"), &out)
    })
}

/// Runs a console command in json mode and fails unless it answers `ok`
/// within `reply` (for the tools in `src/bin`, which report errors rather
/// than panic).
pub fn command(c: &mut Console, cmd: &str, reply: Duration) -> Result<serde_json::Value> {
    let v = c.json(cmd, reply)?;
    if v["ok"] != true {
        bail!("{cmd}: {}", v["error"]);
    }
    Ok(v)
}

/// Registers that no VM transition switches (x87/SSE, DR0-DR3, and on VT-x
/// CR2, KernelGsBase and CR8) are each guest's own: `vm regs` on VMs `p` and `q`, which must both
/// be running, each finding only what it loaded itself.
pub fn unswitched_registers_are_each_guests_own(c: &mut Console, p: &str, q: &str) -> Result<()> {
    registers_hold(c, p, 0, 1111, REPLY)?;
    registers_hold(c, q, 0, 2222, REPLY)?;
    registers_hold(c, p, 1111, 3333, REPLY)?;
    registers_hold(c, q, 2222, 4444, REPLY)
}

/// `vm regs vm next`: the running guest `vm` finds `want` in XMM0, DR0,
/// CR2 and KernelGsBase and its low 4 bits in CR8, then loads `next` into
/// each (its low 4 bits into CR8). `reply` is the console's budget (the
/// guest runs for the answer).
pub fn registers_hold(c: &mut Console, vm: &str, want: u64, next: u64, reply: Duration) -> Result<()> {
    let r = command(c, &format!("vm regs {vm} {next}"), reply)?;
    if r["done"] != true {
        bail!("vm regs {vm} did not finish: {r}");
    }
    for (reg, want) in [("xmm0", want), ("dr0", want), ("cr2", want), ("kernel_gs_base", want), ("cr8", want & 0xF)] {
        if r[reg] != want {
            bail!("{vm} found {reg} = {} instead of {want}: {r}", r[reg]);
        }
    }
    Ok(())
}

/// `vm trap vm` on a running guest whose traps so far number `before`: a
/// #DB exits (a guest's endless chain of them would otherwise hold the CPU
/// without one exit: CVE-2015-8104) and is reflected back to the guest's
/// own handler with DR6.BS, and DR6.BD (which the guest set before, and no
/// #DB clears: SDM Vol. 3B 18.2.3) still set; a CPUID single-stepped
/// traps right after itself, as if it had run in the guest (its exit ends
/// the instruction, and the hypervisor owes the #DB). Returns the reply.
pub fn single_steps_reach_the_guests_handler(c: &mut Console, vm: &str, before: u64) -> Result<serde_json::Value> {
    let r = command(c, &format!("vm trap {vm}"), REPLY)?;
    let dr6 = r["guest_dr6"].as_u64().unwrap_or(0);
    if r["done"] != true || r["guest_traps"] != before + 2 {
        bail!("{vm}: the guest's #DB handler did not run twice: {r}");
    }
    if r["exception_exits"] != 1 {
        bail!("{vm}: the #DB did not exit to the hypervisor once (or one whose delivery an exit cut short was lost, and the guest single-stepped on): {r}");
    }
    if dr6 & (1 << 14) == 0 || dr6 & (1 << 13) == 0 {
        bail!("{vm}: DR6 lacks BS or BD for the handler: {r}");
    }
    if r["guest_trap_rip"] != r["trap_rip_wanted"] {
        bail!("{vm}: the single step over CPUID trapped elsewhere than right after it: {r}");
    }
    Ok(r)
}

/// `vm insns vm`: the running guest runs INVD, WBINVD, RDPMC, RDTSCP,
/// MONITOR, MWAIT and XSETBV (with CR4.OSXSAVE set), and sets CR4.VMXE,
/// which must be answered as by a CPU whose CPUID
/// offers nothing (the guest's reads zeros): the cache flushes do nothing,
/// RDPMC finds no counter (#GP), the others do not exist (#UD), VMXE is
/// reserved (#GP: VT-x exits on it, AMD raises it itself). INVD,
/// WBINVD and RDPMC must each exit once, so none reaches the host's caches
/// or counters (QEMU 7.2 reports INVD as WBINVD); the others raise #UD
/// either on their own (an emulator whose CPU lacks them, VT-x's RDTSCP
/// without its control) or after their exit. XSETBV must exit once too.
/// `left_out` names those the emulator cannot answer so, which are not
/// checked (QEMU 7.2: RDTSCP, checked against the RDTSC intercept, XSETBV,
/// checked against none, and CR4.VMXE, which it takes and then fails the
/// next VMRUN, so the guest does not try it there: README, "Learned this
/// time"). Returns the reply.
pub fn instructions_are_answered_as_cpuid_says(
    c: &mut Console,
    vm: &str,
    left_out: &[&str],
) -> Result<serde_json::Value> {
    let r = command(c, &format!("vm insns {vm}"), REPLY)?;
    if r["done"] != true {
        bail!("vm insns {vm} did not finish: {r}");
    }
    let want = [
        ("invd", "none"),
        ("wbinvd", "none"),
        ("rdpmc", "#GP"),
        ("rdtscp", "#UD"),
        ("monitor", "#UD"),
        ("mwait", "#UD"),
        ("xsetbv", "#UD"),
        ("mov_cr4_vmxe", "#GP"),
    ];
    let exits = |insn: &str| r["exits"][insn].as_u64().unwrap_or(u64::MAX);
    for (insn, raised) in want.into_iter().filter(|(insn, _)| !left_out.contains(insn)) {
        if r["raised"][insn] != raised {
            bail!("{vm}: {insn} raised {} instead of {raised}: {r}", r["raised"][insn]);
        }
        let limit = if matches!(insn, "invd" | "wbinvd") { 2 } else { 1 };
        if exits(insn) > limit {
            bail!("{vm}: {insn} exited {} times: {r}", exits(insn));
        }
    }
    let xsetbv = left_out.contains(&"xsetbv") || exits("xsetbv") == 1;
    if exits("invd") + exits("wbinvd") != 2 || exits("rdpmc") != 1 || !xsetbv {
        bail!("{vm}: INVD, WBINVD, RDPMC and XSETBV must each exit once: {r}");
    }
    Ok(r)
}

/// The receiver's result of the `net bench` transfer of `mib` MiB that has
/// just been sent to it, once it has one (it records it after draining its
/// buffer and seeing the FIN): its MB/s, after checking that all the bytes
/// arrived intact. `net bench listen` clears the previous result, so a
/// result read here is this transfer's.
pub fn bench_result(c: &mut Console, mib: u64) -> Result<f64> {
    let start = std::time::Instant::now();
    let r = loop {
        let r = c.json("net bench result", REPLY)?;
        if r["ok"] == true || start.elapsed() > std::time::Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if r["ok"] != true || r["bytes"].as_u64() != Some(mib << 20) || r["intact"] != true {
        bail!("net bench result after {mib} MiB: {r}");
    }
    r["mb_per_s"].as_str().and_then(|s| s.parse().ok()).context("net bench result without mb_per_s")
}

/// A QEMU host with room for a guest of `guest_mib`, its copy's page
/// tables, and the host's heap (for migrations in the lab).
pub fn qemu_for_guest(guest_mib: u64) -> Result<HostConfig> {
    let mem_mib = u32::try_from((512 + guest_mib * 3 / 2).next_multiple_of(256))?;
    Ok(HostConfig { mem_mib, ..qemu(Firmware::Bios) })
}

/// Boots a host, waits for "hypervisor ready" and switches it to json mode.
///
/// An emulator that exits before the kernel printed a single line is
/// started once more, its log printed; a second such exit fails with it.
/// A CI run saw Bochs quit that way once (see the lock below).
pub fn boot_json(config: &HostConfig) -> Result<Host> {
    let with_log = |e: anyhow::Error, host: &Host| match host.emulator_log_tail(20) {
        Some(log) => e.context(format!("emulator log, last lines:\n{log}")),
        None => e,
    };
    // Bochs hosts start one at a time: Bochs 2.7's RFB display sets
    // SO_REUSEADDR, so two starting together can both bind port 5900;
    // the one whose listen() then fails tries the next ports on the same,
    // already bound socket, fails them all and panics ("RFB could not
    // bind any port"), after its COM1 had connected.
    static BOCHS_START: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = (config.emulator == boot::Emulator::Bochs)
        .then(|| BOCHS_START.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    let mut host = Host::launch(images(), config)?;
    if let Err(e) = boot::wait_ready(host.console(), BOOT) {
        let e = with_log(e, &host);
        if !host.console().transcript.is_empty() {
            return Err(e);
        }
        eprintln!("emulator exited before the kernel printed anything, starting it again: {e:#}");
        drop(host);
        host = Host::launch(images(), config)?;
        if let Err(e) = boot::wait_ready(host.console(), BOOT) {
            return Err(with_log(e, &host));
        }
    }
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

/// Polls `migrate status` on the source's console every `every` until the
/// migration has ended (`done`, `failed` or `in_doubt`) and returns that
/// report, printing each new stage on the way. Panics after `limit` or on
/// a console that does not answer within `reply`.
pub fn wait_migration(c: &mut Console, limit: Duration, reply: Duration, every: Duration) -> serde_json::Value {
    let start = std::time::Instant::now();
    let mut last_stage = String::new();
    loop {
        let s = c.json("migrate status", reply).unwrap_or_else(|e| panic!("migrate status: {e:#}"));
        assert_eq!(s["ok"], true, "migrate status: {s}");
        let stage = s["stage"].as_str().unwrap_or("").to_string();
        if ["done", "failed", "in_doubt"].contains(&stage.as_str()) {
            return s;
        }
        if stage != last_stage {
            println!("[{:>6.1} s] migrate status: {s}", start.elapsed().as_secs_f64());
            last_stage = stage;
        }
        assert!(start.elapsed() < limit, "migration still running after {limit:?}: {s}");
        std::thread::sleep(every);
    }
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

//! The console shell: parses one command line, runs it against the [`Host`],
//! and renders the reply for people (`mode human`) or scripts (`mode json`,
//! exactly one JSON object per line with `"ok": true|false`).
//!
//! The shell is plain logic over the `Host` trait, so every command and every
//! error reply is tested on the host; the kernel implements `Host` over the
//! real machine.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

use log::LevelFilter;
use vmx::cpu::CpuReport;

use crate::json::{human_value, Obj, Value};
use crate::line::{Event, MAX_LINE};
use crate::migcmd::{self, MigrateCommand};
use crate::netcmd::{self, NetCommand};
use crate::vmcmd::{self, VmCommand};

/// Where the CPU's time went, for `uptime`: the kernel adds to each as it
/// works. Time in none of them (console, bookkeeping) is the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// Running VM time slices.
    pub vms_us: u64,
    /// Moving frames: the driver and the TCP/IP stack.
    pub network_us: u64,
    /// Migration engines and their sockets' buffers.
    pub migration_us: u64,
    /// Halted, waiting for an interrupt.
    pub idle_us: u64,
}

/// Which implementation of each hot routine the kernel picked at boot by
/// timing the candidates (for `cpuinfo`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routines {
    /// `memcpy` and friends: `rep movsb` or `8-byte loop`.
    pub memcpy: &'static str,
    /// The migration CRC32C: `crc32 instruction` or `tables`.
    pub crc32c: &'static str,
    /// TSC cycles for a 64 KiB CRC32C with the instruction (0 without SSE4.2).
    pub crc32c_instruction_cycles: u64,
    /// The same with the portable tables.
    pub crc32c_tables_cycles: u64,
}

/// Memory figures for `mem`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// Usable RAM the boot loader reported, in bytes.
    pub total_bytes: u64,
    /// Physical memory not yet allocated, in bytes.
    pub free_bytes: u64,
    /// Size of the kernel heap, in bytes.
    pub heap_bytes: u64,
    /// Heap bytes in use.
    pub heap_used_bytes: u64,
}

/// What the shell needs from the machine it runs on.
pub trait Host {
    /// The processor report taken at boot.
    fn cpu(&self) -> &CpuReport;
    /// Logical processors found in the ACPI MADT (1 when there is no MADT).
    fn processors(&self) -> u32;
    /// The routines chosen at boot.
    fn routines(&self) -> Routines;
    /// Calibrated TSC frequency in Hz.
    fn tsc_hz(&self) -> u64;
    /// How the kernel was booted: `bios`, `uefi` or `multiboot2`.
    fn boot_route(&self) -> &'static str;
    /// Current memory figures.
    fn memory(&self) -> MemInfo;
    /// Microseconds since the clock was calibrated at boot.
    fn uptime_us(&self) -> u64;
    /// Where the CPU's time went since boot.
    fn cpu_time(&self) -> CpuTime;
    /// Runs a `vm` command.
    fn vm(&mut self, cmd: VmCommand) -> Result<Reply, String>;
    /// Runs a network command.
    fn net(&mut self, cmd: NetCommand) -> Result<Reply, String>;
    /// Runs a `migrate` command.
    fn migrate(&mut self, cmd: MigrateCommand) -> Result<Reply, String>;
}

/// Something the kernel must do after printing the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Power the machine off.
    Shutdown,
    /// Raise a CPU exception on purpose (hidden `fault` command), to prove
    /// that faults are reported and never become silent triple faults.
    Fault(Fault),
}

/// Exceptions the hidden `fault` command can raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `int3`: reported, then the kernel carries on.
    Breakpoint,
    /// `ud2`: reported, kernel halts.
    InvalidOpcode,
    /// A read of an unmapped address: reported with CR2, kernel halts.
    PageFault,
}

/// How replies are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Prose and `key: value` lines, with a prompt and echo.
    Human,
    /// One JSON object per reply line; no prompt, no echo.
    Json,
}

/// A successful reply: the data, and optionally a nicer text for people.
#[derive(Debug)]
pub struct Reply {
    /// The reply's fields (the JSON object without `ok`).
    pub data: Obj,
    /// Human-mode text; when `None`, the fields are printed one per line.
    pub human: Option<String>,
}

impl Reply {
    /// A reply printed as its fields in human mode.
    pub fn data(data: Obj) -> Self {
        Reply { data, human: None }
    }
}

/// What one command produced.
#[derive(Debug)]
pub struct Output {
    /// Text to print, already rendered for the current mode, lines ending in
    /// `\r\n`. Empty for an empty command line.
    pub text: String,
    /// What the kernel must do next, if anything.
    pub action: Option<Action>,
}

/// The commands, with usage and a one-line description (what `help` prints).
pub const COMMANDS: &[(&str, &str)] = &[
    ("help", "list the commands"),
    ("version", "name and version of this hypervisor"),
    ("cpuinfo", "processor and virtualization features"),
    ("mem", "physical memory and heap usage"),
    ("uptime", "time since boot"),
    ("log [off|error|warn|info|debug|trace]", "show or set the log level"),
    ("mode [human|json]", "show or set the reply format"),
    ("shutdown", "power off (exits the emulator)"),
];

const LEVELS: [(&str, LevelFilter); 6] = [
    ("off", LevelFilter::Off),
    ("error", LevelFilter::Error),
    ("warn", LevelFilter::Warn),
    ("info", LevelFilter::Info),
    ("debug", LevelFilter::Debug),
    ("trace", LevelFilter::Trace),
];

/// Shell state: only the reply mode.
#[derive(Debug)]
pub struct Shell {
    mode: Mode,
}

impl Default for Shell {
    fn default() -> Self {
        Self::new()
    }
}

impl Shell {
    /// A shell in human mode.
    pub fn new() -> Self {
        Shell { mode: Mode::Human }
    }

    /// The current reply mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The prompt to print before reading a line (none in json mode).
    pub fn prompt(&self) -> &'static str {
        match self.mode {
            Mode::Human => "hv> ",
            Mode::Json => "",
        }
    }

    /// Handles one event from the line editor.
    pub fn handle(&mut self, event: Event, host: &mut dyn Host) -> Output {
        match event {
            Event::Line(line) => self.execute(&line, host),
            Event::TooLong => self.reply_only(Err(format!("line too long (at most {MAX_LINE} bytes)"))),
            Event::Binary(b) => self.reply_only(Err(format!("line holds a non-printable byte 0x{b:02x}; ignored"))),
            Event::Cancelled => Output { text: String::new(), action: None },
        }
    }

    /// Parses and runs one command line.
    pub fn execute(&mut self, line: &str, host: &mut dyn Host) -> Output {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return Output { text: String::new(), action: None };
        };
        let mut action = None;
        let result = match cmd {
            "help" => no_args(cmd, args).map(|()| help()),
            "version" => no_args(cmd, args).map(|()| version()),
            "cpuinfo" => no_args(cmd, args).map(|()| cpuinfo(host)),
            "mem" => no_args(cmd, args).map(|()| mem(host.memory())),
            "uptime" => no_args(cmd, args).map(|()| uptime(host.uptime_us(), host.cpu_time())),
            "log" => log_level(args),
            "mode" => self.set_mode(args),
            "shutdown" => no_args(cmd, args).map(|()| {
                action = Some(Action::Shutdown);
                Reply::data(Obj::new().with("shutdown", true))
            }),
            "vm" => vmcmd::parse(args).and_then(|cmd| host.vm(cmd)),
            "net" => netcmd::parse_net(args).and_then(|cmd| host.net(cmd)),
            "ping" => netcmd::parse_ping(args).and_then(|cmd| host.net(cmd)),
            "migrate" => migcmd::parse(args).and_then(|cmd| host.migrate(cmd)),
            "fault" => fault(args).map(|(f, reply)| {
                action = Some(Action::Fault(f));
                reply
            }),
            other => Err(format!("unknown command '{}'; type 'help' for the list", truncate(other))),
        };
        Output { text: self.render(result), action }
    }

    fn reply_only(&self, result: Result<Reply, String>) -> Output {
        Output { text: self.render(result), action: None }
    }

    fn set_mode(&mut self, args: &[&str]) -> Result<Reply, String> {
        match args {
            [] => {}
            ["human"] => self.mode = Mode::Human,
            ["json"] => self.mode = Mode::Json,
            _ => return Err(String::from("usage: mode [human|json]")),
        }
        let name = if self.mode == Mode::Json { "json" } else { "human" };
        Ok(Reply::data(Obj::new().with("mode", name)))
    }

    /// Renders a reply in the current mode.
    pub fn render(&self, result: Result<Reply, String>) -> String {
        let mut out = String::new();
        match (self.mode, result) {
            (Mode::Json, Ok(reply)) => {
                let mut obj = Obj::new().with("ok", true);
                obj.0.extend(reply.data.0);
                out.push_str(&obj.to_json());
                out.push_str("\r\n");
            }
            (Mode::Json, Err(e)) => {
                out.push_str(&Obj::new().with("ok", false).with("error", e).to_json());
                out.push_str("\r\n");
            }
            (Mode::Human, Ok(Reply { human: Some(text), .. })) => {
                for l in text.lines() {
                    out.push_str(l);
                    out.push_str("\r\n");
                }
            }
            (Mode::Human, Ok(Reply { data, human: None })) => {
                for (k, v) in &data.0 {
                    out.push_str(k);
                    out.push_str(": ");
                    human_value(&mut out, v);
                    out.push_str("\r\n");
                }
            }
            (Mode::Human, Err(e)) => {
                out.push_str("error: ");
                out.push_str(&e);
                out.push_str("\r\n");
            }
        }
        out
    }
}

/// Keeps echoed user input in error messages short.
fn truncate(s: &str) -> &str {
    let end = s.char_indices().nth(32).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

fn no_args(cmd: &str, args: &[&str]) -> Result<(), String> {
    if args.is_empty() {
        Ok(())
    } else {
        Err(format!("'{cmd}' takes no arguments"))
    }
}

fn help() -> Reply {
    let mut text = String::from("commands:\n");
    for (usage, about) in COMMANDS.iter().chain(vmcmd::USAGE).chain(netcmd::USAGE).chain(migcmd::USAGE) {
        let _ = writeln!(text, "  {usage:<40} {about}");
    }
    let list: Vec<Value> = COMMANDS
        .iter()
        .chain(vmcmd::USAGE)
        .chain(netcmd::USAGE)
        .chain(migcmd::USAGE)
        .map(|(usage, about)| Obj::new().with("usage", *usage).with("about", *about).into())
        .collect();
    Reply { data: Obj::new().with("commands", Value::Arr(list)), human: Some(text) }
}

fn version() -> Reply {
    Reply::data(
        Obj::new()
            .with("name", env!("CARGO_PKG_NAME"))
            .with("version", env!("CARGO_PKG_VERSION"))
            .with("git", option_env!("HV_GIT_REV").unwrap_or("unknown")),
    )
}

fn cpuinfo(host: &dyn Host) -> Reply {
    let (c, r) = (host.cpu(), host.routines());
    let invept = match (c.vmx && c.slat, c.invept_single) {
        (false, _) => "none",
        (true, true) => "single",
        (true, false) => "all",
    };
    Reply::data(
        Obj::new()
            .with("vendor", c.vendor_str())
            .with("brand", c.brand_str())
            .with("family", c.family)
            .with("model", c.model)
            .with("stepping", c.stepping)
            .with("processors", host.processors())
            .with("tsc_hz", host.tsc_hz())
            .with("boot", host.boot_route())
            .with("backend", c.backend().as_str())
            .with("vmx", c.vmx)
            .with("svm", c.svm)
            .with("ept", c.vmx && c.slat)
            .with("npt", c.svm && !c.vmx && c.slat)
            .with("ept_ad", c.ept_ad)
            .with("invept", invept)
            .with("pml", c.pml)
            .with("vpid", c.vpid)
            .with("asids", if c.vmx { 0 } else { c.tlb_tags })
            .with("tlb_tags", c.tlb_tags)
            .with("unrestricted_guest", c.unrestricted_guest)
            .with("svm_revision", c.svm_revision)
            .with("nrip_save", c.nrip_save)
            .with("memcpy", r.memcpy)
            .with("crc32c", r.crc32c)
            .with(
                "crc32c_cycles_64k",
                Obj::new().with("instruction", r.crc32c_instruction_cycles).with("tables", r.crc32c_tables_cycles),
            ),
    )
}

fn mib(bytes: u64) -> String {
    format!("{}.{:01} MiB", bytes >> 20, ((bytes & 0xF_FFFF) * 10) >> 20)
}

fn mem(m: MemInfo) -> Reply {
    let human = format!(
        "total: {}\nfree:  {}\nheap:  {} used of {}",
        mib(m.total_bytes),
        mib(m.free_bytes),
        mib(m.heap_used_bytes),
        mib(m.heap_bytes)
    );
    Reply {
        data: Obj::new()
            .with("total_bytes", m.total_bytes)
            .with("free_bytes", m.free_bytes)
            .with("heap_bytes", m.heap_bytes)
            .with("heap_used_bytes", m.heap_used_bytes),
        human: Some(human),
    }
}

fn uptime(us: u64, cpu: CpuTime) -> Reply {
    let secs = |us: u64| format!("{}.{:03}", us / 1_000_000, us % 1_000_000 / 1000);
    let human = format!(
        "up {}.{:06} s; cpu: vms {} s, network {} s, migration {} s, idle {} s",
        us / 1_000_000,
        us % 1_000_000,
        secs(cpu.vms_us),
        secs(cpu.network_us),
        secs(cpu.migration_us),
        secs(cpu.idle_us)
    );
    let data = Obj::new().with("uptime_us", us).with(
        "cpu",
        Obj::new()
            .with("vms_us", cpu.vms_us)
            .with("network_us", cpu.network_us)
            .with("migration_us", cpu.migration_us)
            .with("idle_us", cpu.idle_us),
    );
    Reply { data, human: Some(human) }
}

/// Hidden test command: `fault bp|ud|pf`.
fn fault(args: &[&str]) -> Result<(Fault, Reply), String> {
    let f = match args {
        ["bp"] => Fault::Breakpoint,
        ["ud"] => Fault::InvalidOpcode,
        ["pf"] => Fault::PageFault,
        _ => return Err(String::from("usage: fault bp|ud|pf")),
    };
    Ok((f, Reply::data(Obj::new().with("fault", args[0]))))
}

fn log_level(args: &[&str]) -> Result<Reply, String> {
    let usage = || String::from("usage: log [off|error|warn|info|debug|trace]");
    match args {
        [] => {}
        [name] => {
            let (_, level) = LEVELS.iter().find(|(n, _)| n == name).ok_or_else(usage)?;
            log::set_max_level(*level);
        }
        _ => return Err(usage()),
    }
    let current = log::max_level();
    let name = LEVELS.iter().find(|(_, l)| *l == current).map_or("?", |(n, _)| n);
    Ok(Reply::data(Obj::new().with("level", name.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost(CpuReport);

    impl Host for FakeHost {
        fn cpu(&self) -> &CpuReport {
            &self.0
        }
        fn routines(&self) -> Routines {
            Routines {
                memcpy: "8-byte loop",
                crc32c: "tables",
                crc32c_instruction_cycles: 900_000,
                crc32c_tables_cycles: 150_000,
            }
        }
        fn processors(&self) -> u32 {
            2
        }
        fn tsc_hz(&self) -> u64 {
            2_100_000_000
        }
        fn boot_route(&self) -> &'static str {
            "bios"
        }
        fn memory(&self) -> MemInfo {
            MemInfo { total_bytes: 512 << 20, free_bytes: 400 << 20, heap_bytes: 16 << 20, heap_used_bytes: 1 << 20 }
        }
        fn uptime_us(&self) -> u64 {
            3_000_042
        }
        fn cpu_time(&self) -> CpuTime {
            CpuTime { vms_us: 1_500_000, network_us: 250_000, migration_us: 125_000, idle_us: 1_000_042 }
        }
        fn net(&mut self, cmd: NetCommand) -> Result<Reply, String> {
            Err(format!("no NIC for {cmd:?}"))
        }
        fn migrate(&mut self, cmd: MigrateCommand) -> Result<Reply, String> {
            Err(format!("no migration for {cmd:?}"))
        }
        fn vm(&mut self, cmd: VmCommand) -> Result<Reply, String> {
            match cmd {
                VmCommand::List => Ok(Reply::data(Obj::new().with("vms", Vec::<u8>::new()))),
                other => Err(format!("no VM for {other:?}")),
            }
        }
    }

    fn host() -> FakeHost {
        let mut cpu = CpuReport { svm: true, slat: true, tlb_tags: 16, svm_revision: 1, ..CpuReport::default() };
        cpu.vendor.copy_from_slice(b"AuthenticAMD");
        FakeHost(cpu)
    }

    fn json(shell: &mut Shell, line: &str) -> String {
        if shell.mode() != Mode::Json {
            shell.execute("mode json", &mut host());
        }
        shell.execute(line, &mut host()).text
    }

    #[test]
    fn json_replies_are_exactly_one_line_with_ok() {
        let mut sh = Shell::new();
        for cmd in ["help", "version", "cpuinfo", "mem", "uptime", "log", "mode", "nonsense", "log loud", "mem 1"] {
            let out = json(&mut sh, cmd);
            assert!(out.ends_with("\r\n"), "{cmd}: {out}");
            assert_eq!(out.matches("\r\n").count(), 1, "{cmd}: {out}");
            assert!(out.starts_with("{\"ok\":"), "{cmd}: {out}");
        }
    }

    #[test]
    fn cpuinfo_reports_svm_with_npt() {
        let mut sh = Shell::new();
        let out = json(&mut sh, "cpuinfo");
        for field in [
            r#""vendor":"AuthenticAMD""#,
            r#""svm":true"#,
            r#""npt":true"#,
            r#""ept":false"#,
            r#""asids":16"#,
            r#""backend":"svm""#,
            r#""processors":2"#,
            r#""tsc_hz":2100000000"#,
            r#""crc32c":"tables""#,
            r#""crc32c_cycles_64k":{"instruction":900000,"tables":150000}"#,
        ] {
            assert!(out.contains(field), "{field} missing in {out}");
        }
    }

    #[test]
    fn unknown_command_is_a_clear_error() {
        let mut sh = Shell::new();
        let out = sh.execute("frobnicate now", &mut host()).text;
        assert_eq!(out, "error: unknown command 'frobnicate'; type 'help' for the list\r\n");
        assert_eq!(
            json(&mut sh, "frobnicate"),
            "{\"ok\":false,\"error\":\"unknown command 'frobnicate'; type 'help' for the list\"}\r\n"
        );
    }

    #[test]
    fn bad_arguments_change_nothing() {
        let mut sh = Shell::new();
        assert!(sh.execute("mode xml", &mut host()).text.starts_with("error: usage: mode"));
        assert_eq!(sh.mode(), Mode::Human);
        let before = log::max_level();
        assert!(sh.execute("log loud", &mut host()).text.starts_with("error: usage: log"));
        assert!(sh.execute("log warn info", &mut host()).text.starts_with("error: usage: log"));
        assert_eq!(log::max_level(), before);
        assert_eq!(sh.execute("uptime now", &mut host()).text, "error: 'uptime' takes no arguments\r\n");
    }

    #[test]
    fn log_sets_the_level() {
        let mut sh = Shell::new();
        assert_eq!(json(&mut sh, "log debug"), "{\"ok\":true,\"level\":\"debug\"}\r\n");
        assert_eq!(log::max_level(), LevelFilter::Debug);
        assert_eq!(json(&mut sh, "log"), "{\"ok\":true,\"level\":\"debug\"}\r\n");
    }

    #[test]
    fn shutdown_asks_for_the_action_after_replying() {
        let mut sh = Shell::new();
        let out = sh.execute("shutdown", &mut host());
        assert_eq!(out.action, Some(Action::Shutdown));
        assert_eq!(out.text, "shutdown: true\r\n");
        assert_eq!(sh.execute("shutdown now", &mut host()).action, None);
    }

    #[test]
    fn hidden_fault_command_asks_for_the_fault() {
        let mut sh = Shell::new();
        assert_eq!(sh.execute("fault pf", &mut host()).action, Some(Action::Fault(Fault::PageFault)));
        assert_eq!(sh.execute("fault bp", &mut host()).action, Some(Action::Fault(Fault::Breakpoint)));
        let bad = sh.execute("fault xx", &mut host());
        assert_eq!((bad.action, bad.text.as_str()), (None, "error: usage: fault bp|ud|pf\r\n"));
        assert!(!sh.execute("help", &mut host()).text.contains("fault bp"));
    }

    #[test]
    fn editor_errors_become_replies() {
        let mut sh = Shell::new();
        assert_eq!(sh.handle(Event::TooLong, &mut host()).text, "error: line too long (at most 256 bytes)\r\n");
        sh.execute("mode json", &mut host());
        let out = sh.handle(Event::Binary(0xff), &mut host()).text;
        assert_eq!(out, "{\"ok\":false,\"error\":\"line holds a non-printable byte 0xff; ignored\"}\r\n");
        assert!(sh.handle(Event::Cancelled, &mut host()).text.is_empty());
    }

    #[test]
    fn vm_commands_reach_the_host_after_parsing() {
        let mut sh = Shell::new();
        assert_eq!(json(&mut sh, "vm list"), "{\"ok\":true,\"vms\":[]}\r\n");
        let out = json(&mut sh, "vm create x mem=3");
        assert!(out.contains("\"ok\":false") && out.contains("from 16 to 4096"), "{out}");
        let out = json(&mut sh, "vm start x");
        assert!(out.contains("no VM for Start"), "{out}");
        assert!(sh.execute("help", &mut host()).text.contains("vm create <name> mem=<MiB>"));
    }

    #[test]
    fn empty_line_prints_nothing() {
        let mut sh = Shell::new();
        assert!(sh.execute("   ", &mut host()).text.is_empty());
    }

    #[test]
    fn human_mem_and_uptime_read_well() {
        let mut sh = Shell::new();
        assert_eq!(
            sh.execute("uptime", &mut host()).text,
            "up 3.000042 s; cpu: vms 1.500 s, network 0.250 s, migration 0.125 s, idle 1.000 s\r\n"
        );
        let mem = sh.execute("mem", &mut host()).text;
        assert!(mem.contains("total: 512.0 MiB") && mem.contains("heap:  1.0 MiB used of 16.0 MiB"), "{mem}");
    }

    #[test]
    fn long_unknown_command_is_truncated_in_the_error() {
        let mut sh = Shell::new();
        let long = "x".repeat(200);
        assert!(sh.execute(&long, &mut host()).text.len() < 100);
    }
}

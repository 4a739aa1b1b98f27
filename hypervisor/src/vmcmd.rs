//! Parsing of the `vm` console commands into a [`VmCommand`]; the kernel's VM
//! manager executes them. Every bad name, number or option is refused here
//! with a message that says what was expected.

use alloc::format;
use alloc::string::{String, ToString};

use vmx::cpu::{Backend, CpuReport};

use crate::guest::{Workload, MAX_MEM_MIB, MIN_MEM_MIB};

/// Longest VM name (the migration protocol's limit).
pub use migration::record::MAX_NAME;
/// Highest accepted `rate=` (page writes per second).
pub const MAX_RATE: u64 = 10_000_000;

/// How a VM's dirty pages are tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// Not tracking.
    Off,
    /// Second-level D bits, harvested by test-and-clear.
    Dbit,
    /// Write protection: the first write to each page after a harvest exits.
    Wp,
    /// Intel page-modification logging.
    Pml,
}

impl DirtyMode {
    /// Console name.
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyMode::Off => "off",
            DirtyMode::Dbit => "dbit",
            DirtyMode::Wp => "wp",
            DirtyMode::Pml => "pml",
        }
    }

    /// The mode a VM gets when none was chosen (and for migration): PML,
    /// else second-level D bits, else write protection. AMD's nested paging
    /// always sets D bits; EPT only with its accessed/dirty flags, and an
    /// EPT without them would never report a page dirty.
    pub fn best_for(cpu: &CpuReport) -> Self {
        if DirtyMode::Pml.supported_by(cpu).is_ok() {
            DirtyMode::Pml
        } else if DirtyMode::Dbit.supported_by(cpu).is_ok() {
            DirtyMode::Dbit
        } else {
            DirtyMode::Wp
        }
    }

    /// Whether this processor can track dirty pages this way, and if not,
    /// what to use instead.
    pub fn supported_by(self, cpu: &CpuReport) -> Result<(), String> {
        let vmx = cpu.backend() == Backend::Vmx;
        match self {
            DirtyMode::Pml if !(vmx && cpu.pml) => {
                Err(String::from("pml needs Intel VT-x with page-modification logging; use dbit or wp"))
            }
            DirtyMode::Dbit if vmx && !cpu.ept_ad => {
                Err(String::from("dbit needs EPT accessed/dirty flags, which this CPU lacks; use wp"))
            }
            _ => Ok(()),
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "dbit" => Ok(DirtyMode::Dbit),
            "wp" => Ok(DirtyMode::Wp),
            "pml" => Ok(DirtyMode::Pml),
            "off" => Ok(DirtyMode::Off),
            _ => Err(format!("bad dirty mode '{s}': dbit, wp, pml or off")),
        }
    }
}

/// A parsed `vm` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmCommand {
    /// `vm create <name> mem=<MiB> [workload=...] [rate=...]`
    Create {
        /// Name.
        name: String,
        /// Memory in MiB.
        mem_mib: u64,
        /// Workload.
        workload: Workload,
        /// Page writes per second (0 = unlimited).
        rate: u64,
    },
    /// `vm start <name>`
    Start(String),
    /// `vm pause <name>`
    Pause(String),
    /// `vm resume <name> [force]` (`force`: also a VM in doubt after a
    /// migration, once the operator knows the destination does not run it)
    Resume(String, bool),
    /// `vm stop <name>`
    Stop(String),
    /// `vm destroy <name>`
    Destroy(String),
    /// `vm list`
    List,
    /// `vm info <name>`
    Info(String),
    /// `vm dirty <name> [dbit|wp|pml|off]`
    Dirty(String, Option<DirtyMode>),
    /// `vm verify <name>`
    Verify(String),
    /// `vm digest <name>`
    Digest(String),
    /// Hidden: `vm crash <name>` makes the guest triple-fault.
    Crash(String),
    /// Hidden: `vm break <name>` corrupts the vCPU's control state so the
    /// next VM entry fails (containment test for entry failures).
    Break(String),
    /// Hidden: `vm vmsave <name>` makes the guest run VMSAVE, which must
    /// exit (and stop the VM) rather than write host memory.
    Vmsave(String),
    /// Hidden: `vm ltr <name>` makes the guest load a TSS of its own, then
    /// reports the host's task register, which must still be its own.
    Ltr(String),
    /// Hidden: `vm trap <name>` makes the guest single-step into a #DB
    /// handler of its own; the #DB must exit to the hypervisor, which
    /// reflects it back.
    Trap(String),
    /// Hidden: `vm regs <name> <value>` makes the guest report XMM0, DR0,
    /// CR2 and KernelGsBase and then load `value` (not 0) into each: each
    /// guest must find its own.
    Regs(String, u64),
    /// Hidden: `vm dbchain <name>` makes the guest set off an endless
    /// chain of #DB exceptions; the host must go on regardless.
    Dbchain(String),
    /// Hidden: `vm insns <name>` makes the guest run INVD, WBINVD, RDPMC,
    /// RDTSCP, MONITOR and MWAIT and report what each raised: each must
    /// exit, and be answered as by a CPU whose CPUID offers nothing.
    Insns(String),
    /// Hidden: `vm poke <name> <page>` flips a word of data page `page`
    /// behind the guest's back, so that `vm verify` has a page to find.
    Poke(String, u64),
}

/// Usage lines for `help`.
pub const USAGE: &[(&str, &str)] = &[
    ("vm create <name> mem=<MiB> [workload=idle|sweep|random|hot:<pages>] [rate=<pages/s>]", "create a VM"),
    ("vm start|pause|resume|stop|destroy <name>", "VM lifecycle"),
    ("vm resume <name> force", "resume a VM in doubt after a migration (only if the peer does not run it)"),
    ("vm list", "all VMs"),
    ("vm info <name>", "state, memory, ticks, exits, dirty mode"),
    ("vm dirty <name> [dbit|wp|pml|off]", "harvest dirty pages now (and pick the mechanism)"),
    ("vm verify <name>", "the guest checks every page it stamped"),
    ("vm digest <name>", "hash of all guest memory"),
];

/// A VM name from the console: 1 to [`MAX_NAME`] letters, digits, '-' or
/// '_'.
pub(crate) fn name(s: Option<&&str>) -> Result<String, String> {
    let s = s.ok_or("missing VM name")?;
    if !migration::record::is_vm_name(s) {
        return Err(format!("bad VM name '{s}': 1-{MAX_NAME} letters, digits, '-' or '_'"));
    }
    Ok(s.to_string())
}

fn number(key: &str, v: &str) -> Result<u64, String> {
    v.parse::<u64>().map_err(|_| format!("{key}= needs a whole number, got '{v}'"))
}

/// Parses the words after `vm`.
pub fn parse(args: &[&str]) -> Result<VmCommand, String> {
    let usage = || String::from("usage: vm create|start|pause|resume|stop|destroy|list|info|dirty|verify|digest ...");
    let (&sub, rest) = args.split_first().ok_or_else(usage)?;
    let one = |f: fn(String) -> VmCommand| -> Result<VmCommand, String> {
        if rest.len() > 1 {
            return Err(format!("'vm {sub}' takes just a VM name"));
        }
        Ok(f(name(rest.first())?))
    };
    match sub {
        "create" => parse_create(rest),
        "start" => one(VmCommand::Start),
        "pause" => one(VmCommand::Pause),
        "resume" => match rest {
            [n] => Ok(VmCommand::Resume(name(Some(n))?, false)),
            [n, "force"] => Ok(VmCommand::Resume(name(Some(n))?, true)),
            _ => Err(String::from("usage: vm resume <name> [force]")),
        },
        "stop" => one(VmCommand::Stop),
        "destroy" => one(VmCommand::Destroy),
        "info" => one(VmCommand::Info),
        "verify" => one(VmCommand::Verify),
        "digest" => one(VmCommand::Digest),
        "crash" => one(VmCommand::Crash),
        "break" => one(VmCommand::Break),
        "vmsave" => one(VmCommand::Vmsave),
        "ltr" => one(VmCommand::Ltr),
        "trap" => one(VmCommand::Trap),
        "dbchain" => one(VmCommand::Dbchain),
        "insns" => one(VmCommand::Insns),
        "regs" => match rest {
            [n, v] => match number("value", v)? {
                0 => Err(String::from("vm regs needs a value other than 0")),
                v => Ok(VmCommand::Regs(name(Some(n))?, v)),
            },
            _ => Err(String::from("usage: vm regs <name> <value>")),
        },
        "poke" => match rest {
            [n, page] => Ok(VmCommand::Poke(name(Some(n))?, number("page", page)?)),
            _ => Err(String::from("usage: vm poke <name> <page>")),
        },
        "list" if rest.is_empty() => Ok(VmCommand::List),
        "list" => Err(String::from("'vm list' takes no arguments")),
        "dirty" => match rest {
            [n] => Ok(VmCommand::Dirty(name(Some(n))?, None)),
            [n, mode] => Ok(VmCommand::Dirty(name(Some(n))?, Some(DirtyMode::parse(mode)?))),
            _ => Err(String::from("usage: vm dirty <name> [dbit|wp|pml|off]")),
        },
        _ => Err(usage()),
    }
}

/// Refuses `options[i]` if its key (the part before `=`, or all of it) came
/// earlier among `options`: the last one would silently win.
pub fn given_once(options: &[&str], i: usize) -> Result<(), String> {
    fn key(o: &str) -> &str {
        o.split_once('=').map_or(o, |(k, _)| k)
    }
    let k = options.get(i).map_or("", |o| key(o));
    if options.get(..i).unwrap_or_default().iter().any(|o| key(o) == k) {
        return Err(format!("{k} given twice"));
    }
    Ok(())
}

fn parse_create(rest: &[&str]) -> Result<VmCommand, String> {
    let name = name(rest.first())?;
    crate::migcmd::migratable_name(&name)?;
    let (mut mem_mib, mut workload, mut rate) = (None, Workload::Idle, 0);
    let options = rest.get(1..).unwrap_or_default();
    for (i, opt) in options.iter().enumerate() {
        let (key, value) = opt.split_once('=').ok_or_else(|| format!("bad option '{opt}': expected key=value"))?;
        given_once(options, i)?;
        match key {
            "mem" => {
                let m = number(key, value)?;
                if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m) || m % 2 != 0 {
                    return Err(format!(
                        "mem={m}: guest memory must be an even number of MiB from {MIN_MEM_MIB} to {MAX_MEM_MIB}"
                    ));
                }
                mem_mib = Some(m);
            }
            "workload" => workload = Workload::parse(value)?,
            "rate" => {
                rate = number(key, value)?;
                if rate > MAX_RATE {
                    return Err(format!("rate={rate}: at most {MAX_RATE} pages/s (0 = unlimited)"));
                }
            }
            _ => return Err(format!("unknown option '{key}': mem, workload or rate")),
        }
    }
    let mem_mib = mem_mib.ok_or("vm create needs mem=<MiB>")?;
    Ok(VmCommand::Create { name, mem_mib, workload, rate })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn p(s: &str) -> Result<VmCommand, String> {
        parse(&s.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn parses_the_hidden_regs_hook() {
        assert_eq!(p("regs a 5"), Ok(VmCommand::Regs(String::from("a"), 5)));
        assert!(p("regs a 0").unwrap_err().contains("other than 0"));
        assert!(p("regs a").unwrap_err().starts_with("usage: vm regs"));
        assert!(p("regs a x").unwrap_err().contains("whole number"));
    }

    #[test]
    fn parses_create_with_options() {
        assert_eq!(
            p("create a mem=64 workload=hot:32 rate=1000"),
            Ok(VmCommand::Create { name: "a".into(), mem_mib: 64, workload: Workload::Hot(32), rate: 1000 })
        );
        assert_eq!(
            p("create vm-1_x mem=16"),
            Ok(VmCommand::Create { name: "vm-1_x".into(), mem_mib: 16, workload: Workload::Idle, rate: 0 })
        );
    }

    #[test]
    fn refuses_bad_create_arguments_with_reasons() {
        let err = |s: &str| p(s).unwrap_err();
        assert!(err("create a").contains("needs mem="));
        assert!(err("create a mem=8").contains("from 16 to 4096"));
        assert!(err("create a mem=17").contains("even number"));
        assert!(err("create a mem=99999").contains("from 16 to 4096"));
        assert!(err("create a mem=lots").contains("whole number"));
        assert!(err("create a mem=16 rate=-1").contains("whole number"));
        assert!(err("create a mem=16 rate=20000000").contains("at most"));
        assert!(err("create a mem=16 workload=busy").contains("bad workload"));
        assert!(err("create a mem=16 colour=red").contains("unknown option 'colour'"));
        assert!(err("create a mem=16 junk").contains("expected key=value"));
        assert!(err("create bad!name mem=16").contains("bad VM name"));
        assert!(err(&alloc::format!("create {} mem=16", "n".repeat(33))).contains("bad VM name"));
        assert!(err("create").contains("missing VM name"));
        // Before, the last one silently won.
        assert_eq!(err("create a mem=16 mem=32"), "mem given twice");
        // Before, such a VM was created but could never be migrated.
        for sub in crate::migcmd::SUBCOMMANDS {
            assert!(err(&alloc::format!("create {sub} mem=16")).contains("is a subcommand"), "{sub}");
        }
    }

    #[test]
    fn best_dirty_mode_is_one_the_processor_can_do() {
        let cpu = |vmx, svm, ept_ad, pml| CpuReport { vmx, svm, slat: true, ept_ad, pml, ..CpuReport::default() };
        assert_eq!(DirtyMode::best_for(&cpu(true, false, true, true)), DirtyMode::Pml);
        assert_eq!(DirtyMode::best_for(&cpu(true, false, true, false)), DirtyMode::Dbit);
        // EPT without accessed/dirty flags never marks a page dirty.
        let old_vmx = cpu(true, false, false, false);
        assert_eq!(DirtyMode::best_for(&old_vmx), DirtyMode::Wp);
        assert!(DirtyMode::Dbit.supported_by(&old_vmx).unwrap_err().contains("use wp"));
        // AMD's nested paging always sets D bits, and has no PML.
        let svm = cpu(false, true, false, false);
        assert_eq!(DirtyMode::best_for(&svm), DirtyMode::Dbit);
        assert!(DirtyMode::Pml.supported_by(&svm).unwrap_err().contains("use dbit or wp"));
        for mode in [DirtyMode::Off, DirtyMode::Wp] {
            assert_eq!(mode.supported_by(&old_vmx), Ok(()));
            assert_eq!(mode.supported_by(&svm), Ok(()));
        }
    }

    #[test]
    fn parses_the_lifecycle_and_queries() {
        assert_eq!(p("start a"), Ok(VmCommand::Start("a".into())));
        assert_eq!(p("destroy a"), Ok(VmCommand::Destroy("a".into())));
        assert_eq!(p("list"), Ok(VmCommand::List));
        assert_eq!(p("dirty a wp"), Ok(VmCommand::Dirty("a".into(), Some(DirtyMode::Wp))));
        assert_eq!(p("dirty a"), Ok(VmCommand::Dirty("a".into(), None)));
        assert!(p("dirty a xyz").unwrap_err().contains("bad dirty mode"));
        assert_eq!(p("resume a"), Ok(VmCommand::Resume("a".into(), false)));
        assert_eq!(p("resume a force"), Ok(VmCommand::Resume("a".into(), true)));
        assert!(p("resume a now").unwrap_err().contains("usage: vm resume <name> [force]"));
        assert!(p("start a b").unwrap_err().contains("just a VM name"));
        assert!(p("start").unwrap_err().contains("missing VM name"));
        assert!(p("list x").is_err());
        assert!(p("fly a").unwrap_err().starts_with("usage: vm"));
        assert!(p("").unwrap_err().starts_with("usage: vm"));
    }
}

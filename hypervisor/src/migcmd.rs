//! Parsing of the `migrate` console commands, and the byte layout of a
//! vCPU's state as it travels in the migration stream. The kernel's
//! migration driver executes the commands; everything here is host-tested.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use vmx::svm::Segment;
use vmx::{FxImage, GuestRegs, SystemState, VcpuState};

use crate::netcmd::parse_ipv4;

/// Default TCP port of the migration listener (on by default).
pub const MIGRATION_PORT: u16 = 7070;

/// Percent of the CPU a migration takes from running VMs by default: the
/// host has one CPU, shared half and half.
pub const DEFAULT_SHARE: u8 = 50;

/// What to do with a VM that dirties memory faster than the link carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyArg {
    /// Slow its vCPUs down step by step (default).
    Throttle,
    /// Stop and copy anyway (longer downtime).
    Force,
    /// Give up; the VM keeps running here.
    Abort,
}

/// A parsed `migrate` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrateCommand {
    /// `migrate <vm> <ip>[:port] [downtime=<ms>] [bandwidth=<Mbit/s>] [rounds=<n>] [policy=...] [share=<%>] [verify]`
    Start {
        /// VM name.
        vm: String,
        /// Peer address.
        ip: [u8; 4],
        /// Peer port.
        port: u16,
        /// Downtime budget, ms.
        downtime_ms: u64,
        /// Bandwidth cap, Mbit/s (None: uncapped).
        bandwidth_mbit: Option<u64>,
        /// Round limit.
        rounds: u32,
        /// Non-convergence policy.
        policy: PolicyArg,
        /// Compare whole-memory digests at switchover.
        verify: bool,
        /// Percent of the CPU the migration may take from running VMs.
        share: u8,
    },
    /// `migrate status`
    Status,
    /// `migrate cancel`
    Cancel,
    /// `migrate listen [port|off] [from=<ip>[,<ip>...]|from=any]`
    Listen {
        /// The port, `None` for off.
        port: Option<u16>,
        /// The only hosts whose migrations are taken; empty for any host.
        from: Vec<[u8; 4]>,
    },
    /// `migrate lose-resumed` (hidden test hook): the next incoming
    /// migration runs the VM here but never tells the source, as if its
    /// `Resumed` record were lost, so the source ends in doubt.
    LoseResumed,
}

/// Usage lines for `help`.
pub const USAGE: &[(&str, &str)] = &[
    (
        "migrate <vm> <ip>[:port] [downtime=<ms>] [bandwidth=<Mbit/s>] [rounds=<n>] [policy=throttle|force|abort] [share=<%>] [verify]",
        "live-migrate a VM to a peer",
    ),
    ("migrate status", "progress of the running migration, or the last report"),
    ("migrate cancel", "cancel before the switchover; the VM keeps running here"),
    (
        "migrate listen [port|off] [from=<ip>[,<ip>...]|from=any]",
        "accept incoming migrations (on by default, port 7070, from any host)",
    ),
];

/// Most hosts `migrate listen from=` names.
pub const MAX_LISTEN_FROM: usize = 8;

/// Parses the words after `migrate listen`.
fn parse_listen(words: &[&str]) -> Result<MigrateCommand, String> {
    const USAGE: &str = "usage: migrate listen [port|off] [from=<ip>[,<ip>...]|from=any]";
    let (port, from) = match words {
        [] => (None, None),
        [f] if f.starts_with("from=") => (None, Some(&f[5..])),
        [p] => (Some(*p), None),
        [p, f] if f.starts_with("from=") => (Some(*p), Some(&f[5..])),
        [_, f, extra, ..] if f.starts_with("from=") => return Err(format!("{USAGE}; unexpected '{extra}'")),
        [_, extra, ..] => return Err(format!("{USAGE}; unexpected '{extra}'")),
    };
    let port = match port {
        None => Some(MIGRATION_PORT),
        Some("off") => None,
        Some(p) => Some(u16::try_from(num("port", p, 1..=65535)?).unwrap_or(MIGRATION_PORT)),
    };
    let mut hosts = Vec::new();
    for ip in from.filter(|&f| f != "any").map(|f| f.split(',')).into_iter().flatten() {
        let ip = parse_ipv4(ip).map_err(|e| format!("from=: {e}"))?;
        if hosts.contains(&ip) {
            return Err(format!("from=: {} given twice", Ipv4(ip)));
        }
        hosts.push(ip);
    }
    if hosts.len() > MAX_LISTEN_FROM {
        return Err(format!("from=: {} hosts, at most {MAX_LISTEN_FROM}", hosts.len()));
    }
    if port.is_none() && from.is_some() {
        return Err(String::from("migrate listen off takes no from="));
    }
    Ok(MigrateCommand::Listen { port, from: hosts })
}

/// An IPv4 address as it is written.
pub struct Ipv4(pub [u8; 4]);

impl core::fmt::Display for Ipv4 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

fn num(key: &str, v: &str, range: core::ops::RangeInclusive<u64>) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!("{key}={v}: expected a whole number in {}..={}", range.start(), range.end())),
    }
}

/// Words `migrate` takes as its subcommands with arguments, so no VM here
/// may be named one: `migrate status 10.77.0.12` could not move it.
pub const SUBCOMMANDS: [&str; 3] = ["status", "cancel", "listen"];

/// Refuses a name this host's `migrate` could not take (see
/// [`SUBCOMMANDS`]): for `vm create` and for VMs arriving by migration.
pub fn migratable_name(name: &str) -> Result<(), String> {
    if SUBCOMMANDS.contains(&name) {
        return Err(format!("'{name}' cannot name a VM: 'migrate {name}' is a subcommand"));
    }
    Ok(())
}

/// Parses the words after `migrate`.
pub fn parse(args: &[&str]) -> Result<MigrateCommand, String> {
    match args {
        ["status"] => return Ok(MigrateCommand::Status),
        ["cancel"] => return Ok(MigrateCommand::Cancel),
        ["lose-resumed"] => return Ok(MigrateCommand::LoseResumed),
        ["listen", words @ ..] => return parse_listen(words),
        [sub @ ("status" | "cancel"), extra, ..] => {
            return Err(format!("migrate {sub} takes no arguments, got '{extra}'"))
        }
        [] | [_] => {
            return Err(String::from(
                "usage: migrate <vm> <ip>[:port] [options] | status | cancel | listen [port|off] [from=<ip>[,<ip>...]]",
            ))
        }
        _ => {}
    }
    let (vm, target, options) = (crate::vmcmd::name(args.first())?, args[1], &args[2..]);
    let (ip, port) = match target.split_once(':') {
        Some((ip, p)) => (parse_ipv4(ip)?, u16::try_from(num("port", p, 1..=65535)?).unwrap_or(MIGRATION_PORT)),
        None => (parse_ipv4(target)?, MIGRATION_PORT),
    };
    let mut cmd = MigrateCommand::Start {
        vm,
        ip,
        port,
        downtime_ms: 300,
        bandwidth_mbit: None,
        rounds: 30,
        policy: PolicyArg::Throttle,
        verify: false,
        share: DEFAULT_SHARE,
    };
    let MigrateCommand::Start { downtime_ms, bandwidth_mbit, rounds, policy, verify, share, .. } = &mut cmd else {
        return Err(String::from("internal: not a start command"));
    };
    for (i, opt) in options.iter().enumerate() {
        crate::vmcmd::given_once(options, i)?;
        match opt.split_once('=') {
            None if *opt == "verify" => *verify = true,
            Some(("downtime", v)) => *downtime_ms = num("downtime", v, 1..=60_000)?,
            Some(("bandwidth", v)) => *bandwidth_mbit = Some(num("bandwidth", v, 1..=100_000)?),
            Some(("rounds", v)) => {
                *rounds = u32::try_from(num("rounds", v, 1..=u64::from(migration::converge::MAX_ROUNDS))?).unwrap_or(30)
            }
            Some(("policy", "throttle")) => *policy = PolicyArg::Throttle,
            Some(("policy", "force")) => *policy = PolicyArg::Force,
            Some(("policy", "abort")) => *policy = PolicyArg::Abort,
            Some(("policy", v)) => return Err(format!("policy={v}: throttle, force or abort")),
            Some(("share", v)) => *share = u8::try_from(num("share", v, 10..=95)?).unwrap_or(DEFAULT_SHARE),
            _ => {
                return Err(format!("unknown option '{opt}': downtime=, bandwidth=, rounds=, policy=, share=, verify"))
            }
        }
    }
    Ok(cmd)
}

/// Words of an encoded vCPU state before its segments: 15 GPRs, RIP, RSP,
/// RFLAGS, the guest TSC, DR0-DR3, DR6, DR7, CR2, KernelGsBase, the
/// pending event, CR0, CR3, CR4, CR8, the interruptibility and the pending
/// debug exceptions.
const VCPU_WORDS: usize = 34;
/// Segments in an encoded vCPU state: ES, CS, SS, DS, FS, GS, LDTR, TR,
/// GDTR, IDTR; 16 bytes each (selector u16, attributes u16, limit u32,
/// base u64).
const VCPU_SEGMENTS: usize = 10;
/// Bytes of an encoded vCPU state: [`VCPU_WORDS`] little-endian words,
/// [`VCPU_SEGMENTS`] segments, then the 512-byte FXSAVE image.
pub const VCPU_STATE_LEN: usize = VCPU_WORDS * 8 + VCPU_SEGMENTS * 16 + 512;

/// Encodes a vCPU's state and its guest TSC for the migration stream.
pub fn encode_vcpu(state: &VcpuState, guest_tsc: u64) -> Vec<u8> {
    let r = &state.regs;
    let [dr0, dr1, dr2, dr3] = state.dr;
    let words: [u64; VCPU_WORDS] = [
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        state.rip,
        state.rsp,
        state.rflags,
        guest_tsc,
        dr0,
        dr1,
        dr2,
        dr3,
        state.dr6,
        state.dr7,
        state.cr2,
        state.kernel_gs_base,
        state.pending_event,
        state.system.cr0,
        state.system.cr3,
        state.system.cr4,
        state.system.cr8,
        state.interruptibility,
        state.pending_debug,
    ];
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let sys = &state.system;
    for seg in sys.segments.iter().chain([&sys.gdtr, &sys.idtr]) {
        bytes.extend_from_slice(&seg.selector.to_le_bytes());
        bytes.extend_from_slice(&seg.attrib.to_le_bytes());
        bytes.extend_from_slice(&seg.limit.to_le_bytes());
        bytes.extend_from_slice(&seg.base.to_le_bytes());
    }
    bytes.extend_from_slice(&state.fx.0);
    bytes
}

/// Decodes [`encode_vcpu`]'s bytes; refuses any other length, and a state
/// this host could not load: see [`check_vcpu`]. `mxcsr_mask` is this
/// CPU's (`arch::fpu::mxcsr_mask`).
pub fn decode_vcpu(bytes: &[u8], mxcsr_mask: u32) -> Result<(VcpuState, u64), String> {
    if bytes.len() != VCPU_STATE_LEN {
        return Err(format!("vCPU state of {} bytes, expected {VCPU_STATE_LEN}", bytes.len()));
    }
    let (head, rest) = bytes.split_at(VCPU_WORDS * 8);
    let (segments, fx) = rest.split_at(VCPU_SEGMENTS * 16);
    let mut seg = segments.as_chunks::<16>().0.iter().map(|b| Segment {
        selector: u16::from_le_bytes([b[0], b[1]]),
        attrib: u16::from_le_bytes([b[2], b[3]]),
        limit: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        base: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    });
    let mut next = || seg.next().unwrap_or_default();
    let segments = core::array::from_fn(|_| next());
    // GDTR and IDTR: base and limit only, the rest of the VMCB's field is
    // reserved.
    let gdtr = Segment { selector: 0, attrib: 0, ..next() };
    let idtr = Segment { selector: 0, attrib: 0, ..next() };
    let system = SystemState { cr0: 0, cr3: 0, cr4: 0, cr8: 0, segments, gdtr, idtr };
    let mut w = [0u64; VCPU_WORDS];
    for (word, chunk) in w.iter_mut().zip(head.as_chunks::<8>().0) {
        *word = u64::from_le_bytes(*chunk);
    }
    let regs = GuestRegs {
        rax: w[0],
        rbx: w[1],
        rcx: w[2],
        rdx: w[3],
        rsi: w[4],
        rdi: w[5],
        rbp: w[6],
        r8: w[7],
        r9: w[8],
        r10: w[9],
        r11: w[10],
        r12: w[11],
        r13: w[12],
        r14: w[13],
        r15: w[14],
    };
    let mut image = [0u8; 512];
    image.copy_from_slice(fx);
    let state = VcpuState {
        regs,
        rip: w[15],
        rsp: w[16],
        rflags: w[17],
        dr: [w[19], w[20], w[21], w[22]],
        dr6: w[23],
        dr7: w[24],
        cr2: w[25],
        kernel_gs_base: w[26],
        fx: FxImage(image),
        pending_event: w[27],
        interruptibility: w[32],
        pending_debug: w[33],
        system: SystemState { cr0: w[28], cr3: w[29], cr4: w[30], cr8: w[31], ..system },
    };
    check_vcpu(&state, mxcsr_mask)?;
    Ok((state, w[18]))
}

/// RFLAGS bits that read as 0: 3, 5, 15 and 22-63.
const RFLAGS_RESERVED: u64 = !0x003F_7FD7;
/// RFLAGS bit 1 reads as 1; VM (bit 17) must be 0 in long mode.
const RFLAGS_FIXED1: u64 = 1 << 1;
const RFLAGS_VM: u64 = 1 << 17;

/// Whether `a` is canonical with 48-bit linear addresses.
fn canonical(a: u64) -> bool {
    let top = a >> 47;
    top == 0 || top == 0x1_FFFF
}

/// Refuses a vCPU state a VM entry refuses for a long-mode guest (with
/// 4-level paging, as every guest here has), or that would fault in the
/// host as it loads it. Checked before Ready, so the source resumes its
/// own copy: the entry would otherwise fail on the VM's first run here
/// (VT-x checks RFLAGS and RIP; both vendors DR6 and DR7), after the source
/// had freed the VM, and the host's own `mov dr6` (VT-x), WRMSR of
/// KernelGsBase (VT-x) or FXRSTOR would raise #GP.
fn check_vcpu(s: &VcpuState, mxcsr_mask: u32) -> Result<(), String> {
    if s.rflags & (RFLAGS_RESERVED | RFLAGS_VM) != 0 || s.rflags & RFLAGS_FIXED1 == 0 {
        return Err(format!("vCPU state has RFLAGS {:#x}, not a long-mode guest's", s.rflags));
    }
    // RSP is not checked: the CPU does not at entry, and a guest may hold
    // anything in it for a while.
    if !canonical(s.rip) {
        return Err(format!("vCPU state has a non-canonical RIP {:#x}", s.rip));
    }
    // Bits 63:32 of DR6 and DR7 must be 0 (MOV DR, VMRUN, VM entry); DR0-
    // DR3 take any address.
    for (name, value) in [("DR6", s.dr6), ("DR7", s.dr7)] {
        if value >> 32 != 0 {
            return Err(format!("vCPU state has {name} {value:#x}, with bits above 31"));
        }
    }
    if !canonical(s.kernel_gs_base) {
        return Err(format!("vCPU state has a non-canonical KernelGsBase {:#x}", s.kernel_gs_base));
    }
    // The bases the host cannot load otherwise (VT-x checks FS, GS, TR,
    // LDTR, GDTR and IDTR; a VMLOAD of a non-canonical one faults), and
    // CR3's address bits; everything else the trial entry checks.
    let sys = &s.system;
    let bases = [("FS", sys.segments[4].base), ("GS", sys.segments[5].base), ("LDTR", sys.segments[6].base)];
    let tables = [("TR", sys.segments[7].base), ("GDTR", sys.gdtr.base), ("IDTR", sys.idtr.base)];
    if let Some((name, base)) = bases.into_iter().chain(tables).find(|&(_, b)| !canonical(b)) {
        return Err(format!("vCPU state has a non-canonical {name} base {base:#x}"));
    }
    if sys.cr3 >> 52 != 0 {
        return Err(format!("vCPU state has CR3 {:#x}, with bits above 51", sys.cr3));
    }
    // A task priority has 4 bits (MOV to CR8 refuses more); V_TPR and the
    // virtual-APIC page would keep only those, so more is not a guest's.
    if sys.cr8 > 0xF {
        return Err(format!("vCPU state has CR8 {:#x}, above 15", sys.cr8));
    }
    // At most one of STI and MOV SS blocking; pending debug exceptions of
    // the defined bits only (B0-B3, 12, BS, RTM): VM entry refuses others,
    // and the trial entry checks the rest (STI blocking needs IF, a
    // blocked single step its BS).
    if s.interruptibility > 2 {
        return Err(format!("vCPU state has interruptibility {:#x}, not STI or MOV SS blocking", s.interruptibility));
    }
    if s.pending_debug & !0x1_500F != 0 {
        return Err(format!("vCPU state has pending debug exceptions {:#x}, with undefined bits", s.pending_debug));
    }
    if let Err(why) = check_pending_event(s.pending_event) {
        return Err(format!("vCPU state has a pending event {:#x}: {why}", s.pending_event));
    }
    let mxcsr = s.fx.mxcsr();
    if mxcsr & !mxcsr_mask != 0 {
        return Err(format!("vCPU state has MXCSR {mxcsr:#x}, with bits this CPU lacks (mask {mxcsr_mask:#x})"));
    }
    Ok(())
}

/// Refuses a pending event (EVENTINJ's layout) that VMRUN or VM entry would
/// refuse (APM 15.20, SDM Vol. 3C 26.2.1.3 and 26.3.1.5), or that this
/// hypervisor never leaves pending. It injects only hardware exceptions
/// (vectors 0-20 but 2, 3 and 4: no NMI, and #BP and #OF come from
/// instructions that run again), with an error code exactly for those that
/// push one, of at most 16 bits: no external interrupt or NMI reaches a
/// guest here, VT-x would refuse an external interrupt under RFLAGS.IF=0
/// or STI blocking, and it would want an error code with a #CP (21) on some
/// CPUs and not on others.
fn check_pending_event(e: u64) -> Result<(), &'static str> {
    const VALID: u64 = 1 << 31;
    const ERROR_CODE: u64 = 1 << 11;
    const EXCEPTION: u64 = 3;
    if e == 0 {
        return Ok(());
    }
    if e & VALID == 0 || e & 0x7FFF_F000 != 0 {
        return Err("not a valid event");
    }
    let (kind, vector) = ((e >> 8) & 7, e & 0xFF);
    let pushes_code = matches!(vector, 8 | 10..=14 | 17);
    if kind != EXCEPTION || vector > 20 || matches!(vector, 2..=4) || (e & ERROR_CODE != 0) != pushes_code {
        return Err("not a hardware exception as delivered");
    }
    if e >> 48 != 0 {
        return Err("error code wider than 16 bits");
    }
    Ok(())
}

/// The VM-level device state a migration carries: one byte, 1 if the VM
/// was paused by its operator (it arrives paused), 0 if it ran. The test
/// guest has no devices of its own.
pub fn encode_device_state(paused: bool) -> Vec<u8> {
    alloc::vec![u8::from(paused)]
}

/// Decodes [`encode_device_state`]'s bytes: whether the VM arrives paused.
pub fn decode_device_state(bytes: &[u8]) -> Result<bool, String> {
    match bytes {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(format!("bad device state ({} bytes)", bytes.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<MigrateCommand, String> {
        parse(&s.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn parses_start_with_every_option() {
        assert_eq!(
            p("vm1 10.77.0.12:7000 downtime=100 bandwidth=500 rounds=5 policy=force share=80 verify"),
            Ok(MigrateCommand::Start {
                vm: "vm1".into(),
                ip: [10, 77, 0, 12],
                port: 7000,
                downtime_ms: 100,
                bandwidth_mbit: Some(500),
                rounds: 5,
                policy: PolicyArg::Force,
                verify: true,
                share: 80,
            })
        );
        assert!(matches!(
            p("vm1 10.77.0.12"),
            Ok(MigrateCommand::Start {
                port: MIGRATION_PORT,
                downtime_ms: 300,
                verify: false,
                policy: PolicyArg::Throttle,
                share: DEFAULT_SHARE,
                ..
            })
        ));
        assert_eq!(p("status"), Ok(MigrateCommand::Status));
        assert_eq!(p("cancel"), Ok(MigrateCommand::Cancel));
        let listen = |port, from: &[[u8; 4]]| Ok(MigrateCommand::Listen { port, from: from.to_vec() });
        assert_eq!(p("listen"), listen(Some(MIGRATION_PORT), &[]));
        assert_eq!(p("listen off"), listen(None, &[]));
        assert_eq!(p("listen 9000"), listen(Some(9000), &[]));
        assert_eq!(p("listen from=10.77.0.11"), listen(Some(MIGRATION_PORT), &[[10, 77, 0, 11]]));
        assert_eq!(p("listen 9000 from=10.0.0.1,10.0.0.2"), listen(Some(9000), &[[10, 0, 0, 1], [10, 0, 0, 2]]));
        assert_eq!(p("listen 9000 from=any"), listen(Some(9000), &[]));
        assert_eq!(p("lose-resumed"), Ok(MigrateCommand::LoseResumed));
    }

    #[test]
    fn refuses_bad_options_with_reasons() {
        let err = |s: &str| p(s).unwrap_err();
        assert!(err("vm1").starts_with("usage: migrate"));
        assert!(err("vm1 10.77.0.300").contains("bad IPv4"));
        assert!(err("vm1 10.77.0.1:0").contains("port=0"));
        assert!(err("vm1 10.77.0.1 downtime=0").contains("downtime=0"));
        assert!(err("vm1 10.77.0.1 policy=hope").contains("throttle, force or abort"));
        assert!(err("vm1 10.77.0.1 speed=9").contains("unknown option"));
        assert!(err("vm1 10.77.0.1 rounds=x").contains("rounds=x"));
        assert!(err("vm1 10.77.0.1 share=99").contains("share=99: expected a whole number in 10..=95"));
        assert!(err("listen 0").contains("port=0"));
        // Before, these fell through to "migrate VM 'cancel' to ...".
        assert_eq!(err("cancel m"), "migrate cancel takes no arguments, got 'm'");
        assert_eq!(err("status 10.77.0.12"), "migrate status takes no arguments, got '10.77.0.12'");
        assert!(err("listen 7070 now").contains("unexpected 'now'"));
        assert!(err("listen 7070 from=1.2.3.4 now").contains("unexpected 'now'"));
        assert!(err("listen from=1.2.3.4 7070").contains("unexpected '7070'"));
        assert!(err("listen from=").starts_with("from=: "), "{}", err("listen from="));
        assert!(err("listen from=10.77.0.300").contains("bad IPv4"));
        assert!(err("listen from=1.2.3.4,").starts_with("from=: "));
        assert_eq!(err("listen from=1.2.3.4,1.2.3.4"), "from=: 1.2.3.4 given twice");
        assert_eq!(
            err("listen from=1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4,1.1.1.5,1.1.1.6,1.1.1.7,1.1.1.8,1.1.1.9"),
            "from=: 9 hosts, at most 8"
        );
        assert_eq!(err("listen off from=1.2.3.4"), "migrate listen off takes no from=");
        assert!(err("listen 0 from=1.2.3.4").contains("port=0"));
        assert!(err("bad!name 10.77.0.1").contains("bad VM name 'bad!name'"));
        // Before, the last one silently won.
        assert_eq!(err("vm1 10.77.0.1 downtime=50 downtime=5000"), "downtime given twice");
        assert_eq!(err("vm1 10.77.0.1 verify policy=abort verify"), "verify given twice");
    }

    #[test]
    fn vcpu_state_round_trips_and_rejects_other_lengths() {
        let mut s = VcpuState { rip: 0x10040, rsp: 0x1fff8, rflags: 0x202, ..VcpuState::default() };
        s.regs.rbx = 0x1000;
        s.regs.r15 = 7;
        // Each register a migration must carry (it carried only these
        // three and the GPRs: the x87/SSE registers, the debug registers,
        // CR2 and KernelGsBase arrived at their reset values).
        s.dr = [1, 2, 3, 0xffff_8000_0000_0004];
        (s.dr6, s.dr7, s.cr2, s.kernel_gs_base) = (0xFFFF_4FF1, 0x0F0_0402, 0xdead_b000, 0xffff_8880_1234_0000);
        s.fx.0[FxImage::XMM0..FxImage::XMM0 + 16].copy_from_slice(&0x1111_u128.to_le_bytes());
        s.fx.0[FxImage::MXCSR..FxImage::MXCSR + 4].copy_from_slice(&0x9FC0_u32.to_le_bytes());
        s.fx.0[511] = 0x5A;
        s.pending_event = vmx::svm::event_exception(14, Some(2));
        (s.interruptibility, s.pending_debug) = (1, 0x4000);
        s.system.cr0 = 0x8005_0033;
        s.system.cr3 = 0x2000;
        s.system.cr4 = 0x10620;
        s.system.cr8 = 0xD;
        s.system.segments[1] = Segment { selector: 0x08, attrib: 0xA9B, limit: 0xFFFF_FFFF, base: 0 };
        s.system.segments[5].base = 0xffff_8880_0000_1000;
        s.system.segments[7] = Segment { selector: 0x28, attrib: 0x8B, limit: 0x67, base: 0x1900 };
        s.system.gdtr = Segment { selector: 0, attrib: 0, limit: 0x37, base: 0x1800 };
        s.system.idtr = Segment { selector: 0, attrib: 0, limit: 0xFFF, base: 0x1A00 };
        let mut junk = s;
        junk.system.gdtr.selector = 0x1234;
        junk.system.idtr.attrib = 0x5678;
        let decoded = decode_vcpu(&encode_vcpu(&junk, 1), 0xFFFF).unwrap().0;
        assert_eq!(decoded.system, s.system, "GDTR and IDTR carry base and limit only");
        let bytes = encode_vcpu(&s, 123_456);
        assert_eq!(bytes.len(), VCPU_STATE_LEN);
        assert_eq!(decode_vcpu(&bytes, 0xFFFF), Ok((s, 123_456)));
        assert!(decode_vcpu(&bytes[1..], 0xFFFF).is_err());
        assert!(decode_vcpu(&bytes[..19 * 8], 0xFFFF).is_err(), "the old, shorter state");
    }

    #[test]
    fn vcpu_state_no_long_mode_guest_can_be_in_is_refused() {
        // Found in review: any RFLAGS and RIP were loaded, and VT-x then
        // failed the VM's first entry on the destination, after the source
        // had freed its copy.
        let good =
            VcpuState { rip: 0xffff_8000_0000_0000, rsp: 0x7fff_ffff_fff8, rflags: 0x246, ..VcpuState::default() };
        assert!(decode_vcpu(&encode_vcpu(&good, 1), 0xFFBF).is_ok());
        for (rip, rsp, rflags, why) in [
            (0x1000, 0x2000, 0x200, "RFLAGS 0x200"),
            (0x1000, 0x2000, 0x202 | 1 << 3, "RFLAGS 0x20a"),
            (0x1000, 0x2000, 0x202 | 1 << 17, "RFLAGS 0x20202"),
            (0x1000, 0x2000, 0x202 | 1 << 40, "RFLAGS 0x10000000202"),
            (0x0000_8000_0000_0000, 0x2000, 0x202, "non-canonical RIP 0x800000000000"),
        ] {
            let s = VcpuState { rip, rsp, rflags, ..VcpuState::default() };
            let err = decode_vcpu(&encode_vcpu(&s, 1), 0xFFBF).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn vcpu_state_the_host_would_fault_loading_is_refused() {
        let good = VcpuState { rip: 0x1000, rflags: 0x202, ..VcpuState::default() };
        let refused = |change: &dyn Fn(&mut VcpuState), why: &str| {
            let mut s = good;
            change(&mut s);
            let err = decode_vcpu(&encode_vcpu(&s, 1), 0xFFBF).unwrap_err();
            assert!(err.contains(why), "{err}");
        };
        refused(&|s| s.dr6 |= 1 << 32, "DR6 0x1ffff0ff0");
        refused(&|s| s.dr7 |= 1 << 63, "DR7 0x8000000000000400");
        refused(&|s| s.kernel_gs_base = 0x0000_8000_0000_0000, "KernelGsBase 0x800000000000");
        refused(&|s| s.system.segments[4].base = 1 << 60, "FS base 0x1000000000000000");
        refused(&|s| s.system.idtr.base = 0x0000_8000_0000_0000, "IDTR base 0x800000000000");
        refused(&|s| s.system.cr3 = 1 << 52, "CR3 0x10000000000000");
        refused(&|s| s.system.cr8 = 0x10, "CR8 0x10");
        refused(&|s| s.interruptibility = 3, "interruptibility 0x3");
        refused(&|s| s.pending_debug = 1 << 13, "pending debug exceptions 0x2000");
        // Events no entry takes: no valid bit, #DB with an error code, #PF
        // without, vector 40 as an exception, a code of 17 bits; and
        // events never left pending here: an NMI, an external interrupt
        // (VT-x refuses one under RFLAGS.IF=0), a software interrupt.
        for event in [
            14,
            vmx::svm::event_exception(1, Some(0)),
            vmx::svm::event_exception(14, None),
            vmx::svm::event_exception(40, None),
            vmx::svm::event_exception(21, Some(0)),
            vmx::svm::event_exception(3, None),
            vmx::svm::event_exception(13, Some(0x1_0000)),
            (1 << 31) | (2 << 8) | 2,
            (1 << 31) | 0x30,
            (1 << 31) | (4 << 8) | 0x80,
        ] {
            refused(&|s| s.pending_event = event, "pending event");
        }
        for event in [0, vmx::svm::event_exception(1, None), vmx::svm::event_exception(8, Some(0))] {
            let s = VcpuState { pending_event: event, ..good };
            assert!(decode_vcpu(&encode_vcpu(&s, 1), 0xFFBF).is_ok(), "{event:#x}");
        }
        // DAZ (bit 6) on a CPU whose MXCSR_MASK lacks it, and a reserved bit.
        refused(&|s| s.fx.0[FxImage::MXCSR] |= 1 << 6, "MXCSR 0x1fc0");
        refused(&|s| s.fx.0[FxImage::MXCSR + 2] = 1, "MXCSR 0x11f80");
        let mut daz = good;
        daz.fx.0[FxImage::MXCSR] |= 1 << 6;
        assert!(decode_vcpu(&encode_vcpu(&daz, 1), 0xFFFF).is_ok(), "DAZ where the CPU has it");
    }

    #[test]
    fn device_state_round_trips_and_rejects_garbage() {
        for paused in [false, true] {
            assert_eq!(decode_device_state(&encode_device_state(paused)), Ok(paused));
        }
        assert!(decode_device_state(&[]).is_err());
        assert!(decode_device_state(&[2]).is_err());
        assert!(decode_device_state(&[1, 0]).is_err());
    }
}

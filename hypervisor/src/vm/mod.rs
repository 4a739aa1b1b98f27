//! VMs: creation (guest memory, nested page tables, the test guest, a
//! vCPU), the lifecycle, round-robin scheduling on timer exits, exit
//! handling with containment (a failing guest stops only itself), dirty
//! tracking, and the `vm` console commands.

mod guest_code;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ept::{DirtyBitmap, Format, Gpa, Hpa, PageSize, Perms, Slat, TlbFlush};
use hypervisor::guest::{self, cfg, st, Layout, Workload};
use hypervisor::json::{Obj, Value};
use hypervisor::shell::Reply;
use hypervisor::vmcmd::{DirtyMode, VmCommand};
use vmx::cpu::{Backend, CpuReport};
use vmx::{Access, Insn, Vcpu, VmExit};

use crate::arch::guest_memory::{GuestMemory, KernelFrames};
use crate::arch::svm::SvmVcpu;
use crate::arch::vmx::VmxVcpu;
use crate::arch::{clock, fpu, memory, timer};

/// Host memory kept free for the hypervisor itself, beyond what VMs take.
const HOST_RESERVE: u64 = 8 << 20;
/// How long `vm verify` waits for the guest, in microseconds.
const VERIFY_TIMEOUT_US: u64 = 60_000_000;
/// Page numbers listed in a `vm dirty` reply.
const DIRTY_LIST: usize = 16;
/// Period of the throttle's duty cycle (see `Vm::throttled`): ten 1 ms
/// slices, so a throttled guest misses whole slices.
const THROTTLE_PERIOD_US: u64 = 10_000;

/// What ends a VM's time slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slice {
    /// The first host interrupt: a frame from the NIC is served at once.
    UntilInterrupt,
    /// The next timer tick; other host interrupts are serviced and the
    /// guest goes on. A migration, which pumps the network between ticks,
    /// uses it so that every acknowledgement does not cost a VM exit.
    UntilTick,
}

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Created, never run.
    Created,
    /// Scheduled.
    Running,
    /// Not scheduled; resumable.
    Paused,
    /// Stopped for good, with the reason.
    Stopped(String),
    /// A skeleton receiving an incoming migration; not runnable yet.
    Incoming,
}

impl VmState {
    fn name(&self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped(_) => "stopped",
            VmState::Incoming => "incoming",
        }
    }
}

/// The vCPU of either vendor. The run loop sees only the `Vcpu` trait; the
/// few vendor-specific operations (PML, the test hook) are methods here.
enum AnyVcpu {
    Svm(SvmVcpu),
    Vmx(VmxVcpu),
}

impl Vcpu for AnyVcpu {
    fn run(&mut self) -> VmExit {
        match self {
            AnyVcpu::Svm(v) => v.run(),
            AnyVcpu::Vmx(v) => v.run(),
        }
    }
    fn rip(&self) -> u64 {
        match self {
            AnyVcpu::Svm(v) => v.rip(),
            AnyVcpu::Vmx(v) => v.rip(),
        }
    }
    fn skip_instruction(&mut self, next_rip: u64) {
        match self {
            AnyVcpu::Svm(v) => v.skip_instruction(next_rip),
            AnyVcpu::Vmx(v) => v.skip_instruction(next_rip),
        }
    }
    fn state(&self) -> vmx::VcpuState {
        match self {
            AnyVcpu::Svm(v) => v.state(),
            AnyVcpu::Vmx(v) => v.state(),
        }
    }
    fn regs_mut(&mut self) -> &mut vmx::GuestRegs {
        match self {
            AnyVcpu::Svm(v) => v.regs_mut(),
            AnyVcpu::Vmx(v) => v.regs_mut(),
        }
    }
    fn flush_tlb(&mut self) {
        match self {
            AnyVcpu::Svm(v) => v.flush_tlb(),
            AnyVcpu::Vmx(v) => v.flush_tlb(),
        }
    }
    fn set_state(&mut self, state: &vmx::VcpuState) -> Result<(), &'static str> {
        match self {
            AnyVcpu::Svm(v) => v.set_state(state),
            AnyVcpu::Vmx(v) => v.set_state(state),
        }
    }
    fn enter_without_memory(&mut self, empty_root: u64) -> VmExit {
        match self {
            AnyVcpu::Svm(v) => v.enter_without_memory(empty_root),
            AnyVcpu::Vmx(v) => v.enter_without_memory(empty_root),
        }
    }
    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        match self {
            AnyVcpu::Svm(v) => v.guest_tsc(host_tsc),
            AnyVcpu::Vmx(v) => v.guest_tsc(host_tsc),
        }
    }
    fn set_guest_tsc(&mut self, guest_tsc: u64, host_tsc: u64) {
        match self {
            AnyVcpu::Svm(v) => v.set_guest_tsc(guest_tsc, host_tsc),
            AnyVcpu::Vmx(v) => v.set_guest_tsc(guest_tsc, host_tsc),
        }
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        match self {
            AnyVcpu::Svm(v) => v.inject_exception(vector, error_code),
            AnyVcpu::Vmx(v) => v.inject_exception(vector, error_code),
        }
    }
}

impl AnyVcpu {
    fn set_pml(&mut self, on: bool) -> bool {
        match self {
            AnyVcpu::Svm(_) => !on,
            AnyVcpu::Vmx(v) => v.set_pml(on),
        }
    }

    fn drain_pml(&mut self, out: &mut DirtyBitmap) -> usize {
        match self {
            AnyVcpu::Svm(_) => 0,
            AnyVcpu::Vmx(v) => v.drain_pml(out),
        }
    }

    fn break_state(&mut self) {
        match self {
            AnyVcpu::Svm(v) => v.break_state(),
            AnyVcpu::Vmx(v) => v.break_state(),
        }
    }

    fn destroy(self) {
        match self {
            AnyVcpu::Svm(v) => v.destroy(),
            AnyVcpu::Vmx(v) => v.destroy(),
        }
    }
}

struct Vm {
    name: String,
    mem_mib: u64,
    layout: Layout,
    workload: Workload,
    rate: u64,
    mem: GuestMemory,
    slat: Slat,
    vcpu: AnyVcpu,
    state: VmState,
    exits: BTreeMap<&'static str, u64>,
    dirty_mode: DirtyMode,
    /// Its 2 MiB mappings were split into 4 KiB tables (the first dirty
    /// tracking does it); until then [`guest::table_bytes`] of host memory
    /// stay promised to it.
    tables_split: bool,
    /// The guest's generation table at the last harvest.
    gen_snapshot: Option<Vec<u32>>,
    /// Pages the PML log reported since the last harvest (PML-full exits
    /// drain into it).
    pml_log: DirtyBitmap,
    /// Pages the hypervisor wrote for the guest since the last harvest
    /// (requests in its config page, test hooks), which no tracking
    /// mechanism sees: see `Vm::host_write_u64`.
    host_dirty: Vec<u64>,
    /// Being migrated out: lifecycle commands are refused until the
    /// migration ends.
    migrating: bool,
    /// Percent of wall time the VM sits out (migration auto-converge; see
    /// `Vm::throttled`).
    throttle: u8,
    /// Commit was sent but the destination never confirmed: kept paused.
    in_doubt: bool,
    /// Paused by the operator when its migration began: it stays paused
    /// if the migration fails, and arrives paused if it succeeds.
    paused_before_migration: bool,
    /// Its dirty tracking when its migration began, restored if it fails.
    dirty_before_migration: DirtyMode,
    /// The guest executed `HLT` and waits for its wake time
    /// (`guest::st::WAKE_TSC`): it does not run, and takes no CPU.
    halted: bool,
}

/// All VMs of this host.
pub struct Manager {
    vms: Vec<Vm>,
    next: usize,
    backend: Backend,
    default_dirty: DirtyMode,
    tlb_tags: u32,
    created: u64,
    cpu: CpuReport,
}

impl Manager {
    /// A manager for the processor described by `cpu`.
    pub fn new(cpu: &CpuReport) -> Self {
        let default_dirty = DirtyMode::best_for(cpu);
        Manager {
            vms: Vec::new(),
            next: 0,
            backend: cpu.backend(),
            default_dirty,
            tlb_tags: cpu.tlb_tags.max(2),
            created: 0,
            cpu: cpu.clone(),
        }
    }

    /// Whether any VM is running (halted or not).
    pub fn any_running(&self) -> bool {
        self.vms.iter().any(|vm| vm.state == VmState::Running)
    }

    /// Whether a running VM has work (is not halted until later).
    pub fn any_ready(&mut self) -> bool {
        let now = clock::uptime_us();
        self.vms.iter_mut().any(|vm| vm.runnable(now))
    }

    /// Runs the next running VM (round robin) that is neither throttled nor
    /// halted for one time slice.
    pub fn run_slice(&mut self, slice: Slice) {
        let n = self.vms.len();
        let now = clock::uptime_us();
        for step in 0..n {
            let i = (self.next + step) % n;
            let vm = &mut self.vms[i];
            if !vm.runnable(now) {
                continue;
            }
            self.next = i + 1;
            vm.run_until(|_| false, u64::MAX, slice);
            return;
        }
    }

    /// Marks a running VM as migrating out, arms dirty tracking (a fresh
    /// baseline), and returns its memory size.
    pub fn begin_migration(&mut self, name: &str) -> Result<u64, String> {
        let default = self.default_dirty;
        let vm = self.find(name)?;
        if vm.migrating {
            return Err(format!("VM '{name}' is already being migrated"));
        }
        if vm.in_doubt {
            // Its last migration may have moved it already: another would
            // make a second copy, and its failure would clear the doubt.
            return Err(format!(
                "VM '{name}' is in doubt after a migration; 'vm destroy' or 'vm resume {name} force' it first"
            ));
        }
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(format!("VM '{name}' is {}; only a started VM can migrate", vm.state.name()));
        }
        let mode = if vm.dirty_mode == DirtyMode::Off { default } else { vm.dirty_mode };
        vm.dirty_before_migration = vm.dirty_mode;
        vm.dirty(DirtyMode::Off)?;
        vm.dirty(mode)?;
        vm.migrating = true;
        vm.paused_before_migration = vm.state == VmState::Paused;
        Ok(vm.layout.mem_bytes)
    }

    /// Harvests the pages dirtied since the last harvest, as GFNs.
    pub fn harvest_gfns(&mut self, name: &str) -> Result<Vec<u64>, String> {
        let vm = self.find(name)?;
        let mut bitmap = DirtyBitmap::new(vm.layout.mem_bytes / 4096);
        let mode = vm.dirty_mode;
        vm.harvest_into(mode, &mut bitmap)?;
        Ok(bitmap.iter().map(|g| g.0).collect())
    }

    /// Pauses a migrating VM and returns its encoded vCPU and device state.
    pub fn pause_for_switchover(&mut self, name: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
        let vm = self.find(name)?;
        if let VmState::Stopped(why) = &vm.state {
            // It crashed or was stopped during pre-copy: moving it would
            // start it again on the peer.
            return Err(format!("VM '{name}' stopped during the migration ({why})"));
        }
        if vm.state == VmState::Running {
            vm.state = VmState::Paused;
        }
        let tsc = vm.vcpu.guest_tsc(clock::rdtsc());
        let vcpu = hypervisor::migcmd::encode_vcpu(&vm.vcpu.state(), tsc);
        Ok((vcpu, hypervisor::migcmd::encode_device_state(vm.paused_before_migration)))
    }

    /// Ends a migration on the source: `finished` frees the VM; otherwise
    /// it runs again (unless `in_doubt`, which keeps it paused), without the
    /// dirty tracking the migration armed.
    pub fn end_migration(&mut self, name: &str, finished: bool, in_doubt: bool, resume: bool) {
        if finished {
            if let Some(i) = self.vms.iter().position(|vm| vm.name == name) {
                self.vms.remove(i).destroy();
            }
            return;
        }
        if let Ok(vm) = self.find(name) {
            vm.migrating = false;
            vm.throttle = 0;
            vm.in_doubt = in_doubt;
            if vm.dirty_before_migration == DirtyMode::Off {
                // The tracking armed for the migration goes (write
                // protection and PML cost the guest exits); a mode the
                // operator had chosen stays.
                if let Err(e) = vm.dirty(DirtyMode::Off) {
                    log::warn!("VM '{name}': dirty tracking stays on after its migration: {e}");
                }
            } else {
                // The migration's harvests took the pages dirtied since it
                // began, so the operator's `vm dirty` would call each page
                // written meanwhile missed: a fresh baseline instead.
                let mode = vm.dirty_mode;
                if let Err(e) = vm.dirty(DirtyMode::Off).and_then(|_| vm.dirty(mode)) {
                    log::warn!("VM '{name}': dirty tracking after its migration: {e}");
                }
            }
            if in_doubt {
                vm.state = VmState::Paused;
            } else if resume && vm.state == VmState::Paused && !vm.paused_before_migration {
                vm.state = VmState::Running;
            }
        }
    }

    /// The state of a VM, by its console name (`running`, `paused`, ...).
    pub fn state_name(&self, name: &str) -> Option<&'static str> {
        self.vms.iter().find(|vm| vm.name == name).map(|vm| vm.state.name())
    }

    /// Sets a migrating VM's throttle (percent of wall time it sits out).
    pub fn set_throttle(&mut self, name: &str, percent: u8) {
        if let Ok(vm) = self.find(name) {
            vm.throttle = percent.min(95);
        }
    }

    /// Resumes a VM that was paused for the switchover (a failed migration).
    pub fn resume_after_failure(&mut self, name: &str) {
        if let Ok(vm) = self.find(name) {
            if vm.state == VmState::Paused && !vm.in_doubt && !vm.paused_before_migration {
                vm.state = VmState::Running;
            }
            vm.throttle = 0;
        }
    }

    /// Loads an incoming VM's vCPU state (and makes its TSC continue).
    pub fn load_vcpu(&mut self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let (state, guest_tsc) = hypervisor::migcmd::decode_vcpu(bytes, fpu::mxcsr_mask())?;
        let vm = self.find(name)?;
        vm.vcpu.set_state(&state).map_err(String::from)?;
        vm.vcpu.set_guest_tsc(guest_tsc, clock::rdtsc());
        // One entry that cannot run an instruction, to find out now, while
        // the source can still resume its copy, whether the state enters:
        // a state VMRUN or VM entry refuses would otherwise stop the VM at
        // its first run here, after the source had freed it.
        let root = memory::alloc_zeroed(1).ok_or("no memory for a trial entry")?;
        let exit = vm.vcpu.enter_without_memory(root);
        memory::free_frames(root, 1);
        match exit {
            // The first memory access, or a host interrupt before it; a
            // #DB exit is an instruction breakpoint at RIP (it comes again).
            VmExit::NestedPageFault { .. } | VmExit::ExternalInterrupt | VmExit::Exception { vector: 1, .. } => Ok(()),
            VmExit::EntryFailed { reason, .. } => Err(format!("the vCPU state does not enter: {reason}")),
            // A triple fault without a memory access (an event through an
            // IDT too short for it), or anything else no guest can reach
            // before its first access: not a VM to resume.
            other => Err(format!("the vCPU state does not run: its trial entry ended in '{}'", other.name())),
        }
    }

    /// Starts an incoming VM after the switchover; reads its workload from
    /// the guest's own config page.
    pub fn start_incoming(&mut self, name: &str, paused: bool) -> Result<(), String> {
        let vm = self.find(name)?;
        let code = vm.status(cfg::WORKLOAD);
        vm.workload = match code {
            1 => Workload::Sweep,
            2 => Workload::Random,
            3 => Workload::Hot(vm.status(cfg::HOT_PAGES)),
            _ => Workload::Idle,
        };
        vm.rate = vm.status(cfg::RATE);
        vm.state = if paused { VmState::Paused } else { VmState::Running };
        Ok(())
    }

    /// Host memory promised to the page tables of VMs not yet split.
    fn promised_table_bytes(&self) -> u64 {
        self.vms.iter().filter(|vm| !vm.tables_split).map(|vm| guest::table_bytes(vm.layout.mem_bytes)).sum()
    }

    /// The largest VM an incoming migration may bring: what `create_incoming`
    /// would build now (the destination refuses a larger one at its Hello,
    /// before the source sends anything).
    pub fn largest_incoming(&self) -> u64 {
        let promised = self.promised_table_bytes();
        let fits = guest::largest_guest(memory::free_bytes().saturating_sub(promised + HOST_RESERVE));
        fits.min(guest::MAX_MEM_MIB << 20)
    }

    /// Destroys an incoming skeleton (failed migration).
    pub fn destroy_incoming(&mut self, name: &str) {
        if let Some(i) = self.vms.iter().position(|vm| vm.name == name && vm.state == VmState::Incoming) {
            self.vms.remove(i).destroy();
        }
    }

    /// Runs `f` over a VM's memory.
    pub fn with_memory<T>(&mut self, name: &str, f: impl FnOnce(&mut GuestMemory) -> T) -> Result<T, String> {
        let vm = self.find(name)?;
        Ok(f(&mut vm.mem))
    }

    fn find(&mut self, name: &str) -> Result<&mut Vm, String> {
        self.vms.iter_mut().find(|vm| vm.name == name).ok_or_else(|| format!("no VM named '{name}'"))
    }

    /// For a hidden test hook the guest acts on whenever it next runs: sets
    /// request `field` of VM `n`'s config page, and answers `key: n`.
    fn post_request(&mut self, n: String, field: u64, key: &'static str) -> Result<Reply, String> {
        self.find(&n)?.host_write_u64(guest::CONFIG_GPA + field, 1);
        Ok(Reply::data(Obj::new().with(key, n)))
    }

    /// Executes a parsed `vm` command.
    pub fn command(&mut self, cmd: VmCommand) -> Result<Reply, String> {
        match cmd {
            VmCommand::Create { name, mem_mib, workload, rate } => self.create(name, mem_mib, workload, rate),
            VmCommand::Start(n) => self.find(&n)?.transition("start"),
            VmCommand::Pause(n) => self.find(&n)?.transition("pause"),
            VmCommand::Resume(n, force) => {
                let vm = self.find(&n)?;
                if vm.in_doubt && !force {
                    // A lost `Resumed`: the destination may run it already.
                    return Err(format!(
                        "VM '{n}' is in doubt after a migration: the destination may be running it. Check there, \
                         then 'vm destroy {n}' here, or 'vm resume {n} force' if it does not run there"
                    ));
                }
                let reply = vm.transition("resume")?;
                vm.in_doubt = false;
                Ok(reply)
            }
            VmCommand::Stop(n) => self.find(&n)?.transition("stop"),
            VmCommand::Destroy(n) => {
                let i = self.vms.iter().position(|vm| vm.name == n).ok_or_else(|| format!("no VM named '{n}'"))?;
                if self.vms[i].migrating {
                    return Err(format!("VM '{n}' is being migrated; 'migrate cancel' first"));
                }
                if self.vms[i].state == VmState::Incoming {
                    // `migrate cancel` is the source's: here the skeleton
                    // goes when its migration ends without the VM.
                    return Err(format!("VM '{n}' is still arriving by migration; the source can cancel it"));
                }
                let vm = self.vms.remove(i);
                vm.destroy();
                Ok(Reply::data(Obj::new().with("destroyed", n)))
            }
            VmCommand::List => {
                let list: Vec<Value> = self
                    .vms
                    .iter()
                    .map(|vm| {
                        Obj::new()
                            .with("name", vm.name.as_str())
                            .with("state", vm.state.name())
                            .with("mem_mib", vm.mem_mib)
                            .with("ticks", vm.status(st::TICKS))
                            .into()
                    })
                    .collect();
                Ok(Reply::data(Obj::new().with("vms", Value::Arr(list))))
            }
            VmCommand::Info(n) => Ok(Reply::data(self.find(&n)?.info())),
            VmCommand::Dirty(n, mode) => {
                if self.find(&n)?.migrating {
                    // A harvest here would take pages from the migration's
                    // next one: they would never be sent again.
                    return Err(format!("VM '{n}' is being migrated: its dirty pages are the migration's"));
                }
                let (default, current) = (self.default_dirty, self.find(&n)?.dirty_mode);
                let mode = mode.unwrap_or(if current == DirtyMode::Off { default } else { current });
                mode.supported_by(&self.cpu)?;
                self.find(&n)?.dirty(mode).map(Reply::data)
            }
            VmCommand::Verify(n) => {
                let vm = self.find(&n)?;
                if vm.migrating || vm.in_doubt {
                    // The check runs the guest: after the pause for the
                    // switchover, or in doubt, it may be running elsewhere.
                    let why = if vm.in_doubt { "in doubt after a migration" } else { "being migrated" };
                    return Err(format!("VM '{n}' is {why}; verify runs it"));
                }
                vm.verify().map(Reply::data)
            }
            VmCommand::Digest(n) => {
                let vm = self.find(&n)?;
                Ok(Reply::data(Obj::new().with("name", n).with("digest", format!("{:016x}", vm.mem.digest()))))
            }
            VmCommand::Break(n) => {
                let vm = self.find(&n)?;
                vm.vcpu.break_state();
                Ok(Reply::data(Obj::new().with("broken", n)))
            }
            VmCommand::Crash(n) => self.post_request(n, cfg::CRASH_REQ, "crash_requested"),
            VmCommand::Dbchain(n) => self.post_request(n, cfg::DBCHAIN_REQ, "dbchain_requested"),
            VmCommand::Vmsave(n) => self.post_request(n, cfg::VMSAVE_REQ, "vmsave_requested"),
            VmCommand::Ltr(n) => {
                let done = self.find(&n)?.serve_request("ltr", cfg::LTR_REQ, 1)?;
                let (_, _, host_tss, _) = crate::arch::gdt::host_segments();
                Ok(Reply::data(
                    Obj::new()
                        .with("name", n)
                        .with("done", done)
                        .with("host_tr", crate::arch::gdt::task_register())
                        .with("host_tss", host_tss),
                ))
            }
            VmCommand::Trap(n) => {
                let vm = self.find(&n)?;
                let exits = |vm: &Vm| vm.exits.get("exception").copied().unwrap_or(0);
                let before = exits(vm);
                let done = vm.serve_request("trap", cfg::TRAP_REQ, 1)?;
                Ok(Reply::data(
                    Obj::new()
                        .with("name", n)
                        .with("done", done)
                        .with("guest_traps", vm.status(st::TRAPS))
                        .with("guest_dr6", vm.status(st::TRAP_DR6))
                        .with("guest_trap_rip", vm.status(st::TRAP_RIP))
                        .with("trap_rip_wanted", vm.status(st::TRAP_RIP_WANTED))
                        .with("exception_exits", exits(vm) - before),
                ))
            }
            VmCommand::Regs(n, value) => {
                let vm = self.find(&n)?;
                let done = vm.serve_request("regs", cfg::REGS_REQ, value)?;
                Ok(Reply::data(
                    Obj::new()
                        .with("name", n)
                        .with("done", done)
                        .with("xmm0", vm.status(st::SEEN_XMM0))
                        .with("dr0", vm.status(st::SEEN_DR0))
                        .with("cr2", vm.status(st::SEEN_CR2))
                        .with("kernel_gs_base", vm.status(st::SEEN_KERNEL_GS_BASE))
                        .with("cr8", vm.status(st::SEEN_CR8)),
                ))
            }
            VmCommand::Insns(n) => {
                let vm = self.find(&n)?;
                let before = vm.exits.clone();
                // Setting CR4.VMXE only on VT-x: QEMU 7.2's SVM takes it,
                // then fails the next VMRUN (README, "Learned this time").
                let vmxe = if matches!(vm.vcpu, AnyVcpu::Vmx(_)) { 2 } else { 0 };
                let done = vm.serve_request("insns", cfg::INSNS_REQ, 1 | vmxe)?;
                let faults = vm.status(st::INSN_FAULTS).to_le_bytes();
                let mut raised = Obj::new();
                let mut exits = Obj::new();
                for (i, insn) in guest::INSNS.into_iter().enumerate() {
                    raised = match faults[i] {
                        0xFF => raised.with(insn, "none"),
                        6 => raised.with(insn, "#UD"),
                        13 => raised.with(insn, "#GP"),
                        v => raised.with(insn, u64::from(v)),
                    };
                    let count = |e: &BTreeMap<&'static str, u64>| e.get(insn).copied().unwrap_or(0);
                    exits = exits.with(insn, count(&vm.exits) - count(&before));
                }
                Ok(Reply::data(
                    Obj::new().with("name", n).with("done", done).with("raised", raised).with("exits", exits),
                ))
            }
            VmCommand::Poke(n, page) => {
                let vm = self.find(&n)?;
                if page >= vm.layout.data_pages {
                    return Err(format!("VM '{n}' has {} data pages", vm.layout.data_pages));
                }
                // A word in the middle of the page's stamp pattern.
                let gpa = (vm.layout.gfn(page) << 12) + 8 * 100;
                vm.host_write_u64(gpa, !vm.mem.read_u64(gpa));
                Ok(Reply::data(Obj::new().with("poked", n).with("page", page)))
            }
        }
    }

    fn create(&mut self, name: String, mem_mib: u64, workload: Workload, rate: u64) -> Result<Reply, String> {
        self.build(name, mem_mib, workload, rate, true)
    }

    /// Creates the skeleton of a VM arriving by migration: memory, tables
    /// and a vCPU, no guest program; state `incoming`.
    pub fn create_incoming(&mut self, name: &str, mem_bytes: u64) -> Result<(), String> {
        hypervisor::migcmd::migratable_name(name)?;
        if !mem_bytes.is_multiple_of(2 << 20) {
            return Err(format!("incoming VM memory {mem_bytes} is not a multiple of 2 MiB"));
        }
        self.build(String::from(name), mem_bytes >> 20, Workload::Idle, 0, false)?;
        if let Some(vm) = self.vms.last_mut() {
            vm.state = VmState::Incoming;
        }
        Ok(())
    }

    fn build(
        &mut self,
        name: String,
        mem_mib: u64,
        workload: Workload,
        rate: u64,
        load: bool,
    ) -> Result<Reply, String> {
        if self.backend == Backend::None {
            return Err(String::from(
                "this processor has no usable virtualization (VT-x with EPT or AMD-V with NPT is needed)",
            ));
        }
        if self.vms.iter().any(|vm| vm.name == name) {
            return Err(format!("a VM named '{name}' already exists"));
        }
        if !(guest::MIN_MEM_MIB..=guest::MAX_MEM_MIB).contains(&mem_mib) {
            return Err(format!("mem={mem_mib}: from {} to {} MiB", guest::MIN_MEM_MIB, guest::MAX_MEM_MIB));
        }
        let layout = Layout::new(mem_mib);
        if let Workload::Hot(n) = workload {
            if n > layout.data_pages {
                return Err(format!("workload=hot:{n}: this VM has only {} data pages", layout.data_pages));
            }
        }
        let bytes = mem_mib << 20;
        // Guest memory, its 4 KiB tables after splitting, the tables other
        // VMs will take when tracking first splits theirs (a create once
        // took those frames, and tracking or migrating those VMs then
        // failed), and the host's own reserve.
        let promised = self.promised_table_bytes();
        let needed = bytes + guest::table_bytes(bytes) + promised + HOST_RESERVE;
        let free = memory::free_bytes();
        if needed > free {
            return Err(format!(
                "not enough host memory for mem={mem_mib}: {} MiB free, {} MiB needed (guest, its page tables, {} MiB for other VMs' page tables and {} MiB kept for the host)",
                free >> 20,
                needed.div_ceil(1 << 20),
                promised.div_ceil(1 << 20),
                HOST_RESERVE >> 20
            ));
        }
        let oom = || format!("not enough host memory for mem={mem_mib} (allocation failed)");
        // An incoming skeleton (`load` false) is filled by the migration.
        let mut mem = GuestMemory::new(bytes, load).ok_or_else(oom)?;
        let mut fa = KernelFrames;
        let format = if self.backend == Backend::Vmx { Format::Ept } else { Format::Npt };
        let mut slat = Slat::new(format, &mut fa, Gpa(bytes)).map_err(|e| format!("nested page table: {e:?}"))?;
        for (i, &hpa) in mem.chunks().iter().enumerate() {
            let gpa = Gpa(i as u64 * (2 << 20));
            match slat.map(&mut fa, gpa, Hpa(hpa), PageSize::Size2M, Perms::RWX) {
                Ok(flush) => flush.done(),
                Err(e) => {
                    slat.destroy(&mut fa);
                    return Err(format!("mapping guest memory: {e:?}"));
                }
            }
        }
        if load {
            if let Err(e) = load_guest(&mut mem, layout, workload, rate, self.created) {
                slat.destroy(&mut fa);
                return Err(e);
            }
        }
        self.created += 1;
        let tag = 1 + u32::try_from(self.created % u64::from(self.tlb_tags - 1)).unwrap_or(0);
        let (rip, rsp, cr3) = (guest::CODE_GPA, guest::STACK_TOP, guest::PML4_GPA);
        let vcpu = match self.backend {
            Backend::Vmx => {
                let eptp = slat.eptp(self.cpu.ept_ad);
                let vpid = u16::try_from(tag).unwrap_or(1);
                VmxVcpu::new(&self.cpu, vpid, eptp, rip, rsp, cr3)
                    .map(AnyVcpu::Vmx)
                    .map_err(|e| format!("setting up the VMCS: {e:?}"))
            }
            _ => SvmVcpu::new(tag, slat.root().0, rip, rsp, cr3).map(AnyVcpu::Svm).ok_or_else(oom),
        };
        let vcpu = match vcpu {
            Ok(v) => v,
            Err(e) => {
                slat.destroy(&mut fa);
                return Err(e);
            }
        };
        let vm = Vm {
            name: name.clone(),
            mem_mib,
            layout,
            workload,
            rate,
            mem,
            slat,
            vcpu,
            state: VmState::Created,
            exits: BTreeMap::new(),
            dirty_mode: DirtyMode::Off,
            tables_split: false,
            gen_snapshot: None,
            pml_log: DirtyBitmap::new(bytes / 4096),
            host_dirty: Vec::new(),
            migrating: false,
            throttle: 0,
            in_doubt: false,
            halted: false,
            paused_before_migration: false,
            dirty_before_migration: DirtyMode::Off,
        };
        let reply = Obj::new()
            .with("created", name)
            .with("mem_mib", mem_mib)
            .with("data_pages", layout.data_pages)
            .with("workload", workload.describe())
            .with("rate", rate);
        self.vms.push(vm);
        Ok(Reply::data(reply))
    }
}

/// Writes the guest program, its page tables, config page, generation
/// table and the stamps of every data page (generation 1).
fn load_guest(mem: &mut GuestMemory, layout: Layout, workload: Workload, rate: u64, seed: u64) -> Result<(), String> {
    let image = guest_code::image();
    if image.len() > guest::CODE_MAX || !mem.write_bytes(guest::CODE_GPA, image) {
        return Err(String::from("guest program does not fit"));
    }
    mem.write_u64(guest::PML4_GPA, guest::PDPT_GPA | 0x3);
    let gib = layout.mem_bytes.div_ceil(1 << 30);
    for g in 0..gib {
        mem.write_u64(guest::PDPT_GPA + g * 8, (guest::PD_GPA + g * 4096) | 0x3);
    }
    for n in 0..layout.mem_bytes / (2 << 20) {
        mem.write_u64(guest::PD_GPA + n * 8, guest::pd_entry(n));
    }
    let c = guest::CONFIG_GPA;
    let hot = if let Workload::Hot(n) = workload { n } else { 0 };
    for (field, value) in [
        (cfg::MAGIC, guest::MAGIC),
        (cfg::MEM_BYTES, layout.mem_bytes),
        (cfg::DATA_START, layout.data_start),
        (cfg::DATA_PAGES, layout.data_pages),
        (cfg::GEN_TABLE, guest::GEN_TABLE_GPA),
        (cfg::WORKLOAD, workload.code()),
        (cfg::HOT_PAGES, hot),
        (cfg::RATE, rate),
        (cfg::TSC_HZ, clock::tsc_hz()),
        (st::RNG, 0x2545_f491_4f6c_dd1d ^ (seed.wrapping_mul(guest::GOLDEN) | 1)),
    ] {
        mem.write_u64(c + field, value);
    }
    for i in 0..layout.data_pages {
        let word = guest::GEN_TABLE_GPA + i * 4;
        let old = mem.read_u64(word & !7);
        let shift = (word & 4) * 8;
        mem.write_u64(word & !7, (old & !(0xFFFF_FFFF << shift)) | (1 << shift));
        let gfn = layout.gfn(i);
        let page = mem.page_mut(gfn).ok_or("data page outside guest memory")?;
        guest::stamp(page, gfn, 1);
    }
    Ok(())
}

impl Vm {
    /// Guest status word from the config page.
    fn status(&self, field: u64) -> u64 {
        self.mem.read_u64(guest::CONFIG_GPA + field)
    }

    /// Writes a word of guest memory for the guest (a request in its
    /// config page, a test hook). The write sets no D bit, takes no
    /// write-protect fault and leaves no PML entry, so with tracking on its
    /// page is reported at the next harvest by hand: a migration kept the
    /// destination's older copy of the page (a `vm crash` of a paused VM
    /// being migrated was lost).
    fn host_write_u64(&mut self, gpa: u64, value: u64) {
        self.mem.write_u64(gpa, value);
        let gfn = gpa >> 12;
        if self.dirty_mode != DirtyMode::Off && !self.host_dirty.contains(&gfn) {
            self.host_dirty.push(gfn);
        }
    }

    fn transition(&mut self, action: &str) -> Result<Reply, String> {
        if self.migrating {
            return Err(format!("VM '{}' is being migrated; 'migrate cancel' first", self.name));
        }
        if self.state == VmState::Incoming {
            return Err(format!("VM '{}' is still arriving by migration", self.name));
        }
        let next = match (action, &self.state) {
            ("start", VmState::Created) => VmState::Running,
            ("pause", VmState::Running) => VmState::Paused,
            ("resume", VmState::Paused) => VmState::Running,
            ("stop", VmState::Created | VmState::Running | VmState::Paused) => {
                VmState::Stopped(String::from("stopped by the operator"))
            }
            (_, VmState::Stopped(why)) => {
                return Err(format!("VM '{}' is stopped ({why}); destroy it and create a new one", self.name))
            }
            ("start", _) => return Err(format!("VM '{}' was started already ({})", self.name, self.state.name())),
            _ => return Err(format!("cannot {action} VM '{}': it is {}", self.name, self.state.name())),
        };
        self.state = next;
        Ok(Reply::data(Obj::new().with("name", self.name.as_str()).with("state", self.state.name())))
    }

    /// Whether the VM sits out this part of its throttle period: at a
    /// throttle of `p` percent, the first `p` percent of every
    /// [`THROTTLE_PERIOD_US`] of wall time, whether it would run or halt
    /// (as QEMU's cpu-throttle sleeps the vCPU). Taking only the time it
    /// runs would not slow a guest that halts between paced writes.
    fn throttled(&self, now_us: u64) -> bool {
        now_us % THROTTLE_PERIOD_US < THROTTLE_PERIOD_US * u64::from(self.throttle) / 100
    }

    /// Whether the VM may take a slice now: running, not sitting out its
    /// throttle, and not halted until later.
    fn runnable(&mut self, now_us: u64) -> bool {
        self.state == VmState::Running && !self.throttled(now_us) && self.ready()
    }

    /// Whether the vCPU may run: it is not halted, or its wake time has
    /// come, or a request (verify, crash) waits for it.
    fn ready(&mut self) -> bool {
        if self.halted {
            let request = self.status(cfg::VERIFY_REQ) != self.status(st::VERIFY_DONE)
                || self.status(cfg::CRASH_REQ) != 0
                || self.status(cfg::VMSAVE_REQ) != 0
                || self.status(cfg::LTR_REQ) != 0
                || self.status(cfg::TRAP_REQ) != 0
                || self.status(cfg::REGS_REQ) != 0
                || self.status(cfg::DBCHAIN_REQ) != 0
                || self.status(cfg::INSNS_REQ) != 0;
            if request || self.vcpu.guest_tsc(clock::rdtsc()) >= self.status(st::WAKE_TSC) {
                self.halted = false;
            }
        }
        !self.halted
    }

    /// For a hidden test hook (`vm <hook>`): asks the running guest to
    /// act on request `field` of its config page with `value` (not 0) and
    /// runs it until it has (the guest clears the field), 5 s at most.
    /// Whether it did.
    fn serve_request(&mut self, hook: &str, field: u64, value: u64) -> Result<bool, String> {
        if self.state != VmState::Running {
            return Err(format!("VM '{}' is {}; vm {hook} needs it running", self.name, self.state.name()));
        }
        self.host_write_u64(guest::CONFIG_GPA + field, value);
        let deadline = clock::uptime_us() + 5_000_000;
        Ok(self.run_until(|vm| vm.status(field) == 0, deadline, Slice::UntilInterrupt))
    }

    fn stop(&mut self, why: String) {
        log::warn!("VM '{}' stopped: {why}", self.name);
        self.state = VmState::Stopped(why);
    }

    /// Runs the vCPU until `done` says so, the VM stops, or `deadline_us`
    /// passes; with no deadline, also until the end of the `slice`. Returns
    /// whether `done` was reached.
    fn run_until(&mut self, mut done: impl FnMut(&Vm) -> bool, deadline_us: u64, slice: Slice) -> bool {
        if slice == Slice::UntilTick {
            // A tick that came while the host worked would end the slice
            // at once: take it now.
            timer::service_pending();
        }
        let first_tick = timer::ticks();
        loop {
            if done(self) {
                return true;
            }
            if matches!(self.state, VmState::Stopped(_)) || clock::uptime_us() > deadline_us {
                return false;
            }
            let exit = self.vcpu.run();
            *self.exits.entry(exit.name()).or_insert(0) += 1;
            match exit {
                // A host interrupt exits; a guest raising exception after
                // exception (each reflected back) exits on each instead, as
                // its interrupt exit never comes (a #DB trap outranks it).
                // Either way the interrupt is taken here, and the slice
                // ends as the interrupt would end it, an exception chain's
                // at a tick.
                VmExit::ExternalInterrupt | VmExit::Exception { .. } => {
                    self.handle_exit(exit);
                    timer::service_pending();
                    let interrupted = exit == VmExit::ExternalInterrupt && slice == Slice::UntilInterrupt;
                    if deadline_us == u64::MAX && (interrupted || timer::ticks() != first_tick) {
                        return done(self);
                    }
                }
                // The guest waits for its wake time: the slice ends and
                // the CPU goes to the host or another VM. (Waiting for a
                // deadline, it runs on and halts again.)
                VmExit::Hlt if deadline_us == u64::MAX => {
                    self.handle_exit(exit);
                    self.halted = true;
                    return done(self);
                }
                other => self.handle_exit(other),
            }
        }
    }

    fn handle_exit(&mut self, exit: VmExit) {
        match exit {
            VmExit::Io { string: true, .. } | VmExit::Io { rep: true, .. } => {
                self.stop(String::from("string I/O is not emulated"));
            }
            VmExit::Io { port, input, size, next_rip, .. } => {
                if input {
                    let mask = u64::MAX >> (64 - 8 * u32::from(size));
                    self.vcpu.regs_mut().rax |= mask; // nothing is there: all ones
                } else if port == guest::PORT_HEARTBEAT {
                    let ticks = self.status(st::TICKS);
                    if ticks.is_multiple_of(10) {
                        log::debug!(
                            "VM '{}' heartbeat: ticks {ticks}, writes {}, self-check errors {}",
                            self.name,
                            self.status(st::WRITES),
                            self.status(st::CHECK_ERRORS)
                        );
                    }
                }
                self.vcpu.skip_instruction(next_rip);
            }
            VmExit::Cpuid | VmExit::Msr { .. } => {
                // Both are two bytes long; the guest sees zeros.
                let regs = self.vcpu.regs_mut();
                regs.rax = 0;
                regs.rdx = 0;
                if exit == VmExit::Cpuid {
                    regs.rbx = 0;
                    regs.rcx = 0;
                }
                let rip = self.vcpu.rip();
                self.vcpu.skip_instruction(rip.wrapping_add(2));
            }
            VmExit::Hlt => {
                let rip = self.vcpu.rip();
                self.vcpu.skip_instruction(rip.wrapping_add(1));
            }
            VmExit::NestedPageFault { gpa, access: Access::Write, .. } if self.dirty_mode == DirtyMode::Wp => {
                match self.slat.wp_fault(&mut KernelFrames, Gpa(gpa)) {
                    Ok((true, flush)) => self.flush(flush),
                    Ok((false, flush)) => {
                        flush.done();
                        self.stop(format!("write to read-only guest-physical {gpa:#x}"));
                    }
                    Err(e) => self.stop(format!("write to unmapped guest-physical {gpa:#x} ({e:?})")),
                }
            }
            VmExit::NestedPageFault { gpa, access, .. } => {
                self.stop(format!("bad {access:?} access to guest-physical {gpa:#x}"));
            }
            VmExit::Shutdown => self.stop(String::from("triple fault")),
            VmExit::EntryFailed { code, reason } => self.stop(format!("{reason} (code {code:#x})")),
            VmExit::Hypercall => {
                let rip = self.vcpu.rip();
                self.vcpu.skip_instruction(rip.wrapping_add(3));
            }
            // As a CPU whose CPUID offers nothing runs them (the guest's
            // CPUID reads zeros). Flushing caches (0F 08, 0F 09: two bytes)
            // does nothing here: no device of ours needs it. There are no
            // performance counters, and no RDTSCP, MONITOR, MWAIT or
            // XSETBV. They used to stop the VM (INVD and XSETBV, exits it
            // cannot avoid) or reach the host.
            VmExit::Insn(Insn::Invd | Insn::Wbinvd) => {
                let rip = self.vcpu.rip();
                self.vcpu.skip_instruction(rip.wrapping_add(2));
            }
            // And CR4.VMXE is reserved where the CPUID offers no VMX.
            VmExit::Insn(Insn::Rdpmc | Insn::MovCr4Vmxe) => self.vcpu.inject_exception(13, Some(0)),
            VmExit::Insn(Insn::Rdtscp | Insn::Monitor | Insn::Mwait | Insn::Xsetbv) => {
                self.vcpu.inject_exception(6, None);
            }
            VmExit::ExternalInterrupt => {}
            VmExit::PmlFull => {
                self.vcpu.drain_pml(&mut self.pml_log);
            }
            // Intercepted only so that an endless chain of them exits each
            // time (`vmx::exit::INTERCEPTED_EXCEPTIONS`): back to the guest.
            VmExit::Exception { vector, error_code, .. } => self.vcpu.inject_exception(vector, error_code),
            VmExit::Unknown(code) => self.stop(format!("unexpected exit code {code:#x}")),
        }
    }

    fn flush(&mut self, flush: TlbFlush) {
        if flush.needed() {
            self.vcpu.flush_tlb();
        }
        flush.done();
    }

    fn info(&self) -> Obj {
        let mut exits = Obj::new();
        for (k, v) in &self.exits {
            exits = exits.with(k, *v);
        }
        let stop_reason = match &self.state {
            VmState::Stopped(why) => Some(why.clone()),
            _ => None,
        };
        Obj::new()
            .with("name", self.name.as_str())
            .with("state", self.state.name())
            .with("mem_mib", self.mem_mib)
            .with("workload", self.workload.describe())
            .with("rate", self.rate)
            .with("ticks", self.status(st::TICKS))
            .with("writes", self.status(st::WRITES))
            .with("check_errors", self.status(st::CHECK_ERRORS))
            .with("exits", exits)
            .with("exits_total", self.exits.values().sum::<u64>())
            .with("dirty_mode", self.dirty_mode.as_str())
            .with("stop_reason", stop_reason)
            .with("migrating", self.migrating)
            .with("throttle", self.throttle)
            .with("in_doubt", self.in_doubt)
            .with("system", system_obj(&self.vcpu.state().system))
    }

    fn gen_table(&self) -> Vec<u32> {
        (0..self.layout.data_pages)
            .map(|i| {
                let word = guest::GEN_TABLE_GPA + i * 4;
                u32::try_from((self.mem.read_u64(word & !7) >> ((word & 4) * 8)) & 0xFFFF_FFFF).unwrap_or(0)
            })
            .collect()
    }

    /// Harvests dirty pages with `mode`, switching mechanisms if needed, and
    /// compares the result with the guest's own record of what it wrote.
    fn dirty(&mut self, mode: DirtyMode) -> Result<Obj, String> {
        let mut fa = KernelFrames;
        let mut bitmap = DirtyBitmap::new(self.layout.mem_bytes / 4096);
        if mode != self.dirty_mode || mode == DirtyMode::Off {
            if self.dirty_mode == DirtyMode::Wp {
                let f = self.slat.wp_disarm(&fa);
                self.flush(f);
            }
            if self.dirty_mode == DirtyMode::Pml {
                self.vcpu.set_pml(false);
            }
            let f = self.slat.split_all(&mut fa).map_err(|e| format!("splitting 2 MiB pages: {e:?}"))?;
            self.flush(f);
            self.tables_split = true;
            match mode {
                DirtyMode::Dbit | DirtyMode::Pml => {
                    let (_, f) = self.slat.harvest_dirty(&fa, &mut bitmap);
                    self.flush(f);
                    if mode == DirtyMode::Pml && !self.vcpu.set_pml(true) {
                        self.dirty_mode = DirtyMode::Off;
                        return Err(String::from("this vCPU cannot log page modifications (no PML)"));
                    }
                    self.pml_log.clear_all();
                }
                DirtyMode::Wp => {
                    let f = self.slat.wp_arm(&fa);
                    self.flush(f);
                }
                DirtyMode::Off => {}
            }
            self.dirty_mode = mode;
            self.host_dirty.clear();
            self.gen_snapshot = (mode != DirtyMode::Off).then(|| self.gen_table());
            return Ok(Obj::new()
                .with("name", self.name.as_str())
                .with("mode", mode.as_str())
                .with("baseline", true)
                .with("count", bitmap.count()));
        }
        self.harvest_into(mode, &mut bitmap)?;
        let now = self.gen_table();
        let in_flight = self.status(st::IN_FLIGHT);
        let (mut written, mut missed, mut extra_data, mut flight) = (0u64, 0u64, 0u64, 0u64);
        if let Some(before) = &self.gen_snapshot {
            for (i, (old, new)) in before.iter().zip(&now).enumerate() {
                let i = i as u64;
                let was_written = old != new;
                let reported = bitmap.get(ept::Gfn(self.layout.gfn(i)));
                if in_flight == i + 1 {
                    flight += 1;
                } else if was_written && !reported {
                    missed += 1;
                } else if reported && !was_written {
                    extra_data += 1;
                }
                written += u64::from(was_written);
            }
        }
        let extra_other = bitmap.iter().filter(|g| self.layout.index(g.0).is_none()).count();
        self.gen_snapshot = Some(now);
        let first: Vec<u64> = bitmap.iter().take(DIRTY_LIST).map(|g| g.0).collect();
        Ok(Obj::new()
            .with("name", self.name.as_str())
            .with("mode", mode.as_str())
            .with("baseline", false)
            .with("count", bitmap.count())
            .with("first", first)
            .with("written", written)
            .with("missed", missed)
            .with("extra_data", extra_data)
            .with("extra_other", extra_other)
            .with("in_flight", flight))
    }

    /// Moves the pages written since the last harvest into `bitmap` (which
    /// must be empty) and re-arms tracking, with the TLB flush that needs.
    fn harvest_into(&mut self, mode: DirtyMode, bitmap: &mut DirtyBitmap) -> Result<(), String> {
        let fa = KernelFrames;
        let (_, flush) = match mode {
            DirtyMode::Dbit => self.slat.harvest_dirty(&fa, bitmap),
            DirtyMode::Wp => self.slat.wp_harvest(&fa, bitmap),
            DirtyMode::Pml => {
                // The log alone is the answer; the D-bit pass only clears D
                // so that the next write to each page is logged again.
                self.vcpu.drain_pml(&mut self.pml_log);
                let mut rearm = DirtyBitmap::new(bitmap.pages());
                let r = self.slat.harvest_dirty(&fa, &mut rearm);
                core::mem::swap(bitmap, &mut self.pml_log);
                self.pml_log.clear_all();
                r
            }
            DirtyMode::Off => return Err(String::from("dirty tracking is off; say dbit or wp")),
        };
        self.flush(flush);
        for gfn in self.host_dirty.drain(..) {
            bitmap.set(ept::Gfn(gfn));
        }
        Ok(())
    }

    /// Asks the guest to check every page; runs it (even if paused) until it
    /// answers.
    fn verify(&mut self) -> Result<Obj, String> {
        if !matches!(self.state, VmState::Running | VmState::Paused) {
            return Err(format!("VM '{}' is {}; only a started VM can verify", self.name, self.state.name()));
        }
        let req = self.status(cfg::VERIFY_REQ).wrapping_add(1);
        self.host_write_u64(guest::CONFIG_GPA + cfg::VERIFY_REQ, req);
        let deadline = clock::uptime_us() + VERIFY_TIMEOUT_US;
        let done = self.run_until(|vm| vm.status(st::VERIFY_DONE) == req, deadline, Slice::UntilInterrupt);
        if let VmState::Stopped(why) = &self.state {
            return Err(format!("VM '{}' stopped during verify: {why}", self.name));
        }
        if !done {
            return Err(format!(
                "VM '{}' did not finish verifying within {} s",
                self.name,
                VERIFY_TIMEOUT_US / 1_000_000
            ));
        }
        let bad = self.status(st::VERIFY_BAD);
        let first_bad = self.status(st::VERIFY_FIRST_BAD);
        // The guest takes its layout from its config page, which migrates
        // with it: a damaged one could make it check nothing and pass.
        let checked = self.status(st::VERIFY_PAGES);
        let config_ok = self.status(cfg::MAGIC) == guest::MAGIC
            && self.status(cfg::DATA_PAGES) == self.layout.data_pages
            && checked == self.layout.data_pages;
        Ok(Obj::new()
            .with("name", self.name.as_str())
            .with("pages", self.layout.data_pages)
            .with("pages_checked", checked)
            .with("bad_pages", bad)
            .with("first_bad", (first_bad != u64::MAX).then_some(first_bad))
            .with("check_errors", self.status(st::CHECK_ERRORS))
            .with("config_ok", config_ok)
            .with("verified", config_ok && bad == 0 && self.status(st::CHECK_ERRORS) == 0))
    }

    fn destroy(self) {
        let Vm { slat, vcpu, mut mem, .. } = self;
        slat.destroy(&mut KernelFrames);
        vcpu.destroy();
        mem.free();
    }
}

/// The vCPU's control registers and tables for `vm info`.
fn system_obj(sys: &vmx::SystemState) -> Obj {
    let [_, _, _, _, fs, gs, ldtr, tr] = sys.segments;
    Obj::new()
        .with("cr0", sys.cr0)
        .with("cr3", sys.cr3)
        .with("cr4", sys.cr4)
        .with("cr8", sys.cr8)
        .with("gdtr_base", sys.gdtr.base)
        .with("gdtr_limit", sys.gdtr.limit)
        .with("idtr_base", sys.idtr.base)
        .with("idtr_limit", sys.idtr.limit)
        .with("tr", tr.selector)
        .with("ldtr", ldtr.selector)
        .with("fs_base", fs.base)
        .with("gs_base", gs.base)
}

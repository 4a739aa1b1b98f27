//! Kernel start-up after either boot route, and the console loop.

use alloc::format;
use alloc::string::String;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use hypervisor::acpi;
use hypervisor::bootinfo::BootInfo;
use hypervisor::line::LineEditor;
use hypervisor::migcmd::MigrateCommand;
use hypervisor::netcmd::NetCommand;
use hypervisor::shell::{Action, CpuTime, Fault, Host, MemInfo, Mode, Reply, Routines, Shell};
use hypervisor::vmcmd::VmCommand;
use vmx::cpu::CpuReport;

use crate::arch::{backtrace, clock, cpu, crc, gdt, idt, mem, memory, power, serial, svm, timer};
use crate::migrate::Migrator;
use crate::net::Net;
use crate::vm::{Manager, Slice};

/// The machine as the shell sees it.
struct Machine {
    cpu: CpuReport,
    processors: u32,
    route: &'static str,
    vms: Manager,
    net: Option<Net>,
    migrator: Migrator,
    cpu_time: CpuTime,
    routines: Routines,
}

impl Host for Machine {
    fn cpu(&self) -> &CpuReport {
        &self.cpu
    }
    fn processors(&self) -> u32 {
        self.processors
    }
    fn routines(&self) -> Routines {
        self.routines
    }
    fn tsc_hz(&self) -> u64 {
        clock::tsc_hz()
    }
    fn boot_route(&self) -> &'static str {
        self.route
    }
    fn memory(&self) -> MemInfo {
        let (heap_bytes, heap_used_bytes) = memory::heap_usage();
        MemInfo { total_bytes: memory::total_bytes(), free_bytes: memory::free_bytes(), heap_bytes, heap_used_bytes }
    }
    fn uptime_us(&self) -> u64 {
        clock::uptime_us()
    }
    fn cpu_time(&self) -> CpuTime {
        self.cpu_time
    }
    fn vm(&mut self, cmd: VmCommand) -> Result<Reply, String> {
        if let (VmCommand::Verify(name), true) = (&cmd, self.migrator.busy()) {
            // The check runs the guest for up to a minute without polling
            // the network: a migration's link would time out meanwhile.
            return Err(format!("a migration is running; verify '{name}' after it ends"));
        }
        self.vms.command(cmd)
    }
    fn migrate(&mut self, cmd: MigrateCommand) -> Result<Reply, String> {
        // Two listeners on one port: smoltcp gives each connection to
        // whichever comes first, so a migration could land in the bench.
        if let (MigrateCommand::Listen { port: Some(port), .. }, Some(net)) = (&cmd, &self.net) {
            if net.bench_port() == Some(*port) {
                return Err(format!("port {port} is taken by 'net bench listen'"));
            }
        }
        self.migrator.command(cmd, self.net.as_mut(), &mut self.vms)
    }
    fn net(&mut self, cmd: NetCommand) -> Result<Reply, String> {
        if matches!(cmd, NetCommand::Ping(..) | NetCommand::BenchSend(..) | NetCommand::Blast(..))
            && self.migrator.busy()
        {
            // These run their own loop until done (a ping to a silent host
            // waits 2 s per request, a bench up to minutes): the migration
            // and every VM would stand still, and the peer give up on it.
            return Err(String::from("a migration is running; run this after it ends"));
        }
        if let NetCommand::BenchListen(port) = cmd {
            if self.migrator.listen_port() == Some(port) {
                return Err(format!("port {port} is the migration port ('migrate listen' moves it)"));
            }
        }
        match self.net.as_mut() {
            Some(net) => net.command(cmd),
            None => Err(String::from("no network card: this host has no e1000")),
        }
    }
}

/// Brings the kernel up and runs the console. `reserved` lists physical
/// ranges the boot route still uses that the memory map calls usable.
pub fn start(boot: BootInfo, reserved: &[(u64, u64)]) -> ! {
    serial::init();
    gdt::init();
    idt::init();
    let tsc_hz = clock::calibrate();
    log::info!("hypervisor {} booting ({})", env!("CARGO_PKG_VERSION"), boot.route.as_str());
    if let Err(e) = memory::init(&boot, reserved) {
        log::error!("memory setup failed: {e:?}");
        power::halt_forever();
    }
    if boot.regions_dropped > 0 {
        log::warn!("{} usable memory regions ignored (table full)", boot.regions_dropped);
    }
    let mut scratch = alloc::vec![0u8; 256 * 1024];
    let (copy, rep, looped) = mem::calibrate(&mut scratch);
    drop(scratch);
    log::info!("memcpy: {copy} (128 KiB twice: rep movsb {rep} cycles, loop {looped})");
    let crc = crc::init();
    let routines = Routines {
        memcpy: copy,
        crc32c: if crc.instruction { "crc32 instruction" } else { "tables" },
        crc32c_instruction_cycles: crc.instruction_cycles,
        crc32c_tables_cycles: crc.tables_cycles,
    };
    log::info!(
        "migration CRC32C: {} (64 KiB: instruction {} cycles, tables {})",
        routines.crc32c,
        crc.instruction_cycles,
        crc.tables_cycles
    );
    let cpu = cpu::report();
    let processors = count_processors(&boot);
    log::info!(
        "{} family {:#x} model {:#x}; backend {}; {} processor(s); TSC {}.{:03} MHz",
        cpu.vendor_str(),
        cpu.family,
        cpu.model,
        cpu.backend().as_str(),
        processors,
        tsc_hz / 1_000_000,
        (tsc_hz / 1_000) % 1_000
    );
    log::info!(
        "memory: {} MiB usable, {} MiB free after the heap",
        memory::total_bytes() >> 20,
        memory::free_bytes() >> 20
    );
    crate::arch::fpu::enable();
    match cpu.backend() {
        vmx::cpu::Backend::Svm => match svm::enable() {
            Ok(()) => log::info!("SVM enabled (ASIDs: {})", cpu.tlb_tags),
            Err(e) => log::error!("SVM could not be enabled: {e:?}"),
        },
        vmx::cpu::Backend::Vmx => match crate::arch::vmx::enable() {
            Ok(()) => log::info!("VMX enabled (EPT A/D: {}, PML: {}, VPID: {})", cpu.ept_ad, cpu.pml, cpu.vpid),
            Err(e) => log::error!("VMX could not be enabled: {e:?}"),
        },
        vmx::cpu::Backend::None => log::warn!("no VT-x with EPT or AMD-V with NPT: VMs cannot run"),
    }
    timer::init();
    let vms = Manager::new(&cpu);
    let net = Net::probe();
    if net.is_none() {
        log::info!("no e1000 found: networking off");
    }
    let migrator = Migrator::new(cpu.vendor);
    let mut machine = Machine {
        cpu,
        processors,
        route: boot.route.as_str(),
        vms,
        net,
        migrator,
        cpu_time: CpuTime::default(),
        routines,
    };
    serial::write_str("hypervisor ready\r\n");
    console_loop(&mut machine)
}

fn count_processors(boot: &BootInfo) -> u32 {
    let mut rsdp = [0u8; 36];
    let have = match (boot.rsdp_copy, boot.rsdp) {
        (Some(copy), _) => {
            rsdp = copy;
            true
        }
        (None, Some(pa)) => memory::read_phys(pa, &mut rsdp),
        (None, None) => false,
    };
    if !have {
        log::warn!("no ACPI RSDP; assuming one processor");
        return 1;
    }
    match acpi::count_processors(&rsdp, &memory::read_phys) {
        Ok(n) if n > 0 => n,
        other => {
            log::warn!("MADT unreadable ({other:?}); assuming one processor");
            1
        }
    }
}

/// The main loop: console input first, then the network, then one time
/// slice of the next running VM that is not halted; with nothing to do,
/// sleep until an interrupt (a halted guest waits for its wake time, at the
/// first timer tick past it).
///
/// While a migration runs, the CPU is shared: the network and the
/// migration get up to `share / (100 - share)` timer periods of work (one
/// period at the default 50 %), then a VM runs until the next tick (1 ms at
/// [`timer::FAST_HZ`]) without being cut short by the NIC. Otherwise a
/// VM runs until any host interrupt, so a frame is served as soon as it
/// arrives.
fn console_loop(machine: &mut Machine) -> ! {
    let mut shell = Shell::new();
    let mut editor = LineEditor::new();
    let mut echo = String::new();
    serial::write_str(shell.prompt());
    loop {
        let Some(byte) = serial::try_read() else {
            let share = machine.migrator.cpu_share();
            let fast = share.is_some() || machine.vms.any_running();
            timer::set_hz(if fast { timer::FAST_HZ } else { timer::HZ });
            let busy = serve_network(machine, share);
            if machine.vms.any_ready() {
                let t = clock::uptime_us();
                machine.vms.run_slice(if share.is_some() { Slice::UntilTick } else { Slice::UntilInterrupt });
                let ran = clock::uptime_us();
                machine.cpu_time.vms_us += ran - t;
                if let Some(net) = machine.net.as_mut() {
                    net.poll();
                    machine.cpu_time.network_us += clock::uptime_us() - ran;
                }
            } else if !busy {
                let t = clock::uptime_us();
                timer::wait_for_interrupt();
                machine.cpu_time.idle_us += clock::uptime_us() - t;
            }
            continue;
        };
        let event = editor.feed(byte, &mut echo);
        if shell.mode() == Mode::Human {
            serial::write_str(&echo);
        }
        echo.clear();
        let Some(event) = event else { continue };
        let out = shell.handle(event, machine);
        serial::JSON_EVENTS.store(shell.mode() == Mode::Json, Ordering::Relaxed);
        serial::write_str(&out.text);
        match out.action {
            Some(Action::Shutdown) => {
                log::info!("powering off");
                power::shutdown();
            }
            Some(Action::Fault(f)) => raise(f),
            None => {}
        }
        serial::write_str(shell.prompt());
    }
}

/// Polls the network and moves migrations forward: once, or with a CPU
/// `share` (percent) again and again until there is no work left, the
/// share's time has passed, or a console byte waits. Returns whether there
/// was work.
fn serve_network(machine: &mut Machine, share: Option<u8>) -> bool {
    let Some(net) = machine.net.as_mut() else { return false };
    let period_us = 1_000_000 / timer::FAST_HZ;
    let until = share.map(|p| {
        let p = u64::from(p.min(95));
        clock::uptime_us() + period_us * p / (100 - p)
    });
    let mut worked = false;
    let mut t = clock::uptime_us();
    loop {
        let mut busy = net.poll();
        let polled = clock::uptime_us();
        busy |= machine.migrator.poll(net, &mut machine.vms);
        let migrated = clock::uptime_us();
        machine.cpu_time.network_us += polled - t;
        machine.cpu_time.migration_us += migrated - polled;
        worked |= busy;
        let Some(until) = until else { return worked };
        if !busy || migrated >= until || serial::has_input() {
            return worked;
        }
        t = migrated;
    }
}

/// Raises an exception on purpose (hidden `fault` command).
fn raise(fault: Fault) {
    match fault {
        Fault::Breakpoint => x86_64::instructions::interrupts::int3(),
        // SAFETY: `ud2` only raises #UD, whose handler reports and halts.
        Fault::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
        Fault::PageFault => {
            // An address in a level-4 slot this kernel never maps.
            let unmapped = 0xffff_a000_dead_0000 as *const u64;
            // SAFETY: the read faults (nothing is mapped there); the #PF
            // handler reports it and halts, so no value is ever produced.
            let _ = unsafe { core::ptr::read_volatile(unmapped) };
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut w = serial::RawWriter;
    let mut addresses = [0; backtrace::MAX_FRAMES];
    let n = backtrace::return_addresses(&mut addresses);
    let frames = &addresses[..n];
    if serial::JSON_EVENTS.load(Ordering::Relaxed) {
        let _ = write!(w, "{{\"event\":\"panic\",\"msg\":\"");
        let _ = write!(serial::JsonEscape(&mut w), "{info}");
        let _ = write!(w, "\",\"backtrace\":[");
        for (i, a) in frames.iter().enumerate() {
            let _ = write!(w, "{}\"{a:#x}\"", if i == 0 { "" } else { "," });
        }
        let _ = write!(w, "]}}\r\n");
    } else {
        let _ = write!(w, "\r\nKERNEL PANIC: {info}\r\nbacktrace:");
        for a in frames {
            let _ = write!(w, " {a:#x}");
        }
        let _ = write!(w, "\r\n");
    }
    power::halt_forever()
}

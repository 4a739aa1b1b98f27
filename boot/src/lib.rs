//! Host-side tooling: build boot images from the kernel ELF, launch hosts
//! under QEMU (TCG, AMD-V with NPT) or Bochs (Intel VT-x with EPT), and talk
//! to their serial consoles.
//!
//! Each emulator's COM1 is a TCP connection to a listener this process opens
//! on loopback, so the console is a plain byte stream for both emulators.
//! In a network namespace QEMU's console is a Unix socket instead (it
//! crosses namespaces); Bochs only speaks TCP, so its listener is opened
//! inside the namespace, on the namespace's own loopback.
//! The emulator is killed when its [`Host`] is dropped. Nothing kills it if
//! this process is killed outright (`PR_SET_PDEATHSIG` is not used: it is
//! tied to the spawning thread rather than the process), so tests keep
//! hosts in scope, the scripts use `trap`, and the next lab removes stale
//! namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Where the three boot images of one kernel live.
#[derive(Clone, Debug)]
pub struct Images {
    /// The kernel ELF they were built from.
    pub kernel: PathBuf,
    /// `bootloader` BIOS disk image.
    pub bios: PathBuf,
    /// `bootloader` UEFI disk image.
    pub uefi: PathBuf,
    /// GRUB rescue ISO booting the kernel through Multiboot2.
    pub grub: PathBuf,
}

/// QEMU's exit status when the kernel writes 0x10 to `isa-debug-exit`.
pub const QEMU_CLEAN_EXIT: i32 = 33;

/// OVMF firmware used for UEFI boots.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

impl Images {
    /// Image paths for `kernel` inside `out`.
    pub fn at(kernel: &Path, out: &Path) -> Self {
        Images {
            kernel: kernel.to_path_buf(),
            bios: out.join("bios.img"),
            uefi: out.join("uefi.img"),
            grub: out.join("grub.iso"),
        }
    }

    /// Builds all three images into `out`.
    pub fn build(kernel: &Path, out: &Path) -> Result<Self> {
        let images = Images::at(kernel, out);
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        bootloader::BiosBoot::new(kernel)
            .create_disk_image(&images.bios)
            .map_err(|e| anyhow!("building the BIOS image: {e:#}"))?;
        bootloader::UefiBoot::new(kernel)
            .create_disk_image(&images.uefi)
            .map_err(|e| anyhow!("building the UEFI image: {e:#}"))?;
        build_grub_iso(kernel, &images.grub, &out.join("iso"))?;
        Ok(images)
    }
}

fn build_grub_iso(kernel: &Path, iso: &Path, tree: &Path) -> Result<()> {
    let grub_dir = tree.join("boot/grub");
    std::fs::create_dir_all(&grub_dir)?;
    std::fs::copy(kernel, tree.join("boot/kernel.elf")).context("copying the kernel into the ISO tree")?;
    std::fs::write(
        grub_dir.join("grub.cfg"),
        "set timeout=0\nset default=0\nmenuentry \"hypervisor\" {\n    multiboot2 /boot/kernel.elf\n    boot\n}\n",
    )?;
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(iso)
        .arg(tree)
        .output()
        .context("running grub-mkrescue (install grub-pc-bin, grub-common, xorriso, mtools: scripts/setup.sh)")?;
    if !out.status.success() {
        bail!("grub-mkrescue failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Which emulator runs a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    /// QEMU TCG with `-cpu max` (AMD-V with nested paging).
    Qemu,
    /// Bochs 2.7 with `corei7_skylake_x` (VT-x with EPT, EPT A/D and PML).
    Bochs,
}

/// Firmware route for QEMU hosts (Bochs always boots the GRUB ISO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS and the `bootloader` BIOS image.
    Bios,
    /// OVMF and the `bootloader` UEFI image.
    Uefi,
    /// SeaBIOS and the GRUB ISO (Multiboot2).
    Grub,
}

/// How to start one host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// QEMU or Bochs.
    pub emulator: Emulator,
    /// Firmware route (QEMU only).
    pub firmware: Firmware,
    /// Processors.
    pub cpus: u32,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// Extra arguments appended to the QEMU command line.
    pub qemu_args: Vec<String>,
    /// The host's e1000 NIC, if any.
    pub nic: Option<Nic>,
    /// Run the emulator inside this network namespace (`ip netns exec`).
    /// QEMU's console then goes over a Unix socket, which crosses
    /// namespaces; Bochs's over TCP to a listener opened inside the
    /// namespace (see [`tcp_listener_in_netns`]).
    pub netns: Option<String>,
}

/// How a host's e1000 is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nic {
    /// A TAP device (in the host's network namespace). It must exist:
    /// QEMU and Bochs attach to it by name.
    Tap {
        /// Interface name.
        ifname: String,
        /// MAC address, `52:54:00:..`.
        mac: String,
    },
    /// A point-to-point QEMU socket link: this side listens on a loopback
    /// port (QEMU only).
    Listen {
        /// TCP port on 127.0.0.1.
        port: u16,
        /// MAC address.
        mac: String,
    },
    /// The other side of [`Nic::Listen`].
    Connect {
        /// TCP port on 127.0.0.1.
        port: u16,
        /// MAC address.
        mac: String,
    },
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            emulator: Emulator::Qemu,
            firmware: Firmware::Bios,
            cpus: 1,
            mem_mib: 256,
            qemu_args: Vec::new(),
            nic: None,
            netns: None,
        }
    }
}

/// A console byte stream: TCP on loopback, or a Unix socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Where the emulator's COM1 connects to.
enum ConsoleListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl ConsoleListener {
    fn new(config: &HostConfig) -> Result<Self> {
        match (&config.netns, config.emulator) {
            (Some(_), Emulator::Qemu) => Self::unix(),
            (Some(ns), Emulator::Bochs) => {
                let l = tcp_listener_in_netns(ns)?;
                l.set_nonblocking(true)?;
                Ok(ConsoleListener::Tcp(l))
            }
            (None, _) => {
                let l = TcpListener::bind("127.0.0.1:0").context("binding the console listener")?;
                l.set_nonblocking(true)?;
                Ok(ConsoleListener::Tcp(l))
            }
        }
    }

    fn unix() -> Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hv-console-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).context("binding the console socket")?;
        l.set_nonblocking(true)?;
        Ok(ConsoleListener::Unix(l, path))
    }

    /// The `-serial` / `com1: dev=` argument.
    fn qemu_serial(&self) -> Result<String> {
        Ok(match self {
            ConsoleListener::Tcp(l) => format!("tcp:127.0.0.1:{}", l.local_addr()?.port()),
            ConsoleListener::Unix(_, path) => format!("unix:{}", path.display()),
        })
    }

    fn tcp_port(&self) -> Result<u16> {
        match self {
            ConsoleListener::Tcp(l) => Ok(l.local_addr()?.port()),
            ConsoleListener::Unix(..) => bail!("Bochs consoles use TCP (its com1 has no Unix socket mode)"),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            ConsoleListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::Tcp(s))
            }
            ConsoleListener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Stream::Unix(s))
            }
        }
    }
}

/// Opens a TCP listener on 127.0.0.1 (any port) inside the network
/// namespace `ns` (an `ip netns` name, pinned at `/run/netns/NS`).
///
/// A socket belongs to the namespace it was created in, whatever thread
/// uses it later. So a short-lived thread joins the namespace with
/// `setns(2)` (which changes only the calling thread's namespace), binds,
/// hands the listener back and exits; this process's other threads stay
/// where they were. Needs `CAP_SYS_ADMIN` (the lab runs as root).
pub fn tcp_listener_in_netns(ns: &str) -> Result<TcpListener> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || -> Result<TcpListener> {
        // SAFETY: `file` is an open namespace file for the whole call;
        // setns only switches this (short-lived) thread's network namespace
        // and touches no memory of ours.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET) into the lab namespace");
        }
        TcpListener::bind("127.0.0.1:0").context("binding the console listener inside the namespace")
    })
    .join()
    .map_err(|_| anyhow!("the namespace thread panicked"))?
    .with_context(|| format!("console listener in network namespace {ns}"))
}

impl Drop for ConsoleListener {
    fn drop(&mut self) {
        if let ConsoleListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A running emulated host and its console.
pub struct Host {
    child: Child,
    console: Console,
    workdir: Option<PathBuf>,
}

/// Line-oriented access to a host's serial console.
pub struct Console {
    reader: BufReader<Stream>,
    writer: Stream,
    /// Every line read so far, for failure reports.
    pub transcript: Vec<String>,
}

impl Host {
    /// Starts a host and waits until its console connects (not until the
    /// kernel is ready; see [`Console::wait_for`]).
    pub fn launch(images: &Images, config: &HostConfig) -> Result<Self> {
        let listener = ConsoleListener::new(config)?;
        let (child, workdir) = match config.emulator {
            Emulator::Qemu => (
                qemu_command(images, config, &listener.qemu_serial()?)
                    .spawn()
                    .context("starting qemu-system-x86_64")?,
                None,
            ),
            Emulator::Bochs => {
                let port = listener.tcp_port()?;
                let dir = std::env::temp_dir().join(format!("hv-bochs-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir)?;
                let mut cmd = bochs_command(images, config, port, &dir)?;
                (cmd.spawn().context("starting bochs")?, Some(dir))
            }
        };
        let mut host = Host { child, console: Console::placeholder()?, workdir };
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match listener.accept() {
                Ok(stream) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(status) = host.child.try_wait()? {
                        bail!("emulator exited before connecting its console: {status}");
                    }
                    if Instant::now() > deadline {
                        bail!("emulator did not connect its console within 30 s");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        host.console = Console::new(stream)?;
        Ok(host)
    }

    /// The host's console.
    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    /// Waits for the emulator to exit; kills it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("emulator still running after {timeout:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of the emulator's own log (Bochs writes one to
    /// its work directory; QEMU's goes to its stderr, not kept).
    pub fn emulator_log_tail(&self, n: usize) -> Option<String> {
        let log = std::fs::read_to_string(self.workdir.as_ref()?.join("bochs.log")).ok()?;
        let lines: Vec<&str> = log.lines().collect();
        Some(lines[lines.len().saturating_sub(n)..].join("\n"))
    }

    /// Kills the emulator (idempotent).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Splits the host into its console and a guard that kills the emulator
    /// when dropped (for relaying the console on another thread).
    pub fn into_parts(mut self) -> (Console, HostGuard) {
        let console = std::mem::replace(&mut self.console, Console::placeholder().expect("loopback pair"));
        (console, HostGuard(self))
    }
}

/// Keeps an emulator alive; kills it on drop.
pub struct HostGuard(Host);

impl HostGuard {
    /// See [`Host::wait_exit`].
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        self.0.wait_exit(timeout)
    }
    /// Whether the emulator is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.0.child.try_wait(), Ok(None))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.workdir.take() {
            if std::env::var_os("HV_KEEP_WORKDIR").is_none() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn qemu_command(images: &Images, config: &HostConfig, serial: &str) -> Command {
    let mut cmd = match &config.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    cmd.args(["-nodefaults", "-vga", "std", "-display", "none", "-no-reboot", "-monitor", "none", "-snapshot"])
        .args(["-machine", "pc", "-cpu", "max"])
        .args(["-smp", &config.cpus.to_string(), "-m", &config.mem_mib.to_string()])
        // RAM present from power-on, as on a real machine. QEMU otherwise
        // allocates it on first touch, and the emulated CPU pays a host page
        // fault per 4 KiB: copying pages into fresh RAM took 5.1 us a page
        // against 1.5 us into RAM touched before (a migration's destination
        // writes every page of the guest once).
        .arg("-mem-prealloc")
        .args(["-serial", serial])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    match config.firmware {
        Firmware::Bios => {
            cmd.arg("-drive").arg(format!("format=raw,file={},if=ide", images.bios.display()));
        }
        Firmware::Uefi => {
            cmd.args(["-bios", OVMF]).arg("-drive").arg(format!("format=raw,file={},if=ide", images.uefi.display()));
        }
        Firmware::Grub => {
            cmd.arg("-cdrom").arg(&images.grub).args(["-boot", "d"]);
        }
    }
    let netdev = match &config.nic {
        Some(Nic::Tap { ifname, mac }) => Some((format!("tap,id=n0,ifname={ifname},script=no,downscript=no"), mac)),
        Some(Nic::Listen { port, mac }) => Some((format!("socket,id=n0,listen=127.0.0.1:{port}"), mac)),
        Some(Nic::Connect { port, mac }) => Some((format!("socket,id=n0,connect=127.0.0.1:{port}"), mac)),
        None => None,
    };
    if let Some((netdev, mac)) = netdev {
        cmd.args(["-netdev", &netdev, "-device", &format!("e1000,netdev=n0,mac={mac}")]);
    }
    cmd.args(&config.qemu_args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    cmd
}

/// Bochs's `clock: sync=` for a host.
///
/// Alone, a host runs with `none`: emulated time is instructions / `ips`
/// and a halted CPU skips straight to its next timer, so idle stretches
/// take almost no wall time. That is what the single-host tests want, but
/// two hosts that talk to each other then live on clocks that drift apart
/// by an order of magnitude (measured: an idle destination's clock ran 18
/// times faster than the wall clock while the busy source's ran at half
/// speed, and the destination's 8 s liveness timeout fired between two of
/// the source's frames). Networked hosts therefore use `slowdown`
/// (`iodev/slowdown_timer.cc`): Bochs sleeps whenever emulated time gets
/// more than a second ahead of the host's, so both clocks stay at or below
/// the wall clock.
fn bochs_clock_sync(config: &HostConfig) -> &'static str {
    if config.nic.is_some() {
        "slowdown"
    } else {
        "none"
    }
}

/// The bochsrc lines for the host's e1000, from Bochs 2.7's sources:
///
/// - `e1000:` is an optional plugin's directive (`libbx_e1000.so`); naming
///   it loads the plugin (`config.cc`, `bx_opt_plugin_available`). The card
///   is Intel's 82540EM (PCI 8086:100e), MAC in its EEPROM image
///   (`e1000.cc`, `bx_e1000_c::init`). Its options are those of every NIC
///   (`bx_parse_nic_params`): `enabled`, `mac`, `ethmod`, `ethdev`, `script`.
/// - `ethmod=tuntap` (`eth_tuntap.cc`; Debian builds no `tap` module)
///   passes `ethdev` to `tun_alloc`, which splits it at `:` into the clone
///   device to open and the interface name for `TUNSETIFF` (`IFF_TAP |
///   IFF_NO_PI`). So `ethdev=/dev/net/tun:tap1` attaches to the existing
///   persistent `tap1`; a bare `/dev/net/tun` would create a new, unbridged
///   TAP. `script=none` runs no configuration script.
/// - `pci: enabled=1, chipset=i440fx` turns on the PCI bus (`enabled=1`
///   needs a chipset) and `slot1=e1000` pins the card to slot 1 (`config.cc`,
///   the `"pci"` directive; it would be auto-assigned otherwise).
///
/// Frames are at most 1514 bytes (`BX_PACKET_BUFSIZE` in `netmod.h`): no
/// jumbo frames on Bochs. The module polls the TAP every 1000 µs of
/// emulated time and takes one frame per poll.
fn bochs_nic(nic: &Nic) -> Result<String> {
    match nic {
        Nic::Tap { ifname, mac } => Ok(format!(
            "pci: enabled=1, chipset=i440fx, slot1=e1000\n\
             e1000: enabled=1, mac={mac}, ethmod=tuntap, ethdev=/dev/net/tun:{ifname}, script=none\n"
        )),
        Nic::Listen { .. } | Nic::Connect { .. } => {
            bail!("Bochs hosts connect their e1000 to a TAP only (QEMU socket links are QEMU's)")
        }
    }
}

fn bochs_command(images: &Images, config: &HostConfig, port: u16, dir: &Path) -> Result<Command> {
    let iso = std::fs::canonicalize(&images.grub)
        .with_context(|| format!("{} (run scripts/build.sh)", images.grub.display()))?;
    let nic = config.nic.as_ref().map(bochs_nic).transpose()?.unwrap_or_default();
    let sync = bochs_clock_sync(config);
    let rc = dir.join("bochsrc");
    let script = dir.join("debugger.rc");
    std::fs::write(&script, "c\n")?;
    std::fs::write(
        &rc,
        format!(
            "megs: {mem}\n\
             cpu: model=corei7_skylake_x, count={cpus}, ips=50000000\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
             vga: extension=vbe\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             com1: enabled=1, mode=socket-client, dev=127.0.0.1:{port}\n\
             {nic}\
             display_library: rfb, options=\"timeout=0\"\n\
             clock: sync={sync}\n\
             sound: driver=dummy\n\
             log: {log}\n\
             panic: action=fatal\n\
             error: action=report\n\
             info: action=ignore\n",
            mem = config.mem_mib,
            cpus = config.cpus,
            iso = iso.display(),
            log = dir.join("bochs.log").display(),
        ),
    )?;
    // In a namespace, `ip netns exec` execs Bochs in place (the child is
    // Bochs itself, so killing it works as without one), and Bochs's
    // 127.0.0.1 is the namespace's loopback, where the listener is.
    let mut cmd = match &config.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "bochs"]);
            c
        }
        None => Command::new("bochs"),
    };
    cmd.env("HOME", dir); // keeps Bochs from reading a user's ~/.bochsrc
    cmd.arg("-q").arg("-f").arg(&rc).arg("-rc").arg(&script).current_dir(dir);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    Ok(cmd)
}

impl Console {
    fn new(stream: Stream) -> Result<Self> {
        let writer = stream.try_clone()?;
        Ok(Console { reader: BufReader::new(stream), writer, transcript: Vec::new() })
    }

    /// A console connected to nothing useful (a loopback pair), used while a
    /// host is being set up.
    fn placeholder() -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let a = TcpStream::connect(l.local_addr()?)?;
        let _ = l.accept()?;
        Console::new(Stream::Tcp(a))
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes)?;
        Ok(())
    }

    /// Sends one command line.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        self.send_raw(format!("{line}\r").as_bytes())
    }

    /// Reads one line (without the line end), waiting at most `timeout`.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no complete console line within {timeout:?} (partial: {:?})", String::from_utf8_lossy(&buf));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let mut byte = [0u8; 1];
            match self.reader.read(&mut byte) {
                Ok(0) => bail!("console closed (emulator exited); partial line {:?}", String::from_utf8_lossy(&buf)),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if byte[0] == b'\r' => {}
                Ok(_) => buf.push(byte[0]),
                // A signal (another test's emulator exiting) interrupts
                // the read; the line is still coming.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        self.transcript.push(line.clone());
        Ok(line)
    }

    /// Reads lines until one contains `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .read_line(left)
                .with_context(|| format!("waiting for {needle:?}; last lines: {:?}", self.tail()))?;
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    /// Switches the console to json mode (call once after "hypervisor ready").
    pub fn enter_json(&mut self, timeout: Duration) -> Result<()> {
        self.send_line("mode json")?;
        let v = self.next_reply(timeout)?;
        if v["mode"] != "json" {
            bail!("mode json answered {v}");
        }
        Ok(())
    }

    /// Reads the next reply in json mode: the next line that is a JSON
    /// object without an `event` field (log and fault events are skipped).
    pub fn next_reply(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.read_line(deadline.saturating_duration_since(Instant::now()))?;
            let trimmed = line.trim_start_matches("hv> ").trim();
            if !trimmed.starts_with('{') {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(trimmed).with_context(|| format!("console line is not JSON: {trimmed:?}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Sends a command in json mode and returns its reply.
    pub fn json(&mut self, command: &str, timeout: Duration) -> Result<serde_json::Value> {
        self.send_line(command)?;
        self.next_reply(timeout).with_context(|| format!("reply to {command:?}"))
    }

    /// The last lines read, for error messages.
    pub fn tail(&self) -> &[String] {
        let n = self.transcript.len();
        &self.transcript[n.saturating_sub(15)..]
    }

    /// Splits into raw reader and writer streams (for relaying).
    pub fn into_streams(self) -> (impl Read + Send, impl Write + Send) {
        (self.reader, self.writer)
    }
}

/// Skips the boot stages' own output: lines before the kernel's ready line.
pub fn wait_ready(console: &mut Console, timeout: Duration) -> Result<()> {
    console.wait_for("hypervisor ready", timeout).map(|_| ())
}

/// Reads lines from `reader` until EOF, for tools that relay a console.
pub fn lines(reader: impl BufRead) -> impl Iterator<Item = String> {
    reader.lines().map_while(std::result::Result::ok)
}

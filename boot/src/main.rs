//! `boot`: builds the kernel's boot images and runs one host with its
//! console on this terminal.
//!
//! ```text
//! boot image --kernel ELF --out DIR
//! boot run --images DIR [--emulator qemu|bochs] [--uefi|--grub] [--cpus N] [--mem MiB]
//! ```

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use boot::{Emulator, Firmware, Host, HostConfig, Images, Nic, QEMU_CLEAN_EXIT};

const USAGE: &str = "usage:
  boot image --kernel ELF --out DIR
  boot run --images DIR [--emulator qemu|bochs] [--uefi|--grub] [--cpus N] [--mem MiB]
           [--nic-listen PORT | --nic-connect PORT | --tap IFNAME] [--mac MAC] [--netns NS] [--qemu-arg ARG]...";

fn main() {
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("boot: {e:#}");
            std::process::exit(2);
        }
    }
}

fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> Result<&'a str> {
    *i += 1;
    args.get(*i).map(String::as_str).with_context(|| format!("{flag} needs a value\n{USAGE}"))
}

fn run(args: Vec<String>) -> Result<i32> {
    let Some(cmd) = args.first() else { bail!("{USAGE}") };
    let mut kernel = None;
    let mut out = None;
    let mut config = HostConfig::default();
    let mut mac = None;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value(&args, &mut i, "--kernel")?)),
            "--out" | "--images" => out = Some(PathBuf::from(value(&args, &mut i, "--out")?)),
            "--uefi" => config.firmware = Firmware::Uefi,
            "--grub" => config.firmware = Firmware::Grub,
            "--emulator" => {
                config.emulator = match value(&args, &mut i, "--emulator")? {
                    "qemu" => Emulator::Qemu,
                    "bochs" => Emulator::Bochs,
                    other => bail!("unknown emulator {other:?}: qemu or bochs"),
                }
            }
            "--cpus" => config.cpus = value(&args, &mut i, "--cpus")?.parse().context("--cpus: a number")?,
            "--mem" => config.mem_mib = value(&args, &mut i, "--mem")?.parse().context("--mem: MiB")?,
            "--nic-listen" => {
                let port = value(&args, &mut i, "--nic-listen")?.parse().context("--nic-listen: a port")?;
                config.nic = Some(Nic::Listen { port, mac: String::new() });
            }
            "--nic-connect" => {
                let port = value(&args, &mut i, "--nic-connect")?.parse().context("--nic-connect: a port")?;
                config.nic = Some(Nic::Connect { port, mac: String::new() });
            }
            "--tap" => {
                let ifname = value(&args, &mut i, "--tap")?.to_string();
                config.nic = Some(Nic::Tap { ifname, mac: String::new() });
            }
            "--mac" => mac = Some(value(&args, &mut i, "--mac")?.to_string()),
            "--qemu-arg" => config.qemu_args.push(value(&args, &mut i, "--qemu-arg")?.to_string()),
            "--netns" => config.netns = Some(value(&args, &mut i, "--netns")?.to_string()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
        i += 1;
    }
    let out = out.with_context(|| format!("--out/--images is required\n{USAGE}"))?;
    let mac = mac.unwrap_or_else(|| String::from("52:54:00:12:34:56"));
    match &mut config.nic {
        Some(Nic::Listen { mac: m, .. } | Nic::Connect { mac: m, .. } | Nic::Tap { mac: m, .. }) => *m = mac,
        None => {}
    }
    match cmd.as_str() {
        "image" => {
            let kernel = kernel.with_context(|| format!("--kernel is required\n{USAGE}"))?;
            let images = Images::build(&kernel, &out)?;
            println!("{}\n{}\n{}", images.bios.display(), images.uefi.display(), images.grub.display());
            Ok(0)
        }
        "run" => {
            if config.emulator == Emulator::Bochs && config.firmware == Firmware::Uefi {
                bail!("Bochs boots the GRUB image only (no UEFI firmware for Bochs here)");
            }
            let kernel = out.join("iso/boot/kernel.elf");
            relay(Host::launch(&Images::at(&kernel, &out), &config)?)
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// Relays the console to stdout and stdin to the console (stdin only once
/// the kernel is ready, so nothing typed early is lost while the UART is
/// being initialized). Returns 0 when the kernel powered off cleanly.
fn relay(host: Host) -> Result<i32> {
    let (console, mut guard) = host.into_parts();
    let (mut reader, mut writer) = console.into_streams();
    let ready = Arc::new(AtomicBool::new(false));
    let powered_off = Arc::new(AtomicBool::new(false));
    let (r, p) = (ready.clone(), powered_off.clone());
    let output = std::thread::spawn(move || {
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        let mut stdout = std::io::stdout();
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            let _ = stdout.write_all(&buf[..n]);
            let _ = stdout.flush();
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line);
                    if text.contains("hypervisor ready") {
                        r.store(true, Ordering::SeqCst);
                    }
                    if text.contains("powering off") {
                        p.store(true, Ordering::SeqCst);
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
        if String::from_utf8_lossy(&line).contains("powering off") {
            p.store(true, Ordering::SeqCst);
        }
    });
    let input_done = Arc::new(AtomicBool::new(false));
    let done = input_done.clone();
    std::thread::spawn(move || {
        while !ready.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            // Terminals send LF; the console takes CR or LF alike.
            if writer.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        done.store(true, Ordering::SeqCst);
    });
    // Wait for the emulator; once input has ended, give it a minute to
    // power off by itself.
    let mut waited_after_eof = Duration::ZERO;
    let step = Duration::from_millis(50);
    while guard.running() {
        std::thread::sleep(step);
        if input_done.load(Ordering::SeqCst) {
            waited_after_eof += step;
            if waited_after_eof > Duration::from_secs(60) {
                eprintln!("boot: input ended and the host did not power off within 60 s; killing it");
                return Ok(1);
            }
        }
    }
    let code = guard.wait_exit(Duration::from_secs(1))?;
    let _ = output.join();
    Ok(if code == Some(QEMU_CLEAN_EXIT) || powered_off.load(Ordering::SeqCst) { 0 } else { code.unwrap_or(1) })
}

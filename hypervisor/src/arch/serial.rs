//! COM1 (16550 UART at 0x3F8): console output through `uart_16550`, polled
//! input, the `log` backend, and a lock-free writer for fault reports.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;
use uart_16550::SerialPort;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3F8;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);
/// Set while the console is in json mode: log lines and fault reports are
/// then printed as JSON events, so every line a script reads is JSON.
pub static JSON_EVENTS: AtomicBool = AtomicBool::new(false);

/// Initializes COM1 (115200 8N1, FIFOs on) and installs the logger.
pub fn init() {
    // SAFETY: 0x3F8 is COM1 on every PC-compatible machine we boot on, and
    // nothing else in the kernel drives these ports.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes a string to the console.
pub fn write_str(s: &str) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if let Some(port) = PORT.lock().as_mut() {
            let _ = port.write_str(s);
        }
    });
}

/// Waits until the UART has sent everything (LSR bit 6, "transmitter
/// empty"), so that nothing printed is lost when the machine powers off.
pub fn drain() {
    let mut lsr: Port<u8> = Port::new(COM1 + 5);
    // SAFETY: reading the line status register has no side effect on output.
    while unsafe { lsr.read() } & 0x40 == 0 {
        core::hint::spin_loop();
    }
}

/// Whether a received byte waits in COM1 (LSR bit 0, "data ready").
pub fn has_input() -> bool {
    let mut lsr: Port<u8> = Port::new(COM1 + 5);
    // SAFETY: reading the line status register has no side effect.
    unsafe { lsr.read() & 1 != 0 }
}

/// Reads one byte if the UART has one.
pub fn try_read() -> Option<u8> {
    let mut lsr: Port<u8> = Port::new(COM1 + 5);
    let mut data: Port<u8> = Port::new(COM1);
    // SAFETY: reading the line status and receive buffer registers of COM1
    // has no effect beyond consuming the received byte.
    unsafe { (lsr.read() & 1 != 0).then(|| data.read()) }
}

/// A writer that bypasses the port lock, for fault reports and panics (the
/// lock may be held by the code that faulted). It polls the transmitter.
pub struct RawWriter;

impl Write for RawWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut lsr: Port<u8> = Port::new(COM1 + 5);
        let mut data: Port<u8> = Port::new(COM1);
        for b in s.bytes() {
            // SAFETY: polling LSR bit 5 (transmit holding register empty) and
            // writing the data register only sends bytes on COM1.
            unsafe {
                while lsr.read() & 0x20 == 0 {
                    core::hint::spin_loop();
                }
                data.write(b);
            }
        }
        Ok(())
    }
}

/// Escapes what it writes as the inside of a JSON string.
pub struct JsonEscape<W: Write>(pub W);

impl<W: Write> Write for JsonEscape<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(self.0, "\\u{:04x}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let us = super::clock::uptime_us();
        x86_64::instructions::interrupts::without_interrupts(|| {
            let mut guard = PORT.lock();
            let Some(port) = guard.as_mut() else { return };
            if JSON_EVENTS.load(Ordering::Relaxed) {
                let _ = write!(
                    port,
                    "{{\"event\":\"log\",\"level\":\"{}\",\"uptime_us\":{us},\"msg\":\"",
                    level_name(record.level())
                );
                let _ = write!(JsonEscape(&mut *port), "{}", record.args());
                let _ = port.write_str("\"}\r\n");
            } else {
                let _ = write!(
                    port,
                    "[{:>4}.{:06}] {:<5} {}\r\n",
                    us / 1_000_000,
                    us % 1_000_000,
                    record.level(),
                    record.args()
                );
            }
        });
    }

    fn flush(&self) {}
}

//! The host's network: finds the e1000 on PCI, runs smoltcp over it, and
//! executes the `net` and `ping` commands, including the TCP benchmark
//! (payload verified on the receiver) and the raw-frame blast.
//!
//! smoltcp gets its time from the TSC clock (`poll(timestamp)`); the main
//! loop calls [`Net::poll`] every turn and sleeps only when it reports no
//! work. Synchronous commands (`ping`, `net bench send`, `net blast`) run
//! their own poll loop with a deadline.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use drivers::e1000::{tso_frame_limit, Config as NicConfig, RawSendError, DEVICE_82540EM, E1000, VENDOR_INTEL};
use drivers::pci::{self, Bar};
use hypervisor::json::Obj;
use hypervisor::netcmd::{discard_segment, ephemeral_port, NetCommand, Pattern, Shape, DISCARD_HEADERS};
use hypervisor::shell::Reply;
pub use smoltcp::iface::SocketHandle as TcpHandle;
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
pub use smoltcp::socket::tcp::State as TcpState;
use smoltcp::socket::{icmp, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, Ipv4Address};

use crate::arch::nic::{KernelDma, Mmio};
use crate::arch::{clock, memory, pci::PortConfig, timer};

// `net blast ... tcp` sends its segments to the port the driver diverts.
const _: () = assert!(hypervisor::netcmd::DISCARD_PORT == drivers::e1000::DISCARD_PORT);

/// EtherType of `net blast` frames (IEEE 802 local experimental).
pub const BLAST_ETHERTYPE: u16 = 0x88B5;
/// A poll takes at most this many bytes of frames before it lets the
/// sockets send, so a sender hears an acknowledgement for about every
/// coalesced 64 KiB segment rather than once per ring's worth (smoltcp
/// 0.14's Reno, like RFC 5681, grows its window by one segment per
/// acknowledgement, not per byte acknowledged). In `net bench` at MTU
/// 1500/9000: 219/318 MB/s with 64 KiB, 206/241 with 128 KiB, 195/258 with
/// one burst per poll.
const INGRESS_BURST_BYTES: u64 = 64 * 1024;
/// Bursts per poll: bounds one poll's time, as the emulator refills the
/// ring while the driver reads it.
const INGRESS_BURSTS: usize = 16;
/// Socket buffers for bulk transfers, `net bench` and migration alike (so
/// their goodputs compare). The sender's bounds what is in flight: a
/// 256 KiB one held `net bench` to about 117 MB/s; with 1 MiB, 128 MiB
/// runs gave 120–220 MB/s (4 MiB did no better). The receiver's is four
/// times larger and read on every poll, so its window never closes.
pub const BULK_SEND_BUFFER: usize = 1 << 20;
pub const BULK_RECEIVE_BUFFER: usize = 4 * BULK_SEND_BUFFER;
/// Most finished connections one local port (a listener's) keeps closing
/// at once. Each holds its socket's buffers (4 MiB to receive) until its
/// FIN is out or 2 s pass, and the listener opens anew for the next client
/// at once: a client connecting and hanging up in a loop filled the heap,
/// and a failed allocation halts the kernel. Beyond this the oldest is
/// dropped (freed at once; its peer is reset at its next segment).
const MAX_CLOSING: usize = 2;
const ICMP_IDENT: u16 = 0x4856;
/// `net bench send` gives up on a peer that has not answered its SYN by then.
const CONNECT_TIMEOUT_US: u64 = 5_000_000;
/// Half-open bench connections are dropped after this long, so a SYN flood
/// cannot pin the listener.
const HALF_OPEN_US: u64 = 300_000;

/// Sends what of `tail` fits, and closes `s` once all of it went.
fn send_then_close(s: &mut tcp::Socket, tail: &mut Vec<u8>) {
    let sent = s.send_slice(tail).unwrap_or(0);
    tail.drain(..sent);
    if tail.is_empty() {
        s.close();
    }
}

fn now() -> Instant {
    Instant::from_micros(i64::try_from(clock::uptime_us()).unwrap_or(i64::MAX))
}

struct Listener {
    handle: SocketHandle,
    port: u16,
    bytes: u64,
    ok: bool,
    start_us: u64,
    last_us: u64,
    opened_us: u64,
}

#[derive(Clone, Copy)]
struct BenchResult {
    bytes: u64,
    ok: bool,
    elapsed_us: u64,
}

/// A connection closing: see [`Net::close_later`].
struct Closing {
    handle: SocketHandle,
    /// Dropped anyway after this.
    until_us: u64,
    /// Its local port, which [`MAX_CLOSING`] counts by.
    port: u16,
    /// Never dropped early for the cap.
    kept: bool,
    /// Bytes still to send before the FIN (the send buffer was full).
    tail: Vec<u8>,
}

/// The host's network stack.
pub struct Net {
    nic: E1000<Mmio>,
    iface: Interface,
    sockets: SocketSet<'static>,
    cidr: Option<(Ipv4Address, u8)>,
    listener: Option<Listener>,
    /// Finished connections (bench and migration) still sending their
    /// last bytes and FIN.
    closing: Vec<Closing>,
    last: Option<BenchResult>,
    pattern: Pattern,
    irq: u8,
}

/// A smoltcp interface over the NIC, with the NIC's MTU and MAC, and the
/// address `cidr` if there is one.
fn new_interface(nic: &mut E1000<Mmio>, cidr: Option<(Ipv4Address, u8)>) -> Interface {
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac())));
    let mut iface = Interface::new(config, nic, now());
    set_address(&mut iface, cidr);
    iface
}

fn set_address(iface: &mut Interface, cidr: Option<(Ipv4Address, u8)>) {
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        if let Some((addr, prefix)) = cidr {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(addr), prefix));
        }
    });
}

fn mac_str(m: [u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

fn mbps(bytes: u64, us: u64) -> String {
    let mb_per_s_x100 = (bytes * 100).checked_div(us).unwrap_or(0);
    format!("{}.{:02}", mb_per_s_x100 / 100, mb_per_s_x100 % 100)
}

impl Net {
    /// Finds and starts the first e1000; `None` when there is none.
    pub fn probe() -> Option<Net> {
        let mut cfg = PortConfig;
        let dev =
            pci::scan(&mut cfg).into_iter().find(|d| d.vendor_id == VENDOR_INTEL && d.device_id == DEVICE_82540EM)?;
        let Bar::Memory { base, size, .. } = dev.bars[0] else {
            log::warn!("e1000 at {:02x}:{:02x}.{} has no memory BAR 0", dev.bus, dev.device, dev.function);
            return None;
        };
        pci::enable(&mut cfg, &dev, true, false, true);
        let virt = memory::map_mmio(base, size)?;
        // SAFETY: `virt` maps BAR 0 of this e1000 uncached, just above; no
        // other code knows the mapping.
        let regs = unsafe { Mmio::new(virt) };
        let mut nic = match E1000::new(regs, &mut KernelDma, NicConfig::default()) {
            Ok(n) => n,
            Err(e) => {
                log::error!("e1000 did not start: {e:?}");
                return None;
            }
        };
        let mac = nic.mac();
        let iface = new_interface(&mut nic, None);
        let sockets = SocketSet::new(Vec::new());
        nic.divert(Some(BLAST_ETHERTYPE));
        timer::unmask_irq(dev.interrupt_line);
        log::info!(
            "e1000 {:02x}:{:02x}.{} MAC {} IRQ {} link {}",
            dev.bus,
            dev.device,
            dev.function,
            mac_str(mac),
            dev.interrupt_line,
            if nic.link_up() { "up" } else { "down" }
        );
        Some(Net {
            nic,
            iface,
            sockets,
            cidr: None,
            listener: None,
            closing: Vec::new(),
            last: None,
            pattern: Pattern::new(64 * 1024),
            irq: dev.interrupt_line,
        })
    }

    /// Moves packets and serves the bench listener. Returns true when there
    /// was work, so the caller does not sleep.
    pub fn poll(&mut self) -> bool {
        // Only after the NIC's interrupt was taken (its handler masked the
        // line): under emulation every ICR read is an exit that waits for
        // the emulator's I/O thread, a quarter of a receiver's busy time
        // when read on every poll. An interrupt raised meanwhile stays
        // pending and fires at the next `hlt`.
        if timer::irq_masked(self.irq) {
            self.nic.ack_interrupts();
            timer::unmask_irq(self.irq);
        }
        // What smoltcp's own `poll` does first (expiring fragments and
        // SLAAC state): nothing with the features built now, but the
        // single-step calls below would skip it when a feature comes.
        self.iface.poll_maintenance(now());
        // Lets QEMU's software TLB grow to what the poll streams through
        // (a host running no VM never flushes it otherwise).
        memory::refresh_tlb();
        let mut result = PollResult::None;
        for _ in 0..INGRESS_BURSTS {
            let start = self.nic.rx_bytes();
            let mut took = false;
            while self.nic.rx_bytes() - start < INGRESS_BURST_BYTES {
                match self.iface.poll_ingress_single(now(), &mut self.nic, &mut self.sockets) {
                    PollIngressSingleResult::None => break,
                    PollIngressSingleResult::PacketProcessed => took = true,
                    PollIngressSingleResult::SocketStateChanged => {
                        took = true;
                        result = PollResult::SocketStateChanged;
                    }
                }
            }
            // Sends while sockets have segments (acknowledgements of the
            // burst among them) and the transmit ring has room.
            while self.iface.poll_egress(now(), &mut self.nic, &mut self.sockets) == PollResult::SocketStateChanged {
                result = PollResult::SocketStateChanged;
            }
            if !took || self.nic.rx_bytes() - start < INGRESS_BURST_BYTES {
                break;
            }
            self.nic.flush();
        }
        self.nic.flush();
        if !self.closing.is_empty() {
            self.reap_closing();
        }
        let served = self.serve_listener();
        let soon = self.iface.poll_delay(now(), &self.sockets).is_some_and(|d| d.total_micros() == 0);
        result == PollResult::SocketStateChanged || served || soon
    }

    fn serve_listener(&mut self) -> bool {
        let Some(l) = self.listener.as_mut() else { return false };
        let t = clock::uptime_us();
        let socket = self.sockets.get_mut::<tcp::Socket>(l.handle);
        let mut worked = false;
        match socket.state() {
            tcp::State::SynReceived if t - l.opened_us > HALF_OPEN_US => {
                socket.abort();
            }
            tcp::State::SynReceived => {}
            tcp::State::Listen => l.opened_us = t,
            _ => {}
        }
        while socket.can_recv() {
            let pattern = &self.pattern;
            let (bytes, ok) = (&mut l.bytes, &mut l.ok);
            let got = socket.recv(|data| {
                let n = data.len();
                *ok &= pattern.check(*bytes, data);
                *bytes += n as u64;
                (n, n)
            });
            match got {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if l.start_us == 0 {
                        l.start_us = t;
                    }
                    l.last_us = clock::uptime_us();
                    worked = true;
                }
            }
        }
        let closed = matches!(socket.state(), tcp::State::CloseWait | tcp::State::Closed | tcp::State::TimeWait)
            && !socket.can_recv();
        if closed && l.start_us == 0 {
            // Connected and hung up without a byte (a port scan): not a
            // transfer. Left as it was, the socket sat in CloseWait and
            // the port refused every later connection.
            socket.abort();
            let port = l.port;
            self.relisten(port);
            return true;
        }
        if closed {
            socket.close();
            self.last =
                Some(BenchResult { bytes: l.bytes, ok: l.ok, elapsed_us: l.last_us.saturating_sub(l.start_us) });
            log::info!("bench: received {} bytes, payload {}", l.bytes, if l.ok { "intact" } else { "CORRUPT" });
            let port = l.port;
            self.relisten(port);
            return true;
        }
        if !socket.is_open() {
            // Aborted half-open connection or reset: listen again.
            let port = l.port;
            self.relisten(port);
        }
        worked
    }

    /// Closes a finished connection and keeps its socket for up to 2 s, so
    /// its last bytes and FIN go out; the poll frees it then. Beyond
    /// [`MAX_CLOSING`] on its local port the oldest not `kept` is dropped.
    /// `kept` is for a socket that must finish (a destination's after the
    /// VM resumed: its `Resumed` must reach the source; one per migration,
    /// so a flood of failed connections cannot grow the list).
    ///
    /// `tail` goes out first, as the send buffer makes room: a failing
    /// source's Cancel or Error often waits behind a full buffer of pages,
    /// and its peer should read why rather than see the connection close.
    pub fn close_later(&mut self, handle: SocketHandle, kept: bool, mut tail: Vec<u8>) {
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        let port = s.local_endpoint().map_or(0, |e| e.port);
        send_then_close(s, &mut tail);
        let capped = |c: &Closing| !c.kept && c.port == port;
        if self.closing.iter().filter(|c| capped(c)).count() >= MAX_CLOSING {
            if let Some(i) = self.closing.iter().position(capped) {
                let oldest = self.closing.remove(i);
                self.tcp_remove(oldest.handle);
            }
        }
        self.closing.push(Closing { handle, until_us: clock::uptime_us() + 2_000_000, port, kept, tail });
    }

    /// Removes finished connections whose FIN is out, or whose time is up.
    /// Polled, not only at the next `relisten`: each holds its buffers (a
    /// bench receiver 4 MiB), which stayed allocated after the last one.
    fn reap_closing(&mut self) {
        let t = clock::uptime_us();
        let sockets = &mut self.sockets;
        self.closing.retain_mut(|c| {
            let s = sockets.get_mut::<tcp::Socket>(c.handle);
            if !c.tail.is_empty() {
                send_then_close(s, &mut c.tail);
            }
            let done = !s.is_open() || s.state() == tcp::State::TimeWait || t > c.until_us;
            if done {
                s.abort();
                sockets.remove(c.handle);
            }
            !done
        });
    }

    fn relisten(&mut self, port: u16) {
        if let Some(old) = self.listener.take() {
            // A socket still listening must go at once, or it would accept
            // the next connection and never be read; a finished connection
            // keeps its socket until its FIN is out.
            let s = self.sockets.get_mut::<tcp::Socket>(old.handle);
            if matches!(s.state(), tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed) {
                s.abort();
                self.sockets.remove(old.handle);
            } else {
                self.close_later(old.handle, false, Vec::new());
            }
        }
        self.reap_closing();
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; BULK_RECEIVE_BUFFER]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        if socket.listen(port).is_ok() {
            let handle = self.sockets.add(socket);
            let t = clock::uptime_us();
            self.listener = Some(Listener { handle, port, bytes: 0, ok: true, start_us: 0, last_us: 0, opened_us: t });
        }
    }

    /// The port `net bench listen` holds, if any.
    pub fn bench_port(&self) -> Option<u16> {
        self.listener.as_ref().map(|l| l.port)
    }

    /// Whether an address is set (TCP needs one).
    pub fn has_ip(&self) -> bool {
        self.cidr.is_some()
    }

    /// Opens a TCP connection (for migration) with `rx` and `tx` bytes of
    /// socket buffer.
    pub fn tcp_connect(&mut self, ip: [u8; 4], port: u16, rx: usize, tx: usize) -> Result<SocketHandle, String> {
        self.need_ip()?;
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; tx]));
        socket.set_nagle_enabled(false);
        let local = ephemeral_port(clock::uptime_us(), 0);
        let addr = IpAddress::Ipv4(Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]));
        socket.connect(self.iface.context(), (addr, port), local).map_err(|e| format!("connect: {e}"))?;
        Ok(self.sockets.add(socket))
    }

    /// A TCP socket listening on `port` (for incoming migrations).
    pub fn tcp_listen(&mut self, port: u16, rx: usize, tx: usize) -> Result<SocketHandle, String> {
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; rx]), tcp::SocketBuffer::new(vec![0; tx]));
        socket.set_nagle_enabled(false);
        socket.listen(port).map_err(|e| format!("listen on {port}: {e}"))?;
        Ok(self.sockets.add(socket))
    }

    /// The socket's TCP state.
    pub fn tcp_state(&self, h: SocketHandle) -> tcp::State {
        self.sockets.get::<tcp::Socket>(h).state()
    }

    /// Makes a socket notice a dead peer or a cut link: it probes an idle
    /// connection every `keep_alive_ms` and aborts when the peer has sent
    /// nothing for `timeout_ms` (smoltcp's keep-alive and timeout).
    pub fn tcp_liveness(&mut self, h: SocketHandle, keep_alive_ms: u64, timeout_ms: u64) {
        let socket = self.sockets.get_mut::<tcp::Socket>(h);
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_millis(keep_alive_ms)));
        socket.set_timeout(Some(smoltcp::time::Duration::from_millis(timeout_ms)));
    }

    /// Bytes queued on the socket that the peer has not acknowledged.
    pub fn tcp_send_queue(&self, h: SocketHandle) -> usize {
        self.sockets.get::<tcp::Socket>(h).send_queue()
    }

    /// Queues as much of `data` as fits; returns how much.
    pub fn tcp_send(&mut self, h: SocketHandle, data: &[u8]) -> usize {
        self.sockets.get_mut::<tcp::Socket>(h).send_slice(data).unwrap_or(0)
    }

    /// Free space in the socket's send buffer, in all.
    pub fn tcp_send_free(&self, h: SocketHandle) -> usize {
        let socket = self.sockets.get::<tcp::Socket>(h);
        socket.send_capacity() - socket.send_queue()
    }

    /// Lets `f` write straight into the socket's send buffer: it gets the
    /// free space up to the buffer's end (all of it, unless it wraps) and
    /// answers how many bytes from its start to queue. `None` if the
    /// socket cannot send.
    pub fn tcp_send_with<R>(&mut self, h: SocketHandle, f: impl FnOnce(&mut [u8]) -> (usize, R)) -> Option<R> {
        self.sockets.get_mut::<tcp::Socket>(h).send(f).ok()
    }

    /// Hands up to `max` bytes of what was received to `f`, straight from
    /// the socket's buffer (in at most two pieces when it wraps); returns
    /// the byte count.
    pub fn tcp_recv_with(&mut self, h: SocketHandle, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let socket = self.sockets.get_mut::<tcp::Socket>(h);
        let mut total = 0;
        while socket.can_recv() && total < max {
            match socket.recv(|d| {
                let n = d.len().min(max - total);
                f(&d[..n]);
                (n, n)
            }) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    }

    /// The peer's address and port, once connected.
    pub fn tcp_remote(&self, h: SocketHandle) -> Option<String> {
        self.sockets.get::<tcp::Socket>(h).remote_endpoint().map(|e| format!("{e}"))
    }

    /// The peer's IPv4 address, if connected.
    pub fn tcp_remote_ipv4(&self, h: SocketHandle) -> Option<[u8; 4]> {
        match self.sockets.get::<tcp::Socket>(h).remote_endpoint()?.addr {
            IpAddress::Ipv4(a) => Some(a.octets()),
        }
    }

    /// Resets the connection and frees the socket.
    pub fn tcp_remove(&mut self, h: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(h).abort();
        self.sockets.remove(h);
    }

    /// Executes a network command.
    pub fn command(&mut self, cmd: NetCommand) -> Result<Reply, String> {
        match cmd {
            NetCommand::Status => Ok(Reply::data(self.status())),
            NetCommand::Ip(a, prefix) => {
                let addr = Ipv4Address::new(a[0], a[1], a[2], a[3]);
                self.cidr = Some((addr, prefix));
                set_address(&mut self.iface, self.cidr);
                Ok(Reply::data(Obj::new().with("ip", format!("{addr}/{prefix}"))))
            }
            NetCommand::Mtu(mtu) => {
                self.nic.set_mtu(mtu).map_err(|e| format!("MTU {mtu}: {e:?}"))?;
                // smoltcp reads the device's MTU once, when the interface
                // is made: make it again, or TCP keeps its old segment size.
                self.iface = new_interface(&mut self.nic, self.cidr);
                Ok(Reply::data(Obj::new().with("mtu", mtu)))
            }
            NetCommand::Ping(ip, count) => self.ping(Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]), count),
            NetCommand::BenchListen(port) => {
                // A new measurement: `net bench result` waits for it rather
                // than answering with the previous one.
                self.last = None;
                self.relisten(port);
                if self.listener.is_none() {
                    return Err(format!("cannot listen on port {port}"));
                }
                Ok(Reply::data(Obj::new().with("listening", port)))
            }
            NetCommand::BenchSend(ip, mib, port) => {
                self.bench_send(Ipv4Address::new(ip[0], ip[1], ip[2], ip[3]), u64::from(mib) << 20, port)
            }
            NetCommand::BenchResult => match self.last {
                None => Err(String::from("no transfer received yet")),
                Some(r) => Ok(Reply::data(
                    Obj::new()
                        .with("bytes", r.bytes)
                        .with("intact", r.ok)
                        .with("elapsed_us", r.elapsed_us)
                        .with("mb_per_s", mbps(r.bytes, r.elapsed_us)),
                )),
            },
            NetCommand::Blast(mac, mib, shape) => self.blast(mac, u64::from(mib) << 20, shape),
            NetCommand::BlastResult => {
                let d = self.nic.take_diverted();
                Ok(Reply::data(
                    Obj::new()
                        .with("frames", d.frames)
                        .with("bytes", d.bytes)
                        .with("payload_bytes", d.payload_bytes)
                        .with("elapsed_us", d.last_us.saturating_sub(d.first_us))
                        .with("mb_per_s", mbps(d.bytes, d.last_us.saturating_sub(d.first_us)))
                        .with("payload_mb_per_s", mbps(d.payload_bytes, d.last_us.saturating_sub(d.first_us))),
                ))
            }
        }
    }

    fn status(&mut self) -> Obj {
        let c = self.nic.counters();
        Obj::new()
            .with("mac", mac_str(self.nic.mac()))
            .with("ip", self.cidr.map(|(a, p)| format!("{a}/{p}")))
            .with("link", self.nic.link_up())
            .with("mtu", self.nic.mtu())
            .with("irq", self.irq)
            .with(
                "counters",
                Obj::new()
                    .with("rx_frames", c.rx_frames)
                    .with("rx_bytes", c.rx_bytes)
                    .with("tx_frames", c.tx_frames)
                    .with("tx_bytes", c.tx_bytes)
                    .with("rx_dropped", c.rx_dropped)
                    .with("rx_errors", c.rx_errors)
                    .with("rx_oversize", c.rx_oversize)
                    .with("rx_bad_checksum", c.rx_bad_checksum)
                    .with("rx_coalesced", c.rx_coalesced)
                    .with("tx_ring_full", c.tx_ring_full)
                    .with("tx_segmented", c.tx_segmented)
                    .with("tx_dropped", c.tx_dropped),
            )
    }

    fn need_ip(&self) -> Result<(), String> {
        if self.cidr.is_none() {
            return Err(String::from("no IP address yet; set one with 'net ip <a.b.c.d>/<prefix>'"));
        }
        Ok(())
    }

    fn ping(&mut self, target: Ipv4Address, count: u32) -> Result<Reply, String> {
        self.need_ip()?;
        // A socket of its own per command, removed after it: an echo
        // request smoltcp cannot send (no ARP answer, no route) stays at
        // the head of its socket's queue, and with one socket for the
        // whole boot every later ping, to any host, waited behind it; a
        // late reply also counted for the next command.
        let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
        let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]);
        let mut socket = icmp::Socket::new(rx, tx);
        socket.bind(icmp::Endpoint::Ident(ICMP_IDENT)).map_err(|e| format!("ping: {e}"))?;
        let handle = self.sockets.add(socket);
        let result = self.ping_on(handle, target, count);
        self.sockets.remove(handle);
        result
    }

    fn ping_on(&mut self, handle: SocketHandle, target: Ipv4Address, count: u32) -> Result<Reply, String> {
        let caps = ChecksumCapabilities::default();
        let mut rtts: Vec<u64> = Vec::new();
        for seq in 0..count {
            let seq_no = u16::try_from(seq).unwrap_or(0);
            let payload = [0x5Au8; 32];
            let repr = Icmpv4Repr::EchoRequest { ident: ICMP_IDENT, seq_no, data: &payload };
            let sent_at = clock::uptime_us();
            {
                let socket = self.sockets.get_mut::<icmp::Socket>(handle);
                let buf = socket.send(repr.buffer_len(), IpAddress::Ipv4(target)).map_err(|e| format!("ping: {e}"))?;
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
            }
            // The first packet to a new neighbour waits for ARP (smoltcp
            // retries after 1 s), so give each reply 2 s.
            let deadline = sent_at + 2_000_000;
            while clock::uptime_us() < deadline {
                self.poll();
                let socket = self.sockets.get_mut::<icmp::Socket>(handle);
                let mut got = false;
                while let Ok((data, from)) = socket.recv() {
                    if from != IpAddress::Ipv4(target) {
                        continue;
                    }
                    let Ok(packet) = Icmpv4Packet::new_checked(data) else { continue };
                    if let Ok(Icmpv4Repr::EchoReply { ident, seq_no: s, .. }) = Icmpv4Repr::parse(&packet, &caps) {
                        if ident == ICMP_IDENT && s == seq_no {
                            got = true;
                        }
                    }
                }
                if got {
                    rtts.push(clock::uptime_us() - sent_at);
                    break;
                }
                core::hint::spin_loop();
            }
        }
        let received = rtts.len();
        let human = format!(
            "{received}/{count} replies from {target}; rtt us: {}",
            rtts.iter().map(|r| format!("{r}")).collect::<Vec<_>>().join(" ")
        );
        if received == 0 {
            return Err(format!("no reply from {target} ({count} sent)"));
        }
        Ok(Reply {
            data: Obj::new()
                .with("target", format!("{target}"))
                .with("sent", count)
                .with("received", received)
                .with("rtt_us", rtts.clone())
                .with("min_us", rtts.iter().copied().min().unwrap_or(0))
                .with("max_us", rtts.iter().copied().max().unwrap_or(0)),
            human: Some(human),
        })
    }

    fn bench_send(&mut self, ip: Ipv4Address, total: u64, port: u16) -> Result<Reply, String> {
        self.need_ip()?;
        let start = clock::uptime_us();
        // 20 s to connect and start, then at least 2 MB/s.
        let deadline = start + 20_000_000 + total / 2;
        let local_port = ephemeral_port(start, 0);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; BULK_SEND_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket
            .connect(self.iface.context(), (IpAddress::Ipv4(ip), port), local_port)
            .map_err(|e| format!("connect: {e}"))?;
        let handle = self.sockets.add(socket);
        // Bytes handed to the socket, and those the receiver acknowledged.
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut established_at = 0u64;
        let mut retries = 0;
        let outcome = loop {
            let busy = self.poll();
            let socket = self.sockets.get::<tcp::Socket>(handle);
            if !busy && !socket.can_send() && socket.send_queue() > 0 {
                // The buffer is full and in flight: sleep until a frame (an
                // ACK) or a tick instead of spinning, which would take the
                // shared CPU from the receiver and its emulator.
                timer::wait_for_interrupt();
            }
            let t = clock::uptime_us();
            if t > deadline {
                break Err(format!("timed out after {} of {total} bytes", sent));
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            match socket.state() {
                tcp::State::Closed if established_at == 0 => {
                    // Refused (the listener is busy or not there yet): retry for 5 s.
                    retries += 1;
                    if t - start > 5_000_000 {
                        break Err(format!("connection to {ip}:{port} refused"));
                    }
                    let lp = ephemeral_port(start, retries);
                    if socket.connect(self.iface.context(), (IpAddress::Ipv4(ip), port), lp).is_err() {
                        break Err(String::from("connect failed"));
                    }
                    continue;
                }
                // Our FIN acknowledged means every byte was: done, whether
                // or not the receiver has sent its own FIN yet.
                tcp::State::FinWait2 | tcp::State::TimeWait if sent == total => break Ok(()),
                // Reset before our FIN was acknowledged: bytes handed to
                // the socket may never have arrived (a reset empties its
                // buffer, so what was acknowledged is counted as it goes).
                tcp::State::Closed => {
                    break Err(format!("connection reset after {acked} of {total} bytes were acknowledged"));
                }
                // A SYN nobody answers (no such host): smoltcp retries
                // forever, and this loop held the console for the whole
                // transfer's time budget (half an hour for 4 GiB).
                tcp::State::SynSent if t - start > CONNECT_TIMEOUT_US => {
                    break Err(format!("no answer from {ip}:{port} in {} s", CONNECT_TIMEOUT_US / 1_000_000));
                }
                tcp::State::Established if established_at == 0 => established_at = t,
                _ => {}
            }
            acked = sent.saturating_sub(socket.send_queue() as u64);
            while sent < total && socket.can_send() {
                let n = usize::try_from(total - sent).unwrap_or(usize::MAX).min(self.pattern.max_chunk());
                let chunk = self.pattern.slice(sent, n);
                match socket.send_slice(chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => sent += k as u64,
                }
            }
            if sent == total && socket.send_queue() == 0 && socket.state() == tcp::State::Established {
                socket.close();
            }
        };
        let done = clock::uptime_us();
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket.abort();
        self.poll();
        self.sockets.remove(handle);
        outcome?;
        let elapsed = done - established_at.max(start);
        Ok(Reply::data(
            Obj::new().with("bytes", total).with("elapsed_us", elapsed).with("mb_per_s", mbps(total, elapsed)),
        ))
    }

    fn blast(&mut self, dst: [u8; 6], total: u64, shape: Shape) -> Result<Reply, String> {
        let mtu = self.nic.mtu();
        let mut frame = match shape {
            Shape::Raw => {
                let mut frame = vec![0u8; mtu + 14];
                frame[12..14].copy_from_slice(&BLAST_ETHERTYPE.to_be_bytes());
                frame
            }
            Shape::Tcp => {
                let Some((ip, _)) = self.cidr else {
                    return Err(String::from("no IP address (net ip): TCP-shaped frames carry one"));
                };
                // The NIC cuts them at the MSS of a 1500-byte MTU (no SYN
                // told it the peer's): whole segments of that, so no cut
                // leaves a runt behind.
                discard_segment(ip.octets(), tso_frame_limit(mtu.min(1500)))
            }
        };
        frame[..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&self.nic.mac());
        // Payload bytes per send: the frame after the Ethernet header, or
        // after the TCP header.
        let per_frame = (frame.len() - if shape == Shape::Tcp { DISCARD_HEADERS } else { 14 }) as u64;
        let frames = total.div_ceil(per_frame);
        let start = clock::uptime_us();
        let mut sent = 0u64;
        while sent < frames {
            match shape {
                Shape::Raw => frame[14..22].copy_from_slice(&sent.to_le_bytes()),
                // The sequence number of a stream (it wraps as TCP's does).
                Shape::Tcp => frame[38..42].copy_from_slice(&(sent * per_frame).to_be_bytes()[4..]),
            }
            // Stuck is a ring that takes nothing for 5 s; a deadline over
            // the whole transfer failed a long blast on a slow link. The
            // clock is read only once the ring is full.
            let mut full_since = None;
            while let Err(e) = self.nic.send_raw(&frame) {
                if e == RawSendError::Refused {
                    return Err(format!("the NIC refused frame {sent} ({} bytes)", frame.len()));
                }
                let since = *full_since.get_or_insert_with(clock::uptime_us);
                if clock::uptime_us() - since > 5_000_000 {
                    return Err(format!("transmit ring stuck after {sent} frames"));
                }
                core::hint::spin_loop();
            }
            sent += 1;
        }
        self.nic.flush();
        let elapsed = clock::uptime_us() - start;
        Ok(Reply::data(
            Obj::new()
                .with("frames", frames)
                .with("bytes", frames * per_frame)
                .with("elapsed_us", elapsed)
                .with("mb_per_s", mbps(frames * per_frame, elapsed)),
        ))
    }
}

//! The migration driver: connects the sans-IO `migration::Source` and
//! `migration::Destination` to a TCP socket of the host's network stack and
//! to the VM manager. [`Migrator::poll`] runs every turn of the main loop,
//! between VM time slices, so the VM keeps running during pre-copy.
//!
//! One migration out and one in at a time; a second request is refused.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use hypervisor::json::{Obj, Value};
use hypervisor::migcmd::{Ipv4, MigrateCommand, PolicyArg, MIGRATION_PORT};
use hypervisor::shell::Reply;
use migration::converge::Policy;
use migration::dest::{DestAction, DestState, Destination};
use migration::record::page_batch_frame_len;
use migration::record::{Hello, Record, VmConfig};
use migration::source::{Polled, Report, Source, SourceAction, SourceConfig};
use migration::{GuestMemory as MigMemory, PAGE_SIZE, PROTOCOL_VERSION};

use crate::arch::clock;
use crate::arch::guest_memory::GuestMemory;
use crate::net::{Net, TcpHandle, TcpState, BULK_RECEIVE_BUFFER, BULK_SEND_BUFFER};
use crate::vm::Manager;

/// Buffer for the direction of a migration socket that carries only
/// control records (the stream's buffers are `net::BULK_*`).
const CONTROL_BUFFER: usize = 64 * 1024;
/// An incoming migration that hears nothing for this long is dropped.
const INCOMING_IDLE_US: u64 = 30_000_000;
/// An incoming connection whose Hello has not come by then is dropped: a
/// source sends it as soon as it is connected, and this host takes one
/// incoming migration at a time, so a client connecting and saying nothing
/// held the port for [`INCOMING_IDLE_US`].
const HELLO_TIMEOUT_US: u64 = 5_000_000;
/// Stop pulling records from the source while this much is still unsent.
const MAX_PENDING: usize = 1024 * 1024;
/// Most page-batch bytes the source writes into its socket per poll, so
/// that the network is polled in between (the first ones go out, ACKs
/// come in) rather than only after the whole send buffer is encoded.
/// 128 KiB measured the same (`pingpong`, 18 migrations each, alternating
/// builds: 3077 against 3088 ms).
const SEND_SLICE: usize = 512 * 1024;
/// Fewest pages of a batch written straight into the socket's send
/// buffer (64 KiB): fewer would split the stream into many small frames
/// while the buffer is nearly full.
const DIRECT_MIN_PAGES: usize = 16;
/// Most stream bytes the destination takes per poll, so that the network
/// is polled in between (B acknowledges what arrived and gives the NIC its
/// receive buffers back) every 1-2 ms of work under TCG, not only after
/// the whole socket buffer: an ACK held back past A's retransmission
/// timeout (smoltcp: 10 ms at least) makes A send the window again.
const RECEIVE_SLICE: usize = 256 * 1024;
/// A migration connection probes an idle peer this often...
const KEEP_ALIVE_MS: u64 = 1_000;
/// ...and is aborted when the peer has sent nothing for this long (a cut
/// link, a dead host). Longer than the slowest step either side takes
/// without polling the network (creating a large incoming VM).
const LINK_TIMEOUT_MS: u64 = 8_000;

/// A connection to the migration port that has not completed its
/// handshake by then is dropped (a SYN-ACK round trip takes far less).
const HALF_OPEN_US: u64 = 2_000_000;

/// Every VM here has one vCPU: what a source announces, and the most a
/// destination takes.
const VCPUS_PER_VM: u32 = 1;

/// How long the verify digest of all of `mem` will take, from timing it
/// on 256 pages (1 MiB; about 0.3 ms under TCG): the VM's own memory,
/// cold, on this host now. A timing at boot over a small buffer in cache
/// came out 1.5-2x too low; one that included the hash's first run (which
/// TCG must translate) came out 2x too high, hence the page hashed first.
fn verify_cost_us(mem: &mut GuestMemory) -> u64 {
    let pages = mem.chunks().len() as u64 * 512;
    let hash = |gfn| mem.page_bytes(gfn).map_or(0, |p| migration::page_hash(gfn, p));
    core::hint::black_box(hash(0));
    let sample = pages.saturating_sub(1).min(256);
    let start = clock::rdtsc();
    let sum = (1..=sample).fold(0u64, |sum, gfn| sum.wrapping_add(hash(gfn)));
    core::hint::black_box(sum);
    let cycles = clock::rdtsc() - start;
    let us = u128::from(cycles) * u128::from(pages) * 1_000_000 / u128::from(sample.max(1) * clock::tsc_hz().max(1));
    u64::try_from(us).unwrap_or(u64::MAX)
}

/// A VM's memory as the migration crate sees it.
struct Mem<'a>(&'a mut GuestMemory);

impl MigMemory for Mem<'_> {
    fn pages(&self) -> u64 {
        self.0.chunks().len() as u64 * 512
    }
    fn read_page(&self, gfn: u64, out: &mut [u8; PAGE_SIZE]) {
        match self.0.page_bytes(gfn) {
            Some(p) => out.copy_from_slice(p),
            None => out.fill(0),
        }
    }
    fn write_page(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) {
        if let Some(p) = self.0.page_bytes_mut(gfn) {
            p.copy_from_slice(data);
        }
    }
    fn write_page_hashed(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> u64 {
        match self.0.page_bytes_mut(gfn) {
            Some(p) => migration::copy_page_hashed(gfn, data, p),
            None => migration::page_hash(gfn, data),
        }
    }
    fn with_page(&self, gfn: u64, f: &mut dyn FnMut(&[u8; PAGE_SIZE])) {
        // In place: the VM does not run while the engine works.
        match self.0.page_bytes(gfn) {
            Some(page) => f(page),
            None => f(&[0; PAGE_SIZE]),
        }
    }
    fn digest(&self) -> u64 {
        let start = clock::uptime_us();
        let digest = self.0.digest();
        LAST_DIGEST_US.store(clock::uptime_us() - start, Ordering::Relaxed);
        digest
    }
}

/// How long the source's last memory digest (`verify`) took: it is part of
/// the downtime, and the report shows it.
static LAST_DIGEST_US: AtomicU64 = AtomicU64::new(0);

/// Memory for a destination that has no VM yet (never touched).
struct NoMemory;

impl MigMemory for NoMemory {
    fn pages(&self) -> u64 {
        0
    }
    fn read_page(&self, _gfn: u64, out: &mut [u8; PAGE_SIZE]) {
        out.fill(0);
    }
    fn write_page(&mut self, _gfn: u64, _data: &[u8; PAGE_SIZE]) {}
    fn digest(&self) -> u64 {
        0
    }
}

/// Frames waiting for the socket: appended at the back, sent from the
/// front, copied only into the socket (appending them to one buffer and
/// dropping the sent prefix moved each byte twice more).
#[derive(Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    /// Bytes of the front frame already handed to the socket.
    head: usize,
    len: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a frame; its bytes are never copied here, only into the
    /// socket.
    fn push(&mut self, bytes: Vec<u8>) {
        self.len += bytes.len();
        self.frames.push_back(bytes);
    }

    /// Hands the socket as much as it takes; returns how much.
    fn send(&mut self, net: &mut Net, socket: TcpHandle) -> usize {
        let mut sent = 0;
        while let Some(front) = self.frames.front() {
            let n = net.tcp_send(socket, front.get(self.head..).unwrap_or_default());
            sent += n;
            self.head += n;
            if self.head < front.len() {
                break;
            }
            self.frames.pop_front();
            self.head = 0;
        }
        self.len -= sent;
        sent
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.head = 0;
        self.len = 0;
    }

    /// What is still queued, as one run of bytes; empties the queue.
    fn take(&mut self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len);
        for (i, frame) in self.frames.iter().enumerate() {
            bytes.extend_from_slice(frame.get(if i == 0 { self.head } else { 0 }..).unwrap_or_default());
        }
        self.clear();
        bytes
    }
}

struct Outgoing {
    vm: String,
    peer: String,
    peer_ip: [u8; 4],
    source: Source,
    socket: TcpHandle,
    pending: Queue,
    connected: bool,
    /// When the connection was asked for.
    connect_us: u64,
    /// Percent of the CPU this migration may take from running VMs.
    share: u8,
}

impl Incoming {
    /// What `migrate status` shows of it.
    fn status(&self) -> Obj {
        let p = self.dest.progress();
        Obj::new()
            .with("vm", self.dest.vm().map(|v| v.name.as_str()))
            .with("peer", self.peer.clone())
            .with("state", format!("{:?}", self.dest.state()).to_lowercase())
            .with("round", p.round)
            .with("pages_received", p.pages_received)
            .with("bytes_received", p.bytes_received)
    }
}

impl Outgoing {
    /// The source's next step. Once connected, a page batch is encoded
    /// straight into the socket's send buffer, its pages copied once
    /// instead of into a `Vec` and then into the socket. It waits
    /// (`NeedRoom`) for frames queued ahead of it and until
    /// `DIRECT_MIN_PAGES` fit, except where the free space wraps: there it
    /// takes what fits before the buffer's end, and if not one page does,
    /// a batch of one page is encoded aside and queued across the wrap.
    fn next(&mut self, net: &mut Net, vms: &mut Manager, now: u64) -> Polled {
        if self.connected && !self.source.status().stage.is_terminal() {
            if !self.pending.is_empty() {
                // Queued frames go first, and the next batch waits for
                // them: produced now, it would be queued too.
                return Polled::NeedRoom;
            }
            let free = net.tcp_send_free(self.socket);
            let (source, socket) = (&mut self.source, self.socket);
            let direct = vms.with_memory(&self.vm, |m| {
                net.tcp_send_with(socket, |room| {
                    let wraps = room.len() < free;
                    let min_pages = if wraps { 1 } else { DIRECT_MIN_PAGES };
                    let polled = source.poll_into(&Mem(m), now, room, min_pages);
                    (if let Polled::Wrote(n) = polled { n } else { 0 }, (polled, wraps))
                })
            });
            match direct {
                Ok(Some((Polled::NeedRoom, true))) => {
                    // Not one page fits before the buffer's end: one page
                    // is encoded aside and queued across the wrap.
                    let mut spill = vec![0; page_batch_frame_len(1)];
                    let polled = vms.with_memory(&self.vm, |m| self.source.poll_into(&Mem(m), now, &mut spill, 1));
                    match polled {
                        Ok(Polled::Wrote(n)) => {
                            spill.truncate(n);
                            return Polled::Action(SourceAction::Send(spill));
                        }
                        Ok(polled) => return polled,
                        Err(_) => {} // the VM went away: below
                    }
                }
                Ok(Some((polled, _))) => return polled,
                Ok(None) | Err(_) => {} // the socket cannot send, or the VM went away: below
            }
        }
        let action = match vms.with_memory(&self.vm, |m| self.source.poll(&Mem(m), now)) {
            Ok(a) => a,
            Err(_) => {
                self.source.on_abort("the VM went away");
                self.source.poll(&NoMemory, now)
            }
        };
        action.map_or(Polled::Idle, Polled::Action)
    }
}

struct Incoming {
    dest: Destination,
    socket: TcpHandle,
    pending: Queue,
    /// The skeleton VM, while it exists.
    vm: Option<String>,
    /// The source's address.
    peer: Option<String>,
    peer_ip: Option<[u8; 4]>,
    last_heard_us: u64,
    /// When the connection was taken.
    accepted_us: u64,
    /// The VM was paused on the source and stays paused here.
    arrive_paused: bool,
    /// Test hook (`migrate lose-resumed`): what the destination sends
    /// after the VM resumed here is dropped.
    lose_resumed: bool,
}

/// Migration state of this host.
pub struct Migrator {
    vendor: [u8; 12],
    listen_port: Option<u16>,
    /// The only hosts whose migrations are taken (`migrate listen from=`);
    /// empty for any host.
    listen_from: Vec<[u8; 4]>,
    listener: Option<TcpHandle>,
    out: Option<Outgoing>,
    inc: Option<Incoming>,
    /// The last finished or failed migration, for `migrate status`.
    last: Option<Obj>,
    /// How the last incoming migration ended, for `migrate status`.
    last_incoming: Option<Obj>,
    /// The last connection refused before its stream was read (an address
    /// `migrate listen from=` does not name, or the host this one migrates
    /// to), for `migrate status`; apart, so that refusals do not hide the
    /// last migration.
    last_refused: Option<Obj>,
    /// The next incoming migration loses its `Resumed` (test hook).
    lose_next_resumed: bool,
    /// When the listener was first seen half open (a SYN taken, its
    /// handshake not completed), if it is.
    half_open_since_us: Option<u64>,
}

fn report_obj(vm: &str, peer: &str, r: &Report) -> Obj {
    // The least any pre-copy must send: every non-zero page once, and once
    // more for each time it was dirtied after being sent (every full or
    // delta page we sent), as raw 4 KiB pages.
    let lower_bound = (r.full_pages + r.delta_pages) * PAGE_SIZE as u64;
    Obj::new()
        .with("stage", "done")
        .with("vm", vm)
        .with("peer", peer)
        .with("total_us", r.total_us)
        .with("downtime_us", r.downtime_us)
        .with("expected_downtime_us", r.expected_downtime_us)
        .with("setup_us", r.setup_us)
        .with("rounds", r.rounds.clone())
        .with("bytes_on_wire", r.bytes_on_wire)
        .with("lower_bound_bytes", lower_bound)
        .with("goodput_bytes_per_s", r.bytes_on_wire * 1_000_000 / r.total_us.max(1))
        .with("zero_pages", r.zero_pages)
        .with("delta_pages", r.delta_pages)
        .with("full_pages", r.full_pages)
        .with("max_throttle", r.max_throttle)
        .with("verify_us", if r.verified { LAST_DIGEST_US.load(Ordering::Relaxed) } else { 0 })
        .with("stop_reason", r.stop_reason)
        .with("verified", r.verified)
}

impl Migrator {
    /// Migration for a host whose CPU vendor is `vendor`; listening on the
    /// default port once the network is up.
    pub fn new(vendor: [u8; 12]) -> Self {
        Migrator {
            vendor,
            listen_port: Some(MIGRATION_PORT),
            listen_from: Vec::new(),
            listener: None,
            out: None,
            inc: None,
            last: None,
            last_incoming: None,
            last_refused: None,
            lose_next_resumed: false,
            half_open_since_us: None,
        }
    }

    /// The percent of the CPU that migrations under way may take from
    /// running VMs, or `None` with no migration. An incoming migration
    /// takes the default share.
    pub fn cpu_share(&self) -> Option<u8> {
        match (&self.out, &self.inc) {
            (Some(o), _) => Some(o.share),
            (None, Some(_)) => Some(hypervisor::migcmd::DEFAULT_SHARE),
            (None, None) => None,
        }
    }

    /// Whether a migration runs, out of or into this host.
    pub fn busy(&self) -> bool {
        // An incoming connection counts once it brought a VM: a client
        // that connects and says nothing does not hold the console's
        // commands off for the 30 s until it times out.
        self.out.is_some() || self.inc.as_ref().is_some_and(|i| i.vm.is_some())
    }

    /// The port incoming migrations are accepted on, if any.
    pub fn listen_port(&self) -> Option<u16> {
        self.listen_port
    }

    /// Executes a `migrate` command.
    pub fn command(&mut self, cmd: MigrateCommand, net: Option<&mut Net>, vms: &mut Manager) -> Result<Reply, String> {
        match cmd {
            MigrateCommand::Status => Ok(Reply::data(self.status(net.as_deref()))),
            MigrateCommand::Cancel => match self.out.as_mut() {
                Some(o) => {
                    o.source.cancel()?;
                    Ok(Reply::data(Obj::new().with("cancelling", o.vm.as_str())))
                }
                None => Err(String::from("no outgoing migration to cancel")),
            },
            MigrateCommand::LoseResumed => {
                self.lose_next_resumed = true;
                Ok(Reply::data(Obj::new().with("lose_next_resumed", true)))
            }
            MigrateCommand::Listen { port, from } => {
                self.listen_port = port;
                self.listen_from = from;
                if let Some(net) = net {
                    if let Some(h) = self.listener.take() {
                        net.tcp_remove(h);
                    }
                    // Now, not at the next poll: a source connecting right
                    // after the answer found nothing there ("connection
                    // refused"; a CI run saw it).
                    if let (Some(port), None) = (port, &self.inc) {
                        self.open_listener(net, port);
                    }
                }
                Ok(Reply::data(Obj::new().with("listening", port).with("from", self.listen_from_value())))
            }
            MigrateCommand::Start { vm, ip, port, downtime_ms, bandwidth_mbit, rounds, policy, verify, share } => {
                let net = net.ok_or("no network card: migration needs an e1000")?;
                if let Some(o) = &self.out {
                    return Err(format!("a migration is already running ({} to {}); one at a time", o.vm, o.peer));
                }
                // One at a time between two hosts, either way: this host's
                // own VM would go out while the peer's comes in.
                if let Some(i) = self.inc.as_ref().filter(|i| i.peer_ip == Some(ip)) {
                    let vm = i.dest.vm().map_or("a VM", |v| v.name.as_str());
                    return Err(format!(
                        "{vm} is arriving here from {}; one migration at a time between two hosts",
                        Ipv4(ip)
                    ));
                }
                if !net.has_ip() {
                    return Err(String::from("no IP address yet; set one with 'net ip'"));
                }
                let mem_bytes = vms.begin_migration(&vm)?;
                let peer = format!("{}:{port}", Ipv4(ip));
                let socket = match net.tcp_connect(ip, port, CONTROL_BUFFER, BULK_SEND_BUFFER) {
                    Ok(s) => {
                        net.tcp_liveness(s, KEEP_ALIVE_MS, LINK_TIMEOUT_MS);
                        s
                    }
                    Err(e) => {
                        vms.end_migration(&vm, false, false, true);
                        return Err(e);
                    }
                };
                let config = SourceConfig {
                    downtime_budget_us: downtime_ms * 1000,
                    bandwidth_cap_bytes_per_s: bandwidth_mbit.map(|m| m * 1_000_000 / 8),
                    max_rounds: rounds,
                    policy: match policy {
                        PolicyArg::Throttle => Policy::Throttle,
                        PolicyArg::Force => Policy::Force,
                        PolicyArg::Abort => Policy::Abort,
                    },
                    verify,
                    // 4 MiB of previously sent pages for deltas, on the heap.
                    delta_cache_pages: 1024,
                    verify_cost_us: if verify { vms.with_memory(&vm, verify_cost_us).unwrap_or(0) } else { 0 },
                    ..SourceConfig::default()
                };
                let hello = Hello {
                    protocol_version: PROTOCOL_VERSION,
                    cpu_vendor: self.vendor,
                    features: 0,
                    vm: VmConfig { name: vm.clone(), mem_bytes, vcpus: VCPUS_PER_VM, page_size: 4096 },
                };
                log::info!("migrating VM '{vm}' to {peer}");
                self.last = None;
                self.out = Some(Outgoing {
                    vm: vm.clone(),
                    peer: peer.clone(),
                    peer_ip: ip,
                    source: Source::new(config, hello),
                    socket,
                    pending: Queue::default(),
                    connected: false,
                    connect_us: clock::uptime_us(),
                    share,
                });
                Ok(Reply::data(Obj::new().with("migrating", vm).with("peer", peer)))
            }
        }
    }

    fn status(&self, net: Option<&Net>) -> Obj {
        let o = match (&self.out, &self.last) {
            (Some(out), _) => {
                let s = out.source.status();
                Obj::new()
                    .with("stage", format!("{:?}", s.stage).to_lowercase())
                    .with("vm", out.vm.as_str())
                    .with("peer", out.peer.as_str())
                    .with("round", s.round)
                    .with("pages_sent", s.pages_sent)
                    .with("pages_remaining", s.pages_remaining)
                    .with("dirty_rate_pages_per_s", s.dirty_rate_pages_per_s)
                    .with("bandwidth_bytes_per_s", s.bandwidth_bytes_per_s)
                    // Unknown (null) until a round has measured the bandwidth.
                    .with(
                        "expected_downtime_us",
                        (s.expected_downtime_us != u64::MAX).then_some(s.expected_downtime_us),
                    )
                    .with("throttle", s.throttle)
                    .with("share", out.share)
                    .with("queued_bytes", out.pending.len())
                    .with("socket", net.map(|n| format!("{:?}", n.tcp_state(out.socket))))
            }
            (None, Some(last)) => last.clone(),
            (None, None) => Obj::new().with("stage", "idle"),
        };
        let incoming: Value = self.inc.as_ref().map_or(Value::Null, |i| i.status().into());
        o.with("incoming", incoming)
            .with("last_incoming", self.last_incoming.clone())
            .with("last_refused", self.last_refused.clone())
            .with("listening", self.listen_port)
            .with("listening_from", self.listen_from_value())
    }

    /// Listens for the next incoming migration on `port`.
    fn open_listener(&mut self, net: &mut Net, port: u16) {
        self.listener = net.tcp_listen(port, BULK_RECEIVE_BUFFER, CONTROL_BUFFER).ok();
        self.half_open_since_us = None;
        if let Some(h) = self.listener {
            net.tcp_liveness(h, KEEP_ALIVE_MS, LINK_TIMEOUT_MS);
        }
    }

    /// The hosts `migrate listen from=` named, or "any".
    fn listen_from_value(&self) -> Value {
        if self.listen_from.is_empty() {
            return "any".into();
        }
        let hosts: Vec<Value> = self.listen_from.iter().map(|&ip| format!("{}", Ipv4(ip)).into()).collect();
        hosts.into()
    }

    /// Moves both directions forward. Returns true when there was work.
    pub fn poll(&mut self, net: &mut Net, vms: &mut Manager) -> bool {
        let now = clock::uptime_us();
        let mut busy = self.poll_out(net, vms, now);
        busy |= self.poll_in(net, vms, now);
        busy
    }

    fn poll_out(&mut self, net: &mut Net, vms: &mut Manager, now: u64) -> bool {
        let Some(o) = self.out.as_mut() else { return false };
        let mut busy = false;
        let state = net.tcp_state(o.socket);
        if state == TcpState::Established {
            o.connected = true;
        }
        let source = &mut o.source;
        busy |= net.tcp_recv_with(o.socket, usize::MAX, |bytes| source.on_bytes(bytes, now)) > 0;
        let lost = matches!(
            state,
            TcpState::Closed | TcpState::CloseWait | TcpState::TimeWait | TcpState::Closing | TcpState::LastAck
        );
        if lost && (o.connected || state == TcpState::Closed) {
            o.source.on_abort(if o.connected {
                "connection to the destination lost"
            } else if now - o.connect_us >= LINK_TIMEOUT_MS * 1000 {
                // The socket's own timeout: no SYN-ACK, nor a reset.
                "no answer from the destination (host down, wrong address, or no route)"
            } else {
                "connection refused (the destination does not listen on that port, or takes another migration)"
            });
        }
        if !o.pending.is_empty() && o.connected {
            busy |= o.pending.send(net, o.socket) > 0;
        }
        o.source.on_tick(now);
        if lost {
            // Nothing queued can reach the peer any more; the failure
            // actions (resume, report) must not wait behind it.
            o.pending.clear();
        }
        let mut ended = None;
        let mut written = 0;
        loop {
            if o.connected && !o.pending.is_empty() {
                o.pending.send(net, o.socket);
            }
            let full = o.pending.len() >= MAX_PENDING || written >= SEND_SLICE;
            if full && !o.source.status().stage.is_terminal() {
                break;
            }
            o.source.set_backlog((o.pending.len() + net.tcp_send_queue(o.socket)) as u64);
            let action = match o.next(net, vms, now) {
                Polled::Wrote(n) => {
                    busy = true;
                    written += n;
                    continue;
                }
                Polled::Action(a) => a,
                Polled::NeedRoom | Polled::Idle => break,
            };
            busy = true;
            match action {
                SourceAction::Send(bytes) => o.pending.push(bytes),
                SourceAction::HarvestDirty => match vms.harvest_gfns(&o.vm) {
                    Ok(gfns) => o.source.on_dirty(&gfns, now),
                    Err(e) => o.source.on_abort(&e),
                },
                SourceAction::PauseVm => match vms.pause_for_switchover(&o.vm) {
                    Ok((vcpu, devices)) => o.source.on_vm_paused(now, &[vcpu], &devices),
                    Err(e) => o.source.on_abort(&e),
                },
                SourceAction::ResumeVm => vms.resume_after_failure(&o.vm),
                SourceAction::SetThrottle(p) => vms.set_throttle(&o.vm, p),
                SourceAction::Finished(report) => {
                    log::info!("VM '{}' now runs on {}; downtime {} us", o.vm, o.peer, report.downtime_us);
                    vms.end_migration(&o.vm, true, false, false);
                    ended = Some(report_obj(&o.vm, &o.peer, &report));
                    break;
                }
                SourceAction::Failed { reason, .. } => {
                    log::warn!("migration of VM '{}' failed: {reason}; it keeps running here", o.vm);
                    vms.end_migration(&o.vm, false, false, true);
                    // Running again, or as its operator left it (paused,
                    // or stopped if it crashed meanwhile).
                    let state = vms.state_name(&o.vm).unwrap_or("gone");
                    ended = Some(
                        Obj::new()
                            .with("stage", "failed")
                            .with("vm", o.vm.as_str())
                            .with("peer", o.peer.as_str())
                            .with("error", reason)
                            .with("vm_running_here", state == "running")
                            .with("vm_state", state),
                    );
                    break;
                }
                SourceAction::InDoubt => {
                    log::error!(
                        "VM '{}': commit sent but no confirmation from {}; kept paused (in doubt)",
                        o.vm,
                        o.peer
                    );
                    vms.end_migration(&o.vm, false, true, false);
                    ended = Some(
                        Obj::new()
                            .with("stage", "in_doubt")
                            .with("vm", o.vm.as_str())
                            .with("peer", o.peer.as_str())
                            .with("error", "the destination never confirmed it resumed the VM; kept paused here"),
                    );
                    break;
                }
            }
        }
        if !o.pending.is_empty() && o.connected {
            o.pending.send(net, o.socket);
        }
        if let Some(obj) = ended {
            // What is still queued behind a full send buffer (the rest of
            // a frame, then the Cancel or Error) goes out before the FIN.
            let (socket, tail) = (o.socket, if o.connected { o.pending.take() } else { Vec::new() });
            net.close_later(socket, false, tail);
            self.out = None;
            self.last = Some(obj);
        }
        busy
    }

    fn poll_in(&mut self, net: &mut Net, vms: &mut Manager, now: u64) -> bool {
        if self.inc.is_none() {
            match (self.listen_port, self.listener) {
                (Some(port), None) => {
                    self.open_listener(net, port);
                    return false;
                }
                (Some(_), Some(h)) => match net.tcp_state(h) {
                    TcpState::Listen => {
                        self.half_open_since_us = None;
                        return false;
                    }
                    // A SYN whose sender never completes the handshake (a
                    // vanished client, a forged SYN) held the port for the
                    // socket's 8 s timeout, refusing real migrations. Timed
                    // from when this poll first sees it half open (the
                    // clock read now: `now` predates the outgoing side's
                    // work), so a console command that kept the loop from
                    // the network does not count against the peer.
                    TcpState::SynReceived => {
                        let t = clock::uptime_us();
                        let since = *self.half_open_since_us.get_or_insert(t);
                        if t - since > HALF_OPEN_US {
                            net.tcp_remove(h);
                            self.listener = None;
                        }
                        return false;
                    }
                    TcpState::Closed => {
                        net.tcp_remove(h);
                        self.listener = None;
                        return false;
                    }
                    // Established, or already half closed: a client that
                    // sent its bytes and its FIN within one poll is read all
                    // the same, and one that hung up at once ends the
                    // connection (`Incoming` takes a close with nothing to
                    // read as lost). Left waiting, such a socket kept the
                    // port from listening.
                    _ => {
                        self.listener = None;
                        let ip = net.tcp_remote_ipv4(h);
                        let peer = ip.map_or_else(|| String::from("?"), |ip| format!("{}", Ipv4(ip)));
                        // Before a byte of the stream is read: a host not
                        // named brings no VM here, however well-formed its
                        // stream; nor does the host this one migrates to.
                        let refusal =
                            if !self.listen_from.is_empty() && !ip.is_some_and(|ip| self.listen_from.contains(&ip)) {
                                Some(format!("{peer} may not migrate to this host (migrate listen from=)"))
                            } else if self.out.as_ref().is_some_and(|o| Some(o.peer_ip) == ip) {
                                Some(format!(
                                    "this host is migrating a VM to {peer}; one migration at a time between two hosts"
                                ))
                            } else {
                                None
                            };
                        if let Some(reason) = refusal {
                            log::warn!("incoming migration refused: {reason}");
                            let reject = Record::Reject { reason: reason.clone() }.encode().unwrap_or_default();
                            net.close_later(h, false, reject);
                            self.last_refused = Some(Obj::new().with("peer", peer).with("reason", reason));
                            return false;
                        }
                        self.inc = Some(Incoming {
                            dest: Destination::new(self.vendor, 0, vms.largest_incoming()).with_max_vcpus(VCPUS_PER_VM),
                            socket: h,
                            pending: Queue::default(),
                            vm: None,
                            peer: net.tcp_remote(h),
                            peer_ip: ip,
                            last_heard_us: now,
                            accepted_us: now,
                            arrive_paused: false,
                            lose_resumed: core::mem::take(&mut self.lose_next_resumed),
                        });
                    }
                },
                (None, _) => return false,
            }
        }
        let Some(i) = self.inc.as_mut() else { return false };
        let mut busy = false;
        let (dest, socket) = (&mut i.dest, i.socket);
        let received = match i.vm.as_deref() {
            // Straight from the socket's buffer into the skeleton's memory.
            Some(name) => vms
                .with_memory(name, |m| {
                    net.tcp_recv_with(socket, RECEIVE_SLICE, |bytes| dest.on_bytes(bytes, &mut Mem(m)))
                })
                .unwrap_or_else(|_| {
                    dest.on_abort("the incoming VM went away");
                    0
                }),
            None => net.tcp_recv_with(socket, RECEIVE_SLICE, |bytes| dest.on_bytes(bytes, &mut NoMemory)),
        };
        if received > 0 {
            busy = true;
            i.last_heard_us = now;
        }
        let state = net.tcp_state(i.socket);
        if matches!(state, TcpState::Closed | TcpState::CloseWait) && received == 0 {
            i.dest.on_abort("connection to the source lost");
        } else if now - i.last_heard_us > INCOMING_IDLE_US {
            i.dest.on_abort("the source went silent");
        } else if i.dest.state() == DestState::AwaitHello && now - i.accepted_us > HELLO_TIMEOUT_US {
            i.dest.on_abort("no Hello within 5 s of connecting");
        }
        let mut ended = false;
        while let Some(action) = i.dest.poll() {
            busy = true;
            match action {
                DestAction::Send(bytes) => {
                    if !(i.lose_resumed && i.dest.state() == DestState::Resumed) {
                        i.pending.push(bytes);
                    }
                }
                DestAction::CreateVm(cfg) => match vms.create_incoming(&cfg.name, cfg.mem_bytes) {
                    Ok(()) => i.vm = Some(cfg.name),
                    Err(e) => {
                        log::warn!("incoming migration of '{}' refused: {e}", cfg.name);
                        i.dest.on_host_error(&e);
                    }
                },
                DestAction::SetVcpuState(bytes) => {
                    if let Some(name) = &i.vm {
                        if let Err(e) = vms.load_vcpu(name, &bytes) {
                            i.dest.on_host_error(&e);
                        }
                    }
                }
                DestAction::SetDeviceState(bytes) => match hypervisor::migcmd::decode_device_state(&bytes) {
                    Ok(paused) => i.arrive_paused = paused,
                    Err(e) => i.dest.on_host_error(&e),
                },
                DestAction::ResumeVm => {
                    if let Some(name) = &i.vm {
                        let _ = vms.start_incoming(name, i.arrive_paused);
                        let how = if i.arrive_paused { "is paused" } else { "runs" };
                        log::info!("VM '{name}' arrived and {how} here");
                    }
                }
                DestAction::DestroyVm { reason } => {
                    if let Some(name) = i.vm.take() {
                        log::warn!("incoming VM '{name}' dropped: {reason}");
                        vms.destroy_incoming(&name);
                    }
                    ended = true;
                }
                DestAction::Finished => ended = true,
            }
        }
        // A refused or failed stream ends the connection even when no VM
        // was created (garbage before Hello, a Reject).
        ended |= matches!(i.dest.state(), DestState::Failed | DestState::Rejected);
        if !i.pending.is_empty() {
            i.pending.send(net, i.socket);
        }
        if ended && (i.pending.is_empty() || matches!(state, TcpState::Closed | TcpState::CloseWait)) {
            let socket = i.socket;
            let resumed = i.dest.state() == DestState::Resumed;
            net.close_later(socket, resumed, Vec::new());
            // A connection that never got its Hello answered (garbage, a
            // port scan) was no migration: it must not hide the last one.
            if i.dest.hello_answered() {
                self.last_incoming = Some(i.status().with("reason", i.dest.failure()));
            }
            self.inc = None;
        }
        busy
    }
}

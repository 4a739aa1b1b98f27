//! The destination side (host B): checks Hello, creates the skeleton VM,
//! writes pages as they arrive, checks round totals and the memory digest,
//! loads vCPU and device state, answers Ready, and resumes only on Commit.
//!
//! Order the destination enforces after Accept:
//!
//! ```text
//! (PageBatch(round r)* RoundEnd(r))+      r = 0, 1, 2, …; round 0 carries every page
//! Verify?                                  digest of the complete memory
//! VcpuState × vcpus                        in vCPU order
//! DeviceState                              → SetDeviceState, Ready
//! Commit                                   → ResumeVm, Resumed, Finished
//! ```
//! Round 0 carries every page in full or as a zero page (a delta there
//! has no base). Like pages before `CreateVm`, a Commit that arrives
//! before `poll` handed out Ready (and the actions before it) is a
//! protocol error: the host must have loaded the state Ready vouches for.
//! Anything else, or a frame that fails to decode, sends Error to the
//! source and destroys the skeleton. Page records that arrive before
//! `CreateVm` was handed out by `poll` are a protocol error (a correct
//! source only sends pages after Accept, which follows CreateVm).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::converge::MAX_ROUNDS;
use crate::delta;
use crate::record::{
    clip_reason, is_vm_name, printable, Hello, PageBatchView, PageDataRef, Record, RoundEnd, VmConfig, MAX_NAME,
};
use crate::wire::{FrameDecoder, RecordType, WireError};
use crate::{GuestMemory, PAGE_SIZE, PROTOCOL_VERSION};

/// Most vCPUs the destination accepts.
pub const MAX_VCPUS: u32 = 256;

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAction {
    /// Transmit these bytes to the source, in order.
    Send(Vec<u8>),
    /// Create a paused skeleton VM; pass its memory to later `on_bytes`.
    CreateVm(VmConfig),
    /// Start the VM (Commit received).
    ResumeVm,
    /// Tear down the skeleton VM.
    DestroyVm {
        /// Why.
        reason: String,
    },
    /// Load the next vCPU's state (vCPU 0 first).
    SetVcpuState(Vec<u8>),
    /// Load the device state.
    SetDeviceState(Vec<u8>),
    /// The VM runs here; the migration is over.
    Finished,
}

/// Where the destination is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestState {
    /// Waiting for Hello.
    AwaitHello,
    /// Accepted; receiving memory and state.
    Receiving,
    /// Ready sent; waiting for Commit.
    AwaitCommit,
    /// Commit received; the VM is ours.
    Resumed,
    /// Hello refused (no VM was created).
    Rejected,
    /// Failed before Commit; skeleton destroyed.
    Failed,
}

/// How far an incoming migration got, for its operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestProgress {
    /// The round being received (0 until round 0 ends).
    pub round: u32,
    /// Pages written so far, over all rounds.
    pub pages_received: u64,
    /// Bytes taken from the source so far.
    pub bytes_received: u64,
}

/// The destination state machine. See the module docs.
pub struct Destination {
    vendor: [u8; 12],
    features: u64,
    max_mem_bytes: u64,
    max_vcpus: u32,
    state: DestState,
    out: VecDeque<DestAction>,
    decoder: FrameDecoder,
    vm: Option<VmConfig>,
    vm_created: bool,
    round: u32,
    round_pages: u64,
    /// Pages that arrived in round 0, one bit each: round 0 must carry
    /// every page exactly once (freed after round 0).
    round0_seen: Vec<u64>,
    /// `page_hash` of every page as last written, and their wrapping sum:
    /// the digest of the memory, kept up to date as pages arrive.
    page_hashes: Vec<u64>,
    digest: u64,
    memory_done: bool,
    vcpus_received: u32,
    scratch: Box<[u8; PAGE_SIZE]>,
    pages_received: u64,
    bytes_received: u64,
    /// Why it was refused or failed.
    failure: Option<String>,
}

/// Why handling a record failed: `true` if the peer must be told (we found
/// the problem), `false` if the peer gave up itself.
type Fault = (String, bool);

fn protocol(reason: String) -> Fault {
    (reason, true)
}

/// A record of `kind` from the source that does not hold together.
fn bad_record(kind: RecordType, e: WireError) -> Fault {
    protocol(format!("bad {kind:?} from source: {e}"))
}

impl Destination {
    /// A destination for this host: its CPU vendor string, the CPU features
    /// it offers, and the most guest memory it can give a VM.
    pub fn new(local_vendor: [u8; 12], local_features: u64, max_mem_bytes: u64) -> Self {
        Destination {
            vendor: local_vendor,
            features: local_features,
            max_mem_bytes,
            max_vcpus: MAX_VCPUS,
            state: DestState::AwaitHello,
            out: VecDeque::new(),
            decoder: FrameDecoder::new(),
            vm: None,
            vm_created: false,
            round: 0,
            round_pages: 0,
            round0_seen: Vec::new(),
            page_hashes: Vec::new(),
            digest: 0,
            memory_done: false,
            vcpus_received: 0,
            scratch: Box::new([0; PAGE_SIZE]),
            pages_received: 0,
            bytes_received: 0,
            failure: None,
        }
    }

    /// Refuse VMs of more than `n` vCPUs (at most [`MAX_VCPUS`]): a host
    /// that builds fewer would load every vCPU's state into the ones it
    /// has, the last one winning.
    #[must_use]
    pub fn with_max_vcpus(mut self, n: u32) -> Self {
        self.max_vcpus = n.min(MAX_VCPUS);
        self
    }

    /// Current state.
    pub fn state(&self) -> DestState {
        self.state
    }

    /// Round, pages and bytes received so far.
    pub fn progress(&self) -> DestProgress {
        DestProgress { round: self.round, pages_received: self.pages_received, bytes_received: self.bytes_received }
    }

    /// Why the migration was refused (`Rejected`) or failed (`Failed`).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The VM its accepted Hello announced.
    pub fn vm(&self) -> Option<&VmConfig> {
        self.vm.as_ref()
    }

    /// Whether a Hello was answered (accepted or refused): a connection
    /// that got no further was no migration (garbage, a port scan).
    pub fn hello_answered(&self) -> bool {
        self.vm.is_some() || self.state == DestState::Rejected
    }

    fn active(&self) -> bool {
        matches!(self.state, DestState::AwaitHello | DestState::Receiving | DestState::AwaitCommit)
    }

    /// Bytes from the source. Pages are written through `mem`, the
    /// skeleton VM's memory (unused until `CreateVm` was handed out).
    pub fn on_bytes(&mut self, bytes: &[u8], mem: &mut dyn GuestMemory) {
        if !self.active() {
            return;
        }
        self.bytes_received += bytes.len() as u64;
        // Frames completed before a framing error are handled first, so
        // the outcome does not depend on how the transport split the bytes.
        let pushed = self.decoder.push(bytes);
        while self.active() {
            let Some(frame) = self.decoder.next_frame() else { break };
            let bad = |e| bad_record(frame.kind, e);
            let result = if frame.kind == RecordType::PageBatch && self.state == DestState::Receiving {
                // The hot path: pages go from the frame straight to memory,
                // hashed on the way (`on_pages` compares the hashes).
                PageBatchView::parse_leaving_hashes(&frame.payload).map_err(bad).and_then(|b| self.on_pages(b, mem))
            } else {
                Record::decode(&frame).map_err(bad).and_then(|rec| self.on_record(rec))
            };
            if let Err(f) = result {
                self.fail(f);
            }
        }
        if let Err(e) = pushed {
            if self.active() {
                self.fail(protocol(format!("bad frame from source: {e}")));
            }
        }
    }

    /// The link is cut: destroy the skeleton unless the VM already resumed.
    pub fn on_abort(&mut self, reason: &str) {
        if self.active() {
            self.fail((format!("aborted: {reason}"), false));
        }
    }

    /// This host could not do what an action asked (build the skeleton,
    /// load a vCPU or the device state): fail, tell the source why (an
    /// `Error` record, so its operator reads the reason rather than a lost
    /// connection) and destroy the skeleton unless the VM already resumed.
    pub fn on_host_error(&mut self, reason: &str) {
        if self.active() {
            self.fail(protocol(format!("destination host: {reason}")));
        }
    }

    /// The next action, if any.
    pub fn poll(&mut self) -> Option<DestAction> {
        let a = self.out.pop_front()?;
        if matches!(a, DestAction::CreateVm(_)) {
            self.vm_created = true;
        }
        Some(a)
    }

    fn fail(&mut self, (reason, tell_peer): Fault) {
        self.out.clear();
        self.failure = Some(reason.clone());
        if tell_peer {
            if let Ok(frame) = (Record::Error { reason: clip_reason(&reason) }).encode() {
                self.out.push_back(DestAction::Send(frame));
            }
        }
        if self.vm_created {
            self.out.push_back(DestAction::DestroyVm { reason });
        }
        self.state = DestState::Failed;
    }

    fn send(&mut self, rec: &Record) -> Result<(), Fault> {
        let frame = rec.encode().map_err(|e| protocol(format!("cannot encode {:?}: {e}", rec.kind())))?;
        self.out.push_back(DestAction::Send(frame));
        Ok(())
    }

    fn on_record(&mut self, rec: Record) -> Result<(), Fault> {
        match (self.state, rec) {
            (_, Record::Cancel { reason }) => Err((format!("source cancelled: {}", printable(&reason)), false)),
            (_, Record::Error { reason }) => Err((format!("source error: {}", printable(&reason)), false)),
            (DestState::AwaitHello, Record::Hello(h)) => self.on_hello(h),
            (DestState::Receiving, Record::RoundEnd(e)) => self.on_round_end(e),
            (DestState::Receiving, Record::Verify { digest }) => {
                self.end_of_memory()?;
                if self.vcpus_received > 0 {
                    return Err(protocol(String::from("Verify after vCPU state")));
                }
                let here = self.digest;
                if here != digest {
                    return Err(protocol(format!("memory digest {here:#018x}, source has {digest:#018x}")));
                }
                Ok(())
            }
            (DestState::Receiving, Record::VcpuState(s)) => {
                self.end_of_memory()?;
                if self.vcpus_received >= self.vcpus() {
                    return Err(protocol(format!("more than {} vCPU states", self.vcpus())));
                }
                self.vcpus_received += 1;
                self.out.push_back(DestAction::SetVcpuState(s));
                Ok(())
            }
            (DestState::Receiving, Record::DeviceState(s)) => {
                if self.vcpus_received != self.vcpus() {
                    let why = format!("device state after {} of {} vCPU states", self.vcpus_received, self.vcpus());
                    return Err(protocol(why));
                }
                self.out.push_back(DestAction::SetDeviceState(s));
                self.send(&Record::Ready)?;
                self.state = DestState::AwaitCommit;
                Ok(())
            }
            (DestState::AwaitCommit, Record::Commit) if !self.out.is_empty() => {
                // A source commits only after reading Ready, which is the
                // last action DeviceState queued: a Commit sent ahead of it
                // would resume the VM before the host loaded (or refused,
                // through `on_host_error`) its vCPU and device state.
                Err(protocol(String::from("Commit before Ready was sent")))
            }
            (DestState::AwaitCommit, Record::Commit) => {
                self.out.push_back(DestAction::ResumeVm);
                self.send(&Record::Resumed)?;
                self.out.push_back(DestAction::Finished);
                self.state = DestState::Resumed;
                Ok(())
            }
            (state, rec) => Err(protocol(format!("unexpected {:?} in state {state:?}", rec.kind()))),
        }
    }

    fn vcpus(&self) -> u32 {
        self.vm.as_ref().map_or(0, |vm| vm.vcpus)
    }

    fn vm_pages(&self) -> u64 {
        self.vm.as_ref().map_or(0, VmConfig::pages)
    }

    /// Why this Hello cannot be accepted, if it cannot.
    fn refusal(&self, h: &Hello) -> Option<String> {
        let vm = &h.vm;
        if h.protocol_version != PROTOCOL_VERSION {
            return Some(format!("protocol version {} unsupported", h.protocol_version));
        }
        if h.cpu_vendor != self.vendor {
            let (theirs, ours) = (String::from_utf8_lossy(&h.cpu_vendor), String::from_utf8_lossy(&self.vendor));
            return Some(format!("CPU vendor mismatch: VM from {}, host is {ours}", printable(&theirs)));
        }
        let missing = h.features & !self.features;
        if missing != 0 {
            return Some(format!("CPU features {missing:#x} missing on this host"));
        }
        if vm.page_size as usize != PAGE_SIZE {
            return Some(format!("page size {} unsupported", vm.page_size));
        }
        if vm.mem_bytes == 0 || !vm.mem_bytes.is_multiple_of(PAGE_SIZE as u64) {
            return Some(format!("memory size {} is not a whole number of pages", vm.mem_bytes));
        }
        if vm.mem_bytes > self.max_mem_bytes {
            return Some(format!("VM needs {} bytes of memory, {} available", vm.mem_bytes, self.max_mem_bytes));
        }
        if vm.vcpus == 0 || vm.vcpus > self.max_vcpus {
            return Some(format!("{} vCPUs unsupported: this host takes 1 to {}", vm.vcpus, self.max_vcpus));
        }
        if !is_vm_name(&vm.name) {
            // Not echoed: it could carry terminal escapes. Such a VM could
            // not be named on this host's console, so never destroyed.
            return Some(format!("VM name of {} bytes is not 1-{MAX_NAME} letters, digits, '-' or '_'", vm.name.len()));
        }
        None
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), Fault> {
        if let Some(reason) = self.refusal(&h) {
            self.send(&Record::Reject { reason: clip_reason(&reason) })?;
            self.failure = Some(reason);
            self.state = DestState::Rejected;
            return Ok(());
        }
        self.out.push_back(DestAction::CreateVm(h.vm.clone()));
        self.vm = Some(h.vm);
        self.send(&Record::Accept)?;
        self.state = DestState::Receiving;
        Ok(())
    }

    fn on_pages(&mut self, b: PageBatchView<'_>, mem: &mut dyn GuestMemory) -> Result<(), Fault> {
        if !self.vm_created {
            return Err(protocol(String::from("pages before the VM was created")));
        }
        if self.memory_done {
            return Err(protocol(String::from("pages after the end of memory")));
        }
        if b.round != self.round {
            return Err(protocol(format!("pages of round {} during round {}", b.round, self.round)));
        }
        let pages = self.vm_pages();
        if mem.pages() < pages {
            return Err(protocol(format!("skeleton has {} pages, VM needs {pages}", mem.pages())));
        }
        if self.round == 0 && self.round0_seen.is_empty() {
            self.round0_seen = alloc::vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)];
        }
        if self.page_hashes.is_empty() {
            self.page_hashes = alloc::vec![0; usize::try_from(pages).unwrap_or(0)];
        }
        for (gfn, data) in b.pages() {
            if gfn >= pages {
                return Err(protocol(format!("page {:#x} beyond the VM's {pages} pages", gfn)));
            }
            if self.round == 0 {
                let bit = 1u64 << (gfn % 64);
                let word = usize::try_from(gfn / 64).ok().and_then(|i| self.round0_seen.get_mut(i));
                match word {
                    Some(w) if *w & bit == 0 => *w |= bit,
                    _ => return Err(protocol(format!("page {:#x} twice in round 0", gfn))),
                }
            }
            let hash = match data {
                PageDataRef::Zero => {
                    mem.write_page(gfn, &ZERO_PAGE);
                    crate::page_hash(gfn, &ZERO_PAGE)
                }
                PageDataRef::Full(data, hash) => {
                    // Parsed with the hashes left to us. A page that does
                    // not match is already in memory, but the batch fails
                    // and with it the skeleton, which never runs.
                    if mem.write_page_hashed(gfn, data) != hash {
                        return Err(bad_record(RecordType::PageBatch, WireError::PageHash { gfn }));
                    }
                    hash
                }
                PageDataRef::Delta(_) if self.round == 0 => {
                    // Round 0 is each page's first send, so a delta has no
                    // base: it would apply to the skeleton's unzeroed frames
                    // (another VM's old memory) and hand them to this VM.
                    return Err(protocol(format!(
                        "page {gfn:#x}: a delta in round 0, with nothing sent to apply it to"
                    )));
                }
                PageDataRef::Delta(d) => {
                    mem.read_page(gfn, &mut self.scratch);
                    delta::apply(&mut self.scratch, d).map_err(|e| protocol(format!("page {:#x}: {e}", gfn)))?;
                    mem.write_page(gfn, &self.scratch);
                    crate::page_hash(gfn, &self.scratch)
                }
            };
            let slot = usize::try_from(gfn).ok().and_then(|i| self.page_hashes.get_mut(i));
            if let Some(old) = slot {
                self.digest = self.digest.wrapping_sub(*old).wrapping_add(hash);
                *old = hash;
            }
        }
        self.round_pages += b.len() as u64;
        self.pages_received += b.len() as u64;
        Ok(())
    }

    fn on_round_end(&mut self, e: RoundEnd) -> Result<(), Fault> {
        if self.memory_done || e.round != self.round {
            return Err(protocol(format!("RoundEnd of round {} during round {}", e.round, self.round)));
        }
        if e.pages_sent != self.round_pages {
            let why = format!("round {}: source sent {} pages, {} arrived", e.round, e.pages_sent, self.round_pages);
            return Err(protocol(why));
        }
        if e.round == 0 && e.pages_sent != self.vm_pages() {
            return Err(protocol(format!("round 0 carried {} of {} pages", e.pages_sent, self.vm_pages())));
        }
        if e.round > MAX_ROUNDS {
            return Err(protocol(format!("round {} ended: past the last a source may use ({MAX_ROUNDS})", e.round)));
        }
        self.round = self.round.saturating_add(1);
        self.round_pages = 0;
        self.round0_seen = Vec::new();
        Ok(())
    }

    /// Verify and VcpuState close the memory: at least one whole round, and
    /// no round left open.
    fn end_of_memory(&mut self) -> Result<(), Fault> {
        if self.round == 0 || self.round_pages != 0 {
            return Err(protocol(format!("state before the end of round {}", self.round)));
        }
        self.memory_done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Page, PageBatch, PageData};
    use crate::testmem::VecMemory;
    use crate::wire::{FrameDecoder, WireError};

    const VENDOR: [u8; 12] = *b"AuthenticAMD";

    fn hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            cpu_vendor: VENDOR,
            features: 0b101,
            vm: VmConfig { name: "vm".into(), mem_bytes: 4 * 4096, vcpus: 1, page_size: 4096 },
        }
    }

    fn frame(rec: Record) -> Vec<u8> {
        rec.encode().unwrap()
    }

    fn drain(d: &mut Destination) -> Vec<DestAction> {
        std::iter::from_fn(|| d.poll()).collect()
    }

    fn sent(actions: &[DestAction]) -> Vec<Record> {
        let mut dec = FrameDecoder::new();
        for a in actions {
            if let DestAction::Send(b) = a {
                dec.push(b).unwrap();
            }
        }
        std::iter::from_fn(|| dec.next_frame()).map(|f| Record::decode(&f).unwrap()).collect()
    }

    fn accepted() -> (Destination, VecMemory) {
        let mut d = Destination::new(VENDOR, 0b111, 1 << 20);
        let mut mem = VecMemory::new(4);
        d.on_bytes(&frame(Record::Hello(hello())), &mut mem);
        let a = drain(&mut d);
        assert!(matches!(a[0], DestAction::CreateVm(_)));
        assert_eq!(sent(&a), vec![Record::Accept]);
        (d, mem)
    }

    fn round0(mem_page1: u8) -> Vec<u8> {
        let pages = (0..4)
            .map(|gfn| Page {
                gfn,
                data: if gfn == 1 { PageData::Full(Box::new([mem_page1; 4096])) } else { PageData::Zero },
            })
            .collect();
        round0_of(pages)
    }

    /// Round 0 as one batch of `pages`, announced as 4 pages.
    fn round0_of(pages: Vec<Page>) -> Vec<u8> {
        let mut v = frame(Record::PageBatch(PageBatch { round: 0, pages }));
        v.extend(frame(Record::RoundEnd(RoundEnd { round: 0, pages_sent: 4, ..RoundEnd::default() })));
        v
    }

    /// Round 0, one vCPU's state and the device state: all before Ready.
    fn up_to_ready() -> Vec<u8> {
        let mut bytes = round0(7);
        bytes.extend(frame(Record::VcpuState(vec![1])));
        bytes.extend(frame(Record::DeviceState(vec![])));
        bytes
    }

    fn assert_failed_with_error(d: &mut Destination, needle: &str) {
        let a = drain(d);
        assert_eq!(d.state(), DestState::Failed);
        let recs = sent(&a);
        assert!(matches!(&recs[..], [Record::Error { reason }] if reason.contains(needle)), "{recs:?}");
        assert!(matches!(a.last(), Some(DestAction::DestroyVm { .. })), "{a:?}");
    }

    #[test]
    fn garbage_before_hello_is_rejected() {
        let mut d = Destination::new(VENDOR, 0, 1 << 30);
        let mut mem = VecMemory::new(1);
        d.on_bytes(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", &mut mem);
        assert_eq!(d.state(), DestState::Failed);
        assert!(!d.hello_answered(), "no migration to report");
        let a = drain(&mut d);
        assert_eq!(a.len(), 1, "only an Error, no VM: {a:?}");
        assert!(matches!(&sent(&a)[..], [Record::Error { reason }] if reason.contains("bad magic")));
        d.on_bytes(&frame(Record::Hello(hello())), &mut mem);
        assert!(d.poll().is_none(), "a failed destination stays failed");
    }

    #[test]
    fn record_other_than_hello_first_is_rejected() {
        let mut d = Destination::new(VENDOR, 0, 1 << 30);
        d.on_bytes(&frame(Record::Commit), &mut VecMemory::new(1));
        assert_eq!(d.state(), DestState::Failed);
        assert!(matches!(&sent(&drain(&mut d))[..], [Record::Error { .. }]));
    }

    #[test]
    fn hello_is_checked_against_this_host() {
        type Spoil = fn(&mut Hello);
        let cases: [(Spoil, &str); 9] = [
            (|h| h.cpu_vendor = *b"GenuineIntel", "vendor mismatch"),
            (|h| h.features = 0b1000, "features 0x8"),
            (|h| h.vm.mem_bytes = 2 << 20, "bytes of memory"),
            (|h| h.vm.page_size = 2 << 20, "page size"),
            (|h| h.vm.mem_bytes = 4097, "whole number of pages"),
            (|h| h.vm.vcpus = 0, "vCPUs"),
            (|h| h.vm.name = String::new(), "VM name of 0 bytes"),
            (|h| h.vm.name = "a b".into(), "VM name of 3 bytes"),
            (|h| h.vm.name = "x\u{1b}[2J".into(), "VM name of 5 bytes"),
        ];
        for (spoil, needle) in cases {
            let mut h = hello();
            spoil(&mut h);
            let mut d = Destination::new(VENDOR, 0b111, 1 << 20);
            d.on_bytes(&frame(Record::Hello(h)), &mut VecMemory::new(4));
            assert_eq!(d.state(), DestState::Rejected);
            let a = drain(&mut d);
            assert!(matches!(&sent(&a)[..], [Record::Reject { reason }] if reason.contains(needle)), "{a:?}");
            assert_eq!(a.len(), 1, "no CreateVm");
        }
    }

    #[test]
    fn pages_before_create_vm_was_handed_out_are_a_protocol_error() {
        let mut d = Destination::new(VENDOR, 0b111, 1 << 20);
        let mut mem = VecMemory::new(4);
        let mut bytes = frame(Record::Hello(hello()));
        bytes.extend(round0(1));
        d.on_bytes(&bytes, &mut mem);
        let a = drain(&mut d);
        assert_eq!(d.state(), DestState::Failed);
        assert!(matches!(&sent(&a)[..], [Record::Error { reason }] if reason.contains("before the VM was created")));
        assert!(!a.iter().any(|a| matches!(a, DestAction::CreateVm(_) | DestAction::DestroyVm { .. })));
        assert_eq!(mem, VecMemory::new(4), "nothing written");
    }

    #[test]
    fn full_sequence_resumes_only_on_commit() {
        let (mut d, mut mem) = accepted();
        mem.bytes.fill(0xEE);
        let mut expect = VecMemory::new(4);
        expect.page_mut(1).fill(7);
        let mut bytes = round0(7);
        bytes.extend(frame(Record::Verify { digest: expect.digest() }));
        bytes.extend(frame(Record::VcpuState(vec![1, 2])));
        bytes.extend(frame(Record::DeviceState(vec![3])));
        for b in &bytes {
            d.on_bytes(core::slice::from_ref(b), &mut mem);
        }
        assert_eq!(mem, expect);
        let a = drain(&mut d);
        assert_eq!(a[0], DestAction::SetVcpuState(vec![1, 2]));
        assert_eq!(a[1], DestAction::SetDeviceState(vec![3]));
        assert_eq!(sent(&a), vec![Record::Ready]);
        assert_eq!(d.state(), DestState::AwaitCommit);
        d.on_bytes(&frame(Record::Commit), &mut mem);
        let a = drain(&mut d);
        assert_eq!(a[0], DestAction::ResumeVm);
        assert_eq!(sent(&a), vec![Record::Resumed]);
        assert_eq!(a.last(), Some(&DestAction::Finished));
        d.on_abort("link down");
        assert!(d.poll().is_none(), "no DestroyVm after Commit");
        assert_eq!(d.state(), DestState::Resumed);
    }

    #[test]
    fn progress_and_the_reason_of_a_failure_are_kept_for_the_operator() {
        let (mut d, mut mem) = accepted();
        let round = round0(7);
        d.on_bytes(&round, &mut mem);
        let hello_len = frame(Record::Hello(hello())).len() as u64;
        let p = d.progress();
        assert_eq!((p.round, p.pages_received, p.bytes_received), (1, 4, hello_len + round.len() as u64));
        assert_eq!(d.failure(), None);
        assert!(d.hello_answered());
        // The peer's text is shown escaped: it could hold terminal
        // escapes that clear the operator's screen (found in review).
        d.on_bytes(&frame(Record::Cancel { reason: "stop\u{1b}[2J".into() }), &mut mem);
        assert_eq!(d.failure(), Some("source cancelled: stop\\u{1b}[2J"));
        let mut h = hello();
        h.cpu_vendor = *b"Genuine\x1b[2J\x07";
        let mut r = Destination::new(VENDOR, 0b111, 1 << 20);
        r.on_bytes(&frame(Record::Hello(h)), &mut VecMemory::new(4));
        let why = r.failure().unwrap_or_default();
        assert!(why.contains("VM from Genuine\\u{1b}[2J\\u{7}"), "{why}");
        let sent = sent(&drain(&mut r));
        assert!(matches!(&sent[..], [Record::Reject { reason }] if !reason.contains('\u{1b}')), "{sent:?}");
    }

    #[test]
    fn commit_followed_by_junk_in_the_same_read_still_resumes() {
        // Found by the fuzz target: the framing error used to win over the
        // complete Commit before it, so the outcome depended on how TCP
        // split the bytes.
        let (mut d, mut mem) = accepted();
        d.on_bytes(&up_to_ready(), &mut mem);
        drain(&mut d);
        let mut commit = frame(Record::Commit);
        commit.extend_from_slice(b"junk after the end");
        d.on_bytes(&commit, &mut mem);
        assert_eq!(d.state(), DestState::Resumed);
        assert_eq!(drain(&mut d).last(), Some(&DestAction::Finished));
    }

    #[test]
    fn commit_before_ready_was_handed_out_is_a_protocol_error() {
        // Found in review: a source that sent Commit right behind its
        // DeviceState got the VM resumed before the host had loaded the
        // vCPU state, and a host that then refused that state
        // (`on_host_error`) was ignored: the VM ran on garbage.
        let (mut d, mut mem) = accepted();
        let mut bytes = up_to_ready();
        bytes.extend(frame(Record::Commit));
        d.on_bytes(&bytes, &mut mem);
        let a = drain(&mut d);
        assert_eq!(d.state(), DestState::Failed);
        assert!(!a.contains(&DestAction::ResumeVm), "{a:?}");
        assert!(matches!(&sent(&a)[..], [Record::Error { reason }] if reason.contains("Commit before Ready")), "{a:?}");
        assert!(matches!(a.last(), Some(DestAction::DestroyVm { .. })), "{a:?}");
    }

    #[test]
    fn a_host_refusing_the_vcpu_state_before_commit_destroys_the_skeleton() {
        let (mut d, mut mem) = accepted();
        d.on_bytes(&up_to_ready(), &mut mem);
        assert!(matches!(d.poll(), Some(DestAction::SetVcpuState(_))));
        d.on_host_error("bad vCPU state");
        let a = drain(&mut d);
        assert_eq!(d.state(), DestState::Failed);
        assert!(matches!(&sent(&a)[..], [Record::Error { reason }] if reason.contains("bad vCPU state")), "{a:?}");
        assert!(matches!(a.last(), Some(DestAction::DestroyVm { .. })), "{a:?}");
        d.on_bytes(&frame(Record::Commit), &mut mem);
        assert!(d.poll().is_none(), "nothing after the failure, no ResumeVm");
    }

    #[test]
    fn a_delta_in_round_zero_is_a_protocol_error() {
        // Found in review: round 0 took a delta (even an empty one) as the
        // page's first send, so the VM kept the skeleton's unzeroed frame,
        // another VM's old memory, and round 0 still counted complete.
        let (mut d, mut mem) = accepted();
        mem.bytes.fill(0xEE);
        let pages = (0..4)
            .map(|gfn| Page { gfn, data: if gfn == 2 { PageData::Delta(vec![]) } else { PageData::Zero } })
            .collect();
        d.on_bytes(&round0_of(pages), &mut mem);
        assert_failed_with_error(&mut d, "page 0x2: a delta in round 0");
    }

    #[test]
    fn more_vcpus_than_this_host_builds_are_refused_at_hello() {
        let mut h = hello();
        h.vm.vcpus = 2;
        let mut d = Destination::new(VENDOR, 0b111, 1 << 20).with_max_vcpus(1);
        d.on_bytes(&frame(Record::Hello(h.clone())), &mut VecMemory::new(4));
        assert_eq!(d.state(), DestState::Rejected);
        let a = drain(&mut d);
        assert!(matches!(&sent(&a)[..], [Record::Reject { reason }] if reason.contains("takes 1 to 1")), "{a:?}");
        let mut d = Destination::new(VENDOR, 0b111, 1 << 20);
        d.on_bytes(&frame(Record::Hello(h)), &mut VecMemory::new(4));
        assert_eq!(d.state(), DestState::Receiving, "the crate's own limit is MAX_VCPUS");
    }

    #[test]
    fn round_zero_must_carry_every_page_exactly_once() {
        // Found by the fuzz target: four pages with page 0 twice and page 3
        // missing passed the page count check.
        let (mut d, mut mem) = accepted();
        let pages = [0, 1, 2, 0].map(|gfn| Page { gfn, data: PageData::Zero }).to_vec();
        d.on_bytes(&round0_of(pages), &mut mem);
        assert_failed_with_error(&mut d, "page 0x0 twice in round 0");
    }

    #[test]
    fn a_stream_past_the_last_round_a_source_may_use_is_refused() {
        // Empty rounds after round 0, up to the last a source may number
        // (the final round after MAX_ROUNDS of pre-copy): all taken.
        let (mut d, mut mem) = accepted();
        let mut bytes = round0(7);
        for round in 1..=MAX_ROUNDS {
            bytes.extend(frame(Record::RoundEnd(RoundEnd { round, ..RoundEnd::default() })));
        }
        d.on_bytes(&bytes, &mut mem);
        drain(&mut d);
        assert_eq!(d.state(), DestState::Receiving);
        // One more: a source trickling rounds held the skeleton for ever.
        let next = RoundEnd { round: MAX_ROUNDS + 1, ..RoundEnd::default() };
        d.on_bytes(&frame(Record::RoundEnd(next)), &mut mem);
        assert_failed_with_error(&mut d, "past the last");
    }

    #[test]
    fn digest_mismatch_destroys_the_skeleton() {
        let (mut d, mut mem) = accepted();
        let mut bytes = round0(7);
        bytes.extend(frame(Record::Verify { digest: 42 }));
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, "digest");
    }

    #[test]
    fn round_zero_must_carry_every_page() {
        let (mut d, mut mem) = accepted();
        let one = PageBatch { round: 0, pages: vec![Page { gfn: 0, data: PageData::Zero }] };
        let mut bytes = frame(Record::PageBatch(one));
        bytes.extend(frame(Record::RoundEnd(RoundEnd { round: 0, pages_sent: 1, ..RoundEnd::default() })));
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, "round 0 carried 1 of 4");
    }

    #[test]
    fn round_end_page_count_must_match_what_arrived() {
        let (mut d, mut mem) = accepted();
        let mut bytes = round0(1);
        bytes.extend(frame(Record::RoundEnd(RoundEnd { round: 1, pages_sent: 3, ..RoundEnd::default() })));
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, "source sent 3 pages, 0 arrived");
    }

    #[test]
    fn page_beyond_the_vm_is_rejected() {
        let (mut d, mut mem) = accepted();
        let b = PageBatch { round: 0, pages: vec![Page { gfn: 4, data: PageData::Zero }] };
        d.on_bytes(&frame(Record::PageBatch(b)), &mut mem);
        assert_failed_with_error(&mut d, "beyond");
    }

    #[test]
    fn vcpu_state_before_any_round_ended_is_rejected() {
        let (mut d, mut mem) = accepted();
        d.on_bytes(&frame(Record::VcpuState(vec![1])), &mut mem);
        assert_failed_with_error(&mut d, "state before the end of round 0");
    }

    #[test]
    fn device_state_needs_every_vcpu_first() {
        let (mut d, mut mem) = accepted();
        let mut bytes = round0(1);
        bytes.extend(frame(Record::DeviceState(vec![])));
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, "after 0 of 1 vCPU states");
    }

    #[test]
    fn bad_crc_in_a_page_batch_fails_and_destroys() {
        let (mut d, mut mem) = accepted();
        let mut bytes = round0(1);
        bytes[16 + 6 + 9 + 9] ^= 1; // page 1's hash: the CRC covers it
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, "CRC32C");
    }

    #[test]
    fn corrupted_page_data_fails_its_hash_and_destroys() {
        let (mut d, mut mem) = accepted();
        let mut bytes = round0(1);
        bytes[16 + 6 + 9 + 17 + 100] ^= 1; // inside page 1's data
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, "page 0x1 does not match its hash");
    }

    #[test]
    fn source_cancel_destroys_without_answering() {
        let (mut d, mut mem) = accepted();
        d.on_bytes(&frame(Record::Cancel { reason: "operator".into() }), &mut mem);
        let a = drain(&mut d);
        assert_eq!(d.state(), DestState::Failed);
        assert!(matches!(&a[..], [DestAction::DestroyVm { reason }] if reason.contains("operator")));
    }

    #[test]
    fn abort_before_commit_destroys_the_skeleton() {
        let (mut d, mut mem) = accepted();
        d.on_bytes(&round0(1), &mut mem);
        d.on_abort("link down");
        assert!(matches!(&drain(&mut d)[..], [DestAction::DestroyVm { reason }] if reason.contains("link down")));
    }

    #[test]
    fn malformed_delta_fails_the_destination() {
        let (mut d, mut mem) = accepted();
        d.on_bytes(&round0(1), &mut mem);
        // A frame built by hand: decoding validates the delta before writing.
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend(1u16.to_le_bytes());
        payload.extend(1u64.to_le_bytes());
        payload.extend([2, 6, 0, 0xFF, 0x0F, 2, 0, 1, 1]);
        let h = crate::wire::Header {
            kind: crate::RecordType::PageBatch,
            len: payload.len() as u32,
            crc: crate::crc::crc32c(&payload),
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend(payload);
        d.on_bytes(&bytes, &mut mem);
        assert_failed_with_error(&mut d, &WireError::DeltaPastPage(4097).to_string());
    }
}

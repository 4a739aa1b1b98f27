//! Bounded, structure-aware fuzzing of the migration destination
//! ([`Destination`]): the code that parses bytes from an untrusted peer.
//!
//! - [`fuzz_one`] is the target: it feeds one input to a fresh destination in
//!   chunks derived from the input itself, acts on every action like a host
//!   would, and asserts the invariants listed on [`Host`].
//! - The corpus holds complete streams recorded from a real [`Source`]
//!   migrating a small guest to the destination in memory, streams built
//!   record by record, and one valid frame of every record type.
//! - The mutator (own xorshift PRNG, no dependencies) flips bits, writes
//!   interesting values into header and payload fields, truncates, splices,
//!   duplicates, removes, swaps and inserts whole frames, re-encodes records
//!   with one field changed, and recomputes the CRC after most payload edits
//!   so that mutations reach the record decoder and the state machine
//!   instead of dying at the checksum.
//! - `fuzz_destination_bounded` runs for `MIGRATION_FUZZ_SECS` seconds
//!   (default 20; at least `MIN_ITERATIONS` inputs) from seed
//!   `MIGRATION_FUZZ_SEED` (default fixed; `MIGRATION_FUZZ_ITERS` runs an exact
//!   number of inputs instead), prints what the inputs reached, and fails if
//!   the mutations stopped reaching the deep states and the error paths.
//!
//! A failing input is minimized, printed as hex and saved to the temporary
//! directory; the panic message above it names the broken invariant.

// Sizes here are small (pages, lengths below 4 GiB, test-only arithmetic).
#![allow(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use migration::converge::MAX_ROUNDS;
use migration::crc::crc32c;
use migration::delta::MAX_DELTA;
use migration::dest::MAX_VCPUS;
use migration::record::{
    frame_crc, PageBatchView, PageDataRef, MAX_BATCH_PAGES, MAX_DEVICE_STATE, MAX_NAME, MAX_REASON, MAX_VCPU_STATE,
};
use migration::wire::{HEADER_LEN, MAGIC};
use migration::{
    DestAction, DestState, Destination, FrameDecoder, GuestMemory, Hello, Page, PageBatch, PageData, Policy, Record,
    RecordType, RoundEnd, Source, SourceAction, SourceConfig, VmConfig, WireError, MAX_PAYLOAD, PAGE_SIZE,
    PROTOCOL_VERSION,
};

// ---------------------------------------------------------------------------
// Parameters of the simulated host.

/// This host's CPU.
const VENDOR: [u8; 12] = *b"GenuineIntel";
const FEATURES: u64 = 0b1111;
/// What the destination is told it may give a VM (larger Hellos are rejected).
const DEST_MAX_MEM: u64 = 256 << 20;
/// What the host really allocates for a skeleton; a larger `CreateVm` makes
/// it call `on_abort`, as a kernel out of memory would.
const HOST_ALLOC_LIMIT: u64 = 64 << 20;
/// Skeletons up to this size are pre-filled with [`SKELETON_FILL`] (so zero
/// pages must really be written) and compared page by page with the model.
const CHECKED_MEM: u64 = 4 << 20;
const SKELETON_FILL: u8 = 0xEE;
/// Mutated inputs are cut to this size.
const MAX_INPUT: usize = 3 << 20;
/// Largest PageBatch payload (`record::PAGE_BATCH_MAX_LEN` is crate-private).
const PAGE_BATCH_MAX_LEN: u32 = 4 + 2 + 256 * (8 + 1 + 4096);

const DEFAULT_SECS: f64 = 20.0;
const DEFAULT_SEED: u64 = 0x5EED_0DE5_7100_0007;
/// The coverage assertions need this many mutated inputs, whatever the budget.
const MIN_ITERATIONS: u64 = 3_000;
/// Inputs kept because they reached a new (state, depth, error) combination.
const MAX_POOL: usize = 2_000;

// ---------------------------------------------------------------------------
// Randomness and hashing.

/// xorshift64*, seeded through splitmix64 (never zero).
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (0 if `n == 0`).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
    fn pick<T: Copy>(&mut self, s: &[T]) -> T {
        s[self.below(s.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// `lo..=hi` random bytes.
    fn some_bytes(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.range(lo, hi);
        self.bytes(n)
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

// ---------------------------------------------------------------------------
// Guest memory.

/// The skeleton's memory. Every access is bounds-checked: the destination
/// touching a page beyond the memory it was given is an invariant break.
struct FuzzMem {
    bytes: Vec<u8>,
    writes: u64,
}

impl FuzzMem {
    fn new(pages: u64, fill: u8) -> Self {
        let n = pages as usize * PAGE_SIZE;
        FuzzMem { bytes: if fill == 0 { vec![0; n] } else { vec![fill; n] }, writes: 0 }
    }
    fn span(&self, gfn: u64, op: &str) -> std::ops::Range<usize> {
        assert!(gfn < self.pages(), "destination {op} page {gfn:#x} of a {}-page memory", self.pages());
        let at = gfn as usize * PAGE_SIZE;
        at..at + PAGE_SIZE
    }
    fn page_mut(&mut self, gfn: u64) -> &mut [u8] {
        let r = self.span(gfn, "wrote");
        &mut self.bytes[r]
    }
}

impl GuestMemory for FuzzMem {
    fn pages(&self) -> u64 {
        (self.bytes.len() / PAGE_SIZE) as u64
    }
    fn read_page(&self, gfn: u64, out: &mut [u8; PAGE_SIZE]) {
        out.copy_from_slice(&self.bytes[self.span(gfn, "read")]);
    }
    fn write_page(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) {
        self.writes += 1;
        self.page_mut(gfn).copy_from_slice(data);
    }
}

// ---------------------------------------------------------------------------
// The reference side: decoding the input independently, and a model of the
// documented protocol (lib.rs "Destination states", dest.rs "Order the
// destination enforces").

/// The frames a chunk completed, and the framing error that stopped it, if
/// any (frames completed before the error come first, as in the decoder).
/// Each frame comes as its type, the record as `Record::decode` reads it
/// (everything checked), and for a PageBatch, the batch as the
/// destination's hot path reads it.
type ChunkFrames = (Vec<(RecordType, Result<Record, WireError>, Option<Result<Batch, WireError>>)>, Option<WireError>);

/// A PageBatch as the destination's hot path sees it: parsed with the page
/// hashes left to it, which it checks page by page as it writes each one
/// (`PageBatchView::parse_leaving_hashes`), so a page whose hash does not
/// match fails the batch only once the pages before it were accepted.
struct Batch {
    round: u32,
    /// Each page, and whether its hash matches (zero and delta pages have
    /// none to match).
    pages: Vec<(Page, bool)>,
}

fn lenient_batch(payload: &[u8]) -> Result<Batch, WireError> {
    let view = PageBatchView::parse_leaving_hashes(payload)?;
    let pages = view
        .pages()
        .map(|(gfn, data)| match data {
            PageDataRef::Zero => (Page { gfn, data: PageData::Zero }, true),
            PageDataRef::Full(d, hash) => {
                (Page { gfn, data: PageData::Full(Box::new(*d)) }, migration::page_hash(gfn, d) == hash)
            }
            PageDataRef::Delta(d) => (Page { gfn, data: PageData::Delta(d.to_vec()) }, true),
        })
        .collect();
    Ok(Batch { round: view.round, pages })
}

/// The crate's own `FrameDecoder` fed the same chunks as the destination.
/// Every record that decodes must re-encode to the same bytes (the format
/// has exactly one encoding per record).
#[derive(Default)]
struct Shadow {
    dec: FrameDecoder,
}

impl Shadow {
    fn push(&mut self, chunk: &[u8]) -> ChunkFrames {
        let pushed = self.dec.push(chunk);
        let mut frames = Vec::new();
        while let Some(f) = self.dec.next_frame() {
            let rec = Record::decode(&f);
            if let Ok(r) = &rec {
                let enc = r.encode().unwrap_or_else(|e| panic!("decoded {:?} does not re-encode: {e}", f.kind));
                assert!(enc.get(HEADER_LEN..) == Some(&f.payload[..]), "{:?} re-encodes to other bytes", f.kind);
            }
            let batch = (f.kind == RecordType::PageBatch).then(|| lenient_batch(&f.payload));
            frames.push((f.kind, rec, batch));
        }
        (frames, pushed.err())
    }
}

/// Guest memory as the protocol says it must be: the skeleton's initial
/// contents plus every accepted page, in order.
struct ModelMem {
    pages: u64,
    fill: u8,
    written: BTreeMap<u64, Box<[u8; PAGE_SIZE]>>,
}

impl ModelMem {
    fn page(&self, gfn: u64) -> Box<[u8; PAGE_SIZE]> {
        self.written.get(&gfn).cloned().unwrap_or_else(|| Box::new([self.fill; PAGE_SIZE]))
    }

    fn write(&mut self, gfn: u64, data: &PageData) {
        let page = match data {
            PageData::Zero => Box::new([0; PAGE_SIZE]),
            PageData::Full(d) => d.clone(),
            PageData::Delta(d) => {
                let mut p = self.page(gfn);
                apply_delta(&mut p, d);
                p
            }
        };
        self.written.insert(gfn, page);
    }

    /// The documented digest: the wrapping sum of `page_hash`.
    fn digest(&self) -> u64 {
        let fill = [self.fill; PAGE_SIZE];
        (0..self.pages).fold(0u64, |sum, g| {
            sum.wrapping_add(migration::page_hash(g, self.written.get(&g).map_or(&fill, |p| &**p)))
        })
    }
}

/// The delta format from `delta.rs`, implemented again: ops of
/// `skip u16 | len u16 | xor [len]`, offsets accumulating.
fn apply_delta(page: &mut [u8; PAGE_SIZE], d: &[u8]) {
    let (mut pos, mut i) = (0usize, 0usize);
    while i < d.len() {
        let field = |at: usize| {
            let b = d.get(at..at + 2).expect("the decoder accepted a delta with a cut op header");
            usize::from(u16::from_le_bytes([b[0], b[1]]))
        };
        pos += field(i);
        let len = field(i + 2);
        i += 4;
        let xor = d.get(i..i + len).expect("the decoder accepted a delta with a cut literal");
        let dst = page.get_mut(pos..pos + len).expect("the decoder accepted a delta running past the page");
        dst.iter_mut().zip(xor).for_each(|(p, x)| *p ^= x);
        pos += len;
        i += len;
    }
}

/// Whether this host must accept the Hello (lib.rs: vendor, features,
/// memory; dest.rs: page size, vCPU count, a name of ASCII letters,
/// digits, '-' or '_' (the decoder already bounds its length)).
fn acceptable(h: &Hello) -> bool {
    h.protocol_version == PROTOCOL_VERSION
        && h.cpu_vendor == VENDOR
        && h.features & !FEATURES == 0
        && h.vm.page_size as usize == PAGE_SIZE
        && h.vm.mem_bytes > 0
        && h.vm.mem_bytes.is_multiple_of(PAGE_SIZE as u64)
        && h.vm.mem_bytes <= DEST_MAX_MEM
        && (1..=MAX_VCPUS).contains(&h.vm.vcpus)
        && !h.vm.name.is_empty()
        && h.vm.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Why the model ended in `Failed`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cause {
    /// We detected it: a framing or record error (with the decoder's error
    /// text the Error reply must carry), or a protocol violation (`None`).
    Detected(Option<String>),
    /// The source sent Cancel or Error.
    Peer(RecordType),
    /// The host called `on_abort` (allocation refused, or link down).
    HostAbort,
}

/// The protocol model: predicts the destination's state after every chunk
/// from the records alone.
struct Model {
    state: DestState,
    vm: Option<VmConfig>,
    /// `CreateVm` was handed out (at the drain after Hello's chunk).
    created: bool,
    round: u32,
    round_pages: u64,
    /// Pages seen in round 0, which must carry each page exactly once.
    round0_seen: std::collections::BTreeSet<u64>,
    memory_done: bool,
    vcpu_states: Vec<Vec<u8>>,
    device_state: Option<Vec<u8>>,
    commit_seen: bool,
    /// The host drained the actions up to Ready (after_drain in AwaitCommit).
    ready_out: bool,
    mem: Option<ModelMem>,
    cause: Option<Cause>,
}

fn active(s: DestState) -> bool {
    matches!(s, DestState::AwaitHello | DestState::Receiving | DestState::AwaitCommit)
}

impl Model {
    fn new() -> Self {
        Model {
            state: DestState::AwaitHello,
            vm: None,
            created: false,
            round: 0,
            round_pages: 0,
            round0_seen: std::collections::BTreeSet::new(),
            memory_done: false,
            vcpu_states: Vec::new(),
            device_state: None,
            commit_seen: false,
            ready_out: false,
            mem: None,
            cause: None,
        }
    }

    fn fail(&mut self, cause: Cause) {
        if active(self.state) {
            self.state = DestState::Failed;
            self.cause = Some(cause);
        }
    }

    fn protocol_error(&mut self) {
        self.fail(Cause::Detected(None));
    }

    fn pages(&self) -> u64 {
        self.vm.as_ref().map_or(0, VmConfig::pages)
    }

    fn vcpus(&self) -> u32 {
        self.vm.as_ref().map_or(0, |v| v.vcpus)
    }

    /// Complete frames first, then the framing error (the outcome must
    /// not depend on how the transport split the bytes).
    fn chunk(&mut self, (list, error): &ChunkFrames) {
        for (_, rec, batch) in list {
            if !active(self.state) {
                break;
            }
            match (self.state, batch, rec) {
                (DestState::Receiving, Some(Ok(b)), _) => self.page_batch(b),
                (DestState::Receiving, Some(Err(e)), _) | (_, _, Err(e)) => {
                    self.fail(Cause::Detected(Some(e.to_string())));
                }
                (_, _, Ok(r)) => self.record(r),
            }
        }
        if let Some(e) = error {
            self.fail(Cause::Detected(Some(e.to_string())));
        }
    }

    /// After the host drained the actions of a chunk: `CreateVm` went out if
    /// a Hello was accepted and nothing failed since; the host refuses it
    /// (calls `on_abort`) when it is too large to allocate.
    fn after_drain(&mut self) {
        self.ready_out |= self.state == DestState::AwaitCommit;
        if self.state == DestState::Receiving && !self.created {
            self.created = true;
            if self.vm.as_ref().is_some_and(|v| v.mem_bytes > HOST_ALLOC_LIMIT) {
                self.fail(Cause::HostAbort);
            }
        }
    }

    /// "Closing the memory": at least one whole round, none left open.
    fn end_of_memory(&mut self) -> bool {
        if self.round == 0 || self.round_pages != 0 {
            self.protocol_error();
            return false;
        }
        self.memory_done = true;
        true
    }

    /// A PageBatch while receiving (see [`Batch`]).
    fn page_batch(&mut self, b: &Batch) {
        // Pages only after CreateVm went out, within the round, within the VM.
        if !self.created || self.memory_done || b.round != self.round {
            return self.protocol_error();
        }
        let pages = self.pages();
        for (p, hash_matches) in &b.pages {
            if p.gfn >= pages || (self.round == 0 && !self.round0_seen.insert(p.gfn)) {
                return self.protocol_error();
            }
            if !hash_matches {
                return self.fail(Cause::Detected(Some(WireError::PageHash { gfn: p.gfn }.to_string())));
            }
            // Round 0 is each page's first send: a delta has no base.
            if self.round == 0 && matches!(p.data, PageData::Delta(_)) {
                return self.protocol_error();
            }
            if let Some(m) = &mut self.mem {
                m.write(p.gfn, &p.data);
            }
        }
        self.round_pages += b.pages.len() as u64;
    }

    fn record(&mut self, rec: &Record) {
        use DestState::*;
        match (self.state, rec) {
            (_, Record::Cancel { .. }) => self.fail(Cause::Peer(RecordType::Cancel)),
            (_, Record::Error { .. }) => self.fail(Cause::Peer(RecordType::Error)),
            (AwaitHello, Record::Hello(h)) => {
                if !acceptable(h) {
                    self.state = Rejected;
                    return;
                }
                let fill = if h.vm.mem_bytes <= CHECKED_MEM { SKELETON_FILL } else { 0 };
                self.mem = Some(ModelMem { pages: h.vm.pages(), fill, written: BTreeMap::new() });
                self.vm = Some(h.vm.clone());
                self.state = Receiving;
            }
            (Receiving, Record::RoundEnd(e)) => {
                let complete = e.round != 0 || e.pages_sent == self.pages();
                let past_the_last = e.round > MAX_ROUNDS;
                if self.memory_done
                    || e.round != self.round
                    || e.pages_sent != self.round_pages
                    || !complete
                    || past_the_last
                {
                    return self.protocol_error();
                }
                self.round = self.round.saturating_add(1);
                self.round_pages = 0;
                self.round0_seen.clear();
            }
            (Receiving, Record::Verify { digest }) => {
                if !self.end_of_memory() {
                    return;
                }
                let here = self.mem.as_ref().map_or(0, ModelMem::digest);
                if !self.vcpu_states.is_empty() || here != *digest {
                    self.protocol_error();
                }
            }
            (Receiving, Record::VcpuState(s)) => {
                if !self.end_of_memory() {
                    return;
                }
                if self.vcpu_states.len() as u64 >= u64::from(self.vcpus()) {
                    return self.protocol_error();
                }
                self.vcpu_states.push(s.clone());
            }
            (Receiving, Record::DeviceState(s)) => {
                if self.vcpu_states.len() as u64 != u64::from(self.vcpus()) {
                    return self.protocol_error();
                }
                self.device_state = Some(s.clone());
                self.state = AwaitCommit;
            }
            // Ready must have gone out (the host drained the actions of
            // DeviceState's chunk) before a Commit counts.
            (AwaitCommit, Record::Commit) if !self.ready_out => self.protocol_error(),
            (AwaitCommit, Record::Commit) => {
                self.commit_seen = true;
                self.state = Resumed;
            }
            _ => self.protocol_error(),
        }
    }
}

// ---------------------------------------------------------------------------
// The host: drives the destination and checks every action.

/// How far an input got, from what the host observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Depth {
    Nothing,
    HelloDecided,
    VmCreated,
    PagesWritten,
    RoundEnded,
    VcpuState,
    Ready,
    Resumed,
}

const DEPTHS: [Depth; 8] = [
    Depth::Nothing,
    Depth::HelloDecided,
    Depth::VmCreated,
    Depth::PagesWritten,
    Depth::RoundEnded,
    Depth::VcpuState,
    Depth::Ready,
    Depth::Resumed,
];

fn action_name(a: &DestAction) -> &'static str {
    match a {
        DestAction::Send(_) => "Send",
        DestAction::CreateVm(_) => "CreateVm",
        DestAction::ResumeVm => "ResumeVm",
        DestAction::DestroyVm { .. } => "DestroyVm",
        DestAction::SetVcpuState(_) => "SetVcpuState",
        DestAction::SetDeviceState(_) => "SetDeviceState",
        DestAction::Finished => "Finished",
    }
}

/// A host running one destination. Invariants checked:
///
/// 1. Nothing panics, and the destination reads and writes only pages of
///    the memory it was handed (none before `CreateVm`).
/// 2. After every chunk and abort, the state equals the protocol model's
///    (which decodes the same bytes independently): valid streams are
///    accepted as far as they go, anything else fails at the right record.
/// 3. A framing or record error always ends in `Failed` with an Error reply
///    that names the decoder's error; a protocol violation always ends in
///    `Failed` with an Error reply; a peer Cancel/Error or an abort in
///    `Failed` without one.
/// 4. Terminal states (Rejected, Failed, Resumed) never change, and once one
///    was observed, further bytes and aborts produce no action at all.
/// 5. Each `Send` is exactly one well-formed frame (checked by the crate's
///    `FrameDecoder`), only of the destination's record types, in the order
///    `Reject | Accept [Ready [Resumed]]`, optionally ended by one `Error`;
///    nothing is sent after Reject, Error or Resumed. Accept directly
///    follows `CreateVm`, Ready `SetDeviceState`, Resumed `ResumeVm`.
/// 6. `CreateVm` at most once, for exactly the VM of an acceptable Hello;
///    `SetVcpuState` once per vCPU and equal to the VcpuState records;
///    `SetDeviceState` once, after all of them; `ResumeVm` at most once,
///    only with a created and allocated VM, after Ready and a Commit record;
///    `Finished` right after Resumed; `DestroyVm` exactly when a created VM
///    fails, never after `ResumeVm`; no action after `Finished`/`DestroyVm`.
/// 7. While the migration is alive, guest memory equals the model's (every
///    accepted page applied in order, nothing else written): checked at
///    Ready and at the end.
/// 8. Every record that decodes re-encodes to the same bytes.
struct Host {
    dst: Destination,
    mem: FuzzMem,
    shadow: Shadow,
    model: Model,
    vm: Option<VmConfig>,
    alloc_refused: bool,
    destroyed: Option<String>,
    resumed: bool,
    finished: bool,
    vcpu_states: Vec<Vec<u8>>,
    device_state: Option<Vec<u8>>,
    replies: Vec<Record>,
    reply_dec: FrameDecoder,
    prev: Option<&'static str>,
    ended: bool,
    terminal: Option<DestState>,
    /// Bytes the destination sent, for a source to read.
    outbox: Vec<u8>,
}

impl Host {
    fn new() -> Self {
        Host {
            dst: Destination::new(VENDOR, FEATURES, DEST_MAX_MEM),
            mem: FuzzMem::new(0, 0),
            shadow: Shadow::default(),
            model: Model::new(),
            vm: None,
            alloc_refused: false,
            destroyed: None,
            resumed: false,
            finished: false,
            vcpu_states: Vec::new(),
            device_state: None,
            replies: Vec::new(),
            reply_dec: FrameDecoder::new(),
            prev: None,
            ended: false,
            terminal: None,
            outbox: Vec::new(),
        }
    }

    /// Bytes from the source.
    fn feed(&mut self, chunk: &[u8]) {
        let was_terminal = self.terminal;
        if active(self.model.state) {
            let frames = self.shadow.push(chunk);
            self.model.chunk(&frames);
        }
        self.dst.on_bytes(chunk, &mut self.mem);
        let n = self.drain();
        if let Some(t) = was_terminal {
            assert_eq!(n, 0, "{n} actions from bytes after the terminal state {t:?}");
        }
        self.model.after_drain();
        self.check_state("a chunk");
    }

    /// The link goes down.
    fn abort(&mut self) {
        let before = self.dst.state();
        let sent = self.replies.len();
        self.model.fail(Cause::HostAbort);
        self.dst.on_abort("link down");
        let n = self.drain();
        assert_eq!(self.replies.len(), sent, "the destination answered an abort");
        if !active(before) {
            assert_eq!(n, 0, "{n} actions from an abort in {before:?}");
        }
        self.check_state("on_abort");
    }

    fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(a) = self.dst.poll() {
            n += 1;
            assert!(n < 1_000_000, "poll never runs dry");
            self.on_action(a);
        }
        n
    }

    fn on_action(&mut self, a: DestAction) {
        let name = action_name(&a);
        assert!(!self.ended, "{name} after {:?}", self.prev);
        match a {
            DestAction::Send(bytes) => self.on_reply(&bytes),
            DestAction::CreateVm(vm) => {
                assert!(self.vm.is_none(), "second CreateVm");
                assert!(self.model.state == DestState::Receiving && !self.model.created, "unexpected CreateVm");
                assert_eq!(self.model.vm.as_ref(), Some(&vm), "CreateVm for another VM than the Hello's");
                if vm.mem_bytes <= HOST_ALLOC_LIMIT {
                    let fill = if vm.mem_bytes <= CHECKED_MEM { SKELETON_FILL } else { 0 };
                    self.mem = FuzzMem::new(vm.pages(), fill);
                } else {
                    self.alloc_refused = true;
                    self.dst.on_abort("cannot allocate the skeleton");
                }
                self.vm = Some(vm);
            }
            DestAction::SetVcpuState(s) => {
                let vm = self.vm.as_ref().expect("SetVcpuState without CreateVm");
                assert!(!self.alloc_refused && self.device_state.is_none(), "SetVcpuState out of order");
                assert!((self.vcpu_states.len() as u64) < u64::from(vm.vcpus), "more SetVcpuState than vCPUs");
                let want = self.model.vcpu_states.get(self.vcpu_states.len());
                assert_eq!(want, Some(&s), "SetVcpuState differs from the VcpuState record");
                self.vcpu_states.push(s);
            }
            DestAction::SetDeviceState(s) => {
                let vm = self.vm.as_ref().expect("SetDeviceState without CreateVm");
                assert!(self.device_state.is_none(), "second SetDeviceState");
                assert_eq!(self.vcpu_states.len() as u64, u64::from(vm.vcpus), "SetDeviceState before every vCPU");
                assert_eq!(self.model.device_state.as_ref(), Some(&s), "SetDeviceState differs from the record");
                self.device_state = Some(s);
                self.check_memory("Ready");
            }
            DestAction::ResumeVm => {
                assert!(self.vm.is_some() && !self.alloc_refused, "ResumeVm without a VM");
                assert!(!self.resumed && self.destroyed.is_none(), "ResumeVm twice or after DestroyVm");
                assert!(self.device_state.is_some(), "ResumeVm before the device state");
                assert!(matches!(self.replies.last(), Some(Record::Ready)), "ResumeVm before Ready was sent");
                assert!(self.model.commit_seen, "ResumeVm without a Commit record after Ready");
                self.resumed = true;
            }
            DestAction::DestroyVm { reason } => {
                assert!(self.vm.is_some(), "DestroyVm without CreateVm");
                assert!(!self.resumed, "DestroyVm after ResumeVm: the migrated VM would be lost");
                assert!(!reason.is_empty());
                self.destroyed = Some(reason);
                self.ended = true;
            }
            DestAction::Finished => {
                assert!(self.resumed && self.prev == Some("Send"), "Finished not right after Resumed");
                assert!(matches!(self.replies.last(), Some(Record::Resumed)), "Finished not right after Resumed");
                self.finished = true;
                self.ended = true;
            }
        }
        self.prev = Some(name);
    }

    fn on_reply(&mut self, bytes: &[u8]) {
        if let Err(e) = self.reply_dec.push(bytes) {
            panic!("the destination sent a malformed frame: {e}");
        }
        let frame = self.reply_dec.next_frame().expect("a Send that is not a complete frame");
        assert!(self.reply_dec.next_frame().is_none() && !self.reply_dec.in_frame(), "a Send of more than one frame");
        let rec = Record::decode(&frame).unwrap_or_else(|e| panic!("the destination sent a bad {:?}: {e}", frame.kind));
        if let Some(last) = self.replies.last() {
            let closed = matches!(last, Record::Reject { .. } | Record::Error { .. } | Record::Resumed);
            assert!(!closed, "{:?} sent after {:?}", rec.kind(), last.kind());
        }
        let last = self.replies.last().map(Record::kind);
        match &rec {
            Record::Accept => {
                assert!(last.is_none(), "Accept after {last:?}");
                assert!(self.vm.is_some() && self.prev == Some("CreateVm"), "Accept without CreateVm right before");
            }
            Record::Reject { reason } => {
                assert!(last.is_none() && self.vm.is_none(), "Reject after {last:?} or after CreateVm");
                assert_eq!(self.model.state, DestState::Rejected, "Reject of an acceptable Hello: {reason}");
            }
            Record::Ready => {
                assert_eq!(last, Some(RecordType::Accept), "Ready after {last:?}");
                assert_eq!(self.prev, Some("SetDeviceState"), "Ready not right after SetDeviceState");
            }
            Record::Resumed => {
                assert_eq!(last, Some(RecordType::Ready), "Resumed after {last:?}");
                assert_eq!(self.prev, Some("ResumeVm"), "Resumed not right after ResumeVm");
            }
            Record::Error { reason } => match &self.model.cause {
                Some(Cause::Detected(text)) => {
                    if let Some(t) = text {
                        assert!(reason.contains(t.as_str()), "Error {reason:?} does not name the decoder's {t:?}");
                    }
                }
                other => panic!("Error reply {reason:?}, but the model expected {other:?}"),
            },
            other => panic!("the destination sent {:?}, a source-only record", other.kind()),
        }
        self.outbox.extend_from_slice(bytes);
        self.replies.push(rec);
    }

    fn check_state(&mut self, after: &str) {
        let st = self.dst.state();
        assert_eq!(
            st, self.model.state,
            "state after {after} differs from the protocol model ({:?})",
            self.model.cause
        );
        if let Some(t) = self.terminal {
            assert_eq!(st, t, "the destination left the terminal state {t:?}");
        }
        if !active(st) {
            self.terminal = Some(st);
        }
        assert_eq!(self.vm.is_some(), self.model.created, "CreateVm handed out or not against the model");
        let sent: Vec<RecordType> = self.replies.iter().map(Record::kind).collect();
        use RecordType as T;
        match st {
            DestState::AwaitHello => assert!(sent.is_empty() && self.vm.is_none(), "{sent:?} while awaiting Hello"),
            DestState::Receiving => assert_eq!(sent, [T::Accept], "replies while receiving"),
            DestState::AwaitCommit => assert_eq!(sent, [T::Accept, T::Ready], "replies while awaiting Commit"),
            DestState::Resumed => {
                assert_eq!(sent, [T::Accept, T::Ready, T::Resumed], "replies after resuming");
                assert!(self.resumed && self.finished && self.destroyed.is_none());
            }
            DestState::Rejected => assert!(sent == [T::Reject] && self.vm.is_none(), "{sent:?} after rejecting"),
            DestState::Failed => {
                let told = matches!(self.model.cause, Some(Cause::Detected(_)));
                assert_eq!(sent.last() == Some(&T::Error), told, "Error reply vs. cause {:?}", self.model.cause);
                assert_eq!(self.destroyed.is_some(), self.vm.is_some(), "DestroyVm iff CreateVm was handed out");
                assert!(!self.resumed);
            }
        }
        if matches!(st, DestState::Receiving | DestState::AwaitCommit | DestState::Resumed) {
            assert_eq!(self.vcpu_states, self.model.vcpu_states, "vCPU states handed out");
        }
    }

    /// Host memory against the model, while the migration is alive.
    fn check_memory(&self, when: &str) {
        let (Some(vm), Some(model)) = (&self.vm, &self.model.mem) else { return };
        if self.alloc_refused || vm.mem_bytes > CHECKED_MEM || self.dst.state() == DestState::Failed {
            return;
        }
        for gfn in 0..vm.pages() {
            let r = self.mem.span(gfn, "checked");
            assert!(self.mem.bytes[r] == model.page(gfn)[..], "page {gfn:#x} differs from the model at {when}");
        }
    }

    /// After the input: late bytes and aborts must not move a terminal state.
    fn finish(&mut self) {
        self.check_memory("the end");
        if let Some(t) = self.terminal {
            self.dst.on_bytes(late_bytes(), &mut self.mem);
            self.dst.on_abort("late abort");
            if let Some(a) = self.dst.poll() {
                panic!("{} after the terminal state {t:?}", action_name(&a));
            }
            assert_eq!(self.dst.state(), t, "late bytes moved the terminal state");
        }
    }

    fn depth(&self) -> Depth {
        if self.resumed {
            Depth::Resumed
        } else if self.device_state.is_some() {
            Depth::Ready
        } else if !self.vcpu_states.is_empty() {
            Depth::VcpuState
        } else if self.model.round > 0 {
            Depth::RoundEnded
        } else if self.mem.writes > 0 {
            Depth::PagesWritten
        } else if self.vm.is_some() {
            Depth::VmCreated
        } else if self.dst.state() == DestState::Rejected || self.model.vm.is_some() {
            Depth::HelloDecided
        } else {
            Depth::Nothing
        }
    }

    /// What ended the input, from the destination's own replies.
    fn label(&self) -> (&'static str, String) {
        for r in &self.replies {
            match r {
                Record::Reject { reason } => return (classify(REJECTS, reason, "reject/other"), reason.clone()),
                Record::Error { reason } => return (classify_error(reason), reason.clone()),
                _ => {}
            }
        }
        let label = match (self.dst.state(), &self.model.cause) {
            (DestState::Resumed, _) => "ok/resumed",
            (DestState::AwaitHello, _) => "open/await-hello",
            (DestState::Receiving, _) => "open/receiving",
            (DestState::AwaitCommit, _) => "open/await-commit",
            (DestState::Failed, Some(Cause::Peer(RecordType::Cancel))) => "peer/cancel",
            (DestState::Failed, Some(Cause::Peer(_))) => "peer/error",
            (DestState::Failed, _) if self.alloc_refused => "host/alloc-refused",
            (DestState::Failed, _) => "host/abort",
            (DestState::Rejected, _) => "reject/silent",
        };
        (label, self.destroyed.clone().unwrap_or_default())
    }
}

/// Valid frames fed after a terminal state (Hello, then Commit).
fn late_bytes() -> &'static [u8] {
    static LATE: OnceLock<Vec<u8>> = OnceLock::new();
    LATE.get_or_init(|| {
        let mut v = Record::Hello(hello(4, 1)).encode().unwrap();
        v.extend(Record::Commit.encode().unwrap());
        v
    })
}

const REJECTS: &[(&str, &str)] = &[
    ("protocol version", "reject/protocol-version"),
    ("vendor", "reject/cpu-vendor"),
    ("features", "reject/cpu-features"),
    ("page size", "reject/page-size"),
    ("whole number of pages", "reject/memory-not-pages"),
    ("bytes of memory", "reject/memory-too-large"),
    ("vCPUs", "reject/vcpus"),
    ("VM name", "reject/vm-name"),
];
const WIRE_ERRORS: &[(&str, &str)] = &[
    ("bad magic", "wire/bad-magic"),
    ("protocol version", "wire/bad-version"),
    ("exceeds", "wire/too-long"),
    ("record type 0", "wire/type-0"),
    ("unknown record type", "wire/unknown-type"),
    ("CRC32C", "wire/bad-crc"),
];
const RECORD_ERRORS: &[(&str, &str)] = &[
    ("truncated", "record/truncated"),
    ("trailing", "record/trailing-bytes"),
    ("VM name", "record/name-too-long"),
    ("reason of", "record/reason-too-long"),
    ("not UTF-8", "record/not-utf8"),
    ("page batch of", "record/too-many-pages"),
    ("page encoding", "record/bad-page-kind"),
    ("delta of", "record/delta-too-long"),
    ("past the page", "record/delta-past-page"),
    ("does not match its hash", "record/page-hash"),
];
const PROTOCOL_ERRORS: &[(&str, &str)] = &[
    ("unexpected", "proto/unexpected-record"),
    ("before the VM was created", "proto/pages-before-create-vm"),
    ("after the end of memory", "proto/pages-after-memory"),
    ("pages of round", "proto/batch-of-wrong-round"),
    ("RoundEnd of round", "proto/round-end-of-wrong-round"),
    ("arrived", "proto/round-page-count"),
    ("round 0 carried", "proto/round-0-incomplete"),
    ("past the last", "proto/too-many-rounds"),
    ("beyond the VM", "proto/gfn-beyond-vm"),
    ("skeleton has", "proto/skeleton-too-small"),
    ("state before the end of round", "proto/state-before-round-end"),
    ("device state after", "proto/device-state-early"),
    ("more than", "proto/too-many-vcpu-states"),
    ("memory digest", "proto/digest-mismatch"),
    ("Verify after", "proto/verify-after-vcpu-state"),
    ("a delta in round 0", "proto/delta-in-round-0"),
    ("Commit before Ready", "proto/commit-before-ready"),
];

fn classify(table: &[(&str, &'static str)], reason: &str, other: &'static str) -> &'static str {
    table.iter().find(|(needle, _)| reason.contains(needle)).map_or(other, |(_, label)| label)
}

fn classify_error(reason: &str) -> &'static str {
    if let Some(rest) = reason.strip_prefix("bad frame from source: ") {
        classify(WIRE_ERRORS, rest, "wire/other")
    } else if reason.starts_with("bad ") && reason.contains(" from source: ") {
        classify(RECORD_ERRORS, reason, "record/other")
    } else {
        classify(PROTOCOL_ERRORS, reason, "proto/other")
    }
}

// ---------------------------------------------------------------------------
// The target.

/// How an input is delivered: chunk lengths, then maybe a link cut.
#[derive(Clone, Debug)]
struct Plan {
    chunks: Vec<usize>,
    abort: bool,
}

/// Lenient frame boundaries: header lengths followed from the start (magic,
/// type and CRC not checked), as `(start, end)`; stops at the first header
/// whose payload does not fit.
fn frame_spans(data: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = 0;
    while data.len() - at >= HEADER_LEN {
        let len = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD as usize || data.len() - at - HEADER_LEN < len {
            break;
        }
        spans.push((at, at + HEADER_LEN + len));
        at += HEADER_LEN + len;
    }
    spans
}

/// The delivery plan derived from the input's hash: whole, byte by byte,
/// small or TCP-sized random pieces, or frame by frame; usually with a cut
/// after the first frame (a real source waits for Accept after Hello); a
/// link cut at the end one time in four.
fn plan_for(data: &[u8]) -> Plan {
    let mut rng = Rng::new(fnv1a(data));
    let spans = frame_spans(data);
    let mut chunks = Vec::new();
    let mut at = 0;
    if !rng.one_in(8) {
        if let Some(&(_, end)) = spans.first() {
            chunks.push(end);
            at = end;
        }
    }
    let mode = rng.below(8);
    while at < data.len() {
        let rest = data.len() - at;
        let n = match mode {
            0 => rest,
            1 if data.len() <= 1 << 16 => 1,
            1 => rng.range(1, 16),
            2 | 3 => rng.range(1, 64),
            4 | 5 => rng.range(1, 9000),
            _ => spans.iter().find(|s| s.0 == at).map_or(rest, |s| s.1 - s.0),
        };
        chunks.push(n.min(rest));
        at += n.min(rest);
    }
    Plan { chunks, abort: rng.one_in(4) }
}

fn plan_whole(data: &[u8]) -> Plan {
    Plan { chunks: vec![data.len()], abort: false }
}

fn plan_frames(data: &[u8]) -> Plan {
    let spans = frame_spans(data);
    let mut chunks: Vec<usize> = spans.iter().map(|s| s.1 - s.0).collect();
    let end = spans.last().map_or(0, |s| s.1);
    if end < data.len() {
        chunks.push(data.len() - end);
    }
    Plan { chunks, abort: false }
}

/// What one input reached.
#[derive(Clone, Debug)]
struct Outcome {
    state: DestState,
    depth: Depth,
    label: &'static str,
    detail: String,
}

/// The fuzz target: one input, delivered as [`plan_for`] derives from it.
fn fuzz_one(data: &[u8]) -> Outcome {
    run_with_plan(data, &plan_for(data))
}

fn run_with_plan(data: &[u8], plan: &Plan) -> Outcome {
    let mut host = Host::new();
    let mut rest = data;
    if data.is_empty() {
        host.feed(&[]);
    }
    for &n in &plan.chunks {
        let (chunk, tail) = rest.split_at(n);
        host.feed(chunk);
        rest = tail;
    }
    assert!(rest.is_empty(), "plan does not cover the input");
    if plan.abort {
        host.abort();
    }
    host.finish();
    let (label, detail) = host.label();
    Outcome { state: host.dst.state(), depth: host.depth(), label, detail }
}

// ---------------------------------------------------------------------------
// Corpus.

fn hello(pages: u64, vcpus: u32) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        cpu_vendor: VENDOR,
        features: 0b1011,
        vm: VmConfig { name: "fuzz-guest".into(), mem_bytes: pages * PAGE_SIZE as u64, vcpus, page_size: 4096 },
    }
}

fn random_page(rng: &mut Rng) -> Box<[u8; PAGE_SIZE]> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    for w in p.as_chunks_mut::<8>().0 {
        *w = rng.next().to_le_bytes();
    }
    p
}

/// One of each record, plus a few variants.
fn sample_records() -> Vec<Record> {
    let mut rng = Rng::new(1);
    let mut big = hello(1 << 10, MAX_VCPUS);
    big.vm.name = "n".repeat(MAX_NAME);
    let mut amd = hello(4, 1);
    amd.cpu_vendor = *b"AuthenticAMD";
    let mut unnamable = hello(4, 1);
    unnamable.vm.name = "a b".into();
    let pages = vec![
        Page { gfn: 0, data: PageData::Zero },
        Page { gfn: 1, data: PageData::Full(random_page(&mut rng)) },
        Page { gfn: 2, data: PageData::Delta(vec![4, 0, 2, 0, 0xAA, 0xBB]) },
    ];
    let zeros = (0..MAX_BATCH_PAGES as u64).map(|gfn| Page { gfn, data: PageData::Zero }).collect();
    vec![
        Record::Hello(hello(4, 1)),
        Record::Hello(big),
        Record::Hello(unnamable),
        Record::Hello(amd),
        Record::Accept,
        Record::Reject { reason: "no".into() },
        Record::PageBatch(PageBatch { round: 0, pages }),
        Record::PageBatch(PageBatch { round: 0, pages: vec![] }),
        Record::PageBatch(PageBatch { round: 1, pages: zeros }),
        Record::RoundEnd(RoundEnd {
            round: 0,
            pages_sent: 4,
            bytes_sent: 5000,
            dirty_pages_remaining: 1,
            duration_us: 9,
        }),
        Record::VcpuState(vec![0xC0; 64]),
        Record::VcpuState(vec![0xC1; MAX_VCPU_STATE as usize]),
        Record::DeviceState(vec![0xD5; 300]),
        Record::DeviceState(vec![]),
        Record::Verify { digest: 0x0123_4567_89AB_CDEF },
        Record::Ready,
        Record::Commit,
        Record::Resumed,
        Record::Cancel { reason: "operator".into() },
        Record::Error { reason: "é".repeat(MAX_REASON / 2) },
    ]
}

fn frames_of(records: &[Record]) -> Vec<u8> {
    records.iter().flat_map(|r| r.encode().unwrap()).collect()
}

/// A guest write between rounds: a small edit (a delta next time), a
/// zeroed page, or a new random page.
fn guest_write(mem: &mut FuzzMem, gfn: u64, rng: &mut Rng) {
    match rng.below(6) {
        0 => mem.page_mut(gfn).fill(0),
        1 => {
            let p = random_page(rng);
            mem.page_mut(gfn).copy_from_slice(&p[..]);
        }
        _ => {
            for _ in 0..rng.range(1, 12) {
                let at = rng.below(PAGE_SIZE);
                let v = rng.next() as u8 | 1;
                mem.page_mut(gfn)[at] ^= v;
            }
        }
    }
}

fn initial_guest(pages: u64, rng: &mut Rng) -> FuzzMem {
    let mut mem = FuzzMem::new(pages, 0);
    for gfn in 0..pages {
        match gfn % 4 {
            0 | 1 => {
                let p = random_page(rng);
                mem.page_mut(gfn).copy_from_slice(&p[..]);
            }
            2 => mem.page_mut(gfn)[(gfn as usize * 7) % PAGE_SIZE] = gfn as u8 | 1,
            _ => {}
        }
    }
    mem
}

/// The bytes a real [`Source`] sends while migrating a small busy guest to a
/// destination (the same [`Host`], invariants on), in memory, with a fake
/// clock at 100 MB/s.
fn source_stream(pages: u64, vcpus: u32, verify: bool, max_rounds: u32, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut mem = initial_guest(pages, &mut rng);
    let config =
        SourceConfig { downtime_budget_us: 0, max_rounds, policy: Policy::Force, verify, ..Default::default() };
    let mut src = Source::new(config, hello(pages, vcpus));
    let mut host = Host::new();
    let vcpu_states: Vec<Vec<u8>> = (0..vcpus).map(|i| vec![0xC0 + i as u8; 100 + 700 * i as usize]).collect();
    let device = vec![0xD5; 3000];
    let hot = pages.min(6);
    let mut dirty = BTreeSet::new();
    let mut stream = Vec::new();
    let mut now = 1_000;
    let mut finished = false;
    let mut paused = false;
    for _ in 0..100_000 {
        let Some(a) = src.poll(&mem, now) else {
            now += 1_000;
            src.on_tick(now);
            continue;
        };
        match a {
            SourceAction::Send(b) => {
                now += 1 + b.len() as u64 / 100;
                stream.extend_from_slice(&b);
                host.feed(&b);
                let replies = std::mem::take(&mut host.outbox);
                if !replies.is_empty() {
                    now += 100;
                    src.on_bytes(&replies, now);
                }
            }
            SourceAction::HarvestDirty | SourceAction::PauseVm => {
                // The guest ran during the round, or until the pause.
                if !paused {
                    for _ in 0..rng.range(1, 8) {
                        let within = if rng.one_in(4) { pages } else { hot };
                        let gfn = rng.below(within as usize) as u64;
                        guest_write(&mut mem, gfn, &mut rng);
                        dirty.insert(gfn);
                    }
                }
                if a == SourceAction::PauseVm {
                    paused = true;
                    src.on_vm_paused(now, &vcpu_states, &device);
                } else {
                    let gfns: Vec<u64> = std::mem::take(&mut dirty).into_iter().collect();
                    src.on_dirty(&gfns, now);
                }
            }
            SourceAction::SetThrottle(_) => {}
            SourceAction::Finished(_) => {
                finished = true;
                break;
            }
            other => panic!("the source migration failed: {other:?}, destination {:?}", host.dst.state()),
        }
    }
    assert!(finished, "the source never finished");
    assert_eq!(host.dst.state(), DestState::Resumed);
    assert!(host.mem.bytes == mem.bytes, "destination memory differs from the source's");
    host.finish();
    stream
}

/// A complete migration built record by record (no Source involved):
/// `rounds` rounds, deltas after round 0, batches of up to `batch` pages.
fn handmade_stream(pages: u64, vcpus: u32, verify: bool, rounds: u32, batch: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut mem = initial_guest(pages, &mut rng);
    let mut recs = vec![Record::Hello(hello(pages, vcpus))];
    for round in 0..rounds {
        let gfns: Vec<u64> = if round == 0 {
            (0..pages).collect()
        } else {
            let set: BTreeSet<u64> = (0..rng.range(1, 10)).map(|_| rng.below(pages as usize) as u64).collect();
            set.into_iter().collect()
        };
        let mut out = Vec::new();
        for &gfn in &gfns {
            let old: [u8; PAGE_SIZE] = mem.bytes[mem.span(gfn, "read")].try_into().unwrap();
            if round > 0 {
                guest_write(&mut mem, gfn, &mut rng);
            }
            let new: [u8; PAGE_SIZE] = mem.bytes[mem.span(gfn, "read")].try_into().unwrap();
            let mut d = Vec::new();
            let data = if new == [0; PAGE_SIZE] {
                PageData::Zero
            } else if round > 0 && migration::delta::encode(&old, &new, &mut d) {
                PageData::Delta(d)
            } else {
                PageData::Full(Box::new(new))
            };
            out.push(Page { gfn, data });
        }
        let n = out.len() as u64;
        while !out.is_empty() {
            let rest = out.split_off(batch.min(out.len()));
            recs.push(Record::PageBatch(PageBatch { round, pages: std::mem::replace(&mut out, rest) }));
        }
        recs.push(Record::RoundEnd(RoundEnd { round, pages_sent: n, ..RoundEnd::default() }));
    }
    if verify {
        recs.push(Record::Verify { digest: mem.digest() });
    }
    for i in 0..vcpus {
        recs.push(Record::VcpuState(vec![i as u8; 1 + 97 * i as usize]));
    }
    recs.push(Record::DeviceState(rng.some_bytes(0, 2000)));
    recs.push(Record::Commit);
    frames_of(&recs)
}

struct Corpus {
    /// Complete valid migrations.
    streams: Vec<Vec<u8>>,
    /// Everything the mutator starts from.
    inputs: Vec<Vec<u8>>,
    /// Single valid frames, for insertion.
    frames: Vec<Vec<u8>>,
}

fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let streams = vec![
            source_stream(8, 1, true, 3, 1),
            source_stream(33, 2, false, 1, 2),
            source_stream(24, 3, true, 5, 3),
            source_stream(300, 1, true, 2, 4),
            handmade_stream(4, 1, true, 3, 2, 5),
            handmade_stream(17, 2, false, 2, 256, 6),
            handmade_stream(1, 1, true, 1, 1, 7),
        ];
        let records = sample_records();
        let frames: Vec<Vec<u8>> = records.iter().map(|r| r.encode().unwrap()).collect();
        let mut inputs = streams.clone();
        inputs.extend(frames.iter().cloned());
        // Prefixes: Hello alone, Hello and the first round.
        for s in &streams {
            let spans = frame_spans(s);
            inputs.push(s[..spans[0].1].to_vec());
            inputs.push(s[..spans[spans.len() / 2].1].to_vec());
        }
        Corpus { streams, inputs, frames }
    })
}

// ---------------------------------------------------------------------------
// Mutator.

const I8: &[u8] = &[0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF, 13, 14, 32, 33];
const I16: &[u16] =
    &[0, 1, 2, 0xFF, 256, 257, 0x7FFF, 0x8000, 0xFFFF, MAX_DELTA as u16, MAX_DELTA as u16 + 1, 4095, 4096, 4097];
const I32: &[u32] = &[
    0,
    1,
    2,
    13,
    14,
    36,
    37,
    71,
    72,
    255,
    256,
    257,
    258,
    259,
    4096,
    4097,
    65_536,
    65_537,
    PAGE_BATCH_MAX_LEN,
    PAGE_BATCH_MAX_LEN + 1,
    MAX_PAYLOAD,
    MAX_PAYLOAD + 1,
    0x7FFF_FFFF,
    0x8000_0000,
    u32::MAX,
];
const I64: &[u64] = &[
    0,
    1,
    4095,
    4096,
    4097,
    HOST_ALLOC_LIMIT,
    HOST_ALLOC_LIMIT + 4096,
    DEST_MAX_MEM,
    DEST_MAX_MEM + 4096,
    1 << 32,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

fn put(data: &mut [u8], at: usize, width: usize, rng: &mut Rng) {
    let bytes = match width {
        1 => vec![rng.pick(I8)],
        2 => rng.pick(I16).to_le_bytes().to_vec(),
        4 => rng.pick(I32).to_le_bytes().to_vec(),
        _ => rng.pick(I64).to_le_bytes().to_vec(),
    };
    let end = (at + bytes.len()).min(data.len());
    if at < end {
        data[at..end].copy_from_slice(&bytes[..end - at]);
    }
}

/// `(offset, width)` of the payload fields of a record type, walking page
/// batches and deltas leniently.
fn field_offsets(kind: u16, body: &[u8]) -> Vec<(usize, usize)> {
    let u16_at = |at: usize| body.get(at..at + 2).map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    match kind {
        1 => vec![(0, 2), (2, 1), (13, 1), (14, 8), (22, 8), (30, 4), (34, 4), (38, 1)],
        3 | 12 | 13 => vec![(0, 2), (2, 1)],
        4 => {
            let mut f = vec![(0, 4), (4, 2)];
            let mut at = 6;
            while at + 9 <= body.len() && f.len() < 64 {
                f.extend([(at, 8), (at + 8, 1)]);
                match body[at + 8] {
                    1 => {
                        f.push((at + 9, 8)); // the page's hash
                        at += 17 + PAGE_SIZE;
                    }
                    2 => {
                        f.push((at + 9, 2));
                        let len = u16_at(at + 9);
                        let mut op = at + 11;
                        while op + 4 <= (at + 11 + len).min(body.len()) && f.len() < 64 {
                            f.extend([(op, 2), (op + 2, 2)]);
                            op += 4 + u16_at(op + 2);
                        }
                        at += 11 + len;
                    }
                    _ => at += 9,
                }
            }
            f
        }
        5 => vec![(0, 4), (4, 8), (12, 8), (20, 8), (28, 8)],
        8 => vec![(0, 8)],
        _ => vec![],
    }
}

/// Rewrites a frame's CRC as the protocol defines it for its type (a
/// PageBatch's leaves out full-page data, which the page hashes cover).
fn fix_crc(data: &mut [u8], start: usize, end: usize) {
    let payload = &data[start + HEADER_LEN..end];
    let crc = match RecordType::from_wire(u16::from_le_bytes([data[start + 6], data[start + 7]])) {
        Ok(kind) => frame_crc(kind, payload),
        Err(_) => crc32c(payload),
    };
    data[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

fn set_len(data: &mut [u8], start: usize, len: usize) {
    data[start + 8..start + 12].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Frame boundaries (including 0 and the end of the last whole frame).
fn boundaries(data: &[u8]) -> Vec<usize> {
    let mut b = vec![0];
    b.extend(frame_spans(data).iter().map(|s| s.1));
    b
}

struct Mutator<'a> {
    frames: &'a [Vec<u8>],
}

impl Mutator<'_> {
    fn mutate(&self, pool: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
        let mut data = pool[rng.below(pool.len())].clone();
        let n = 1 + (rng.next().trailing_zeros() as usize).min(4);
        for _ in 0..n {
            self.apply_one(&mut data, pool, rng);
        }
        data.truncate(MAX_INPUT);
        data
    }

    fn apply_one(&self, data: &mut Vec<u8>, pool: &[Vec<u8>], rng: &mut Rng) {
        let spans = frame_spans(data);
        let span = (!spans.is_empty()).then(|| spans[rng.below(spans.len())]);
        match (rng.below(20), span) {
            (0, _) if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] ^= 1 << rng.below(8);
            }
            (1, _) if !data.is_empty() => {
                let at = rng.below(data.len());
                data[at] = rng.pick(I8);
            }
            (2, _) if !data.is_empty() => {
                let at = rng.below(data.len());
                let w = rng.pick(&[1, 2, 4, 8]);
                put(data, at, w, rng);
            }
            (3..=7, Some(s)) => body_edit(data, s, rng),
            (8, Some(s)) => header_edit(data, s, rng),
            (9..=11, Some(s)) => record_tweak(data, s, rng),
            (12, _) => {
                let cut = if rng.one_in(2) { rng.pick(&boundaries(data)) } else { rng.below(data.len() + 1) };
                let cut = if rng.one_in(3) { cut.saturating_sub(rng.range(1, 16)) } else { cut };
                data.truncate(cut);
            }
            (13, _) => {
                let other = &pool[rng.below(pool.len())];
                let a = if rng.one_in(4) { rng.below(data.len() + 1) } else { rng.pick(&boundaries(data)) };
                let b = if rng.one_in(4) { rng.below(other.len() + 1) } else { rng.pick(&boundaries(other)) };
                data.truncate(a);
                data.extend_from_slice(&other[b..]);
            }
            (14, Some((s, e))) => {
                let frame = data[s..e].to_vec();
                let at = if rng.one_in(2) { e } else { rng.pick(&boundaries(data)) };
                data.splice(at..at, frame);
            }
            (15, Some((s, e))) => {
                data.drain(s..e);
            }
            (16, Some((s, e))) if spans.len() > 1 => {
                // Move the frame to another boundary (a swap when adjacent).
                let frame: Vec<u8> = data.drain(s..e).collect();
                let at = rng.pick(&boundaries(data));
                data.splice(at..at, frame);
            }
            (17, _) => {
                let at = rng.below(data.len() + 1);
                let bytes = if rng.one_in(3) { MAGIC.to_le_bytes().to_vec() } else { rng.some_bytes(1, 32) };
                data.splice(at..at, bytes);
            }
            (18, _) => {
                let frame = self.frames[rng.below(self.frames.len())].clone();
                let at = rng.pick(&boundaries(data));
                data.splice(at..at, frame);
            }
            (19, Some((s, e))) => {
                let frame = self.frames[rng.below(self.frames.len())].clone();
                data.splice(s..e, frame);
            }
            _ => {
                // No frame to work on: flip a byte if there is one.
                if !data.is_empty() {
                    let at = rng.below(data.len());
                    data[at] ^= 0xFF;
                } else {
                    data.extend(rng.some_bytes(1, 20));
                }
            }
        }
    }
}

/// Edits a frame's payload, then fixes its length and CRC so the edit
/// reaches the record decoder.
fn body_edit(data: &mut Vec<u8>, (s, e): (usize, usize), rng: &mut Rng) {
    let kind = u16::from_le_bytes([data[s + 6], data[s + 7]]);
    let body_len = e - s - HEADER_LEN;
    let mut new_len = body_len;
    match rng.below(8) {
        0..=3 => {
            let fields = field_offsets(kind, &data[s + HEADER_LEN..e]);
            let (at, w) = if !fields.is_empty() && !rng.one_in(4) {
                rng.pick(&fields)
            } else {
                (rng.below(body_len.max(1)), rng.pick(&[1, 2, 4, 8]))
            };
            put(&mut data[s + HEADER_LEN..e], at, w, rng);
        }
        4 if body_len > 0 => {
            let at = s + HEADER_LEN + rng.below(body_len);
            data[at] ^= 1 << rng.below(8);
        }
        5 => {
            let n = rng.range(1, 8);
            let at = s + HEADER_LEN + rng.below(body_len + 1);
            data.splice(at..at, rng.bytes(n));
            new_len += n;
        }
        6 if body_len > 0 => {
            let n = rng.range(1, 8).min(body_len);
            let at = s + HEADER_LEN + rng.below(body_len - n + 1);
            data.drain(at..at + n);
            new_len -= n;
        }
        _ => {
            let keep = rng.below(body_len + 1);
            data.drain(s + HEADER_LEN + keep..e);
            new_len = keep;
        }
    }
    set_len(data, s, new_len);
    fix_crc(data, s, s + HEADER_LEN + new_len);
}

/// Edits a frame header: type (the CRC stays valid), length, magic or
/// version.
fn header_edit(data: &mut [u8], (s, e): (usize, usize), rng: &mut Rng) {
    let len = e - s - HEADER_LEN;
    match rng.below(4) {
        0 | 1 => {
            let t: u16 = rng.pick(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0xFF, 0x100, 0xFFFF]);
            data[s + 6..s + 8].copy_from_slice(&t.to_le_bytes());
        }
        2 => {
            let l = match rng.below(3) {
                0 => rng.pick(I32),
                1 => (len as u32).wrapping_add(1),
                _ => (len as u32).wrapping_sub(1),
            };
            data[s + 8..s + 12].copy_from_slice(&l.to_le_bytes());
        }
        _ => {
            let at = s + rng.below(6);
            data[at] = rng.pick(I8);
        }
    }
}

/// Decodes a frame, changes one field of the record, encodes it again: a
/// well-formed frame that is wrong for the protocol.
fn record_tweak(data: &mut Vec<u8>, (s, e): (usize, usize), rng: &mut Rng) {
    let mut dec = FrameDecoder::new();
    let Ok(()) = dec.push(&data[s..e]) else { return body_edit(data, (s, e), rng) };
    let Some(Ok(rec)) = dec.next_frame().map(|f| Record::decode(&f)) else { return body_edit(data, (s, e), rng) };
    let tweaked = tweak(rec, rng);
    if let Ok(bytes) = tweaked.encode() {
        data.splice(s..e, bytes);
    }
}

fn bump(v: u64, rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => v.wrapping_add(1),
        1 => v.wrapping_sub(1),
        2 => v.wrapping_add(rng.range(2, 300) as u64),
        _ => rng.pick(I64),
    }
}

fn tweak(rec: Record, rng: &mut Rng) -> Record {
    match rec {
        Record::Hello(mut h) => {
            match rng.below(8) {
                0 => h.vm.mem_bytes = rng.pick(I64),
                1 => h.vm.mem_bytes = bump(h.vm.mem_bytes / 4096, rng).wrapping_mul(4096),
                2 => h.vm.vcpus = rng.pick(&[0, 1, 2, 3, 255, 256, 257, u32::MAX]),
                3 => h.features |= 1 << rng.below(64),
                4 => h.cpu_vendor[rng.below(12)] ^= 1 << rng.below(8),
                5 => h.protocol_version = rng.pick(&[0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 0xFFFF]),
                6 => h.vm.page_size = rng.pick(&[0, 4095, 4097, 8192, 2 << 20]),
                _ => h.vm.name = "x".repeat(rng.below(MAX_NAME + 1)),
            }
            Record::Hello(h)
        }
        Record::PageBatch(mut b) => {
            let n = b.pages.len();
            match rng.below(8) {
                0 => b.round = bump(u64::from(b.round), rng) as u32,
                1 if n > 0 => {
                    b.pages.remove(rng.below(n));
                }
                2 if n > 0 && n < MAX_BATCH_PAGES => {
                    let p = b.pages[rng.below(n)].clone();
                    b.pages.insert(rng.below(n + 1), p);
                }
                3 if n > 0 => {
                    let i = rng.below(n);
                    b.pages[i].gfn = bump(b.pages[i].gfn, rng);
                }
                4 if n > 0 => {
                    let i = rng.below(n);
                    b.pages[i].data = match rng.below(3) {
                        0 => PageData::Zero,
                        1 => PageData::Full(random_page(rng)),
                        _ => PageData::Delta(vec![rng.below(4000) as u8, 0, 2, 0, 0x11, 0x22]),
                    };
                }
                5 if n > 0 => {
                    // A delta the decoder must refuse (runs past the page).
                    let i = rng.below(n);
                    b.pages[i].data = PageData::Delta(vec![0xFF, 0x0F, 2, 0, 1, 1]);
                }
                _ if n < MAX_BATCH_PAGES => b.pages.push(Page { gfn: rng.below(64) as u64, data: PageData::Zero }),
                _ => b.pages.clear(),
            }
            Record::PageBatch(b)
        }
        Record::RoundEnd(mut e) => {
            match rng.below(3) {
                0 => e.round = bump(u64::from(e.round), rng) as u32,
                1 => e.pages_sent = bump(e.pages_sent, rng),
                _ => e.dirty_pages_remaining = bump(e.dirty_pages_remaining, rng),
            }
            Record::RoundEnd(e)
        }
        Record::VcpuState(s) => Record::VcpuState(resize(s, MAX_VCPU_STATE as usize, rng)),
        Record::DeviceState(s) => Record::DeviceState(resize(s, MAX_DEVICE_STATE as usize, rng)),
        Record::Verify { digest } => Record::Verify { digest: digest ^ (1 << rng.below(64)) },
        Record::Cancel { .. } | Record::Error { .. } | Record::Reject { .. } => {
            let reason = "r".repeat(rng.pick(&[0, 1, MAX_REASON]));
            match rng.below(3) {
                0 => Record::Cancel { reason },
                1 => Record::Error { reason },
                _ => Record::Reject { reason },
            }
        }
        _ => {
            let mut all = sample_records();
            let i = rng.below(all.len());
            all.swap_remove(i)
        }
    }
}

fn resize(mut s: Vec<u8>, max: usize, rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => s.clear(),
        1 => s.push(0xAB),
        2 => s.resize(max, 0x5A),
        _ if !s.is_empty() => {
            let i = rng.below(s.len());
            s[i] ^= 0x01;
        }
        _ => {}
    }
    s
}

// ---------------------------------------------------------------------------
// Failures: minimize, print, save.

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default()
}

fn fails(input: &[u8]) -> bool {
    panic::catch_unwind(|| {
        fuzz_one(input);
    })
    .is_err()
}

/// Removes whole frames, then ever smaller byte ranges, while the input
/// still fails (with any invariant).
fn minimize(mut best: Vec<u8>) -> Vec<u8> {
    let mut tries = 0;
    loop {
        let before = best.len();
        let spans = frame_spans(&best);
        for &(s, e) in spans.iter().rev() {
            let mut c = best.clone();
            c.drain(s..e);
            tries += 1;
            if fails(&c) {
                best = c;
            }
        }
        let mut size = best.len() / 2;
        while size > 0 && tries < 4_000 {
            let mut at = 0;
            while at + size <= best.len() && tries < 4_000 {
                let mut c = best.clone();
                c.drain(at..at + size);
                tries += 1;
                if fails(&c) {
                    best = c;
                } else {
                    at += size;
                }
            }
            size /= 2;
        }
        if best.len() == before || tries >= 4_000 {
            return best;
        }
    }
}

fn hex(data: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in data.chunks(32).take(128).enumerate() {
        let _ = write!(s, "{:06x}:", i * 32);
        for b in line {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    if data.len() > 32 * 128 {
        let _ = writeln!(s, "... ({} bytes)", data.len());
    }
    s
}

/// Runs the target; on a failure, minimizes the input and fails the test
/// with the invariant, the minimized input and how to reproduce it.
fn run_guarded(input: &[u8], context: &str) -> Outcome {
    match panic::catch_unwind(AssertUnwindSafe(|| fuzz_one(input))) {
        Ok(o) => o,
        Err(p) => {
            let msg = panic_text(&*p);
            let hook = panic::take_hook();
            panic::set_hook(Box::new(|_| {}));
            let min = minimize(input.to_vec());
            panic::set_hook(hook);
            let path = std::env::temp_dir().join("migration-fuzz-destination-crash.bin");
            let saved =
                std::fs::write(&path, &min).map_or_else(|e| format!("not saved: {e}"), |()| path.display().to_string());
            let again = panic::catch_unwind(|| {
                fuzz_one(&min);
            })
            .err()
            .map(|p| panic_text(&*p))
            .unwrap_or_default();
            panic!(
                "fuzz_one failed ({context}): {msg}\nminimized to {} of {} bytes ({saved}), failing with: {again}\n\
                 delivery plan {:?}\n{}",
                min.len(),
                input.len(),
                plan_for(&min),
                hex(&min)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics.

fn state_name(s: DestState) -> &'static str {
    match s {
        DestState::AwaitHello => "AwaitHello",
        DestState::Receiving => "Receiving",
        DestState::AwaitCommit => "AwaitCommit",
        DestState::Resumed => "Resumed",
        DestState::Rejected => "Rejected",
        DestState::Failed => "Failed",
    }
}

#[derive(Default)]
struct Stats {
    inputs: u64,
    bytes: u64,
    states: BTreeMap<&'static str, u64>,
    depths: BTreeMap<Depth, u64>,
    labels: BTreeMap<&'static str, (u64, String)>,
}

impl Stats {
    fn add(&mut self, o: &Outcome, len: usize) {
        self.inputs += 1;
        self.bytes += len as u64;
        *self.states.entry(state_name(o.state)).or_default() += 1;
        *self.depths.entry(o.depth).or_default() += 1;
        let e = self.labels.entry(o.label).or_insert_with(|| (0, o.detail.clone()));
        e.0 += 1;
    }

    /// Inputs that got at least as far as `d`.
    fn reached(&self, d: Depth) -> u64 {
        self.depths.range(d..).map(|(_, n)| n).sum()
    }

    fn count(&self, label: &str) -> u64 {
        self.labels.get(label).map_or(0, |e| e.0)
    }

    fn kinds(&self, prefix: &str) -> usize {
        self.labels.keys().filter(|l| l.starts_with(prefix)).count()
    }

    fn print(&self, title: &str) {
        let pct = |n: u64| 100.0 * n as f64 / self.inputs.max(1) as f64;
        println!("{title}: {} inputs, {:.1} MiB", self.inputs, self.bytes as f64 / (1 << 20) as f64);
        println!("  final state:");
        for (s, n) in &self.states {
            println!("    {s:<12} {n:>9} {:>6.2}%", pct(*n));
        }
        println!("  reached at least:");
        for d in DEPTHS {
            println!("    {:<12} {:>9} {:>6.2}%", format!("{d:?}"), self.reached(d), pct(self.reached(d)));
        }
        println!("  how inputs ended (label, count, first reason seen):");
        for (l, (n, why)) in &self.labels {
            let why: String = why.escape_debug().take(90).collect();
            println!("    {l:<32} {n:>9} {:>6.2}%  {why}", pct(*n));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn fuzz_destination_bounded() {
    let secs = std::env::var("MIGRATION_FUZZ_SECS")
        .ok()
        .map_or(DEFAULT_SECS, |v| v.trim().parse::<f64>().unwrap_or_else(|e| panic!("MIGRATION_FUZZ_SECS={v}: {e}")));
    let seed = env_u64("MIGRATION_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let exact = env_u64("MIGRATION_FUZZ_ITERS");
    println!(
        "fuzz_destination: seed {seed:#x} (MIGRATION_FUZZ_SEED), budget {secs} s (MIGRATION_FUZZ_SECS), \
         at least {MIN_ITERATIONS} inputs{}",
        exact.map_or(String::new(), |n| format!(", exactly {n} inputs (MIGRATION_FUZZ_ITERS)"))
    );
    let corpus = corpus();
    let mut seeds = Stats::default();
    for (i, input) in corpus.inputs.iter().enumerate() {
        let o = run_guarded(input, &format!("corpus input {i}"));
        seeds.add(&o, input.len());
    }
    seeds.print("corpus (unmutated)");

    let mutator = Mutator { frames: &corpus.frames };
    let mut pool = corpus.inputs.clone();
    let mut seen = BTreeSet::new();
    let mut stats = Stats::default();
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let budget = Duration::from_secs_f64(secs.max(0.0));
    let mut i = 0u64;
    loop {
        let more = match exact {
            Some(n) => i < n,
            None => i < MIN_ITERATIONS || start.elapsed() < budget,
        };
        if !more {
            break;
        }
        let input = mutator.mutate(&pool, &mut rng);
        let o = run_guarded(&input, &format!("seed {seed:#x}, input {i}"));
        // Keep inputs that reached a new combination (cheap behavioural feedback).
        if seen.insert((state_name(o.state), o.depth, o.label)) {
            if pool.len() < MAX_POOL {
                pool.push(input.clone());
            } else {
                let at = corpus.inputs.len() + rng.below(MAX_POOL - corpus.inputs.len());
                pool[at] = input.clone();
            }
        }
        stats.add(&o, input.len());
        i += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!();
    stats.print("mutated");
    println!(
        "fuzz_destination: {i} mutated inputs in {elapsed:.1} s = {:.0} inputs/s, {} kept in the pool, seed {seed:#x}",
        i as f64 / elapsed.max(1e-9),
        pool.len() - corpus.inputs.len()
    );

    // The fuzzer must still reach deep states and every class of error.
    if exact.is_some_and(|n| n < MIN_ITERATIONS) {
        println!("fewer than {MIN_ITERATIONS} inputs: coverage not asserted");
        return;
    }
    let n = stats.inputs;
    let deep = [
        (Depth::VmCreated, n / 10),
        (Depth::PagesWritten, n / 20),
        (Depth::RoundEnded, n / 50),
        (Depth::VcpuState, n / 200),
        (Depth::Ready, n / 500),
        (Depth::Resumed, n / 1000),
    ];
    for (d, min) in deep {
        assert!(stats.reached(d) >= min.max(1), "only {} of {n} inputs reached {d:?} (want {min})", stats.reached(d));
    }
    for label in [
        "wire/bad-crc",
        "wire/too-long",
        "wire/unknown-type",
        "wire/type-0",
        "wire/bad-magic",
        "wire/bad-version",
        "record/truncated",
        "record/trailing-bytes",
        "record/bad-page-kind",
        "record/delta-past-page",
        "record/page-hash",
        "proto/unexpected-record",
        "proto/batch-of-wrong-round",
        "proto/round-page-count",
        "proto/gfn-beyond-vm",
        "proto/digest-mismatch",
        "reject/memory-too-large",
        "reject/vcpus",
        "peer/cancel",
        "host/alloc-refused",
        "host/abort",
    ] {
        assert!(stats.count(label) > 0, "no mutated input ended with {label}");
    }
    assert!(stats.kinds("record/") >= 6, "record errors seen: {}", stats.kinds("record/"));
    assert!(stats.kinds("proto/") >= 10, "protocol errors seen: {}", stats.kinds("proto/"));
    assert!(stats.kinds("reject/") >= 5, "Hello refusals seen: {}", stats.kinds("reject/"));
    // Checksum failures must not dominate: most mutations get past the CRC.
    let crc = stats.count("wire/bad-crc");
    assert!(crc * 3 < n, "{crc} of {n} inputs stopped at the CRC check");
}

#[test]
fn regression_inputs() {
    let header = |kind: u16, len: u32, crc: u32| {
        let mut v = MAGIC.to_le_bytes().to_vec();
        v.extend(PROTOCOL_VERSION.to_le_bytes());
        v.extend(kind.to_le_bytes());
        v.extend(len.to_le_bytes());
        v.extend(crc.to_le_bytes());
        v
    };
    let raw = |kind: u16, payload: &[u8]| {
        let crc = RecordType::from_wire(kind).map_or_else(|_| crc32c(payload), |k| frame_crc(k, payload));
        let mut v = header(kind, payload.len() as u32, crc);
        v.extend_from_slice(payload);
        v
    };
    let hello4 = Record::Hello(hello(4, 1)).encode().unwrap();
    let with_hello = |more: &[u8]| [&hello4[..], more].concat();
    let batch_payload = |pages: &[(u64, &[u8])]| {
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend((pages.len() as u16).to_le_bytes());
        for (gfn, body) in pages {
            p.extend(gfn.to_le_bytes());
            p.extend_from_slice(body);
        }
        p
    };
    // Round 0 sends page 0 twice and page 1..3 never... count-only check (see below).
    let dup = frames_of(&[
        Record::Hello(hello(2, 1)),
        Record::PageBatch(PageBatch {
            round: 0,
            pages: vec![Page { gfn: 0, data: PageData::Zero }, Page { gfn: 0, data: PageData::Zero }],
        }),
        Record::RoundEnd(RoundEnd { round: 0, pages_sent: 2, ..RoundEnd::default() }),
        Record::VcpuState(vec![1]),
        Record::DeviceState(vec![]),
        Record::Commit,
    ]);
    let mut big_hello = hello(4, 1);
    big_hello.vm.mem_bytes = 128 << 20; // the destination accepts it, this host cannot allocate it
    let vcpus = |n: u32| Record::Hello(hello(4, n)).encode().unwrap();
    let mem = |bytes: u64| {
        let mut h = hello(4, 1);
        h.vm.mem_bytes = bytes;
        Record::Hello(h).encode().unwrap()
    };
    let bad_name = {
        let mut p = Record::Hello(hello(4, 1)).encode().unwrap()[HEADER_LEN..].to_vec();
        p[38] = 33; // checked before the name is read
        raw(1, &p)
    };
    // A full page (kind 1) whose hash (8 zero bytes) is not its data's.
    let wrong_hash = [&[1u8][..], &[0; 8], &[0xAB; PAGE_SIZE]].concat();
    let valid = handmade_stream(4, 1, true, 2, 3, 99);
    let mut after_commit = valid.clone();
    after_commit.extend(b"garbage after the commit");

    // (name, input, label when delivered frame by frame)
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("empty", vec![], Some("open/await-hello")),
        ("header with length u32::MAX", header(4, u32::MAX, 0), Some("wire/too-long")),
        ("valid header of type 0", header(0, 0, 0), Some("wire/type-0")),
        ("type 14", header(14, 0, 0), Some("wire/unknown-type")),
        ("type 0xFFFF", header(0xFFFF, 0, 0), Some("wire/unknown-type")),
        ("15 header bytes", header(1, 0, 0)[..15].to_vec(), Some("open/await-hello")),
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(), Some("wire/bad-magic")),
        (
            "version 1",
            [&MAGIC.to_le_bytes()[..], &[1u8, 0][..], &header(1, 0, 0)[6..]].concat(),
            Some("wire/bad-version"),
        ),
        ("Hello one byte too long", header(1, 72, 0), Some("wire/too-long")),
        ("Accept with a payload", raw(2, &[0]), Some("wire/too-long")),
        (
            "Hello with a bad CRC",
            {
                let mut h = hello4.clone();
                h[20] ^= 1;
                h
            },
            Some("wire/bad-crc"),
        ),
        ("empty Hello", raw(1, &[]), Some("record/truncated")),
        ("name of 33 bytes", bad_name, Some("record/name-too-long")),
        ("Commit first", Record::Commit.encode().unwrap(), Some("proto/unexpected-record")),
        ("Hello with 0 vCPUs", vcpus(0), Some("reject/vcpus")),
        ("Hello with MAX_VCPUS", vcpus(MAX_VCPUS), Some("open/receiving")),
        ("Hello with MAX_VCPUS + 1", vcpus(MAX_VCPUS + 1), Some("reject/vcpus")),
        ("Hello with all the memory offered", mem(DEST_MAX_MEM), Some("host/alloc-refused")),
        ("Hello with a page more", mem(DEST_MAX_MEM + 4096), Some("reject/memory-too-large")),
        ("Hello with as much as the host allocates", mem(HOST_ALLOC_LIMIT), Some("open/receiving")),
        ("Hello with half a page", mem(2048), Some("reject/memory-not-pages")),
        ("Hello too large to allocate", Record::Hello(big_hello).encode().unwrap(), Some("host/alloc-refused")),
        ("Hello, Cancel", with_hello(&Record::Cancel { reason: "stop".into() }.encode().unwrap()), Some("peer/cancel")),
        ("Hello, non-UTF-8 Error", with_hello(&raw(13, &[2, 0, 0xC3, 0x28])), Some("record/not-utf8")),
        ("Hello twice", with_hello(&hello4), Some("proto/unexpected-record")),
        ("257 pages", with_hello(&raw(4, &[0, 0, 0, 0, 1, 1])), Some("record/too-many-pages")),
        ("page kind 3", with_hello(&raw(4, &batch_payload(&[(0, &[3])]))), Some("record/bad-page-kind")),
        (
            "delta past the page",
            with_hello(&raw(4, &batch_payload(&[(0, &[2, 6, 0, 0xFF, 0x0F, 2, 0, 1, 1])]))),
            Some("record/delta-past-page"),
        ),
        ("delta of 2049 bytes", with_hello(&raw(4, &batch_payload(&[(0, &[2, 1, 8])]))), Some("record/delta-too-long")),
        (
            "full page with a wrong hash",
            with_hello(&raw(4, &batch_payload(&[(0, &wrong_hash)]))),
            Some("record/page-hash"),
        ),
        (
            "empty delta in round 0",
            with_hello(&raw(4, &batch_payload(&[(0, &[2, 0, 0])]))),
            Some("proto/delta-in-round-0"),
        ),
        ("gfn beyond the VM", with_hello(&raw(4, &batch_payload(&[(4, &[0])]))), Some("proto/gfn-beyond-vm")),
        ("gfn u64::MAX", with_hello(&raw(4, &batch_payload(&[(u64::MAX, &[0])]))), Some("proto/gfn-beyond-vm")),
        ("Verify of 7 bytes", with_hello(&raw(8, &[0; 7])), Some("record/truncated")),
        ("valid migration", valid, Some("ok/resumed")),
        ("bytes after Resumed", after_commit, Some("ok/resumed")),
        // Round 0 is checked by count, not coverage: without Verify, page 1
        // is never written and the VM resumes (not asserted either way).
        ("round 0 sends page 0 twice, page 1 never", dup, None),
    ];
    // DeviceState and Commit in one read: the Commit came before Ready
    // went out, which no source that waits for Ready can send.
    let stream = handmade_stream(4, 1, true, 2, 3, 99);
    let mut early = plan_frames(&stream);
    let commit = early.chunks.pop().unwrap();
    *early.chunks.last_mut().unwrap() += commit;
    assert_eq!(run_with_plan(&stream, &early).label, "proto/commit-before-ready");
    for (name, input, want) in &cases {
        for plan in [plan_frames(input), plan_whole(input), plan_for(input), Plan { abort: true, ..plan_frames(input) }]
        {
            let o = panic::catch_unwind(AssertUnwindSafe(|| run_with_plan(input, &plan)))
                .unwrap_or_else(|p| panic!("{name} ({plan:?}): {}", panic_text(&*p)));
            let how = format!("{} chunk(s){}", plan.chunks.len(), if plan.abort { ", abort" } else { "" });
            println!("{name:<44} {how:<20} -> {:?}, {}", o.state, o.label);
        }
        let o = run_with_plan(input, &plan_frames(input));
        if let Some(want) = want {
            assert_eq!(o.label, *want, "{name}: {}", o.detail);
        }
        run_guarded(input, name);
    }
}

/// The corpus itself: every stream migrates, and cut at any frame boundary
/// or inside a frame it leaves the destination waiting, never failed.
#[test]
fn corpus_streams_are_valid_migrations() {
    let corpus = corpus();
    for (i, s) in corpus.streams.iter().enumerate() {
        let o = run_with_plan(s, &plan_frames(s));
        assert_eq!((o.state, o.label), (DestState::Resumed, "ok/resumed"), "stream {i}: {}", o.detail);
        // All at once, pages arrive before CreateVm went out: refused.
        assert_eq!(run_with_plan(s, &plan_whole(s)).label, "proto/pages-before-create-vm", "stream {i}");
        let spans = frame_spans(s);
        let mut rng = Rng::new(i as u64);
        for &(start, end) in &spans {
            for cut in [end, start + rng.range(1, end - start - 1)] {
                let o = run_with_plan(&s[..cut], &plan_frames(&s[..cut]));
                assert!(active(o.state) || o.state == DestState::Resumed, "stream {i} cut at {cut}: {o:?}");
                let aborted = run_with_plan(&s[..cut], &Plan { abort: true, ..plan_frames(&s[..cut]) });
                let resumed = aborted.state == DestState::Resumed;
                assert!(resumed || aborted.label == "host/abort", "stream {i} cut at {cut}, aborted: {aborted:?}");
            }
        }
    }
}

//! The source side (host A): sends Hello, pre-copies memory in rounds,
//! pauses the VM, sends the rest and the vCPU and device state, then runs
//! the two-phase switchover.
//!
//! ```text
//!  Setup ──Accept──> Sending ──round sent──> Harvest ──on_dirty──┬─> Sending (next round,
//!    │                  ^                                        │    maybe SetThrottle)
//!    │ Reject           └────────────────────────────────────────┘
//!    v                         StopAndCopy: PauseVm ──> Pausing ──on_vm_paused──> FinalHarvest
//!  Failed <── any error before Commit           ──on_dirty──> FinalSending ──> AwaitReady
//!             (Cancel/Error sent, SetThrottle(0), ResumeVm if paused)
//!  AwaitReady ──Ready──> Commit ──poll hands out Commit──> AwaitResumed ──Resumed──> Done
//!                                     after Commit, any failure ──> InDoubt
//! ```
//!
//! A round ends when its batches have been handed out and the transport
//! holds at most [`ROUND_END_BACKLOG`] of them. Bandwidth is the bytes of a
//! round's page batches that reached the
//! transport's far side over the time from the poll that handed out its
//! first batch to the poll that asked for the harvest. The caller reports
//! with [`Source::set_backlog`] how many handed-out bytes are still queued
//! or unacknowledged; without it, every byte handed out counts as sent,
//! and a small round that fits the caller's buffers would measure a
//! bandwidth the link does not have. The
//! dirty rate is the harvested page count over the time since the previous
//! harvest. With a bandwidth cap, page batches are paced: after a batch of
//! `n` bytes, the next one is held back `n / cap` seconds.
//!
//! Deltas need the version the destination holds. The source keeps a copy
//! of pages it re-sends after round 0 (the writable working set), up to
//! `delta_cache_pages`; a cached page is sent as a delta when that is
//! shorter than half a page.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::converge::{self, Decision, Inputs, Policy};
use crate::record::{
    clip_reason, page_batch_frame_len, printable, Hello, PageBatchWriter, PageKind, Record, RoundEnd, MAX_BATCH_PAGES,
};
use crate::record::{MAX_DEVICE_STATE, MAX_VCPU_STATE};
use crate::wire::{FrameBuf, FrameDecoder};
use crate::{GuestMemory, PAGE_SIZE, PROTOCOL_VERSION};

/// Without progress (a frame received, an action handed out, a caller
/// event) for this long, the migration fails (or is in doubt after Commit).
pub const PROGRESS_TIMEOUT_US: u64 = 30_000_000;
/// A round ends (the dirty log is harvested) once no more than this much
/// of it is still queued in the transport (see [`Source::set_backlog`]):
/// the next harvest then counts what was dirtied while the round was on
/// the wire, not just while it was handed out.
pub const ROUND_END_BACKLOG: u64 = 128 * 1024;
/// Largest guest the source accepts to migrate (4 TiB; the dirty bitmap is
/// one bit per page, 128 MiB at that size).
pub const MAX_GUEST_BYTES: u64 = 4 << 40;

/// How far behind its pacing schedule a capped source may fall and still
/// catch up (sending the late frames back to back): a little more than a
/// caller's polling period, little enough that the burst it allows is small.
const PACING_CREDIT_US: u64 = 2_000;
/// Shortest part of a round whose rate `status` shows: shorter ones swing
/// with each burst the transport carries.
const LIVE_RATE_MIN_US: u64 = 100_000;

/// Source tuning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    /// Longest acceptable pause of the VM.
    pub downtime_budget_us: u64,
    /// Optional pacing of page batches.
    pub bandwidth_cap_bytes_per_s: Option<u64>,
    /// Most pre-copy rounds before stop-and-copy (or Abort).
    pub max_rounds: u32,
    /// What to do when pre-copy does not converge.
    pub policy: Policy,
    /// Send a memory digest for the destination to check.
    pub verify: bool,
    /// Pages kept for delta encoding (0 disables deltas). Extension to the
    /// brief's field list.
    pub delta_cache_pages: usize,
    /// How long the verify read of all memory will take at the pause
    /// (the host measures its hashing speed), counted into the expected
    /// downtime and the stop-and-copy decision when `verify` is on.
    pub verify_cost_us: u64,
    /// Most pages per PageBatch frame (1..=`MAX_BATCH_PAGES`). Smaller
    /// frames let both sides interleave their engine with the network in
    /// finer steps: the destination handles a frame only once all of it
    /// has arrived.
    pub batch_pages: usize,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            downtime_budget_us: 300_000,
            bandwidth_cap_bytes_per_s: None,
            max_rounds: 30,
            policy: Policy::Throttle,
            verify: true,
            delta_cache_pages: 4096, // 16 MiB
            batch_pages: 64,         // 256 KiB
            verify_cost_us: 0,
        }
    }
}

/// What [`Source::poll_into`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Polled {
    /// A page batch of this many bytes was written at the start of the
    /// caller's room: it is handed out, like a `Send`.
    Wrote(usize),
    /// The next action, as [`Source::poll`] would have given it.
    Action(SourceAction),
    /// A page batch is due, but too few of its pages fit the room.
    NeedRoom,
    /// Nothing to do now.
    Idle,
}

/// The caller's send-buffer space for [`Source::poll_into`].
struct Room<'a> {
    buf: &'a mut [u8],
    min_pages: usize,
}

/// What [`Source::next_batch`] did.
enum Batch {
    /// Wrote a frame of this many bytes into the room.
    Wrote(usize),
    /// Too few pages fit the room; nothing taken.
    NeedRoom,
    /// Queued whatever came next (a `Send`, the round's end, a failure) or
    /// nothing (paced).
    Queued,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Transmit these bytes to the destination, in order.
    Send(Vec<u8>),
    /// Pause every vCPU, then call [`Source::on_vm_paused`].
    PauseVm,
    /// Let the VM run again (the migration failed before Commit).
    ResumeVm,
    /// Take this percentage of CPU time away from the guest (0 = none).
    SetThrottle(u8),
    /// Collect and clear the dirty log, then call [`Source::on_dirty`].
    HarvestDirty,
    /// The destination runs the VM: free it here.
    Finished(Report),
    /// The migration failed before Commit; the VM runs here (resumed and
    /// unthrottled by the preceding actions).
    Failed {
        /// What went wrong.
        reason: String,
        /// Always true: failures after Commit are `InDoubt`.
        vm_running: bool,
    },
    /// Commit was sent but Resumed never came: the VM may run on the
    /// destination. Keep this copy paused; do not free or resume it.
    InDoubt,
}

/// Statistics of a finished migration.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Report {
    /// First poll to Resumed.
    pub total_us: u64,
    /// VM paused (on_vm_paused) to Resumed.
    pub downtime_us: u64,
    /// First poll to Accept.
    pub setup_us: u64,
    /// Pages sent per round, the final stop-and-copy round last.
    pub rounds: Vec<u64>,
    /// All bytes the source handed out in Send actions.
    pub bytes_on_wire: u64,
    /// Pages sent as a zero flag.
    pub zero_pages: u64,
    /// Pages sent as a delta.
    pub delta_pages: u64,
    /// Pages sent whole.
    pub full_pages: u64,
    /// The destination checked the memory digest.
    pub verified: bool,
    /// The highest throttle applied (percent of CPU taken away).
    pub max_throttle: u8,
    /// Why pre-copy ended: `"budget"` (the rest fit the downtime budget),
    /// `"round limit"`, or `"not converging"` (policy Force).
    pub stop_reason: &'static str,
    /// The pause the stop-and-copy decision expected: the last dirty pages
    /// and the queued bytes at the measured bandwidth, plus the verify read
    /// (`verify_cost_us`); it leaves out the switchover's round trips.
    pub expected_downtime_us: u64,
}

/// Coarse progress, for operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Hello sent, waiting for Accept.
    Setup,
    /// Iterative pre-copy.
    PreCopy,
    /// Pausing and sending the rest.
    StopAndCopy,
    /// Waiting for Ready / Resumed.
    Switchover,
    /// VM runs on the destination.
    Done,
    /// Failed before Commit; VM runs here.
    Failed,
    /// Resumed lost after Commit.
    InDoubt,
}

impl Stage {
    /// Whether the migration has ended (its last actions may still be
    /// queued for the caller).
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Done | Stage::Failed | Stage::InDoubt)
    }
}

/// Snapshot of the source's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Stage.
    pub stage: Stage,
    /// Current round.
    pub round: u32,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Pages still to send in this round (or dirty after the last harvest).
    pub pages_remaining: u64,
    /// Last measured dirty rate.
    pub dirty_rate_pages_per_s: u64,
    /// Last measured bandwidth.
    pub bandwidth_bytes_per_s: u64,
    /// Pause needed to send `pages_remaining` at that bandwidth, plus the
    /// verify read.
    pub expected_downtime_us: u64,
    /// Current throttle, percent.
    pub throttle: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Setup,
    Sending,
    Harvest,
    Pausing,
    FinalHarvest,
    FinalSending,
    AwaitReady,
    Commit,
    AwaitResumed,
    Done,
    Failed,
    InDoubt,
}

/// One bit per guest page.
struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    fn new(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).unwrap_or(0);
        Bits { words: vec![0; words], len }
    }
    fn set(&mut self, i: u64) {
        if i < self.len {
            if let Some(w) = self.words.get_mut(usize::try_from(i / 64).unwrap_or(usize::MAX)) {
                *w |= 1 << (i % 64);
            }
        }
    }
    fn fill(&mut self, on: bool) {
        self.words.fill(if on { u64::MAX } else { 0 });
        if let (true, Some(last), r @ 1..) = (on, self.words.last_mut(), self.len % 64) {
            *last = (1 << r) - 1;
        }
    }
    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// First set bit at or after `from`.
    fn next_from(&self, from: u64) -> Option<u64> {
        let first = usize::try_from(from / 64).ok()?;
        let mut mask = u64::MAX << (from % 64);
        for (i, w) in self.words.iter().enumerate().skip(first) {
            let hit = w & mask;
            if hit != 0 {
                return Some(i as u64 * 64 + u64::from(hit.trailing_zeros()));
            }
            mask = u64::MAX;
        }
        None
    }
}

fn rate(amount: u64, us: u64) -> u64 {
    if us == 0 {
        return u64::MAX;
    }
    u64::try_from(u128::from(amount) * 1_000_000 / u128::from(us)).unwrap_or(u64::MAX)
}

/// The source state machine. See the module docs.
pub struct Source {
    config: SourceConfig,
    hello: Hello,
    pages: u64,
    pub(crate) phase: Phase,
    out: VecDeque<SourceAction>,
    decoder: FrameDecoder,
    to_send: Bits,
    cursor: u64,
    round_total: u64,
    cache: BTreeMap<u64, Box<[u8; PAGE_SIZE]>>,
    vcpu_states: Vec<Vec<u8>>,
    device_state: Vec<u8>,
    // Time.
    start_us: Option<u64>,
    last_progress_us: Option<u64>,
    /// The transport carried some of the backlog since the last tick.
    backlog_drained: bool,
    paused_at_us: u64,
    next_send_us: u64,
    round_start_us: Option<u64>,
    last_harvest_us: u64,
    /// Handed-out bytes the transport has not delivered, now and when the
    /// round's first batch was handed out.
    backlog: u64,
    round_start_backlog: u64,
    // This round.
    round: u32,
    round_pages: u64,
    round_bytes: u64,
    // Measurements and side effects handed out.
    pages_sent: u64,
    remaining: u64,
    bandwidth: u64,
    /// The rate the transport has carried this round so far, once it has
    /// run [`LIVE_RATE_MIN_US`] (0 before): what `status` shows while a
    /// round runs, as `bandwidth` is measured only at round ends (round 0
    /// of a large guest takes seconds).
    live_bandwidth: u64,
    dirty_rate: u64,
    hot_rounds: u32,
    throttle: u8,
    pause_requested: bool,
    report: Report,
}

impl Source {
    /// A source for the VM described by `hello`, with Hello queued. An
    /// unusable Hello (name too long, size not whole pages, beyond
    /// [`MAX_GUEST_BYTES`]) yields `Failed` on the first poll.
    pub fn new(config: SourceConfig, hello: Hello) -> Self {
        let vm = &hello.vm;
        let usable = vm.page_size as usize == PAGE_SIZE
            && vm.mem_bytes > 0
            && vm.mem_bytes.is_multiple_of(PAGE_SIZE as u64)
            && vm.mem_bytes <= MAX_GUEST_BYTES
            && hello.protocol_version == PROTOCOL_VERSION;
        let pages = if usable { vm.pages() } else { 0 };
        let mut s = Source {
            config,
            pages,
            phase: Phase::Setup,
            out: VecDeque::new(),
            decoder: FrameDecoder::new(),
            to_send: Bits::new(pages),
            cursor: 0,
            round_total: 0,
            cache: BTreeMap::new(),
            vcpu_states: Vec::new(),
            device_state: Vec::new(),
            start_us: None,
            last_progress_us: None,
            backlog_drained: false,
            paused_at_us: 0,
            next_send_us: 0,
            round_start_us: None,
            last_harvest_us: 0,
            backlog: 0,
            round_start_backlog: 0,
            round: 0,
            round_pages: 0,
            round_bytes: 0,
            pages_sent: 0,
            remaining: pages,
            bandwidth: 0,
            live_bandwidth: 0,
            dirty_rate: 0,
            hot_rounds: 0,
            throttle: 0,
            pause_requested: false,
            report: Report::default(),
            hello,
        };
        match Record::Hello(s.hello.clone()).encode() {
            Ok(_) if !usable => s.fail("unusable VM configuration in Hello", None),
            Ok(frame) => s.out.push_back(SourceAction::Send(frame)),
            Err(e) => s.fail(&format!("cannot encode Hello: {e}"), None),
        }
        s
    }

    fn committed(&self) -> bool {
        matches!(self.phase, Phase::AwaitResumed)
    }

    fn terminal(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed | Phase::InDoubt)
    }

    fn send(&mut self, rec: &Record) {
        match rec.encode() {
            Ok(frame) => self.out.push_back(SourceAction::Send(frame)),
            Err(e) => self.fail(&format!("cannot encode {:?}: {e}", rec.kind()), Some(false)),
        }
    }

    /// Ends the migration before Commit (`InDoubt` after it). `notify`:
    /// `Some(true)` sends Cancel, `Some(false)` sends Error, `None` nothing.
    fn fail(&mut self, reason: &str, notify: Option<bool>) {
        if self.terminal() {
            return;
        }
        if self.committed() {
            return self.in_doubt();
        }
        self.out.clear();
        let reason_text = clip_reason(reason);
        let rec = match notify {
            Some(true) => Some(Record::Cancel { reason: reason_text }),
            Some(false) => Some(Record::Error { reason: reason_text }),
            None => None,
        };
        if let Some(Ok(frame)) = rec.map(|r| r.encode()) {
            self.out.push_back(SourceAction::Send(frame));
        }
        if self.throttle > 0 {
            self.out.push_back(SourceAction::SetThrottle(0));
            self.throttle = 0;
        }
        if self.pause_requested {
            self.out.push_back(SourceAction::ResumeVm);
        }
        self.out.push_back(SourceAction::Failed { reason: String::from(reason), vm_running: true });
        self.phase = Phase::Failed;
        self.cache.clear();
    }

    fn in_doubt(&mut self) {
        self.out.clear();
        self.out.push_back(SourceAction::InDoubt);
        self.phase = Phase::InDoubt;
        self.cache.clear();
    }

    fn progress(&mut self, now_us: u64) {
        self.last_progress_us = Some(now_us);
    }

    /// Bytes from the destination.
    pub fn on_bytes(&mut self, bytes: &[u8], now_us: u64) {
        if self.terminal() {
            return;
        }
        // Frames completed before a framing error are handled first, so
        // the outcome does not depend on how the transport split the bytes.
        let pushed = self.decoder.push(bytes);
        while let Some(frame) = self.decoder.next_frame() {
            if self.terminal() {
                return;
            }
            self.progress(now_us);
            match Record::decode(&frame) {
                Ok(rec) => self.on_record(rec, now_us),
                Err(e) => self.fail(&format!("bad {:?} from destination: {e}", frame.kind), Some(false)),
            }
        }
        if let Err(e) = pushed {
            if !self.terminal() {
                self.fail(&format!("bad frame from destination: {e}"), Some(false));
            }
        }
    }

    fn on_record(&mut self, rec: Record, now_us: u64) {
        match (self.phase, rec) {
            (_, Record::Reject { reason }) => self.fail(&format!("destination rejected: {}", printable(&reason)), None),
            (_, Record::Cancel { reason }) => {
                self.fail(&format!("destination cancelled: {}", printable(&reason)), None)
            }
            (_, Record::Error { reason }) => self.fail(&format!("destination error: {}", printable(&reason)), None),
            (Phase::Setup, Record::Accept) => {
                self.report.setup_us = now_us.saturating_sub(self.start_us.unwrap_or(now_us));
                self.last_harvest_us = now_us;
                self.to_send.fill(true);
                self.start_round(Phase::Sending);
            }
            (Phase::AwaitReady, Record::Ready) => self.phase = Phase::Commit,
            (Phase::AwaitResumed, Record::Resumed) => {
                let start = self.start_us.unwrap_or(now_us);
                self.report.total_us = now_us.saturating_sub(start);
                self.report.downtime_us = now_us.saturating_sub(self.paused_at_us);
                self.report.verified = self.config.verify;
                self.out.push_back(SourceAction::Finished(core::mem::take(&mut self.report)));
                self.phase = Phase::Done;
                self.cache.clear();
            }
            (phase, rec) => self.fail(&format!("unexpected {:?} in phase {phase:?}", rec.kind()), Some(false)),
        }
    }

    fn start_round(&mut self, phase: Phase) {
        self.cursor = 0;
        self.round_total = self.to_send.count();
        self.remaining = self.round_total;
        self.round_pages = 0;
        self.round_bytes = 0;
        self.round_start_us = None;
        self.phase = phase;
    }

    /// The dirty log the caller harvested (answers `HarvestDirty`). Gfns
    /// beyond the guest are ignored.
    pub fn on_dirty(&mut self, gfns: &[u64], now_us: u64) {
        match self.phase {
            Phase::Harvest => {
                self.to_send.fill(false);
            }
            Phase::FinalHarvest => {}
            _ => return,
        }
        self.progress(now_us);
        gfns.iter().for_each(|&g| self.to_send.set(g));
        if self.phase == Phase::FinalHarvest {
            self.round += 1;
            return self.start_round(Phase::FinalSending);
        }
        let dirty = self.to_send.count();
        let round_us = now_us.saturating_sub(self.round_start_us.unwrap_or(now_us));
        let delivered = self.delivered_this_round();
        // A round too short to time (nothing to send, or all of it handed
        // out and harvested at one instant) keeps the old rate. Until there
        // is one, the rate since the start stands in: without it, an idle
        // guest whose first round was tiny never "fit" any budget and ran
        // to the round limit (or failed under `Policy::Abort`).
        if delivered > 0 && round_us > 0 {
            self.bandwidth = rate(delivered, round_us);
        } else if self.bandwidth == 0 {
            let since_us = now_us.saturating_sub(self.start_us.unwrap_or(now_us));
            let delivered = self.report.bytes_on_wire.saturating_sub(self.backlog);
            if delivered > 0 && since_us > 0 {
                self.bandwidth = rate(delivered, since_us);
            }
        }
        // The round is timed whole now; the next one shows this until it
        // has run long enough to be timed.
        self.live_bandwidth = 0;
        let harvest_us = now_us.saturating_sub(self.last_harvest_us);
        if harvest_us > 0 {
            self.dirty_rate = rate(dirty, harvest_us);
        }
        self.last_harvest_us = now_us;
        self.remaining = dirty;
        let hot = converge::is_hot(self.dirty_rate.saturating_mul(PAGE_SIZE as u64), self.bandwidth);
        self.hot_rounds = if hot { self.hot_rounds + 1 } else { 0 };
        self.report.rounds.push(self.round_pages);
        let end = RoundEnd {
            round: self.round,
            pages_sent: self.round_pages,
            bytes_sent: self.round_bytes,
            dirty_pages_remaining: dirty,
            duration_us: round_us,
        };
        self.send(&Record::RoundEnd(end));
        let inputs = Inputs {
            policy: self.config.policy,
            round: self.round,
            max_rounds: self.config.max_rounds,
            remaining_pages: dirty,
            backlog_bytes: self.backlog,
            bandwidth_bytes_per_s: self.bandwidth,
            downtime_budget_us: self.config.downtime_budget_us,
            fixed_pause_us: self.fixed_pause_us(),
            throttle: self.throttle,
            hot_rounds: self.hot_rounds,
        };
        let decision = converge::decide(&inputs);
        match decision {
            Decision::Continue | Decision::Throttle(_) => {
                if let Decision::Throttle(p) = decision {
                    self.throttle = p;
                    self.report.max_throttle = self.report.max_throttle.max(p);
                    self.out.push_back(SourceAction::SetThrottle(p));
                }
                self.round += 1;
                self.start_round(Phase::Sending);
            }
            Decision::StopAndCopy => {
                self.report.stop_reason = converge::stop_reason(&inputs);
                self.report.expected_downtime_us = self.expected_downtime_us(dirty, self.bandwidth);
                self.out.push_back(SourceAction::PauseVm);
                self.phase = Phase::Pausing;
            }
            Decision::Abort => {
                let why = format!("guest does not converge after round {} (policy Abort)", self.round);
                self.fail(&why, Some(true));
            }
        }
    }

    /// The VM is paused (answers `PauseVm`), with the state of each vCPU in
    /// order (at most 4096 bytes each, one per vCPU of the Hello) and the
    /// device state (at most 64 KiB).
    pub fn on_vm_paused(&mut self, now_us: u64, vcpu_states: &[Vec<u8>], device_state: &[u8]) {
        if self.phase != Phase::Pausing {
            return;
        }
        self.progress(now_us);
        self.paused_at_us = now_us;
        if vcpu_states.len() != self.hello.vm.vcpus as usize {
            let why = format!("{} vCPU states for {} vCPUs", vcpu_states.len(), self.hello.vm.vcpus);
            return self.fail(&why, Some(true));
        }
        if let Some(s) = vcpu_states.iter().find(|s| s.len() > MAX_VCPU_STATE as usize) {
            return self.fail(&format!("vCPU state of {} bytes", s.len()), Some(true));
        }
        if device_state.len() > MAX_DEVICE_STATE as usize {
            return self.fail(&format!("device state of {} bytes", device_state.len()), Some(true));
        }
        self.vcpu_states = vcpu_states.to_vec();
        self.device_state = device_state.to_vec();
        self.out.push_back(SourceAction::HarvestDirty);
        self.phase = Phase::FinalHarvest;
    }

    /// How many of the bytes handed out in `Send` actions the transport
    /// still holds (queued, or sent and not acknowledged). Call before
    /// each poll; see the module docs on bandwidth.
    pub fn set_backlog(&mut self, bytes: u64) {
        self.backlog_drained |= bytes < self.backlog;
        self.backlog = bytes;
    }

    /// Checks the progress timeout.
    pub fn on_tick(&mut self, now_us: u64) {
        if self.terminal() {
            return;
        }
        // Bytes the peer acknowledged are progress too: a round end and
        // the wait for Ready hand out nothing while the transport drains.
        if core::mem::take(&mut self.backlog_drained) {
            self.progress(now_us);
        }
        if let (Phase::Sending, Some(start)) = (self.phase, self.round_start_us) {
            let round_us = now_us.saturating_sub(start);
            if round_us >= LIVE_RATE_MIN_US {
                self.live_bandwidth = rate(self.delivered_this_round(), round_us);
            }
        }
        let since = *self.last_progress_us.get_or_insert(now_us);
        if now_us.saturating_sub(since) >= PROGRESS_TIMEOUT_US {
            let why = format!("no progress for {} s in phase {:?}", PROGRESS_TIMEOUT_US / 1_000_000, self.phase);
            self.fail(&why, Some(true));
        }
    }

    /// The link is cut (or the host gives up).
    pub fn on_abort(&mut self, reason: &str) {
        self.fail(&format!("aborted: {reason}"), Some(true));
    }

    /// The operator cancels: the destination is told, the VM runs on here.
    /// Refused once Commit went out, as the VM is then the destination's
    /// and ending here could only leave it in doubt; and after the end.
    pub fn cancel(&mut self) -> Result<(), &'static str> {
        if self.committed() {
            return Err("too late to cancel: commit was sent and the VM is the destination's");
        }
        if self.terminal() {
            return Err("the migration has already ended");
        }
        self.on_abort("cancelled by the operator");
        Ok(())
    }

    /// The next action, if any. Page data is read through `mem`.
    pub fn poll(&mut self, mem: &dyn GuestMemory, now_us: u64) -> Option<SourceAction> {
        match self.poll_with(mem, now_us, None) {
            Polled::Action(a) => Some(a),
            _ => None,
        }
    }

    /// Like [`poll`](Self::poll), but a page batch due now is encoded
    /// straight into `room` (the free space at the end of the caller's send
    /// buffer) rather than into a new `Vec`, so its pages are copied once.
    /// It takes as many pages as fit, up to the configured batch; if fewer
    /// than `min_pages` fit (and the round has that many left), nothing is
    /// taken and the answer is [`Polled::NeedRoom`].
    pub fn poll_into(&mut self, mem: &dyn GuestMemory, now_us: u64, room: &mut [u8], min_pages: usize) -> Polled {
        self.poll_with(mem, now_us, Some(Room { buf: room, min_pages }))
    }

    fn poll_with(&mut self, mem: &dyn GuestMemory, now_us: u64, room: Option<Room<'_>>) -> Polled {
        self.start_us.get_or_insert(now_us);
        self.last_progress_us.get_or_insert(now_us);
        if self.out.is_empty() {
            match self.phase {
                Phase::Sending | Phase::FinalSending => match self.next_batch(mem, now_us, room) {
                    Batch::Wrote(n) => {
                        self.progress(now_us);
                        self.report.bytes_on_wire += n as u64;
                        return Polled::Wrote(n);
                    }
                    Batch::NeedRoom => return Polled::NeedRoom,
                    Batch::Queued => {}
                },
                Phase::Commit => {
                    // Handed out just below: from here on, never ResumeVm.
                    self.send(&Record::Commit);
                    if !self.terminal() {
                        self.phase = Phase::AwaitResumed;
                    }
                }
                _ => {}
            }
        }
        let Some(action) = self.out.pop_front() else { return Polled::Idle };
        self.progress(now_us);
        match &action {
            SourceAction::Send(b) => self.report.bytes_on_wire += b.len() as u64,
            SourceAction::PauseVm => self.pause_requested = true,
            _ => {}
        }
        Polled::Action(action)
    }

    /// Encodes the next page batch into `room` if given (answering how
    /// much it wrote), else queues it as a `Send`; or ends the round.
    fn next_batch(&mut self, mem: &dyn GuestMemory, now_us: u64, room: Option<Room<'_>>) -> Batch {
        // Not more either: the digest would count pages never sent, and
        // without `verify` they would silently stay behind.
        if mem.pages() != self.pages {
            let why = format!("guest memory has {} pages, Hello announced {}", mem.pages(), self.pages);
            self.fail(&why, Some(true));
            return Batch::Queued;
        }
        if self.config.bandwidth_cap_bytes_per_s.is_some() && now_us < self.next_send_us {
            return Batch::Queued;
        }
        let batch = self.config.batch_pages.clamp(1, MAX_BATCH_PAGES);
        let want = usize::try_from(self.remaining).unwrap_or(batch).min(batch);
        // With nothing left the round ends, whatever the room: waiting
        // for room would hold back the harvest, or the last records.
        let Some(Room { buf, min_pages }) = room.filter(|_| want > 0) else {
            if let Some(frame) = self.encode_batch(mem, PageBatchWriter::new(self.round, want), batch, now_us) {
                self.out.push_back(SourceAction::Send(frame));
            }
            return Batch::Queued;
        };
        let fit = (1..=batch).rev().find(|&p| page_batch_frame_len(p) <= buf.len()).unwrap_or(0);
        if fit == 0 || fit < min_pages.min(want) {
            return Batch::NeedRoom;
        }
        match self.encode_batch(mem, PageBatchWriter::in_slice(buf, self.round), fit, now_us) {
            Some(frame) => Batch::Wrote(frame.len()),
            None => Batch::Queued,
        }
    }

    /// Fills `w` with up to `max` pages and seals it, counting the frame.
    /// `None` if the round ended instead or the migration failed.
    fn encode_batch<B: FrameBuf>(
        &mut self,
        mem: &dyn GuestMemory,
        mut w: PageBatchWriter<B>,
        max: usize,
        now_us: u64,
    ) -> Option<B> {
        self.fill_batch(mem, &mut w, max, now_us)?;
        match w.finish() {
            Ok(frame) => {
                self.count_batch(frame.len(), now_us);
                Some(frame)
            }
            Err(e) => {
                self.fail(&format!("cannot encode page batch: {e}"), Some(false));
                None
            }
        }
    }

    /// Adds up to `max` pages still to send to `w`, and counts them.
    /// `None` if there was nothing to add (the round ended instead) or the
    /// migration failed.
    fn fill_batch<B: FrameBuf>(
        &mut self,
        mem: &dyn GuestMemory,
        w: &mut PageBatchWriter<B>,
        max: usize,
        now_us: u64,
    ) -> Option<()> {
        let mut n = 0;
        while n < max {
            let Some(gfn) = self.to_send.next_from(self.cursor) else { break };
            self.cursor = gfn + 1;
            n += 1;
            // The version B holds, if cached: taken out while the page is
            // encoded against it, put back with the new contents.
            let mut cached = self.cache.remove(&gfn);
            let mut encoded = Ok(PageKind::Zero);
            let cache_room = self.round > 0 && self.cache.len() < self.config.delta_cache_pages;
            mem.with_page(gfn, &mut |page| {
                encoded = w.push_page(gfn, page, cached.as_deref());
                if matches!(encoded, Ok(PageKind::Full | PageKind::Delta)) {
                    match cached.as_mut() {
                        Some(c) => **c = *page,
                        None if cache_room => cached = Some(Box::new(*page)),
                        None => {}
                    }
                }
            });
            let kind = match encoded {
                Ok(k) => k,
                Err(e) => {
                    self.fail(&format!("cannot encode page {gfn}: {e}"), Some(false));
                    return None;
                }
            };
            match kind {
                PageKind::Zero => self.report.zero_pages += 1,
                PageKind::Delta => self.report.delta_pages += 1,
                PageKind::Full => self.report.full_pages += 1,
            }
            if kind != PageKind::Zero {
                if let Some(c) = cached {
                    self.cache.insert(gfn, c);
                }
            }
        }
        if n == 0 {
            self.end_round(mem, now_us);
            return None;
        }
        if self.round_start_us.is_none() {
            self.round_start_us = Some(now_us);
            self.round_start_backlog = self.backlog;
        }
        self.round_pages += n as u64;
        self.pages_sent += n as u64;
        self.remaining = self.remaining.saturating_sub(n as u64);
        Some(())
    }

    /// Counts a page batch frame of `len` bytes handed out now, and paces
    /// the next one under a bandwidth cap.
    fn count_batch(&mut self, len: usize, now_us: u64) {
        self.round_bytes += len as u64;
        if let Some(cap) = self.config.bandwidth_cap_bytes_per_s {
            let hold = u128::from(len as u64) * 1_000_000 / u128::from(cap.max(1));
            // From when this frame was due, not from when we were polled,
            // so a caller that polls late catches up (within a limit).
            let due = self.next_send_us.max(now_us.saturating_sub(PACING_CREDIT_US));
            self.next_send_us = due.saturating_add(u64::try_from(hold).unwrap_or(u64::MAX));
        }
    }

    fn end_round(&mut self, mem: &dyn GuestMemory, now_us: u64) {
        if self.phase == Phase::Sending {
            if self.backlog > ROUND_END_BACKLOG {
                return; // the round is on its way; poll again
            }
            self.out.push_back(SourceAction::HarvestDirty);
            self.phase = Phase::Harvest;
            return;
        }
        // Final round sent: RoundEnd, Verify, the vCPUs, the devices.
        self.report.rounds.push(self.round_pages);
        let end = RoundEnd {
            round: self.round,
            pages_sent: self.round_pages,
            bytes_sent: self.round_bytes,
            dirty_pages_remaining: 0,
            duration_us: now_us.saturating_sub(self.round_start_us.unwrap_or(now_us)),
        };
        self.send(&Record::RoundEnd(end));
        if self.config.verify {
            self.send(&Record::Verify { digest: mem.digest() });
        }
        for s in core::mem::take(&mut self.vcpu_states) {
            self.send(&Record::VcpuState(s));
        }
        let dev = core::mem::take(&mut self.device_state);
        self.send(&Record::DeviceState(dev));
        if !self.terminal() {
            self.phase = Phase::AwaitReady;
        }
    }

    /// The pause's work that does not depend on the dirty pages.
    fn fixed_pause_us(&self) -> u64 {
        if self.config.verify {
            self.config.verify_cost_us
        } else {
            0
        }
    }

    /// The pause sending `pages` (after the queued bytes) would take at
    /// `bandwidth`, with the verify read.
    fn expected_downtime_us(&self, pages: u64, bandwidth: u64) -> u64 {
        converge::transfer_time_us(pages, self.backlog, bandwidth).saturating_add(self.fixed_pause_us())
    }

    /// Bytes of this round (and of the backlog it started behind) the
    /// transport has delivered.
    fn delivered_this_round(&self) -> u64 {
        (self.round_bytes + self.round_start_backlog).saturating_sub(self.backlog)
    }

    /// Progress snapshot.
    pub fn status(&self) -> Status {
        let bandwidth = if self.live_bandwidth > 0 { self.live_bandwidth } else { self.bandwidth };
        let stage = match self.phase {
            Phase::Setup => Stage::Setup,
            Phase::Sending | Phase::Harvest => Stage::PreCopy,
            Phase::Pausing | Phase::FinalHarvest | Phase::FinalSending => Stage::StopAndCopy,
            Phase::AwaitReady | Phase::Commit | Phase::AwaitResumed => Stage::Switchover,
            Phase::Done => Stage::Done,
            Phase::Failed => Stage::Failed,
            Phase::InDoubt => Stage::InDoubt,
        };
        Status {
            stage,
            round: self.round,
            pages_sent: self.pages_sent,
            pages_remaining: self.remaining,
            dirty_rate_pages_per_s: self.dirty_rate,
            bandwidth_bytes_per_s: bandwidth,
            expected_downtime_us: self.expected_downtime_us(self.remaining, bandwidth),
            throttle: self.throttle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Page, PageData, VmConfig};
    use crate::testmem::VecMemory;

    fn hello(pages: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            cpu_vendor: *b"GenuineIntel",
            features: 0,
            vm: VmConfig { name: "vm".into(), mem_bytes: pages * 4096, vcpus: 1, page_size: 4096 },
        }
    }

    fn records(bytes: &[u8]) -> Vec<Record> {
        let mut d = FrameDecoder::new();
        d.push(bytes).unwrap();
        std::iter::from_fn(|| d.next_frame()).map(|f| Record::decode(&f).unwrap()).collect()
    }

    fn drain(s: &mut Source, mem: &VecMemory, now: u64) -> Vec<SourceAction> {
        std::iter::from_fn(|| s.poll(mem, now)).take(10_000).collect()
    }

    fn sent(actions: &[SourceAction]) -> Vec<Record> {
        actions.iter().flat_map(|a| if let SourceAction::Send(b) = a { records(b) } else { vec![] }).collect()
    }

    /// A source past Accept, its memory, and the actions up to the first harvest.
    fn accepted(pages: u64) -> (Source, VecMemory, Vec<SourceAction>) {
        accepted_behind(pages, 0)
    }

    /// As [`accepted`], with `backlog` bytes still in the transport when
    /// round 0 is handed out.
    fn accepted_behind(pages: u64, backlog: u64) -> (Source, VecMemory, Vec<SourceAction>) {
        let mut mem = VecMemory::new(pages);
        mem.page_mut(1).fill(9);
        let mut s = Source::new(SourceConfig::default(), hello(pages));
        let a = drain(&mut s, &mem, 0);
        assert!(matches!(&sent(&a)[..], [Record::Hello(h)] if *h == hello(pages)));
        s.on_bytes(&Record::Accept.encode().unwrap(), 10);
        s.set_backlog(backlog);
        let a = drain(&mut s, &mem, 20);
        (s, mem, a)
    }

    fn failed(a: &[SourceAction]) -> &str {
        match a.last() {
            Some(SourceAction::Failed { reason, vm_running: true }) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reject_is_reported_with_the_peers_control_characters_escaped() {
        // Found in review: the reason went to the operator's console as
        // sent, so a peer could clear the screen or retitle the terminal.
        let mem = VecMemory::new(4);
        let mut s = Source::new(SourceConfig::default(), hello(4));
        drain(&mut s, &mem, 0);
        s.on_bytes(&Record::Reject { reason: "full\u{1b}]0;owned\u{7}".into() }.encode().unwrap(), 10);
        let a = drain(&mut s, &mem, 20);
        assert_eq!(failed(&a), "destination rejected: full\\u{1b}]0;owned\\u{7}");
    }

    #[test]
    fn round_zero_sends_every_page_then_asks_for_the_harvest() {
        let (s, _, a) = accepted(300);
        assert_eq!(a.last(), Some(&SourceAction::HarvestDirty));
        let recs = sent(&a);
        assert_eq!(recs.len(), 5, "300 pages = four full batches of 64 and one of 44");
        let Record::PageBatch(b) = &recs[0] else { panic!() };
        assert_eq!(b.pages.len(), 64);
        assert_eq!(b.pages[0], Page { gfn: 0, data: PageData::Zero });
        assert_eq!(b.pages[1].data, PageData::Full(Box::new([9; 4096])));
        assert_eq!(s.status().stage, Stage::PreCopy);
        assert_eq!(s.status().pages_sent, 300);
    }

    #[test]
    fn harvest_answer_ends_the_round_and_drives_the_decision() {
        let (mut s, mem, _) = accepted(4);
        // Gfns beyond the guest are ignored; the rest fits the budget.
        s.on_dirty(&[1, 2, 99], 1_000);
        let a = drain(&mut s, &mem, 1_000);
        let [Record::RoundEnd(end)] = &sent(&a)[..] else { panic!("{a:?}") };
        assert_eq!((end.round, end.pages_sent, end.dirty_pages_remaining, end.duration_us), (0, 4, 2, 980));
        assert_eq!(a.last(), Some(&SourceAction::PauseVm));
        s.on_vm_paused(1_100, &[vec![1; 10]], &[2; 20]);
        assert_eq!(drain(&mut s, &mem, 1_100), vec![SourceAction::HarvestDirty]);
        s.on_dirty(&[3], 1_200);
        let recs = sent(&drain(&mut s, &mem, 1_200));
        let Record::PageBatch(b) = &recs[0] else { panic!("{recs:?}") };
        assert_eq!(b.pages.iter().map(|p| p.gfn).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(recs[2], Record::Verify { digest: mem.digest() });
        assert_eq!(recs[3..], [Record::VcpuState(vec![1; 10]), Record::DeviceState(vec![2; 20])]);
        assert_eq!(s.status().stage, Stage::Switchover);
    }

    #[test]
    fn bandwidth_counts_only_what_the_transport_delivered() {
        let (mut s, mem, a) = accepted(300);
        let handed: u64 = a.iter().map(|a| if let SourceAction::Send(b) = a { b.len() as u64 } else { 0 }).sum();
        // All of round 0 sits in the caller's buffers at first; one second
        // later a quarter of it is still there.
        s.set_backlog(handed / 4);
        s.on_dirty(&(0..300).collect::<Vec<_>>(), 1_000_020);
        let delivered = handed - handed / 4;
        assert_eq!(s.status().bandwidth_bytes_per_s, delivered);
        // 300 pages after the backlog, at that rate: about 1.7 s, so no
        // stop-and-copy yet with a 300 ms budget.
        let want = converge::transfer_time_us(300, handed / 4, delivered);
        assert_eq!(s.status().expected_downtime_us, want);
        assert!(want > 1_500_000);
        s.config.verify_cost_us = 70_000;
        assert_eq!(s.status().expected_downtime_us, want + 70_000, "the verify read is part of the pause");
        s.config.verify = false;
        assert_eq!(s.status().expected_downtime_us, want, "but only when there is one");
        assert!(!drain(&mut s, &mem, 1_000_020).contains(&SourceAction::PauseVm));
    }

    #[test]
    fn status_shows_the_rate_of_the_round_under_way() {
        // Round 0 of a large guest takes seconds: its progress showed no
        // rate (0, and no expected downtime) until it ended.
        // Behind 1 MiB of earlier records, which the transport then
        // delivers, with a quarter of the round 0 that followed.
        let (mut s, mem, a) = accepted_behind(300, 1 << 20);
        let handed: u64 = a.iter().map(|a| if let SourceAction::Send(b) = a { b.len() as u64 } else { 0 }).sum();
        let backlog = handed - handed / 4;
        s.set_backlog(backlog);
        s.on_tick(50_020);
        assert_eq!(s.status().bandwidth_bytes_per_s, 0, "50 ms are too short to time");
        s.on_tick(500_020);
        let delivered = (1 << 20) + handed / 4;
        assert_eq!(s.status().bandwidth_bytes_per_s, delivered * 2, "half a second for {delivered} bytes");
        let want = converge::transfer_time_us(s.status().pages_remaining, backlog, delivered * 2);
        assert_eq!(s.status().expected_downtime_us, want);
        assert!(want < u64::MAX);
        // The round's end measures the whole round, and the next round
        // shows that until it has its own.
        s.set_backlog(0);
        assert_eq!(drain(&mut s, &mem, 1_000_020), vec![SourceAction::HarvestDirty]);
        s.on_dirty(&[1], 1_000_020);
        assert_eq!(s.status().bandwidth_bytes_per_s, ((1 << 20) + handed));
    }

    #[test]
    fn a_round_ends_only_once_the_transport_has_carried_it() {
        let (mut s, mem, a) = accepted_behind(300, 1 << 20);
        assert!(!a.is_empty() && !a.contains(&SourceAction::HarvestDirty), "{a:?}");
        assert!(drain(&mut s, &mem, 500_000).is_empty(), "still on the wire");
        s.set_backlog(ROUND_END_BACKLOG);
        assert_eq!(drain(&mut s, &mem, 1_000_000), vec![SourceAction::HarvestDirty]);
        // An idle guest dirtied nothing: stop and copy now, rather than
        // spinning through empty rounds while the backlog drains.
        s.on_dirty(&[], 1_000_000);
        let a = drain(&mut s, &mem, 1_000_000);
        assert_eq!(a.last(), Some(&SourceAction::PauseVm), "{a:?}");
    }

    #[test]
    fn idle_guest_whose_first_round_was_too_short_to_time_stops_at_once() {
        // All zero pages: round 0 is a few bytes, handed out and harvested
        // at one instant, as one pass of the hypervisor's loop does.
        let mem = VecMemory::new(4);
        let config = SourceConfig { policy: Policy::Abort, ..SourceConfig::default() };
        let mut s = Source::new(config, hello(4));
        drain(&mut s, &mem, 0);
        s.on_bytes(&Record::Accept.encode().unwrap(), 10);
        assert_eq!(drain(&mut s, &mem, 20).last(), Some(&SourceAction::HarvestDirty));
        s.on_dirty(&[], 20);
        // Before: bandwidth unknown, so 0 pages never fit; the next round
        // began, and Abort failed the migration at the round limit.
        assert!(s.status().bandwidth_bytes_per_s > 0);
        assert_eq!(drain(&mut s, &mem, 20).last(), Some(&SourceAction::PauseVm));
    }

    #[test]
    fn garbage_from_destination_fails_the_source() {
        let (mut s, mem, _) = accepted(4);
        s.on_bytes(b"\0\0\0\0garbage garbage", 30);
        let a = drain(&mut s, &mem, 30);
        assert!(matches!(&sent(&a)[..], [Record::Error { reason }] if reason.contains("bad magic")));
        assert!(failed(&a).contains("bad frame"));
        assert!(!a.contains(&SourceAction::ResumeVm), "never paused");
    }

    #[test]
    fn silent_destination_times_out_with_the_vm_running() {
        let mut mem = VecMemory::new(4);
        mem.page_mut(0).fill(1);
        let mut s = Source::new(SourceConfig::default(), hello(4));
        drain(&mut s, &mem, 5);
        s.on_tick(5 + PROGRESS_TIMEOUT_US - 1);
        assert!(s.poll(&mem, 5 + PROGRESS_TIMEOUT_US - 1).is_none());
        s.on_tick(5 + PROGRESS_TIMEOUT_US);
        let a = drain(&mut s, &mem, 5 + PROGRESS_TIMEOUT_US);
        assert!(matches!(&sent(&a)[..], [Record::Cancel { .. }]));
        assert!(failed(&a).contains("no progress"));
    }

    #[test]
    fn a_slow_link_draining_its_backlog_is_progress() {
        // A round end waits for the transport to carry what was handed
        // out; on a slow link that takes longer than the timeout.
        let (mut s, mem, _) = accepted_behind(300, 1 << 20);
        let mut now = 20;
        for left in (1..=10u64).rev() {
            now += PROGRESS_TIMEOUT_US / 2;
            s.set_backlog(ROUND_END_BACKLOG + left * 4096);
            s.on_tick(now);
            assert!(drain(&mut s, &mem, now).is_empty(), "failed with {left} pages still draining");
        }
        // A backlog that stays put is no progress.
        now += PROGRESS_TIMEOUT_US;
        s.set_backlog(ROUND_END_BACKLOG + 4096);
        s.on_tick(now);
        assert!(failed(&drain(&mut s, &mem, now)).contains("no progress"));
    }

    #[test]
    fn timeout_while_paused_resumes_the_vm() {
        let (mut s, mem, _) = accepted(4);
        s.on_dirty(&[], 100);
        drain(&mut s, &mem, 100); // RoundEnd, PauseVm
        s.on_tick(100 + PROGRESS_TIMEOUT_US);
        let a = drain(&mut s, &mem, 100 + PROGRESS_TIMEOUT_US);
        assert_eq!(a[a.len() - 2], SourceAction::ResumeVm);
        failed(&a);
    }

    #[test]
    fn wrong_number_of_vcpu_states_fails_and_resumes() {
        let (mut s, mem, _) = accepted(4);
        s.on_dirty(&[], 100);
        drain(&mut s, &mem, 100);
        s.on_vm_paused(200, &[vec![], vec![]], &[]);
        let a = drain(&mut s, &mem, 200);
        assert!(failed(&a).contains("2 vCPU states for 1 vCPUs"));
        assert!(a.contains(&SourceAction::ResumeVm));
    }

    #[test]
    fn unusable_hello_fails_on_the_first_poll() {
        let mem = VecMemory::new(1);
        let mut h = hello(1);
        h.vm.mem_bytes = 4095;
        let a = drain(&mut Source::new(SourceConfig::default(), h), &mem, 0);
        assert!(failed(&a).contains("unusable"));
        let mut h = hello(1);
        h.vm.name = "x".repeat(40);
        let a = drain(&mut Source::new(SourceConfig::default(), h), &mem, 0);
        assert!(failed(&a).contains("Hello"));
    }

    /// The actions of a source whose Hello announced `announced` pages,
    /// over memory of `pages` pages, once accepted.
    fn accepted_over(announced: u64, pages: u64) -> Vec<SourceAction> {
        let mut s = Source::new(SourceConfig::default(), hello(announced));
        let mem = VecMemory::new(pages);
        drain(&mut s, &mem, 0);
        s.on_bytes(&Record::Accept.encode().unwrap(), 1);
        drain(&mut s, &mem, 1)
    }

    #[test]
    fn memory_smaller_than_announced_fails() {
        assert!(failed(&accepted_over(8, 4)).contains("4 pages"));
    }

    /// A source of an idle 4-page guest, paused for the switchover at 200.
    fn paused() -> (Source, VecMemory) {
        let (mut s, mem, _) = accepted(4);
        s.on_dirty(&[], 100);
        drain(&mut s, &mem, 100); // RoundEnd, PauseVm
        s.on_vm_paused(200, &[vec![1; 10]], &[2]);
        (s, mem)
    }

    #[test]
    fn cancel_is_refused_once_commit_went_out() {
        let (mut s, mem) = paused();
        s.on_dirty(&[], 200);
        drain(&mut s, &mem, 200);
        s.on_bytes(&Record::Ready.encode().unwrap(), 300);
        assert!(sent(&drain(&mut s, &mem, 300)).contains(&Record::Commit));
        // Before, this made the migration "in doubt" with B running the VM.
        assert!(s.cancel().unwrap_err().contains("commit was sent"));
        assert_eq!(s.status().stage, Stage::Switchover);
        s.on_bytes(&Record::Resumed.encode().unwrap(), 400);
        assert!(matches!(drain(&mut s, &mem, 400).last(), Some(SourceAction::Finished(_))));
        assert_eq!(s.cancel(), Err("the migration has already ended"));
    }

    #[test]
    fn cancel_before_commit_tells_the_destination_and_resumes_the_vm() {
        let (mut s, mem) = paused();
        assert_eq!(s.cancel(), Ok(()));
        let a = drain(&mut s, &mem, 200);
        assert!(matches!(&sent(&a)[..], [Record::Cancel { reason }] if reason.contains("cancelled by the operator")));
        assert!(a.contains(&SourceAction::ResumeVm));
        failed(&a);
    }

    #[test]
    fn memory_larger_than_announced_fails() {
        // Before: migrated the first 4 pages, and a verify failed only at
        // the switchover, the VM paused.
        assert!(failed(&accepted_over(4, 8)).contains("guest memory has 8 pages, Hello announced 4"));
    }

    #[test]
    fn a_round_with_nothing_left_ends_whatever_the_room() {
        let mem = VecMemory::new(4);
        let mut s = Source::new(SourceConfig::default(), hello(4));
        drain(&mut s, &mem, 0);
        s.on_bytes(&Record::Accept.encode().unwrap(), 10);
        let mut room = vec![0; page_batch_frame_len(4)];
        assert!(matches!(s.poll_into(&mem, 20, &mut room, 1), Polled::Wrote(_)));
        // Before: NeedRoom until a page's worth was free, holding back the
        // harvest (and in the last round, Verify and the vCPU state).
        assert!(matches!(s.poll_into(&mem, 20, &mut [0; 100], 1), Polled::Action(SourceAction::HarvestDirty)));
    }

    #[test]
    fn unexpected_record_is_a_protocol_error() {
        let (mut s, mem, _) = accepted(4);
        s.on_bytes(&Record::Resumed.encode().unwrap(), 30);
        let a = drain(&mut s, &mem, 30);
        assert!(matches!(&sent(&a)[..], [Record::Error { .. }]));
        assert!(failed(&a).contains("unexpected Resumed"));
    }

    #[test]
    fn bits_find_the_next_set_page() {
        let mut b = Bits::new(130);
        b.fill(true);
        assert_eq!(b.count(), 130);
        b.fill(false);
        for i in [0, 63, 64, 129, 130] {
            b.set(i);
        }
        assert_eq!(b.count(), 4);
        let found: Vec<u64> = std::iter::successors(b.next_from(0), |&i| b.next_from(i + 1)).collect();
        assert_eq!(found, vec![0, 63, 64, 129]);
    }
}

//! End to end: a source and a destination wired with in-memory byte pipes,
//! a fake clock, a link of fixed bandwidth and a fake guest that keeps
//! writing to its memory while it runs.

use std::collections::BTreeSet;

use crate::converge::Policy;
use crate::dest::{DestAction, DestState, Destination};
use crate::record::{Hello, VmConfig};
use crate::source::{Phase, Polled, Report, Source, SourceAction, SourceConfig, PROGRESS_TIMEOUT_US};
use crate::testmem::VecMemory;
use crate::PAGE_SIZE;

const PAGES: u64 = 1024;
const VENDOR: [u8; 12] = *b"GenuineIntel";
const LINK: u64 = 1_000_000_000; // bytes per second
const PAGES_PER_S: u64 = LINK / PAGE_SIZE as u64;
/// One-way delay of the link.
const LATENCY_US: u64 = 50;

fn name(a: &SourceAction) -> &'static str {
    match a {
        SourceAction::Send(_) => "Send",
        SourceAction::PauseVm => "PauseVm",
        SourceAction::ResumeVm => "ResumeVm",
        SourceAction::SetThrottle(_) => "SetThrottle",
        SourceAction::HarvestDirty => "HarvestDirty",
        SourceAction::Finished(_) => "Finished",
        SourceAction::Failed { .. } => "Failed",
        SourceAction::InDoubt => "InDoubt",
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pattern {
    /// Small edits, mostly in a hot set of 64 pages; some pages zeroed or
    /// rewritten whole.
    Random,
    /// Every page in turn, rewritten whole (defeats deltas).
    Sweep,
}

struct Guest {
    rng: u64,
    pattern: Pattern,
    writes_per_s: u64,
    throttle: u8,
    acc: u64,
    sweep: u64,
    dirty: BTreeSet<u64>,
}

impl Guest {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn fill_random(&mut self, page: &mut [u8]) {
        for w in page.as_chunks_mut::<8>().0 {
            *w = self.rand().to_le_bytes();
        }
    }

    fn run(&mut self, mem: &mut VecMemory, dt_us: u64) {
        self.acc += self.writes_per_s * dt_us * u64::from(100 - self.throttle) / 100;
        let n = self.acc / 1_000_000;
        self.acc %= 1_000_000;
        for _ in 0..n {
            let pick = self.rand();
            let gfn = match self.pattern {
                Pattern::Random if pick.is_multiple_of(10) => (pick >> 8) % PAGES,
                Pattern::Random => (pick >> 8) % 64,
                Pattern::Sweep => {
                    self.sweep = (self.sweep + 1) % PAGES;
                    self.sweep
                }
            };
            let r = self.rand();
            let mut page = mem.page_mut(gfn).to_vec();
            match (self.pattern, r % 20) {
                (Pattern::Random, 0) => page.fill(0),
                (Pattern::Random, 1) | (Pattern::Sweep, _) => self.fill_random(&mut page),
                (Pattern::Random, _) => {
                    for _ in 0..1 + r % 8 {
                        let at = self.rand() as usize % PAGE_SIZE;
                        page[at] = page[at].wrapping_add(1 + (r >> 8) as u8 % 255);
                    }
                }
            }
            mem.page_mut(gfn).copy_from_slice(&page);
            self.dirty.insert(gfn);
        }
    }
}

fn hello(mem_bytes: u64) -> Hello {
    Hello {
        protocol_version: crate::PROTOCOL_VERSION,
        cpu_vendor: VENDOR,
        features: 0b1011,
        vm: VmConfig { name: "guest-1".into(), mem_bytes, vcpus: 2, page_size: 4096 },
    }
}

fn vcpu_states() -> Vec<Vec<u8>> {
    vec![vec![0xC0; 512], vec![0xC1; 4096]]
}

const DEVICE_STATE: [u8; 5000] = [0xD5; 5000];

struct Sim {
    src: Source,
    dst: Destination,
    smem: VecMemory,
    dmem: VecMemory,
    guest: Guest,
    now: u64,
    a_to_b: Vec<u8>,
    b_to_a: Vec<u8>,
    link_up: bool,
    /// Flip a bit in the payload of the first page batch sent in this phase.
    corrupt_in: Option<Phase>,
    /// Lose every byte the destination sends after it resumed the VM.
    lose_resumed: bool,
    sent_by_src: u64,
    src_running: bool,
    dst_running: bool,
    dst_created: bool,
    dst_destroyed: bool,
    dst_finished: bool,
    /// The destination host fails to build the skeleton, or to load the
    /// vCPU state, with this reason (as a kernel out of memory would).
    refuse_create: Option<&'static str>,
    refuse_vcpu: Option<&'static str>,
    src_end: Option<SourceAction>,
    resume_after_commit: bool,
    src_log: Vec<&'static str>,
    throttles: Vec<u8>,
    vcpus_got: Vec<Vec<u8>>,
    device_got: Option<Vec<u8>>,
    chunk_rng: u64,
    /// Poll with `poll_into` and rooms of pseudo-random size from this
    /// generator, as the hypervisor does with its socket's send buffer.
    room_rng: Option<u64>,
    /// Frames the source wrote into a room, and times too few pages fit.
    room_frames: u64,
    room_short: u64,
}

impl Sim {
    fn new(config: SourceConfig, pattern: Pattern, writes_per_s: u64) -> Self {
        let mut guest = Guest {
            rng: 0x9E37_79B9_7F4A_7C15,
            pattern,
            writes_per_s,
            throttle: 0,
            acc: 0,
            sweep: 0,
            dirty: BTreeSet::new(),
        };
        let mut smem = VecMemory::new(PAGES);
        for gfn in 0..PAGES {
            if gfn % 2 == 1 {
                let mut page = vec![0; PAGE_SIZE];
                guest.fill_random(&mut page);
                smem.page_mut(gfn).copy_from_slice(&page);
            }
        }
        let mut dmem = VecMemory::new(PAGES);
        dmem.bytes.fill(0xEE); // the skeleton is not zeroed: zero pages must be written
        Sim {
            src: Source::new(config, hello(PAGES * PAGE_SIZE as u64)),
            dst: Destination::new(VENDOR, 0b1111, 1 << 30),
            smem,
            dmem,
            guest,
            now: 1_000,
            a_to_b: Vec::new(),
            b_to_a: Vec::new(),
            link_up: true,
            corrupt_in: None,
            lose_resumed: false,
            sent_by_src: 0,
            src_running: true,
            dst_running: false,
            dst_created: false,
            dst_destroyed: false,
            dst_finished: false,
            refuse_create: None,
            refuse_vcpu: None,
            src_end: None,
            resume_after_commit: false,
            src_log: Vec::new(),
            throttles: Vec::new(),
            vcpus_got: Vec::new(),
            device_got: None,
            chunk_rng: 12345,
            room_rng: None,
            room_frames: 0,
            room_short: 0,
        }
    }

    /// The source's next action. In room mode a frame written into the
    /// room comes back as the `Send` of those bytes; when too few pages
    /// fit, the batch is taken the `Vec` way, as the hypervisor does at its
    /// ring's wrap.
    fn next_action(&mut self) -> Option<SourceAction> {
        let Some(rng) = self.room_rng.as_mut() else { return self.src.poll(&self.smem, self.now) };
        *rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let size = (*rng >> 33) as usize % (300 * 1024);
        let min_pages = if (*rng >> 20) & 1 == 0 { 1 } else { usize::MAX };
        let mut room = vec![0xA5; size];
        match self.src.poll_into(&self.smem, self.now, &mut room, min_pages) {
            Polled::Wrote(n) => {
                self.room_frames += 1;
                room.truncate(n);
                Some(SourceAction::Send(room))
            }
            Polled::Action(a) => Some(a),
            Polled::NeedRoom => {
                self.room_short += 1;
                self.src.poll(&self.smem, self.now)
            }
            Polled::Idle => None,
        }
    }

    fn advance(&mut self, dt: u64) {
        self.now += dt;
        if self.src_running {
            self.guest.run(&mut self.smem, dt);
        }
    }

    /// Polls the source until it has nothing to do or handed out a
    /// frame (so the destination's answers interleave, as on a real link).
    fn drive_source(&mut self) -> bool {
        let mut busy = false;
        let mut sends = 0;
        for _ in 0..100_000 {
            if sends == 1 {
                return busy;
            }
            let Some(a) = self.next_action() else { return busy };
            busy = true;
            self.src_log.push(name(&a));
            match a {
                SourceAction::Send(mut b) => {
                    sends += 1;
                    if b.len() > 10_000 && self.corrupt_in == Some(self.src.phase) {
                        b[5_000] ^= 0x10;
                        self.corrupt_in = None;
                    }
                    self.sent_by_src += b.len() as u64;
                    self.advance(b.len() as u64 * 1_000_000 / LINK);
                    if self.link_up {
                        self.a_to_b.extend(b);
                    }
                }
                SourceAction::PauseVm => {
                    self.src_running = false;
                    self.src.on_vm_paused(self.now, &vcpu_states(), &DEVICE_STATE);
                }
                SourceAction::ResumeVm => {
                    if matches!(self.src.phase, Phase::AwaitResumed | Phase::InDoubt | Phase::Done) {
                        self.resume_after_commit = true;
                    }
                    self.src_running = true;
                }
                SourceAction::SetThrottle(p) => {
                    self.guest.throttle = p;
                    self.throttles.push(p);
                }
                SourceAction::HarvestDirty => {
                    let gfns: Vec<u64> = core::mem::take(&mut self.guest.dirty).into_iter().collect();
                    self.src.on_dirty(&gfns, self.now);
                }
                end @ (SourceAction::Finished(_) | SourceAction::Failed { .. } | SourceAction::InDoubt) => {
                    assert!(self.src_end.is_none(), "two endings: {:?} then {end:?}", self.src_end);
                    self.src_end = Some(end);
                }
            }
            assert!(!(self.src_running && self.dst_running), "two running copies");
        }
        panic!("source never stops producing actions");
    }

    fn drive_destination(&mut self) -> bool {
        let mut busy = !self.a_to_b.is_empty();
        let bytes = core::mem::take(&mut self.a_to_b);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            // Deliver in uneven pieces, like TCP segments.
            self.chunk_rng = self.chunk_rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = ((self.chunk_rng >> 33) as usize % 9000 + 1).min(rest.len());
            self.dst.on_bytes(&rest[..n], &mut self.dmem);
            rest = &rest[n..];
        }
        while let Some(a) = self.dst.poll() {
            busy = true;
            match a {
                DestAction::Send(b) => {
                    if self.link_up && !(self.lose_resumed && self.dst_running) {
                        self.b_to_a.extend(b);
                    }
                }
                DestAction::CreateVm(vm) => {
                    assert_eq!(vm.pages(), PAGES);
                    match self.refuse_create {
                        Some(reason) => self.dst.on_host_error(reason),
                        None => self.dst_created = true,
                    }
                }
                DestAction::ResumeVm => {
                    assert!(!self.src_running, "destination resumed while the source runs");
                    self.dst_running = true;
                }
                DestAction::DestroyVm { .. } => {
                    assert!(!self.dst_running);
                    // Also handed out after a refused CreateVm: the kernel
                    // then has nothing to destroy.
                    assert!(self.dst_created || self.refuse_create.is_some());
                    self.dst_destroyed = self.dst_created;
                }
                DestAction::SetVcpuState(s) => match self.refuse_vcpu {
                    Some(reason) => self.dst.on_host_error(reason),
                    None => self.vcpus_got.push(s),
                },
                DestAction::SetDeviceState(s) => self.device_got = Some(s),
                DestAction::Finished => self.dst_finished = true,
            }
        }
        busy
    }

    /// One exchange in each direction; returns whether anything happened.
    fn step(&mut self) -> bool {
        let mut busy = self.drive_source();
        busy |= self.drive_destination();
        if !self.b_to_a.is_empty() {
            busy = true;
            let bytes = core::mem::take(&mut self.b_to_a);
            self.advance(2 * LATENCY_US); // the round trip
            self.src.on_bytes(&bytes, self.now);
        }
        self.src.on_tick(self.now);
        busy
    }

    fn done(&self) -> bool {
        self.src_end.is_some()
            && !matches!(self.dst.state(), DestState::AwaitHello | DestState::Receiving | DestState::AwaitCommit)
    }

    /// Runs until both sides are done, or `stop` holds (then returns true).
    fn run_until(&mut self, stop: impl Fn(&Sim) -> bool) -> bool {
        for _ in 0..200_000 {
            if stop(self) {
                return true;
            }
            if self.done() {
                return false;
            }
            if !self.step() {
                self.advance(1_000);
            }
        }
        panic!("no end after 200000 steps; source {:?}, destination {:?}", self.src.status(), self.dst.state());
    }

    fn run(&mut self) {
        self.run_until(|_| false);
    }

    fn cut_link(&mut self) {
        self.link_up = false;
        self.a_to_b.clear();
        self.b_to_a.clear();
        self.src.on_abort("link down");
        self.dst.on_abort("link down");
        self.run();
    }

    fn report(&self) -> &Report {
        match &self.src_end {
            Some(SourceAction::Finished(r)) => r,
            other => panic!("source ended with {other:?}"),
        }
    }

    fn failure(&self) -> &str {
        match &self.src_end {
            Some(SourceAction::Failed { reason, vm_running }) => {
                assert!(vm_running);
                reason
            }
            other => panic!("source ended with {other:?}"),
        }
    }

    /// After a failure before Commit: VM runs on the source only, unthrottled.
    fn assert_clean_failure(&self) {
        self.failure();
        assert!(self.src_running && !self.dst_running);
        assert_eq!(self.guest.throttle, 0);
        assert_eq!(self.src.status().throttle, 0, "status shows the throttle taken back");
        let state = self.dst.state();
        if self.dst_created {
            assert_eq!(state, DestState::Failed);
        } else {
            // Refused, failed before CreateVm, or never reached by a Hello.
            assert!(matches!(state, DestState::Failed | DestState::Rejected | DestState::AwaitHello), "{state:?}");
        }
        assert_eq!(self.dst_destroyed, self.dst_created, "skeleton destroyed iff created");
    }
}

fn config() -> SourceConfig {
    SourceConfig { downtime_budget_us: 50, ..SourceConfig::default() }
}

#[test]
fn migration_copies_memory_byte_for_byte_and_report_adds_up() {
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.run();
    let r = sim.report().clone();
    assert_eq!(sim.dmem, sim.smem, "destination memory differs");
    assert!(sim.dst_finished && sim.dst_running && !sim.src_running);
    assert_eq!(sim.vcpus_got, vcpu_states());
    assert_eq!(sim.device_got.as_deref(), Some(&DEVICE_STATE[..]));
    assert!(r.rounds.len() >= 3, "{r:?}");
    assert_eq!(r.rounds[0], PAGES);
    assert_eq!(r.rounds.iter().sum::<u64>(), r.zero_pages + r.delta_pages + r.full_pages);
    assert!(r.zero_pages >= PAGES / 2 && r.delta_pages > 0 && r.full_pages >= PAGES / 2, "{r:?}");
    assert_eq!(r.bytes_on_wire, sim.sent_by_src);
    assert!(r.verified);
    assert!(r.setup_us > 0 && r.downtime_us > 0 && r.setup_us + r.downtime_us < r.total_us, "{r:?}");
    assert!(sim.throttles.is_empty());
    assert!(!sim.resume_after_commit);
}

#[test]
fn batches_written_into_the_callers_room_arrive_byte_for_byte() {
    let mut sim = Sim::new(SourceConfig { batch_pages: 16, ..config() }, Pattern::Random, 50_000);
    sim.room_rng = Some(7);
    sim.run();
    let r = sim.report().clone();
    assert_eq!(sim.dmem, sim.smem, "destination memory differs");
    assert!(sim.dst_finished && sim.dst_running && !sim.src_running);
    assert!(r.rounds.len() >= 3 && r.delta_pages > 0 && r.verified, "{r:?}");
    assert_eq!(r.bytes_on_wire, sim.sent_by_src);
    assert!(sim.room_frames > 40 && sim.room_short > 5, "{} frames, {} short", sim.room_frames, sim.room_short);
}

#[test]
fn a_room_too_small_takes_no_page() {
    let mut sim = Sim::new(config(), Pattern::Random, 0);
    sim.run_until(|s| s.src.phase == Phase::Sending);
    let before = sim.src.status();
    let mut room = vec![0; crate::record::page_batch_frame_len(3)];
    assert_eq!(sim.src.poll_into(&sim.smem, sim.now, &mut room, 4), Polled::NeedRoom);
    assert_eq!(sim.src.poll_into(&sim.smem, sim.now, &mut room[..100], 1), Polled::NeedRoom);
    assert_eq!(sim.src.status().pages_sent, before.pages_sent);
    let Polled::Wrote(n) = sim.src.poll_into(&sim.smem, sim.now, &mut room, 3) else { panic!("three pages fit") };
    assert!(n <= room.len());
    assert_eq!(sim.src.status().pages_sent, before.pages_sent + 3);
    sim.a_to_b.extend_from_slice(&room[..n]);
    sim.sent_by_src += n as u64;
    sim.run();
    assert_eq!(sim.dmem, sim.smem);
}

#[test]
fn bandwidth_cap_paces_page_batches() {
    let cap = 100_000_000;
    let mut sim = Sim::new(SourceConfig { bandwidth_cap_bytes_per_s: Some(cap), ..config() }, Pattern::Random, 5_000);
    sim.run_until(|s| s.src.status().round >= 1);
    let bw = sim.src.status().bandwidth_bytes_per_s;
    // Within 10 %: a round's first frame goes out at once, so n frames are
    // timed over n - 1 gaps, and a late poll (this link is polled every
    // millisecond when idle) is caught up.
    assert!(bw < cap * 11 / 10 && bw > cap * 9 / 10, "measured {bw}");
    sim.run();
    assert_eq!(sim.dmem, sim.smem);
}

#[test]
fn vendor_mismatch_is_rejected_and_vm_keeps_running() {
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.dst = Destination::new(*b"AuthenticAMD", 0b1111, 1 << 30);
    sim.run();
    assert!(sim.failure().contains("vendor mismatch"), "{}", sim.failure());
    assert_eq!(sim.dst.state(), DestState::Rejected);
    assert!(!sim.dst_created);
    sim.assert_clean_failure();
}

#[test]
fn too_little_memory_is_rejected_and_vm_keeps_running() {
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.dst = Destination::new(VENDOR, 0b1111, PAGES * PAGE_SIZE as u64 - 1);
    sim.run();
    assert!(sim.failure().contains("bytes of memory"), "{}", sim.failure());
    assert_eq!(sim.dst.state(), DestState::Rejected);
    sim.assert_clean_failure();
}

#[test]
fn destination_host_errors_reach_the_source_and_the_vm_keeps_running() {
    // Before: the hypervisor called on_abort, which tells the peer
    // nothing; A read "connection to the destination lost".
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.refuse_create = Some("a VM named 'demo' already exists");
    sim.run();
    assert!(sim.failure().contains("destination error: destination host: a VM named 'demo' already exists"));
    assert_eq!(sim.dst.state(), DestState::Failed);
    assert!(!sim.dst_created);
    sim.assert_clean_failure();

    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.refuse_vcpu = Some("vCPU state of 3 bytes");
    sim.run();
    assert!(sim.failure().contains("destination host: vCPU state of 3 bytes"), "{}", sim.failure());
    assert!(sim.dst_created);
    sim.assert_clean_failure();
}

#[test]
fn link_cut_before_commit_resumes_the_source_and_destroys_the_skeleton() {
    type Point = (&'static str, fn(&Sim) -> bool);
    let points: [Point; 6] = [
        ("round 0", |s| s.src.status().pages_sent > 300),
        ("round 1", |s| s.src.status().round == 1 && s.src.phase == Phase::Sending),
        ("throttled", |s| s.src.status().throttle > 0),
        ("paused", |s| s.src.phase == Phase::FinalSending),
        ("state sent", |s| s.src.phase == Phase::AwaitReady),
        ("ready received", |s| s.src.phase == Phase::Commit),
    ];
    for (name, point) in points {
        let (pattern, rate) =
            if name == "throttled" { (Pattern::Sweep, PAGES_PER_S * 12 / 10) } else { (Pattern::Random, 50_000) };
        let mut sim = Sim::new(config(), pattern, rate);
        assert!(sim.run_until(point), "{name}: point never reached");
        let paused = !sim.src_running;
        assert_eq!(paused, matches!(name, "paused" | "state sent" | "ready received"), "{name}");
        sim.cut_link();
        assert!(sim.failure().contains("link down"), "{name}: {}", sim.failure());
        sim.assert_clean_failure();
        assert!(sim.dst_created, "{name}");
        assert_eq!(
            sim.src_log.contains(&"ResumeVm"),
            paused,
            "{name}: {:?}",
            &sim.src_log[sim.src_log.len().saturating_sub(8)..]
        );
        assert_eq!(sim.src_log.last(), Some(&"Failed"), "{name}");
    }
}

#[test]
fn link_cut_during_setup_fails_without_touching_the_vm() {
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.drive_source(); // Hello is on the wire
    sim.cut_link();
    sim.assert_clean_failure();
    assert!(!sim.dst_created);
    assert_eq!(sim.dst.state(), DestState::Failed);
    assert!(!sim.src_log.contains(&"ResumeVm") && !sim.src_log.contains(&"PauseVm"));
}

#[test]
fn corrupted_page_batch_fails_both_sides_cleanly() {
    for phase in [Phase::Sending, Phase::FinalSending] {
        let mut sim = Sim::new(config(), Pattern::Random, 50_000);
        sim.corrupt_in = Some(phase);
        sim.run();
        assert!(sim.corrupt_in.is_none(), "{phase:?}: nothing corrupted");
        // A flipped byte of page data fails that page's hash; one of the
        // record fields would fail the frame's CRC32C.
        let why = sim.failure();
        assert!(why.contains("corrupted in transit") || why.contains("CRC32C"), "{why}");
        assert_eq!(sim.dst.state(), DestState::Failed);
        sim.assert_clean_failure();
        assert_eq!(sim.src_log.contains(&"ResumeVm"), phase == Phase::FinalSending);
    }
}

#[test]
fn lost_resumed_leaves_the_source_in_doubt_and_paused() {
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.lose_resumed = true;
    let committed_at = {
        sim.run_until(|s| s.src.phase == Phase::AwaitResumed);
        sim.now
    };
    sim.run();
    assert_eq!(sim.src_end, Some(SourceAction::InDoubt));
    assert!(sim.now - committed_at >= PROGRESS_TIMEOUT_US);
    assert!(!sim.src_running && sim.dst_running && sim.dst_finished);
    assert!(!sim.resume_after_commit);
    assert_eq!(sim.dmem, sim.smem);
    // A late abort changes nothing.
    sim.src.on_abort("operator");
    assert!(sim.src.poll(&sim.smem, sim.now).is_none());
}

#[test]
fn link_cut_after_commit_is_in_doubt_not_resumed() {
    let mut sim = Sim::new(config(), Pattern::Random, 50_000);
    sim.lose_resumed = true;
    sim.run_until(|s| s.src.phase == Phase::AwaitResumed);
    sim.src.on_abort("link down");
    sim.dst.on_abort("link down");
    sim.run();
    assert_eq!(sim.src_end, Some(SourceAction::InDoubt));
    assert!(!sim.src_running && sim.dst_running && !sim.dst_destroyed);
}

#[test]
fn non_converging_guest_is_throttled_and_finishes() {
    let mut sim = Sim::new(config(), Pattern::Sweep, PAGES_PER_S * 12 / 10);
    sim.run();
    let r = sim.report().clone();
    assert_eq!(sim.dmem, sim.smem);
    assert_eq!(sim.throttles, vec![20, 40], "{r:?}");
    assert!(r.rounds.len() > 4, "{r:?}");
    assert_eq!((r.max_throttle, r.stop_reason), (40, "budget"), "converged once throttled: {r:?}");
    assert!(r.expected_downtime_us <= config().downtime_budget_us, "stopped within the budget: {r:?}");
}

#[test]
fn guest_too_hot_for_any_throttle_still_finishes_at_max_rounds() {
    let mut sim = Sim::new(SourceConfig { max_rounds: 8, ..config() }, Pattern::Sweep, PAGES_PER_S * 10);
    sim.run();
    let r = sim.report().clone();
    assert_eq!(sim.dmem, sim.smem);
    assert_eq!(sim.throttles, vec![20, 40, 60, 80]);
    assert_eq!(r.rounds.len(), 8 + 1, "{r:?}");
    assert!(r.downtime_us > 2_000, "{r:?}");
    assert_eq!((r.max_throttle, r.stop_reason), (80, "round limit"), "{r:?}");
    assert!(r.expected_downtime_us > config().downtime_budget_us, "forced past the budget: {r:?}");
}

#[test]
fn non_converging_guest_under_force_finishes_with_longer_downtime() {
    let mut sim = Sim::new(SourceConfig { policy: Policy::Force, ..config() }, Pattern::Sweep, PAGES_PER_S * 12 / 10);
    sim.run();
    let r = sim.report().clone();
    assert_eq!(sim.dmem, sim.smem);
    assert!(sim.throttles.is_empty());
    assert_eq!(r.rounds.len(), 3, "two hot rounds, then stop-and-copy: {r:?}");
    assert_eq!(r.stop_reason, "not converging");
    assert!(r.downtime_us > 40 * 50, "downtime {} vs budget 50", r.downtime_us);
}

#[test]
fn non_converging_guest_under_abort_fails_with_vm_running() {
    let mut sim = Sim::new(SourceConfig { policy: Policy::Abort, ..config() }, Pattern::Sweep, PAGES_PER_S * 12 / 10);
    sim.run();
    assert!(sim.failure().contains("does not converge"), "{}", sim.failure());
    assert!(!sim.src_log.contains(&"PauseVm"));
    sim.assert_clean_failure();
}

//! The records and their payload encodings. All integers little-endian,
//! no padding, no optional fields; lengths are checked against the limits
//! below before anything is allocated.
//!
//! ```text
//! Hello        protocol_version u16 | cpu_vendor [u8; 12] | features u64
//!              | mem_bytes u64 | vcpus u32 | page_size u32
//!              | name_len u8 (<= 32) | name [u8; name_len] (UTF-8; a
//!              destination refuses any but 1-32 ASCII letters, digits, - or _)
//! Accept, Ready, Commit, Resumed
//!              empty
//! Reject, Cancel, Error
//!              reason_len u16 (<= 256) | reason [u8; reason_len] (UTF-8)
//! PageBatch    round u32 | count u16 (<= 256) | page*count
//!   page       gfn u64 | kind u8 | body
//!     kind 0   Zero:  no body (the page is all zeros)
//!     kind 1   Full:  hash u64 | [u8; 4096]           (hash = `page_hash(gfn, page)`)
//!     kind 2   Delta: len u16 (<= 2048) | [u8; len]   (see `delta`)
//! RoundEnd     round u32 | pages_sent u64 | bytes_sent u64
//!              | dirty_pages_remaining u64 | duration_us u64
//! VcpuState    the state bytes (<= 4096), one record per vCPU, in order
//! DeviceState  the state bytes (<= 64 KiB)
//! Verify       digest u64
//! ```
//!
//! The frame CRC32C covers a PageBatch's payload except the 4096 data bytes
//! of its full pages ([`frame_crc`]): those are checked against the hash
//! that precedes them, which the destination needs anyway for the memory
//! digest. Under emulation CRC32C cost two thirds of the source engine's
//! time and half the destination's; the hash costs a sixth of the CRC.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use crate::delta::{self, MAX_DELTA};
use crate::wire::{Frame, FrameBuf, Reader, RecordType, SliceBuf, WireError, Writer, HEADER_LEN};
use crate::{copy_page_hashed, crc, page_hash, PAGE_SIZE};

/// Longest VM name, in bytes.
pub const MAX_NAME: usize = 32;

/// Whether `name` is a VM name hosts accept: 1 to [`MAX_NAME`] ASCII
/// letters, digits, '-' or '_' (what a console can type and show).
pub fn is_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
/// Longest reason in Reject, Cancel and Error, in bytes.
pub const MAX_REASON: usize = REASON_MAX as usize;
/// Most pages in one batch.
pub const MAX_BATCH_PAGES: usize = BATCH_MAX as usize;
const REASON_MAX: u32 = 256;
const BATCH_MAX: u32 = 256;
/// Largest state of one vCPU, in bytes.
pub const MAX_VCPU_STATE: u32 = 4096;
/// Largest device state, in bytes.
pub const MAX_DEVICE_STATE: u32 = 64 * 1024;

pub(crate) const HELLO_MAX_LEN: u32 = 2 + 12 + 8 + 8 + 4 + 4 + 1 + 32;
pub(crate) const REASON_RECORD_MAX_LEN: u32 = 2 + REASON_MAX;
pub(crate) const ROUND_END_LEN: u32 = 4 + 4 * 8;
const PAGE_MAX_LEN: u32 = 8 + 1 + 8 + 4096;
pub(crate) const PAGE_BATCH_MAX_LEN: u32 = 4 + 2 + BATCH_MAX * PAGE_MAX_LEN;

const KIND_ZERO: u8 = 0;
const KIND_FULL: u8 = 1;
const KIND_DELTA: u8 = 2;

/// The VM being migrated, as announced in Hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Name, at most [`MAX_NAME`] bytes.
    pub name: String,
    /// Guest memory size; a multiple of `page_size`.
    pub mem_bytes: u64,
    /// Number of vCPUs (one VcpuState record each).
    pub vcpus: u32,
    /// Page size; must be 4096.
    pub page_size: u32,
}

impl VmConfig {
    /// Guest pages (`mem_bytes / 4096`).
    pub fn pages(&self) -> u64 {
        self.mem_bytes / PAGE_SIZE as u64
    }
}

/// The source's opening record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of the sender.
    pub protocol_version: u16,
    /// CPUID leaf 0 vendor string, e.g. `*b"GenuineIntel"`.
    pub cpu_vendor: [u8; 12],
    /// CPU features the guest may use; the destination must have them all.
    pub features: u64,
    /// The VM.
    pub vm: VmConfig,
}

/// How one page travels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageData {
    /// All zeros.
    Zero,
    /// The whole page.
    Full(Box<[u8; PAGE_SIZE]>),
    /// XOR against the previously sent version (see `delta`).
    Delta(Vec<u8>),
}

impl From<PageDataRef<'_>> for PageData {
    fn from(d: PageDataRef<'_>) -> Self {
        match d {
            PageDataRef::Zero => PageData::Zero,
            PageDataRef::Full(page, _) => PageData::Full(Box::new(*page)),
            PageDataRef::Delta(d) => PageData::Delta(d.to_vec()),
        }
    }
}

/// One guest page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Guest frame number.
    pub gfn: u64,
    /// Contents.
    pub data: PageData,
}

/// Pages of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBatch {
    /// Round number (0 is the full copy).
    pub round: u32,
    /// At most [`MAX_BATCH_PAGES`].
    pub pages: Vec<Page>,
}

/// How one page travels, borrowed from a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageDataRef<'a> {
    /// All zeros.
    Zero,
    /// The whole page, and the `page_hash` sent with it: checked against
    /// the data by [`PageBatchView::parse`], left to the caller by
    /// [`PageBatchView::parse_leaving_hashes`].
    Full(&'a [u8; PAGE_SIZE], u64),
    /// XOR against the previously sent version, already validated.
    Delta(&'a [u8]),
}

/// A PageBatch payload, checked when parsed (in full, or all but the page
/// hashes), whose pages borrow from it: the destination writes them from
/// the frame straight into memory ([`Record::decode`] copies each page
/// into a box).
#[derive(Clone, Copy, Debug)]
pub struct PageBatchView<'a> {
    /// Round number.
    pub round: u32,
    count: usize,
    body: &'a [u8],
}

impl<'a> PageBatchView<'a> {
    /// Checks the whole payload (what [`Record::decode`] checks) and keeps
    /// a view of it.
    pub fn parse(payload: &'a [u8]) -> Result<Self, WireError> {
        Self::parse_checking(payload, Check::All)
    }

    /// Like [`parse`](Self::parse), but leaves full pages' hashes to the
    /// caller, who must compare each [`PageDataRef::Full`] page's hash with
    /// the page as it uses it: the destination hashes a page while it copies
    /// it into guest memory ([`crate::GuestMemory::write_page_hashed`]), which reads
    /// the page once instead of twice.
    pub fn parse_leaving_hashes(payload: &'a [u8]) -> Result<Self, WireError> {
        Self::parse_checking(payload, Check::AllButHashes)
    }

    fn parse_checking(payload: &'a [u8], check: Check) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let round = r.u32("round")?;
        let count = usize::from(r.u16("page count")?);
        if count > MAX_BATCH_PAGES {
            return Err(WireError::TooManyPages(count));
        }
        let body = r.rest();
        for _ in 0..count {
            next_page(&mut r, check)?;
        }
        r.finish()?;
        Ok(PageBatchView { round, count, body })
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch has no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pages in order: guest frame number and contents.
    pub fn pages(&self) -> impl Iterator<Item = (u64, PageDataRef<'a>)> + 'a {
        let mut r = Reader::new(self.body);
        // Parsing checked every page (and the hashes, unless it left them
        // to the caller), so none fails here and none is checked again.
        (0..self.count).map_while(move |_| next_page(&mut r, Check::Nothing).ok())
    }
}

/// What [`next_page`] verifies beyond the record's structure.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Full pages against their hash, and deltas.
    All,
    /// Deltas only.
    AllButHashes,
    /// Neither (the batch was checked before).
    Nothing,
}

/// Reads one page record, verifying what `check` says.
fn next_page<'a>(r: &mut Reader<'a>, check: Check) -> Result<(u64, PageDataRef<'a>), WireError> {
    let gfn = r.u64("gfn")?;
    let data = match r.u8("page kind")? {
        KIND_ZERO => PageDataRef::Zero,
        KIND_FULL => {
            let hash = r.u64("page hash")?;
            let data = r.array_ref("page data")?;
            if check == Check::All && page_hash(gfn, data) != hash {
                return Err(WireError::PageHash { gfn });
            }
            PageDataRef::Full(data, hash)
        }
        KIND_DELTA => {
            let len = usize::from(r.u16("delta length")?);
            if len > MAX_DELTA {
                return Err(WireError::DeltaTooLong(len));
            }
            let d = r.take(len, "delta")?;
            if check != Check::Nothing {
                delta::validate(d)?;
            }
            PageDataRef::Delta(d)
        }
        k => return Err(WireError::BadPageKind(k)),
    };
    Ok((gfn, data))
}

/// End-of-round statistics; `pages_sent` is checked by the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RoundEnd {
    /// The round that ended.
    pub round: u32,
    /// Pages sent in that round.
    pub pages_sent: u64,
    /// Frame bytes of those pages.
    pub bytes_sent: u64,
    /// Pages dirtied meanwhile (0 for the final round).
    pub dirty_pages_remaining: u64,
    /// Duration of the round.
    pub duration_us: u64,
}

/// Every record of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// See [`Hello`].
    Hello(Hello),
    /// Destination agrees.
    Accept,
    /// Destination refuses.
    Reject {
        /// Why.
        reason: String,
    },
    /// See [`PageBatch`].
    PageBatch(PageBatch),
    /// See [`RoundEnd`].
    RoundEnd(RoundEnd),
    /// One vCPU's state.
    VcpuState(Vec<u8>),
    /// The device state.
    DeviceState(Vec<u8>),
    /// Digest of the final memory.
    Verify {
        /// `GuestMemory::digest` at the source, VM paused.
        digest: u64,
    },
    /// Destination is ready to resume.
    Ready,
    /// Source hands over; point of no return.
    Commit,
    /// Destination runs the VM.
    Resumed,
    /// The sender gives up.
    Cancel {
        /// Why.
        reason: String,
    },
    /// The sender saw a protocol error.
    Error {
        /// Why.
        reason: String,
    },
}

/// `s` (text from the peer: a reason, a vendor string) with its control
/// characters escaped (`\u{1b}`), fit to print on a console: the peer
/// could otherwise clear the operator's screen or retitle the terminal.
pub fn printable(s: &str) -> String {
    s.chars().fold(String::with_capacity(s.len()), |mut out, c| {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        out
    })
}

/// `s` cut to at most [`MAX_REASON`] bytes at a character boundary.
pub fn clip_reason(s: &str) -> String {
    let mut end = s.len().min(MAX_REASON);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    String::from(s.get(..end).unwrap_or_default())
}

fn put_reason(w: &mut Writer, reason: &str) -> Result<(), WireError> {
    let len = u16::try_from(reason.len()).ok().filter(|&l| usize::from(l) <= MAX_REASON);
    w.u16(len.ok_or(WireError::ReasonTooLong(reason.len()))?);
    w.bytes(reason.as_bytes());
    Ok(())
}

fn get_text(r: &mut Reader<'_>, len: usize, field: &'static str) -> Result<String, WireError> {
    let bytes = r.take(len, field)?;
    core::str::from_utf8(bytes).map(String::from).map_err(|_| WireError::NotUtf8)
}

fn get_reason(r: &mut Reader<'_>) -> Result<String, WireError> {
    let len = usize::from(r.u16("reason length")?);
    if len > MAX_REASON {
        return Err(WireError::ReasonTooLong(len));
    }
    get_text(r, len, "reason")
}

fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.as_chunks::<8>().0.iter().all(|w| *w == [0; 8])
}

/// The CRC32C a frame of type `kind` carries for `payload`: of the whole
/// payload, except for PageBatch, where the data of each full page is left
/// out (its hash covers it). Defined for any bytes: from the first page
/// record that does not parse, the rest of the payload is covered whole.
pub fn frame_crc(kind: RecordType, payload: &[u8]) -> u32 {
    if kind != RecordType::PageBatch {
        return crc::crc32c(payload);
    }
    let mut r = Reader::new(payload);
    let count = match (r.u32("round"), r.u16("page count")) {
        (Ok(_), Ok(count)) => count,
        _ => 0,
    };
    let (mut crc, mut from) = (0, 0);
    for _ in 0..count {
        let Ok((_, page)) = next_page(&mut r, Check::Nothing) else { break };
        if let PageDataRef::Full(..) = page {
            let data_end = payload.len() - r.rest().len();
            let data_start = data_end - PAGE_SIZE;
            crc = crc::update(crc, payload.get(from..data_start).unwrap_or_default());
            from = data_end;
        }
    }
    crc::update(crc, payload.get(from..).unwrap_or_default())
}

/// Which encoding [`PageBatchWriter::push_page`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// Sent as a flag.
    Zero,
    /// Sent whole.
    Full,
    /// Sent as a delta.
    Delta,
}

/// Encodes a PageBatch frame page by page, without an intermediate
/// [`PageBatch`] (the source's hot path), into a `Vec` or a caller's slice.
pub struct PageBatchWriter<B: FrameBuf = Vec<u8>> {
    w: Writer<B>,
    count: u16,
}

/// Bytes a PageBatch frame of `pages` pages takes at most.
pub const fn page_batch_frame_len(pages: usize) -> usize {
    HEADER_LEN + 6 + pages * PAGE_MAX_LEN as usize
}

impl PageBatchWriter {
    /// A batch for `round`, with room reserved for `pages_hint` full pages.
    pub fn new(round: u32, pages_hint: usize) -> Self {
        Self::start_batch(Writer::new(6 + pages_hint.min(MAX_BATCH_PAGES) * PAGE_MAX_LEN as usize), round)
    }
}

impl<'a> PageBatchWriter<SliceBuf<'a>> {
    /// A batch for `round` written into `buf`, which should hold
    /// [`page_batch_frame_len`] bytes for the pages to come: beyond its end,
    /// [`finish`](Self::finish) fails with [`WireError::NoRoom`].
    pub fn in_slice(buf: &'a mut [u8], round: u32) -> Self {
        Self::start_batch(Writer::in_slice(buf), round)
    }
}

impl<B: FrameBuf> PageBatchWriter<B> {
    fn start_batch(mut w: Writer<B>, round: u32) -> Self {
        w.u32(round);
        w.u16(0); // count, patched by `finish`
        PageBatchWriter { w, count: 0 }
    }

    /// Pages in the batch so far.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether no page was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn start(&mut self, gfn: u64, kind: u8) -> Result<(), WireError> {
        if self.len() >= MAX_BATCH_PAGES {
            return Err(WireError::TooManyPages(self.len() + 1));
        }
        self.count += 1;
        self.w.u64(gfn);
        self.w.u8(kind);
        Ok(())
    }

    /// Adds a zero page.
    pub fn push_zero(&mut self, gfn: u64) -> Result<(), WireError> {
        self.start(gfn, KIND_ZERO)
    }

    /// Adds a full page.
    pub fn push_full(&mut self, gfn: u64, data: &[u8; PAGE_SIZE]) -> Result<(), WireError> {
        self.start(gfn, KIND_FULL)?;
        // The hash precedes the data but is worked out while the data is
        // copied (one pass over the page), then patched in.
        let at = self.w.payload_len();
        self.w.u64(0);
        if let Some(hash) = self.w.page_with(|to| copy_page_hashed(gfn, data, to)) {
            self.w.patch_u64(at, hash);
        }
        Ok(())
    }

    /// Adds an already encoded delta.
    pub fn push_delta(&mut self, gfn: u64, delta: &[u8]) -> Result<(), WireError> {
        let len = u16::try_from(delta.len()).ok().filter(|&l| usize::from(l) <= MAX_DELTA);
        let len = len.ok_or(WireError::DeltaTooLong(delta.len()))?;
        self.start(gfn, KIND_DELTA)?;
        self.w.u16(len);
        self.w.bytes(delta);
        Ok(())
    }

    /// Adds `data` in the cheapest encoding: zero flag, delta against
    /// `previous` (the version the destination holds) or full.
    pub fn push_page(
        &mut self,
        gfn: u64,
        data: &[u8; PAGE_SIZE],
        previous: Option<&[u8; PAGE_SIZE]>,
    ) -> Result<PageKind, WireError> {
        if is_zero(data) {
            self.push_zero(gfn)?;
            return Ok(PageKind::Zero);
        }
        if let Some(old) = previous {
            self.start(gfn, KIND_DELTA)?;
            let len_at = self.w.payload_len();
            self.w.u16(0);
            let body_at = self.w.buf().len();
            if delta::encode(old, data, self.w.buf()) {
                let len = self.w.buf().len() - body_at; // <= MAX_DELTA
                self.w.patch_u16(len_at, u16::try_from(len).unwrap_or(u16::MAX));
                return Ok(PageKind::Delta);
            }
            // Too different: rewrite this page as a full one.
            self.w.buf().truncate(body_at - 2 - 1 - 8);
            self.count -= 1;
        }
        self.push_full(gfn, data)?;
        Ok(PageKind::Full)
    }

    /// The complete frame.
    pub fn finish(mut self) -> Result<B, WireError> {
        self.w.patch_u16(4, self.count);
        self.w.finish(RecordType::PageBatch)
    }
}

impl Record {
    /// The record type on the wire.
    pub fn kind(&self) -> RecordType {
        match self {
            Record::Hello(_) => RecordType::Hello,
            Record::Accept => RecordType::Accept,
            Record::Reject { .. } => RecordType::Reject,
            Record::PageBatch(_) => RecordType::PageBatch,
            Record::RoundEnd(_) => RecordType::RoundEnd,
            Record::VcpuState(_) => RecordType::VcpuState,
            Record::DeviceState(_) => RecordType::DeviceState,
            Record::Verify { .. } => RecordType::Verify,
            Record::Ready => RecordType::Ready,
            Record::Commit => RecordType::Commit,
            Record::Resumed => RecordType::Resumed,
            Record::Cancel { .. } => RecordType::Cancel,
            Record::Error { .. } => RecordType::Error,
        }
    }

    /// The complete frame (header and payload). Fails if a field exceeds
    /// its limit.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        if let Record::PageBatch(b) = self {
            if b.pages.len() > MAX_BATCH_PAGES {
                return Err(WireError::TooManyPages(b.pages.len()));
            }
            let mut pw = PageBatchWriter::new(b.round, b.pages.len());
            for p in &b.pages {
                match &p.data {
                    PageData::Zero => pw.push_zero(p.gfn)?,
                    PageData::Full(d) => pw.push_full(p.gfn, d)?,
                    PageData::Delta(d) => pw.push_delta(p.gfn, d)?,
                }
            }
            return pw.finish();
        }
        let mut w = Writer::new(match self {
            Record::VcpuState(b) | Record::DeviceState(b) => b.len(),
            _ => 64,
        });
        match self {
            Record::Hello(h) => {
                w.u16(h.protocol_version);
                w.bytes(&h.cpu_vendor);
                w.u64(h.features);
                w.u64(h.vm.mem_bytes);
                w.u32(h.vm.vcpus);
                w.u32(h.vm.page_size);
                let name = h.vm.name.as_bytes();
                let len = u8::try_from(name.len()).ok().filter(|&l| usize::from(l) <= MAX_NAME);
                w.u8(len.ok_or(WireError::NameTooLong(name.len()))?);
                w.bytes(name);
            }
            Record::Reject { reason } | Record::Cancel { reason } | Record::Error { reason } => {
                put_reason(&mut w, reason)?;
            }
            Record::RoundEnd(e) => {
                w.u32(e.round);
                w.u64(e.pages_sent);
                w.u64(e.bytes_sent);
                w.u64(e.dirty_pages_remaining);
                w.u64(e.duration_us);
            }
            Record::VcpuState(b) | Record::DeviceState(b) => w.bytes(b),
            Record::Verify { digest } => w.u64(*digest),
            Record::Accept | Record::Ready | Record::Commit | Record::Resumed | Record::PageBatch(_) => {}
        }
        w.finish(self.kind())
    }

    /// Parses a frame's payload. Every field is bounds-checked; trailing
    /// bytes are an error.
    pub fn decode(frame: &Frame) -> Result<Record, WireError> {
        let mut r = Reader::new(&frame.payload);
        let rec = match frame.kind {
            RecordType::Hello => {
                let protocol_version = r.u16("protocol version")?;
                let cpu_vendor = r.array("cpu vendor")?;
                let features = r.u64("features")?;
                let mem_bytes = r.u64("memory size")?;
                let vcpus = r.u32("vcpus")?;
                let page_size = r.u32("page size")?;
                let name_len = usize::from(r.u8("name length")?);
                if name_len > MAX_NAME {
                    return Err(WireError::NameTooLong(name_len));
                }
                let name = get_text(&mut r, name_len, "name")?;
                Record::Hello(Hello {
                    protocol_version,
                    cpu_vendor,
                    features,
                    vm: VmConfig { name, mem_bytes, vcpus, page_size },
                })
            }
            RecordType::Accept => Record::Accept,
            RecordType::Ready => Record::Ready,
            RecordType::Commit => Record::Commit,
            RecordType::Resumed => Record::Resumed,
            RecordType::Reject => Record::Reject { reason: get_reason(&mut r)? },
            RecordType::Cancel => Record::Cancel { reason: get_reason(&mut r)? },
            RecordType::Error => Record::Error { reason: get_reason(&mut r)? },
            RecordType::PageBatch => {
                let view = PageBatchView::parse(&frame.payload)?;
                let pages = view.pages().map(|(gfn, data)| Page { gfn, data: data.into() }).collect();
                return Ok(Record::PageBatch(PageBatch { round: view.round, pages }));
            }
            RecordType::RoundEnd => Record::RoundEnd(RoundEnd {
                round: r.u32("round")?,
                pages_sent: r.u64("pages sent")?,
                bytes_sent: r.u64("bytes sent")?,
                dirty_pages_remaining: r.u64("dirty pages remaining")?,
                duration_us: r.u64("duration")?,
            }),
            // Their length was bounded by the header check.
            RecordType::VcpuState => Record::VcpuState(r.take(frame.payload.len(), "state")?.to_vec()),
            RecordType::DeviceState => Record::DeviceState(r.take(frame.payload.len(), "state")?.to_vec()),
            RecordType::Verify => Record::Verify { digest: r.u64("digest")? },
        };
        r.finish()?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameDecoder;

    fn through_the_wire(rec: &Record) -> Record {
        let bytes = rec.encode().unwrap();
        let mut d = FrameDecoder::new();
        d.push(&bytes).unwrap();
        let f = d.next_frame().unwrap();
        assert!(d.next_frame().is_none());
        Record::decode(&f).unwrap()
    }

    fn hello() -> Hello {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            cpu_vendor: *b"GenuineIntel",
            features: 0xF00D,
            vm: VmConfig { name: "web-1".into(), mem_bytes: 1 << 30, vcpus: 4, page_size: 4096 },
        }
    }

    fn batch() -> PageBatch {
        let mut full = Box::new([0u8; PAGE_SIZE]);
        full[17] = 3;
        PageBatch {
            round: 7,
            pages: vec![
                Page { gfn: 1, data: PageData::Zero },
                Page { gfn: u64::MAX, data: PageData::Full(full) },
                Page { gfn: 9, data: PageData::Delta(vec![4, 0, 2, 0, 0xAA, 0xBB]) },
            ],
        }
    }

    fn payload_of(rec: &Record) -> Frame {
        let bytes = rec.encode().unwrap();
        Frame { kind: rec.kind(), payload: bytes[16..].to_vec() }
    }

    #[test]
    fn every_record_round_trips() {
        let all = [
            Record::Hello(hello()),
            Record::Accept,
            Record::Reject { reason: "vendor mismatch".into() },
            Record::PageBatch(batch()),
            Record::PageBatch(PageBatch { round: 0, pages: vec![] }),
            Record::RoundEnd(RoundEnd {
                round: 3,
                pages_sent: 10,
                bytes_sent: 1 << 40,
                dirty_pages_remaining: 5,
                duration_us: 99,
            }),
            Record::VcpuState(vec![1; MAX_VCPU_STATE as usize]),
            Record::DeviceState(vec![2; MAX_DEVICE_STATE as usize]),
            Record::Verify { digest: 0x0123_4567_89AB_CDEF },
            Record::Ready,
            Record::Commit,
            Record::Resumed,
            Record::Cancel { reason: "operator".into() },
            Record::Error { reason: "é".repeat(128) },
        ];
        for rec in &all {
            assert_eq!(&through_the_wire(rec), rec);
        }
    }

    #[test]
    fn batch_writer_picks_zero_delta_or_full() {
        let zero = [0u8; PAGE_SIZE];
        let mut a = [5u8; PAGE_SIZE];
        let mut w = PageBatchWriter::new(2, 4);
        assert_eq!(w.push_page(10, &zero, Some(&a)).unwrap(), PageKind::Zero);
        assert_eq!(w.push_page(11, &a, None).unwrap(), PageKind::Full);
        let old = a;
        a[100] = 6;
        assert_eq!(w.push_page(12, &a, Some(&old)).unwrap(), PageKind::Delta);
        assert_eq!(w.push_page(13, &a, Some(&[9; PAGE_SIZE])).unwrap(), PageKind::Full);
        let bytes = w.finish().unwrap();
        let mut d = FrameDecoder::new();
        d.push(&bytes).unwrap();
        let Record::PageBatch(b) = Record::decode(&d.next_frame().unwrap()).unwrap() else { panic!() };
        assert_eq!(b.round, 2);
        let kinds: Vec<_> = b.pages.iter().map(|p| (p.gfn, core::mem::discriminant(&p.data))).collect();
        assert_eq!(kinds[0], (10, core::mem::discriminant(&PageData::Zero)));
        assert_eq!(b.pages[3].data, PageData::Full(Box::new(a)));
        let PageData::Delta(dl) = &b.pages[2].data else { panic!() };
        let mut p = old;
        delta::apply(&mut p, dl).unwrap();
        assert_eq!(p, a);
    }

    /// The same pages give the same frame in a caller's slice as in a
    /// `Vec`; a slice too short fails `finish` instead of panicking.
    #[test]
    fn page_batch_in_a_slice_equals_the_vec_one_and_overflow_fails() {
        let a = [5u8; PAGE_SIZE];
        fn encode<B: FrameBuf>(w: &mut PageBatchWriter<B>) {
            let a = [5u8; PAGE_SIZE];
            let mut b = a;
            b[7] = 1;
            w.push_page(1, &[0; PAGE_SIZE], None).unwrap();
            w.push_page(2, &a, None).unwrap();
            w.push_page(3, &b, Some(&a)).unwrap();
        }
        let mut v = PageBatchWriter::new(4, 3);
        encode(&mut v);
        let v = v.finish().unwrap();
        let mut room = vec![0xA5; page_batch_frame_len(3)];
        let mut s = PageBatchWriter::in_slice(&mut room, 4);
        encode(&mut s);
        let n = s.finish().unwrap().len();
        assert_eq!(&room[..n], &v[..]);

        let mut short = vec![0; page_batch_frame_len(1) - 1];
        let mut s = PageBatchWriter::in_slice(&mut short, 4);
        s.push_page(2, &a, None).unwrap();
        assert_eq!(s.finish().err(), Some(WireError::NoRoom(short.len())));
    }

    #[test]
    fn batch_of_257_pages_is_refused_both_ways() {
        let mut w = PageBatchWriter::new(0, 0);
        for g in 0..256 {
            w.push_zero(g).unwrap();
        }
        assert_eq!(w.push_zero(256), Err(WireError::TooManyPages(257)));
        let mut f = payload_of(&Record::PageBatch(PageBatch { round: 0, pages: vec![] }));
        f.payload[4..6].copy_from_slice(&257u16.to_le_bytes());
        assert_eq!(Record::decode(&f), Err(WireError::TooManyPages(257)));
    }

    #[test]
    fn truncated_payload_fields_are_rejected() {
        let cases = [
            (Record::Hello(hello()), "name"),
            (Record::RoundEnd(RoundEnd::default()), "duration"),
            (Record::Verify { digest: 1 }, "digest"),
            (Record::Reject { reason: "no".into() }, "reason"),
            (Record::PageBatch(batch()), "delta"),
        ];
        for (rec, field) in cases {
            let mut f = payload_of(&rec);
            f.payload.pop();
            assert_eq!(Record::decode(&f), Err(WireError::Truncated(field)), "{rec:?}");
        }
        let mut f = payload_of(&Record::PageBatch(batch()));
        f.payload.truncate(6 + 9 + 8 + 1 + 100);
        assert_eq!(Record::decode(&f), Err(WireError::Truncated("page data")));
    }

    #[test]
    fn malformed_fields_are_rejected() {
        let mut f = payload_of(&Record::Hello(hello()));
        let name_len_at = 2 + 12 + 8 + 8 + 4 + 4;
        f.payload[name_len_at] = 33;
        f.payload.extend([b'x'; 28]);
        assert_eq!(Record::decode(&f), Err(WireError::NameTooLong(33)));

        let mut f = payload_of(&Record::Cancel { reason: "ab".into() });
        f.payload[2] = 0xFF;
        assert_eq!(Record::decode(&f), Err(WireError::NotUtf8));

        let mut f = payload_of(&Record::Verify { digest: 1 });
        f.payload.push(0);
        assert_eq!(Record::decode(&f), Err(WireError::TrailingBytes(1)));

        let mut f = payload_of(&Record::PageBatch(batch()));
        f.payload[6 + 8] = 3;
        assert_eq!(Record::decode(&f), Err(WireError::BadPageKind(3)));
    }

    #[test]
    fn delta_running_past_the_page_fails_the_batch() {
        let bad = Page { gfn: 0, data: PageData::Delta(vec![0xFF, 0x0F, 2, 0, 1, 1]) };
        let f = payload_of(&Record::PageBatch(PageBatch { round: 0, pages: vec![bad] }));
        assert_eq!(Record::decode(&f), Err(WireError::DeltaPastPage(4097)));
    }

    #[test]
    fn oversized_fields_are_refused_when_encoding() {
        let mut h = hello();
        h.vm.name = "n".repeat(33);
        assert_eq!(Record::Hello(h).encode(), Err(WireError::NameTooLong(33)));
        assert_eq!(Record::Error { reason: "r".repeat(257) }.encode(), Err(WireError::ReasonTooLong(257)));
        assert!(matches!(
            Record::VcpuState(vec![0; 4097]).encode(),
            Err(WireError::PayloadTooLong { len: 4097, max: 4096, .. })
        ));
        assert_eq!(clip_reason(&"é".repeat(200)).len(), 256);
        assert_eq!(clip_reason(&"éa".repeat(100)).len(), 255);
    }

    #[test]
    fn the_frame_crc_leaves_out_full_page_data_only() {
        // batch(): a zero page, a full page (data at 6+9+17..), a delta.
        let f = payload_of(&Record::PageBatch(batch()));
        let crc = frame_crc(RecordType::PageBatch, &f.payload);
        let data_at = 6 + 9 + 17;
        let delta_at = data_at + PAGE_SIZE;
        for (at, covered) in [
            (0, true),             // round
            (6, true),             // zero page's gfn
            (6 + 9 + 8, true),     // full page's kind
            (6 + 9 + 9, true),     // its hash
            (data_at, false),      // its data
            (delta_at - 1, false), // the end of its data
            (delta_at, true),      // the delta page's gfn
            (f.payload.len() - 1, true),
        ] {
            let mut p = f.payload.clone();
            p[at] ^= 0x40;
            assert_eq!(frame_crc(RecordType::PageBatch, &p) != crc, covered, "byte {at}");
        }
        // Other records: the whole payload, plain CRC32C.
        let v = payload_of(&Record::VcpuState(vec![7; 100]));
        assert_eq!(frame_crc(RecordType::VcpuState, &v.payload), crc::crc32c(&v.payload));
        // Any bytes have a CRC, however malformed.
        for len in 0..40 {
            frame_crc(RecordType::PageBatch, &vec![1; len]);
        }
    }

    #[test]
    fn a_full_page_must_match_its_hash() {
        let mut f = payload_of(&Record::PageBatch(batch()));
        f.payload[6 + 9 + 17 + 17] ^= 1;
        assert_eq!(Record::decode(&f), Err(WireError::PageHash { gfn: u64::MAX }));
        assert_eq!(PageBatchView::parse(&f.payload).err(), Some(WireError::PageHash { gfn: u64::MAX }));
    }
}

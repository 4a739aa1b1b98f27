//! Framing: the 16-byte header, the record types, the incremental
//! [`FrameDecoder`] and the error type shared by all decoding.
//!
//! ```text
//! offset size field
//!      0    4 magic        0x4D56_4948 (bytes "HIVM")
//!      4    2 version      PROTOCOL_VERSION (5)
//!      6    2 record type  RecordType (0 is never valid)
//!      8    4 length       payload bytes, <= the type's limit <= MAX_PAYLOAD
//!     12    4 crc          CRC32C of the payload (`record::frame_crc`: a
//!                          PageBatch's leaves out full-page data)
//!     16    … payload
//! ```
//! All integers little-endian. The decoder validates magic, version, type
//! and length as soon as the 16 header bytes are in, before it allocates or
//! buffers a single payload byte; the CRC is checked when the payload is
//! complete. The first error poisons the decoder: the stream has no resync
//! point, so every later `push` returns the same error.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

use crate::PAGE_SIZE;

/// `"HIVM"` read as a little-endian `u32`.
pub const MAGIC: u32 = 0x4D56_4948;
/// The only protocol version this crate speaks. Version 1 covered full
/// pages with the frame CRC and sent no page hash; version 2's vCPU state
/// (the host's `migcmd::encode_vcpu`) left out the x87/SSE and debug
/// registers, CR2 and KernelGsBase, version 3's the pending event,
/// version 4's the control registers, segments and descriptor tables, and
/// version 5's CR8, the interrupt shadow and VT-x's pending debug
/// exceptions.
pub const PROTOCOL_VERSION: u16 = 6;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Upper bound on any payload: 1 MiB of pages plus 64 KiB of slack.
pub const MAX_PAYLOAD: u32 = 1024 * 1024 + 64 * 1024;

/// Record types; the discriminant is the value on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordType {
    /// Source → destination: who is coming.
    Hello = 1,
    /// Destination → source: go ahead.
    Accept = 2,
    /// Destination → source: refused, with a reason.
    Reject = 3,
    /// Source → destination: up to 256 pages of one round.
    PageBatch = 4,
    /// Source → destination: a round is complete, with its statistics.
    RoundEnd = 5,
    /// Source → destination: one vCPU's state (opaque).
    VcpuState = 6,
    /// Source → destination: the device state (opaque).
    DeviceState = 7,
    /// Source → destination: digest of the final guest memory.
    Verify = 8,
    /// Destination → source: everything received and checked.
    Ready = 9,
    /// Source → destination: point of no return.
    Commit = 10,
    /// Destination → source: the VM runs here now.
    Resumed = 11,
    /// Either way: the sender gives up (operator, timeout, policy).
    Cancel = 12,
    /// Either way: the sender saw a protocol or integrity error.
    Error = 13,
}

impl RecordType {
    /// The type for a wire value; 0 and unknown values are errors.
    pub fn from_wire(v: u16) -> Result<Self, WireError> {
        use RecordType::*;
        Ok(match v {
            0 => return Err(WireError::InvalidType),
            1 => Hello,
            2 => Accept,
            3 => Reject,
            4 => PageBatch,
            5 => RoundEnd,
            6 => VcpuState,
            7 => DeviceState,
            8 => Verify,
            9 => Ready,
            10 => Commit,
            11 => Resumed,
            12 => Cancel,
            13 => Error,
            _ => return Err(WireError::UnknownType(v)),
        })
    }

    /// Largest payload a record of this type can have (see `record`).
    pub fn max_payload(self) -> u32 {
        use crate::record as r;
        match self {
            Self::Hello => r::HELLO_MAX_LEN,
            Self::Accept | Self::Ready | Self::Commit | Self::Resumed => 0,
            Self::Reject | Self::Cancel | Self::Error => r::REASON_RECORD_MAX_LEN,
            Self::PageBatch => r::PAGE_BATCH_MAX_LEN,
            Self::RoundEnd => r::ROUND_END_LEN,
            Self::VcpuState => r::MAX_VCPU_STATE,
            Self::DeviceState => r::MAX_DEVICE_STATE,
            Self::Verify => 8,
        }
    }
}

/// Everything that can be wrong with bytes from the peer (or with a record
/// we were asked to encode). One variant per cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The first four bytes of a header are not [`MAGIC`].
    BadMagic(u32),
    /// The header carries another protocol version.
    BadVersion(u16),
    /// Record type 0.
    InvalidType,
    /// A record type this version does not know (all records are mandatory).
    UnknownType(u16),
    /// The declared payload length exceeds the limit for its type.
    PayloadTooLong {
        /// Record type on the wire.
        kind: u16,
        /// Declared length.
        len: u64,
        /// Limit for that type.
        max: u32,
    },
    /// The payload does not match the header's CRC32C.
    BadCrc {
        /// CRC from the header.
        expected: u32,
        /// CRC of the payload received.
        actual: u32,
    },
    /// The payload ends inside the named field.
    Truncated(&'static str),
    /// The payload has bytes after the last field.
    TrailingBytes(usize),
    /// A VM name longer than [`MAX_NAME`](crate::record::MAX_NAME) bytes.
    NameTooLong(usize),
    /// A reason longer than [`MAX_REASON`](crate::record::MAX_REASON) bytes.
    ReasonTooLong(usize),
    /// A name or reason that is not UTF-8.
    NotUtf8,
    /// A page batch with more than [`MAX_BATCH_PAGES`](crate::record::MAX_BATCH_PAGES) pages.
    TooManyPages(usize),
    /// A page encoding byte other than zero, full or delta.
    BadPageKind(u8),
    /// A delta longer than [`MAX_DELTA`](crate::delta::MAX_DELTA) bytes.
    DeltaTooLong(usize),
    /// A delta skip or literal run that ends beyond the page (offset reached).
    DeltaPastPage(usize),
    /// A full page whose contents do not match the hash sent with it.
    PageHash {
        /// The page.
        gfn: u64,
    },
    /// A frame being encoded did not fit the caller's buffer of this size.
    NoRoom(usize),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            Self::BadVersion(v) => write!(f, "unsupported protocol version {v}"),
            Self::InvalidType => write!(f, "record type 0"),
            Self::UnknownType(t) => write!(f, "unknown record type {t}"),
            Self::PayloadTooLong { kind, len, max } => {
                write!(f, "record type {kind}: payload of {len} bytes exceeds {max}")
            }
            Self::BadCrc { expected, actual } => {
                write!(f, "payload CRC32C {actual:#010x}, header says {expected:#010x}")
            }
            Self::Truncated(field) => write!(f, "payload truncated in {field}"),
            Self::TrailingBytes(n) => write!(f, "{n} trailing payload bytes"),
            Self::NameTooLong(n) => write!(f, "VM name of {n} bytes"),
            Self::ReasonTooLong(n) => write!(f, "reason of {n} bytes"),
            Self::NotUtf8 => write!(f, "text is not UTF-8"),
            Self::TooManyPages(n) => write!(f, "page batch of {n} pages"),
            Self::BadPageKind(k) => write!(f, "page encoding {k}"),
            Self::DeltaTooLong(n) => write!(f, "delta of {n} bytes"),
            Self::DeltaPastPage(at) => write!(f, "delta run ends at offset {at}, past the page"),
            Self::PageHash { gfn } => write!(f, "page {gfn:#x} does not match its hash (corrupted in transit)"),
            Self::NoRoom(n) => write!(f, "frame does not fit a buffer of {n} bytes"),
        }
    }
}

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Record type.
    pub kind: RecordType,
    /// Payload length (within the type's limit).
    pub len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

impl Header {
    /// The 16 wire bytes (magic and version filled in).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let (magic, rest) = b.split_at_mut(4);
        let (version, rest) = rest.split_at_mut(2);
        let (kind, rest) = rest.split_at_mut(2);
        let (len, crc) = rest.split_at_mut(4);
        magic.copy_from_slice(&MAGIC.to_le_bytes());
        version.copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        kind.copy_from_slice(&(self.kind as u16).to_le_bytes());
        len.copy_from_slice(&self.len.to_le_bytes());
        crc.copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Parses and validates 16 header bytes: magic, version, type, and the
    /// length against the type's limit.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let [m0, m1, m2, m3, v0, v1, t0, t1, l0, l1, l2, l3, c0, c1, c2, c3] = *b;
        let magic = u32::from_le_bytes([m0, m1, m2, m3]);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::BadVersion(version));
        }
        let raw_kind = u16::from_le_bytes([t0, t1]);
        let kind = RecordType::from_wire(raw_kind)?;
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let max = kind.max_payload().min(MAX_PAYLOAD);
        if len > max {
            return Err(WireError::PayloadTooLong { kind: raw_kind, len: u64::from(len), max });
        }
        Ok(Header { kind, len, crc: u32::from_le_bytes([c0, c1, c2, c3]) })
    }
}

/// One complete, CRC-checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Record type.
    pub kind: RecordType,
    /// The payload, `len` bytes.
    pub payload: Vec<u8>,
}

/// Reassembles frames from bytes pushed in arbitrary pieces.
///
/// Holds at most one partial frame: up to 16 header bytes, then a payload
/// buffer allocated only after the header passed validation.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; HEADER_LEN],
    header_fill: usize,
    body: Option<(Header, Vec<u8>)>,
    ready: VecDeque<Frame>,
    error: Option<WireError>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes`. Complete frames queue up for [`Self::next_frame`];
    /// frames completed before an error stay available.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<(), WireError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        while !bytes.is_empty() {
            let taken = match self.step(bytes) {
                Ok(n) => n,
                Err(e) => {
                    self.error = Some(e.clone());
                    return Err(e);
                }
            };
            bytes = bytes.get(taken..).unwrap_or_default();
        }
        Ok(())
    }

    /// The oldest complete frame not yet taken.
    pub fn next_frame(&mut self) -> Option<Frame> {
        self.ready.pop_front()
    }

    /// Whether a frame is partially received (a stream cut now is truncated).
    pub fn in_frame(&self) -> bool {
        self.header_fill > 0 || self.body.is_some()
    }

    /// Consumes some of `bytes` (at least one), returns how many.
    fn step(&mut self, bytes: &[u8]) -> Result<usize, WireError> {
        let Some((header, payload)) = &mut self.body else {
            let free = self.header.get_mut(self.header_fill..).unwrap_or_default();
            let n = free.len().min(bytes.len());
            free.iter_mut().zip(bytes).for_each(|(d, s)| *d = *s);
            self.header_fill += n;
            if self.header_fill == HEADER_LEN {
                self.header_fill = 0;
                let h = Header::decode(&self.header)?;
                // `len` is bounded by `MAX_PAYLOAD` (1.1 MiB) at this point.
                self.body = Some((h, Vec::with_capacity(h.len as usize)));
                self.complete_if_full()?;
            }
            return Ok(n);
        };
        let want = (header.len as usize).saturating_sub(payload.len());
        let n = want.min(bytes.len());
        payload.extend_from_slice(bytes.get(..n).unwrap_or_default());
        self.complete_if_full()?;
        Ok(n)
    }

    fn complete_if_full(&mut self) -> Result<(), WireError> {
        match &self.body {
            Some((h, p)) if p.len() == h.len as usize => {}
            _ => return Ok(()),
        }
        if let Some((h, payload)) = self.body.take() {
            let actual = crate::record::frame_crc(h.kind, &payload);
            if actual != h.crc {
                return Err(WireError::BadCrc { expected: h.crc, actual });
            }
            self.ready.push_back(Frame { kind: h.kind, payload });
        }
        Ok(())
    }
}

/// Where a frame is built: a `Vec` that grows as needed, or a [`SliceBuf`]
/// over a caller's buffer (the source writes page batches straight into
/// its socket's send buffer, so page data is copied once, not twice).
pub trait FrameBuf {
    /// Bytes written so far.
    fn len(&self) -> usize;
    /// Whether nothing was written.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `bytes`.
    fn extend_from_slice(&mut self, bytes: &[u8]);
    /// Grows by `n` bytes and lends them to be written (what they hold
    /// before is unspecified); `None`, and nothing grows, if they do not
    /// fit (the write counts as one past the end).
    fn append(&mut self, n: usize) -> Option<&mut [u8]>;
    /// Drops everything after the first `len` bytes.
    fn truncate(&mut self, len: usize);
    /// The bytes written so far.
    fn written_mut(&mut self) -> &mut [u8];
    /// If a write did not fit: the buffer's size.
    fn overflowed(&self) -> Option<usize> {
        None
    }
}

impl FrameBuf for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        Vec::extend_from_slice(self, bytes);
    }
    fn append(&mut self, n: usize) -> Option<&mut [u8]> {
        let start = self.len();
        self.resize(start + n, 0);
        self.get_mut(start..)
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }
    fn written_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// A frame built in a caller's fixed slice. Writing past its end is
/// remembered, and finishing the frame then fails ([`WireError::NoRoom`])
/// instead of panicking.
pub struct SliceBuf<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflowed: bool,
}

impl<'a> SliceBuf<'a> {
    /// An empty frame at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceBuf { buf, len: 0, overflowed: false }
    }
}

impl FrameBuf for SliceBuf<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        if let Some(d) = self.append(bytes.len()) {
            d.copy_from_slice(bytes);
        }
    }
    fn append(&mut self, n: usize) -> Option<&mut [u8]> {
        let start = self.len;
        match self.buf.get_mut(start..start + n) {
            Some(d) => {
                self.len += n;
                Some(d)
            }
            None => {
                self.overflowed = true;
                None
            }
        }
    }
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    fn written_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(..self.len).unwrap_or_default()
    }
    fn overflowed(&self) -> Option<usize> {
        self.overflowed.then_some(self.buf.len())
    }
}

/// Builds one frame: reserves the header, appends payload fields, then
/// fills in length and CRC.
pub(crate) struct Writer<B: FrameBuf = Vec<u8>> {
    buf: B,
}

impl Writer {
    pub(crate) fn new(payload_capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload_capacity);
        buf.resize(HEADER_LEN, 0);
        Writer { buf }
    }
}

impl<'a> Writer<SliceBuf<'a>> {
    /// A frame written into `buf` from its start.
    pub(crate) fn in_slice(buf: &'a mut [u8]) -> Self {
        let mut buf = SliceBuf::new(buf);
        buf.extend_from_slice(&[0; HEADER_LEN]);
        Writer { buf }
    }
}

impl<B: FrameBuf> Writer<B> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.extend_from_slice(&[v]);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// The buffer, for in-place encoders (the delta encoder appends to it).
    pub(crate) fn buf(&mut self) -> &mut B {
        &mut self.buf
    }
    /// Appends a page that `fill` writes into the frame (returning a value
    /// it worked out on the way); `None` if the page does not fit, which
    /// makes [`finish`](Self::finish) fail.
    pub(crate) fn page_with<T>(&mut self, fill: impl FnOnce(&mut [u8; PAGE_SIZE]) -> T) -> Option<T> {
        self.buf.append(PAGE_SIZE)?.as_mut_array().map(fill)
    }
    /// Patches a little-endian `u16` at payload offset `at`.
    pub(crate) fn patch_u16(&mut self, at: usize, v: u16) {
        self.patch(at, &v.to_le_bytes());
    }
    /// Patches a little-endian `u64` at payload offset `at`.
    pub(crate) fn patch_u64(&mut self, at: usize, v: u64) {
        self.patch(at, &v.to_le_bytes());
    }
    fn patch(&mut self, at: usize, bytes: &[u8]) {
        if let Some(d) = self.buf.written_mut().get_mut(HEADER_LEN + at..HEADER_LEN + at + bytes.len()) {
            d.copy_from_slice(bytes);
        }
    }
    pub(crate) fn payload_len(&self) -> usize {
        self.buf.len() - HEADER_LEN
    }

    /// Seals the frame, checking the payload against the type's limit.
    pub(crate) fn finish(mut self, kind: RecordType) -> Result<B, WireError> {
        if let Some(size) = self.buf.overflowed() {
            return Err(WireError::NoRoom(size));
        }
        let max = kind.max_payload().min(MAX_PAYLOAD);
        let frame = self.buf.written_mut();
        let payload = frame.get(HEADER_LEN..).unwrap_or_default();
        let too_long = || WireError::PayloadTooLong { kind: kind as u16, len: payload.len() as u64, max };
        let len = u32::try_from(payload.len()).ok().filter(|&l| l <= max).ok_or_else(too_long)?;
        let header = Header { kind, len, crc: crate::record::frame_crc(kind, payload) };
        if let Some(h) = frame.get_mut(..HEADER_LEN) {
            h.copy_from_slice(&header.encode());
        }
        Ok(self.buf)
    }
}

/// Reads payload fields front to back; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(payload: &'a [u8]) -> Self {
        Reader { rest: payload }
    }
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(WireError::Truncated(field))?;
        self.rest = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        self.array_ref(field).copied()
    }
    pub(crate) fn array_ref<const N: usize>(&mut self, field: &'static str) -> Result<&'a [u8; N], WireError> {
        let (head, tail) = self.rest.split_first_chunk::<N>().ok_or(WireError::Truncated(field))?;
        self.rest = tail;
        Ok(head)
    }
    /// What is left, without consuming it.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.rest
    }
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    pub(crate) fn has_more(&self) -> bool {
        !self.rest.is_empty()
    }
    /// Fails if anything is left.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crc;

    fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&MAGIC.to_le_bytes());
        v.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&crc::crc32c(payload).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn magic_spells_hivm_on_the_wire() {
        assert_eq!(&MAGIC.to_le_bytes(), b"HIVM");
    }

    #[test]
    fn header_round_trips() {
        let h = Header { kind: RecordType::PageBatch, len: 12345, crc: 0xDEAD_BEEF };
        let b = h.encode();
        assert_eq!(&b[..4], b"HIVM");
        assert_eq!(Header::decode(&b), Ok(h));
    }

    #[test]
    fn decoder_fed_one_byte_at_a_time_yields_every_frame() {
        let mut stream = frame(RecordType::Verify as u16, &7u64.to_le_bytes());
        stream.extend(frame(RecordType::Ready as u16, &[]));
        stream.extend(frame(RecordType::VcpuState as u16, &[9; 300]));
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.push(core::slice::from_ref(b)).unwrap();
            while let Some(f) = d.next_frame() {
                got.push(f);
            }
        }
        assert!(!d.in_frame());
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Frame { kind: RecordType::Verify, payload: 7u64.to_le_bytes().to_vec() });
        assert_eq!(got[1].kind, RecordType::Ready);
        assert_eq!(got[2].payload, vec![9; 300]);
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut f = frame(2, &[]);
        f[0] ^= 1;
        assert!(matches!(FrameDecoder::new().push(&f), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn other_version_is_rejected() {
        let mut f = frame(2, &[]);
        f[4] = 1; // version 1 covered full pages with the CRC, not a hash
        assert_eq!(FrameDecoder::new().push(&f), Err(WireError::BadVersion(1)));
    }

    #[test]
    fn record_type_zero_is_rejected() {
        assert_eq!(FrameDecoder::new().push(&frame(0, &[])), Err(WireError::InvalidType));
    }

    #[test]
    fn unknown_record_type_is_rejected() {
        assert_eq!(FrameDecoder::new().push(&frame(14, &[])), Err(WireError::UnknownType(14)));
    }

    #[test]
    fn oversize_length_is_rejected_before_any_payload_byte() {
        let mut d = FrameDecoder::new();
        let mut h = frame(RecordType::PageBatch as u16, &[]);
        h[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        // The header alone triggers the error: no payload was sent or buffered.
        assert!(matches!(d.push(&h), Err(WireError::PayloadTooLong { len, .. }) if len == u64::from(MAX_PAYLOAD) + 1));
        // A per-type limit is tighter than MAX_PAYLOAD.
        let mut h = frame(RecordType::Accept as u16, &[]);
        h[8] = 1;
        assert!(matches!(FrameDecoder::new().push(&h), Err(WireError::PayloadTooLong { max: 0, .. })));
    }

    #[test]
    fn bad_crc_is_rejected() {
        let mut f = frame(RecordType::VcpuState as u16, b"state");
        *f.last_mut().unwrap() ^= 0x40;
        assert!(matches!(FrameDecoder::new().push(&f), Err(WireError::BadCrc { .. })));
    }

    #[test]
    fn decoder_stays_poisoned_after_an_error() {
        let mut d = FrameDecoder::new();
        assert!(d.push(&frame(0, &[])).is_err());
        assert_eq!(d.push(&frame(2, &[])), Err(WireError::InvalidType));
        assert!(d.next_frame().is_none());
    }

    #[test]
    fn reader_reports_truncation_and_trailing_bytes() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16("a"), Ok(0x0201));
        assert_eq!(r.u16("b"), Err(WireError::Truncated("b")));
        let r = Reader::new(&[1]);
        assert_eq!(r.finish(), Err(WireError::TrailingBytes(1)));
    }
}

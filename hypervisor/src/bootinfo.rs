//! One view of what the boot loader told us, whichever way the kernel was
//! booted: the `bootloader` crate's BIOS/UEFI stages or GRUB's Multiboot2.
//!
//! The Multiboot2 information structure is parsed here from a byte slice
//! (Multiboot2 specification 1.0, section 3.6 "Boot information format"), so
//! the parser is tested on the host. Nothing here allocates: the kernel fills
//! a `BootInfo` before its heap exists.

/// How the kernel was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootRoute {
    /// `bootloader` crate, legacy BIOS.
    Bios,
    /// `bootloader` crate, UEFI.
    Uefi,
    /// GRUB (or any Multiboot2 loader) through the 32-bit entry stub.
    Multiboot2,
}

impl BootRoute {
    /// Lowercase name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            BootRoute::Bios => "bios",
            BootRoute::Uefi => "uefi",
            BootRoute::Multiboot2 => "multiboot2",
        }
    }
}

/// A physical memory range `[start, end)` that is free for the kernel to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Most usable regions kept; firmware maps rarely have more than a few dozen.
pub const MAX_REGIONS: usize = 128;
/// Longest kernel command line kept, in bytes.
pub const MAX_CMDLINE: usize = 256;

/// What the kernel needs from its boot loader.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// The route taken.
    pub route: BootRoute,
    /// Virtual address at which all physical memory is mapped.
    pub phys_offset: u64,
    regions: [Region; MAX_REGIONS],
    region_count: usize,
    /// Usable regions dropped because the table was full.
    pub regions_dropped: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// Physical address of the ACPI RSDP, if the loader found one.
    pub rsdp: Option<u64>,
    /// A copy of the RSDP when the loader hands over a copy instead of an
    /// address (Multiboot2 tags 14/15).
    pub rsdp_copy: Option<[u8; 36]>,
}

impl BootInfo {
    /// An empty boot info for `route`.
    pub const fn new(route: BootRoute, phys_offset: u64) -> Self {
        BootInfo {
            route,
            phys_offset,
            regions: [Region { start: 0, end: 0 }; MAX_REGIONS],
            region_count: 0,
            regions_dropped: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp: None,
            rsdp_copy: None,
        }
    }

    /// Records a usable range; empty ranges are ignored.
    pub fn add_usable(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        match self.regions.get_mut(self.region_count) {
            Some(slot) => {
                *slot = Region { start, end };
                self.region_count += 1;
            }
            None => self.regions_dropped += 1,
        }
    }

    /// The usable regions, in the order the loader gave them.
    pub fn usable(&self) -> &[Region] {
        &self.regions[..self.region_count]
    }

    /// Total usable bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.usable().iter().map(|r| r.end - r.start).sum()
    }

    /// Sets the command line (truncated to [`MAX_CMDLINE`] bytes).
    pub fn set_cmdline(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(MAX_CMDLINE);
        self.cmdline[..n].copy_from_slice(&bytes[..n]);
        self.cmdline_len = n;
    }

    /// The kernel command line (empty when the loader has none).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}

/// Magic value a Multiboot2 loader leaves in EAX.
pub const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36d7_6289;

/// Why a Multiboot2 information structure was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultibootError {
    /// The structure is shorter than its header or its stated size.
    Truncated,
    /// A tag runs past the end of the structure or is shorter than 8 bytes.
    BadTag {
        /// Byte offset of the tag.
        offset: usize,
    },
    /// No memory map tag (type 6).
    NoMemoryMap,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses a Multiboot2 information structure into `info`: the memory map
/// (type 1 "available" entries), the command line and the ACPI RSDP copy.
///
/// `mbi` must start at the structure (its first word is `total_size`); it may
/// be longer than the structure.
pub fn parse_multiboot2(mbi: &[u8], info: &mut BootInfo) -> Result<(), MultibootError> {
    let total = u32_at(mbi, 0).ok_or(MultibootError::Truncated)? as usize;
    if total < 8 || total > mbi.len() {
        return Err(MultibootError::Truncated);
    }
    let mbi = &mbi[..total];
    let mut at = 8;
    let mut saw_mmap = false;
    while at + 8 <= total {
        let ty = u32_at(mbi, at).ok_or(MultibootError::BadTag { offset: at })?;
        let size = u32_at(mbi, at + 4).ok_or(MultibootError::BadTag { offset: at })? as usize;
        if size < 8 || at + size > total {
            return Err(MultibootError::BadTag { offset: at });
        }
        let body = &mbi[at + 8..at + size];
        match ty {
            0 => break, // end tag
            1 => {
                let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
                info.set_cmdline(&body[..end]);
            }
            6 => {
                saw_mmap = true;
                let entry_size = u32_at(body, 0).ok_or(MultibootError::BadTag { offset: at })? as usize;
                if entry_size < 24 {
                    return Err(MultibootError::BadTag { offset: at });
                }
                let entries = body.get(8..).unwrap_or(&[]);
                for e in entries.chunks_exact(entry_size) {
                    let (Some(base), Some(len), Some(kind)) = (u64_at(e, 0), u64_at(e, 8), u32_at(e, 16)) else {
                        continue;
                    };
                    if kind == 1 {
                        info.add_usable(base, base.saturating_add(len));
                    }
                }
            }
            // Old (14) or new (15) RSDP; the new one wins when both exist.
            14 | 15 if body.len() >= 20 && (info.rsdp_copy.is_none() || ty == 15) => {
                let mut copy = [0u8; 36];
                let n = body.len().min(36);
                copy[..n].copy_from_slice(&body[..n]);
                info.rsdp_copy = Some(copy);
            }
            _ => {}
        }
        at += (size + 7) & !7;
    }
    if saw_mmap {
        Ok(())
    } else {
        Err(MultibootError::NoMemoryMap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn tag(out: &mut Vec<u8>, ty: u32, body: &[u8]) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
    }

    fn mmap(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(base, len, kind) in entries {
            b.extend_from_slice(&base.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&kind.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b
    }

    fn mbi(tags: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::from([0u8; 8]);
        for (ty, body) in tags {
            tag(&mut out, *ty, body);
        }
        tag(&mut out, 0, &[]);
        let total = out.len() as u32;
        out[..4].copy_from_slice(&total.to_le_bytes());
        out
    }

    #[test]
    fn parses_memory_map_cmdline_and_rsdp() {
        let mut rsdp = Vec::from(*b"RSD PTR ");
        rsdp.resize(20, 7);
        let m = mbi(&[
            (1, Vec::from(*b"console=json\0")),
            (6, mmap(&[(0, 0x9fc00, 1), (0xf0000, 0x10000, 2), (0x100000, 0x7ef0000, 1)])),
            (14, rsdp),
        ]);
        let mut info = BootInfo::new(BootRoute::Multiboot2, 0);
        parse_multiboot2(&m, &mut info).unwrap();
        assert_eq!(info.cmdline(), "console=json");
        assert_eq!(info.usable(), [Region { start: 0, end: 0x9fc00 }, Region { start: 0x100000, end: 0x7ff0000 }]);
        assert_eq!(info.usable_bytes(), 0x9fc00 + 0x7ef0000);
        assert_eq!(&info.rsdp_copy.unwrap()[..8], b"RSD PTR ");
    }

    #[test]
    fn refuses_truncated_structures_and_bad_tags() {
        let m = mbi(&[(6, mmap(&[(0x100000, 0x100000, 1)]))]);
        let mut info = BootInfo::new(BootRoute::Multiboot2, 0);
        assert_eq!(parse_multiboot2(&m[..m.len() - 8], &mut info), Err(MultibootError::Truncated));
        assert_eq!(parse_multiboot2(&[1, 2], &mut info), Err(MultibootError::Truncated));
        let mut bad = m.clone();
        bad[12..16].copy_from_slice(&4000u32.to_le_bytes()); // first tag's size runs past the end
        assert_eq!(parse_multiboot2(&bad, &mut info), Err(MultibootError::BadTag { offset: 8 }));
        let mut tiny = m.clone();
        tiny[12..16].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(parse_multiboot2(&tiny, &mut info), Err(MultibootError::BadTag { offset: 8 }));
    }

    #[test]
    fn memory_map_is_required() {
        let m = mbi(&[(1, Vec::from(*b"x\0"))]);
        let mut info = BootInfo::new(BootRoute::Multiboot2, 0);
        assert_eq!(parse_multiboot2(&m, &mut info), Err(MultibootError::NoMemoryMap));
    }

    #[test]
    fn region_table_overflow_is_counted_not_fatal() {
        let mut info = BootInfo::new(BootRoute::Bios, 0);
        for i in 0..(MAX_REGIONS as u64 + 5) {
            info.add_usable(i * 0x2000, i * 0x2000 + 0x1000);
        }
        info.add_usable(10, 10);
        assert_eq!(info.usable().len(), MAX_REGIONS);
        assert_eq!(info.regions_dropped, 5);
    }

    #[test]
    fn fuzzed_structures_never_panic() {
        let good = mbi(&[(1, Vec::from(*b"abc\0")), (6, mmap(&[(0x100000, 0x100000, 1)]))]);
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..5000 {
            let mut m = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % m.len();
                m[i] = (x >> 32) as u8;
            }
            let mut info = BootInfo::new(BootRoute::Multiboot2, 0);
            let _ = parse_multiboot2(&m, &mut info);
        }
    }
}

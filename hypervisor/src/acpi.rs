//! Just enough ACPI to count the logical processors: RSDP, then the RSDT or
//! XSDT, then the MADT's enabled local APIC and x2APIC entries.
//!
//! Follows the ACPI 6.5 specification, sections 5.2.5 (RSDP), 5.2.7-8
//! (RSDT/XSDT) and 5.2.12 (MADT). Physical memory is read through a closure,
//! so the parser is tested on the host over a byte arena; every length read
//! from a table is checked against a limit before it is used.

/// Why the processor count could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// The RSDP signature or checksum is wrong.
    BadRsdp,
    /// A table could not be read, or its header is inconsistent.
    BadTable(u64),
    /// A table's checksum does not add up to zero.
    Checksum(u64),
    /// No MADT ("APIC") in the root table.
    NoMadt,
}

/// Tables larger than this are refused (real MADTs are a few KiB).
const MAX_TABLE: usize = 64 * 1024;
const HEADER: usize = 36;

/// Reads `buf.len()` bytes of physical memory at an address; false if the
/// range is not readable.
pub type PhysRead<'a> = &'a dyn Fn(u64, &mut [u8]) -> bool;

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

/// Reads a whole table at `addr` (header first, then `length` bytes).
fn read_table(read: PhysRead<'_>, addr: u64) -> Result<alloc::vec::Vec<u8>, AcpiError> {
    let mut header = [0u8; HEADER];
    if !read(addr, &mut header) {
        return Err(AcpiError::BadTable(addr));
    }
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if !(HEADER..=MAX_TABLE).contains(&len) {
        return Err(AcpiError::BadTable(addr));
    }
    let mut table = alloc::vec![0u8; len];
    if !read(addr, &mut table) {
        return Err(AcpiError::BadTable(addr));
    }
    if !checksum_ok(&table) {
        return Err(AcpiError::Checksum(addr));
    }
    Ok(table)
}

/// Counts enabled (or online-capable) processors in the MADT reached from
/// `rsdp` (the first 36 bytes of the RSDP, or 20 for ACPI 1.0).
pub fn count_processors(rsdp: &[u8], read: PhysRead<'_>) -> Result<u32, AcpiError> {
    if rsdp.len() < 20 || &rsdp[..8] != b"RSD PTR " || !checksum_ok(&rsdp[..20]) {
        return Err(AcpiError::BadRsdp);
    }
    let revision = rsdp[15];
    let (root, entry_size) = if revision >= 2 && rsdp.len() >= 36 {
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().map_err(|_| AcpiError::BadRsdp)?);
        (xsdt, 8)
    } else {
        (u64::from(u32::from_le_bytes([rsdp[16], rsdp[17], rsdp[18], rsdp[19]])), 4)
    };
    let root_table = read_table(read, root)?;
    let madt = root_table[HEADER..]
        .chunks_exact(entry_size)
        .map(|e| {
            if entry_size == 8 {
                u64::from_le_bytes(e.try_into().unwrap_or([0; 8]))
            } else {
                u64::from(u32::from_le_bytes(e.try_into().unwrap_or([0; 4])))
            }
        })
        .find(|&addr| {
            let mut sig = [0u8; 4];
            read(addr, &mut sig) && &sig == b"APIC"
        })
        .ok_or(AcpiError::NoMadt)?;
    let table = read_table(read, madt)?;
    let mut count = 0;
    let mut at = HEADER + 8; // local APIC address and flags
    while at + 2 <= table.len() {
        let (kind, len) = (table[at], usize::from(table[at + 1]));
        if len < 2 || at + len > table.len() {
            return Err(AcpiError::BadTable(madt));
        }
        let entry = &table[at..at + len];
        let flags = match (kind, len) {
            (0, 8) => u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]),
            (9, 16) => u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]),
            _ => 0,
        };
        if flags & 0b11 != 0 {
            count += 1;
        }
        at += len;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    fn fix_checksum(t: &mut [u8], at: usize) {
        t[at] = 0;
        let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        t[at] = 0u8.wrapping_sub(sum);
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = Vec::from(*sig);
        t.extend_from_slice(&((HEADER + body.len()) as u32).to_le_bytes());
        t.resize(HEADER, 0);
        t.extend_from_slice(body);
        fix_checksum(&mut t, 9);
        t
    }

    struct Mem(RefCell<Vec<u8>>);

    impl Mem {
        fn put(&self, at: usize, bytes: &[u8]) {
            let mut m = self.0.borrow_mut();
            m[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let m = self.0.borrow();
            match m.get(addr as usize..addr as usize + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn madt_body(entries: &[(u8, u32)]) -> Vec<u8> {
        let mut b = Vec::from([0u8; 8]);
        b.extend_from_slice(&[1, 10, 0, 0, 0, 0, 0, 0, 0, 0]); // an I/O APIC entry, skipped
        for &(kind, flags) in entries {
            if kind == 0 {
                b.extend_from_slice(&[0, 8, 0, 0]);
                b.extend_from_slice(&flags.to_le_bytes());
            } else {
                b.extend_from_slice(&[9, 16, 0, 0, 0, 0, 0, 0]);
                b.extend_from_slice(&flags.to_le_bytes());
                b.extend_from_slice(&[0; 4]);
            }
        }
        b
    }

    fn setup(xsdt: bool, madt: Vec<u8>) -> (Mem, Vec<u8>) {
        let mem = Mem(RefCell::new(alloc::vec![0u8; 0x4000]));
        mem.put(0x100, &table(b"FACP", &[0; 8]));
        mem.put(0x2000, &madt);
        let root = if xsdt {
            let mut e = Vec::new();
            e.extend_from_slice(&0x100u64.to_le_bytes());
            e.extend_from_slice(&0x2000u64.to_le_bytes());
            table(b"XSDT", &e)
        } else {
            let mut e = Vec::new();
            e.extend_from_slice(&0x100u32.to_le_bytes());
            e.extend_from_slice(&0x2000u32.to_le_bytes());
            table(b"RSDT", &e)
        };
        mem.put(0x1000, &root);
        let mut rsdp = Vec::from(*b"RSD PTR ");
        rsdp.resize(36, 0);
        rsdp[15] = if xsdt { 2 } else { 0 };
        rsdp[16..20].copy_from_slice(&0x1000u32.to_le_bytes());
        rsdp[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        fix_checksum(&mut rsdp[..20], 8);
        (mem, rsdp)
    }

    #[test]
    fn counts_enabled_lapic_and_x2apic_entries() {
        for xsdt in [false, true] {
            let madt = table(b"APIC", &madt_body(&[(0, 1), (0, 1), (0, 0), (9, 1), (0, 2)]));
            let (mem, rsdp) = setup(xsdt, madt);
            assert_eq!(count_processors(&rsdp, &|a, b| mem.read(a, b)), Ok(4));
        }
    }

    #[test]
    fn rejects_bad_rsdp_checksum_and_missing_madt() {
        let (mem, mut rsdp) = setup(false, table(b"APIC", &madt_body(&[(0, 1)])));
        rsdp[9] ^= 1;
        assert_eq!(count_processors(&rsdp, &|a, b| mem.read(a, b)), Err(AcpiError::BadRsdp));
        let (mem, rsdp) = setup(false, table(b"SSDT", &[0; 8]));
        assert_eq!(count_processors(&rsdp, &|a, b| mem.read(a, b)), Err(AcpiError::NoMadt));
    }

    #[test]
    fn rejects_corrupt_madt() {
        let mut madt = table(b"APIC", &madt_body(&[(0, 1)]));
        madt[HEADER + 9] = 0; // the I/O APIC entry claims length 0
        fix_checksum(&mut madt, 9);
        let (mem, rsdp) = setup(false, madt);
        assert_eq!(count_processors(&rsdp, &|a, b| mem.read(a, b)), Err(AcpiError::BadTable(0x2000)));
        let mut madt = table(b"APIC", &madt_body(&[(0, 1)]));
        madt[20] ^= 0x55;
        let (mem, rsdp) = setup(false, madt);
        assert_eq!(count_processors(&rsdp, &|a, b| mem.read(a, b)), Err(AcpiError::Checksum(0x2000)));
    }

    #[test]
    fn refuses_huge_table_lengths_before_reading() {
        let mut madt = table(b"APIC", &madt_body(&[(0, 1)]));
        madt[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let (mem, rsdp) = setup(true, madt);
        assert_eq!(count_processors(&rsdp, &|a, b| mem.read(a, b)), Err(AcpiError::BadTable(0x2000)));
    }
}

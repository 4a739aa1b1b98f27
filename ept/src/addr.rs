//! Address newtypes (guest-physical, host-physical, guest frame number) and
//! the two leaf sizes the tables use (4 KiB and 2 MiB, Intel SDM Vol 3C
//! 29.3.2 / AMD APM Vol 2 15.25.1; 1 GiB leaves are not used).

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

/// A host-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hpa(pub u64);

/// A guest frame number: a guest-physical address shifted right by 12.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gfn(pub u64);

/// Bytes in a small page.
pub const PAGE_4K: u64 = 4096;
/// Bytes in a large page.
pub const PAGE_2M: u64 = 2 << 20;

impl Gpa {
    /// The frame holding this address.
    pub fn gfn(self) -> Gfn {
        Gfn(self.0 >> 12)
    }
}

impl Gfn {
    /// The address of the first byte of the frame.
    pub fn gpa(self) -> Gpa {
        Gpa(self.0 << 12)
    }
}

/// The size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB, a leaf in a page table (level 1).
    Size4K,
    /// 2 MiB, a leaf in a page directory (level 2, PS bit set).
    Size2M,
}

impl PageSize {
    /// Bytes covered by one leaf of this size.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_4K,
            PageSize::Size2M => PAGE_2M,
        }
    }

    /// 4 KiB pages covered by one leaf of this size.
    pub const fn pages(self) -> u64 {
        self.bytes() / PAGE_4K
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_and_gfn_convert_both_ways() {
        assert_eq!(Gpa(0x1234_5678).gfn(), Gfn(0x12345));
        assert_eq!(Gfn(0x12345).gpa(), Gpa(0x1234_5000));
    }

    #[test]
    fn page_sizes_report_bytes_and_pages() {
        assert_eq!(PageSize::Size4K.bytes(), PAGE_4K);
        assert_eq!(PageSize::Size2M.bytes(), 2 * 1024 * 1024);
        assert_eq!(PageSize::Size2M.pages(), 512);
        assert_eq!(PageSize::Size4K.pages(), 1);
    }
}

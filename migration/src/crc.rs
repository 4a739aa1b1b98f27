//! CRC32C (Castagnoli, reflected polynomial `0x82F6_3B78`, initial value and
//! final XOR `0xFFFF_FFFF`), the checksum of every frame payload.
//!
//! Table-driven, slicing-by-8: eight 256-entry tables built at compile time,
//! eight input bytes per step. The crate forbids `unsafe`, so it cannot use
//! the SSE4.2 `crc32` instruction itself; a host that can installs one with
//! [`install`] (the kernel does), after it is checked against the tables.

const POLY: u32 = 0x82F6_3B78;

/// `TABLES[0]` is the classic byte table; `TABLES[k][b]` is the CRC of byte
/// `b` followed by `k` zero bytes.
#[allow(clippy::indexing_slicing, clippy::cast_possible_truncation)] // const construction, i < 256
const TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// Entry `b & 0xFF` of table `K`.
#[inline(always)]
#[allow(clippy::indexing_slicing)] // K < 8 (checked at compile time) and b & 0xFF < 256: no bounds check remains
fn t<const K: usize>(b: u32) -> u32 {
    TABLES[K][(b & 0xFF) as usize]
}

/// A faster implementation the host installed, if any.
static ACCELERATED: spin::Once<fn(u32, &[u8]) -> u32> = spin::Once::new();

/// Installs `f` as the implementation of [`update`] if it agrees with the
/// tables on a set of inputs (every length 0..=64 and a long one, from
/// fresh and continued CRCs). Returns whether it was installed; only the
/// first successful call has an effect.
pub fn install(f: fn(u32, &[u8]) -> u32) -> bool {
    let data: [u8; 300] = core::array::from_fn(|i| u8::try_from(i * 37 % 251).unwrap_or(0));
    let agrees = (0..=64).all(|n| {
        let d = data.get(..n).unwrap_or_default();
        f(0, d) == tables(0, d) && f(0x1234_5678, d) == tables(0x1234_5678, d)
    }) && f(0, &data) == tables(0, &data);
    if agrees {
        ACCELERATED.call_once(|| f);
    }
    agrees
}

/// Continues a CRC32C over `data`. Start with `0` for a fresh checksum:
/// `update(update(0, a), b) == crc32c(a ++ b)`.
pub fn update(crc: u32, data: &[u8]) -> u32 {
    match ACCELERATED.get() {
        Some(f) => f(crc, data),
        None => tables(crc, data),
    }
}

/// [`update`] by the tables.
fn tables(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    let (chunks, rest) = data.as_chunks::<8>();
    for &[a, b, c, d, e, f, g, h] in chunks {
        let lo = u32::from_le_bytes([a, b, c, d]) ^ crc;
        let hi = u32::from_le_bytes([e, f, g, h]);
        crc = t::<7>(lo)
            ^ t::<6>(lo >> 8)
            ^ t::<5>(lo >> 16)
            ^ t::<4>(lo >> 24)
            ^ t::<3>(hi)
            ^ t::<2>(hi >> 8)
            ^ t::<1>(hi >> 16)
            ^ t::<0>(hi >> 24);
    }
    for &b in rest {
        crc = (crc >> 8) ^ t::<0>(crc ^ u32::from(b));
    }
    !crc
}

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    update(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_refuses_an_implementation_that_disagrees() {
        fn almost(crc: u32, data: &[u8]) -> u32 {
            if data.len() == 63 {
                0
            } else {
                tables(crc, data)
            }
        }
        assert!(!install(almost));
        assert!(!install(|_, _| 0));
        assert!(ACCELERATED.get().is_none_or(|f| f(0, b"123456789") == 0xE306_9283));
    }

    /// The bit-at-a-time definition, to check the tables against.
    fn bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn check_vector_matches_the_standard() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn slicing_by_8_matches_bitwise_at_every_length_and_split() {
        let data: Vec<u8> = (0..100u32).map(|i| (i.wrapping_mul(151) ^ 0x5A) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(crc32c(&data[..len]), bitwise(&data[..len]), "len {len}");
        }
        for split in 0..data.len() {
            assert_eq!(update(update(0, &data[..split]), &data[split..]), bitwise(&data));
        }
    }
}

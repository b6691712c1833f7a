//! SCTP's checksum under a port rewrite, without reading the packet.
//!
//! SCTP carries a CRC32c (Castagnoli, reflected; RFC 9260 appendix A) over the whole SCTP
//! packet, with no pseudo-header: rewriting the IP addresses leaves it valid, rewriting a port
//! does not. Recomputing it would be a loop over every byte of the packet, which the verifier
//! of Linux 5.10 (no `bpf_loop`) cannot take in the same program as the rest of the datapath.
//!
//! A CRC is affine over GF(2): for two messages of the same length `L`,
//! `crc(M') = crc(M) ^ lin(M ^ M')`, where `lin` is the CRC register run from 0 with no final
//! xor. A port rewrite changes the first 4 bytes only, so the delta message is those 4 bytes'
//! xor followed by `L - 4` zero bytes, and (see [`shift`]) `lin` of it is `Z^L(w)`: `w` the
//! 4 bytes read as a little-endian word, `Z` the register's advance over one zero byte. `Z^L`
//! is applied as the product of `Z^(2^k)` over the bits of `L`, each a linear map on 32 bits
//! tabulated by byte (4 tables of 256 words per power, built at compile time). Beside each
//! power's tables lie the identity's, chosen by the bit of `L` as an index: the update has no
//! branch, which keeps the verifier's walk of the programs linear in it (128 KiB in all).
//! The stored checksum is the CRC's value as a little-endian word (Linux's
//! `sctp_compute_cksum`), so on a little-endian machine the update is one xor of the field read
//! as a native word.

/// CRC32c's polynomial, bit-reflected.
pub const CRC32C_POLY: u32 = 0x82F6_3B78;

/// Powers of `Z` tabulated: `Z^(2^k)` for k in 0..16, so lengths up to 65535 bytes.
pub const SHIFT_POWERS: usize = 16;
// `shift` takes one step per power, written out.
const _: () = assert!(SHIFT_POWERS == 16);

/// `SHIFT[8k + 4 + j][b]` is `Z^(2^k)` of the byte `b` placed at byte `j` of the register;
/// `SHIFT[8k + j][b]` is that byte itself (the identity), for a bit of the length that is 0.
pub type ShiftTables = [[u32; 256]; SHIFT_POWERS * 8];

/// The register advanced over one zero byte.
const fn zero_byte(mut r: u32) -> u32 {
    let mut i = 0;
    while i < 8 {
        r = if r & 1 != 0 {
            (r >> 1) ^ CRC32C_POLY
        } else {
            r >> 1
        };
        i += 1;
    }
    r
}

/// A linear map on 32 bits given by the images of its basis bits, applied to `x`.
const fn apply(m: &[u32; 32], x: u32) -> u32 {
    let mut out = 0;
    let mut i = 0;
    while i < 32 {
        if x & (1 << i) != 0 {
            out ^= m[i];
        }
        i += 1;
    }
    out
}

/// The tables behind [`shift`], built at compile time by squaring `Z`'s matrix.
pub const fn shift_tables() -> ShiftTables {
    let mut m = [0u32; 32];
    let mut i = 0;
    while i < 32 {
        m[i] = zero_byte(1 << i);
        i += 1;
    }
    let mut t = [[0u32; 256]; SHIFT_POWERS * 8];
    let mut k = 0;
    while k < SHIFT_POWERS {
        let mut j = 0;
        while j < 4 {
            let mut b = 0;
            while b < 256 {
                t[k * 8 + j][b] = (b as u32) << (8 * j);
                t[k * 8 + 4 + j][b] = apply(&m, (b as u32) << (8 * j));
                b += 1;
            }
            j += 1;
        }
        // Z^(2^(k+1)) = Z^(2^k) twice.
        let mut sq = [0u32; 32];
        let mut i = 0;
        while i < 32 {
            sq[i] = apply(&m, m[i]);
            i += 1;
        }
        m = sq;
        k += 1;
    }
    t
}

/// What the checksum of an SCTP packet of `len` bytes (its common header and chunks) gains,
/// xored in, when its first 4 bytes (the ports), read as a little-endian word, change by
/// `delta` (old ^ new). `len` above 65535 is taken modulo 65536: IPv4 cannot carry more.
#[inline(always)]
pub fn shift(t: &ShiftTables, len: u32, delta: u32) -> u32 {
    // One step per power, each with its power as a constant: a loop's variable shift of `len`
    // loses the index's bounds in Linux 5.10's verifier ("math between map_value pointer and
    // register with unbounded min value").
    let r = step::<0>(t, len, delta);
    let r = step::<1>(t, len, r);
    let r = step::<2>(t, len, r);
    let r = step::<3>(t, len, r);
    let r = step::<4>(t, len, r);
    let r = step::<5>(t, len, r);
    let r = step::<6>(t, len, r);
    let r = step::<7>(t, len, r);
    let r = step::<8>(t, len, r);
    let r = step::<9>(t, len, r);
    let r = step::<10>(t, len, r);
    let r = step::<11>(t, len, r);
    let r = step::<12>(t, len, r);
    let r = step::<13>(t, len, r);
    let r = step::<14>(t, len, r);
    step::<15>(t, len, r)
}

/// `Z^(2^K)` applied to `r` if bit `K` of `len` is set, else `r`: the power's tables or the
/// identity's, chosen by an index, not a branch. Masked indexes: in bounds by construction,
/// which the verifier and the compiler can both see.
#[inline(always)]
fn step<const K: usize>(t: &ShiftTables, len: u32, r: u32) -> u32 {
    let base = (K * 8 + ((len >> K) & 1) as usize * 4) & 127;
    t[base][(r & 0xff) as usize]
        ^ t[(base + 1) & 127][((r >> 8) & 0xff) as usize]
        ^ t[(base + 2) & 127][((r >> 16) & 0xff) as usize]
        ^ t[(base + 3) & 127][(r >> 24) as usize]
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// CRC32c bit by bit, as RFC 9260 appendix A defines it: the independent reference.
    fn crc32c(data: &[u8]) -> u32 {
        let mut r = !0u32;
        for &b in data {
            r ^= u32::from(b);
            for _ in 0..8 {
                r = if r & 1 != 0 {
                    (r >> 1) ^ CRC32C_POLY
                } else {
                    r >> 1
                };
            }
        }
        !r
    }

    static T: ShiftTables = shift_tables();

    #[test]
    fn the_reference_crc_matches_rfc_3720s_check_value() {
        // The CRC32c check value ("123456789"), and iSCSI's 32 zero bytes (RFC 3720 B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn a_port_rewrite_updates_the_checksum_as_a_full_recompute_would() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in [
            12usize, 13, 16, 28, 64, 255, 256, 1452, 1500, 4096, 9000, 65515,
        ] {
            let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            pkt[8..12].fill(0);
            let before = crc32c(&pkt);
            let old = u32::from_le_bytes(pkt[0..4].try_into().unwrap());
            let new = next();
            pkt[0..4].copy_from_slice(&new.to_le_bytes());
            let after = crc32c(&pkt);
            assert_eq!(
                before ^ shift(&T, len as u32, old ^ new),
                after,
                "length {len}"
            );
        }
    }

    #[test]
    fn no_change_shifts_to_no_change() {
        assert_eq!(shift(&T, 1500, 0), 0);
    }
}

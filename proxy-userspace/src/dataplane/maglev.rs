//! Maglev's lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4), for frontends with `--lb-algorithm maglev` or the
//! Service annotation `sluice.io/lb-algorithm: maglev`.
//!
//! Each backend gets a permutation of the table's positions from a hash of its address and
//! port and the cluster's seed (`offset = h1 % M`, `skip = h2 % (M - 1) + 1`, M prime); the
//! backends then take turns claiming their next free position until the table is full. So:
//! - every node computes the same table for the same backends, whatever their order or their
//!   node-local ids, and the programs hash a flow's tuple to a position the same way on every
//!   node (`proxy_common::maglev_hash`): an ECMP router may send a flow's packets to any node;
//! - each backend holds M/N positions, give or take one;
//! - removing one of N backends moves its positions and few others (measured in the tests).
//!
//! The hashes are splitmix64 (Steele et al.), written out here so that they never change under
//! a node whose agent was built with another toolchain: every node of a cluster must agree.
use std::net::Ipv4Addr;

/// The table: for each of `m` positions, an index into `backends`. Empty if there are none.
/// `m` must be prime (the permutations are then complete).
pub fn table(backends: &[(Ipv4Addr, u16)], seed: u32, m: usize) -> Vec<usize> {
    if backends.is_empty() {
        return Vec::new();
    }
    // Claim order must not depend on the caller's order: take turns in address order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    order.dedup_by_key(|i| backends[*i]);
    let perms: Vec<(usize, usize)> = order
        .iter()
        .map(|&i| {
            let (addr, port) = backends[i];
            let h = splitmix64(
                u64::from(seed) << 48 ^ u64::from(u32::from(addr)) << 16 ^ u64::from(port),
            );
            let offset = (splitmix64(h ^ 1) % m as u64) as usize;
            let skip = (splitmix64(h ^ 2) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; order.len()];
    let mut entry = vec![usize::MAX; m];
    let mut filled = 0;
    loop {
        for (turn, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[turn] * skip) % m;
            while entry[c] != usize::MAX {
                next[turn] += 1;
                c = (offset + next[turn] * skip) % m;
            }
            entry[c] = order[turn];
            next[turn] += 1;
            filled += 1;
            if filled == m {
                return entry;
            }
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::MAGLEV_M;

    fn backends(n: u32) -> Vec<(Ipv4Addr, u16)> {
        (0..n)
            .map(|i| {
                (
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 10)) + i),
                    8080,
                )
            })
            .collect()
    }

    /// The table as backends rather than indices.
    fn named(b: &[(Ipv4Addr, u16)]) -> Vec<(Ipv4Addr, u16)> {
        table(b, 7, MAGLEV_M).into_iter().map(|i| b[i]).collect()
    }

    #[test]
    fn the_table_is_the_same_whatever_the_order_of_the_backends() {
        let b = backends(10);
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(named(&b), named(&reversed));
        let other_seed: Vec<_> = table(&b, 8, MAGLEV_M).into_iter().map(|i| b[i]).collect();
        assert_ne!(named(&b), other_seed, "the seed matters");
    }

    #[test]
    fn each_backend_holds_its_share_of_positions() {
        for n in [1u32, 2, 3, 10, 100] {
            let t = table(&backends(n), 7, MAGLEV_M);
            assert_eq!(t.len(), MAGLEV_M);
            let mut count = vec![0usize; n as usize];
            for i in t {
                count[i] += 1;
            }
            let (lo, hi) = (count.iter().min().unwrap(), count.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n} backends: shares {lo}..{hi}");
        }
    }

    /// Removing one of N backends moves its own positions (1/N of the table) and few others.
    /// Maglev does not promise none: the paper's figure 10 shows a few percent of the rest
    /// for small tables; here, with M = 16,381, the fraction is printed and bounded.
    #[test]
    fn removing_one_backend_moves_little_besides_its_own_positions() {
        for n in [3u32, 10, 100] {
            let all = backends(n);
            let before = named(&all);
            let gone = all[(n / 2) as usize];
            let rest: Vec<_> = all.iter().copied().filter(|b| *b != gone).collect();
            let after = named(&rest);
            let kept: Vec<usize> = (0..MAGLEV_M).filter(|&p| before[p] != gone).collect();
            let moved = kept.iter().filter(|&&p| before[p] != after[p]).count();
            let fraction = moved as f64 / kept.len() as f64;
            println!(
                "{n} backends, one removed: {moved} of {} other positions moved ({:.2}%)",
                kept.len(),
                fraction * 100.0
            );
            assert!(
                fraction < 0.05,
                "{n} backends: {:.2}% moved",
                fraction * 100.0
            );
            assert!(
                (0..MAGLEV_M).all(|p| after[p] != gone),
                "the removed backend is gone"
            );
        }
    }
}

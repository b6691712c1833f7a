//! Reading what the datapath did: counters and conntrack.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{HashMap, MapData, PerCpuArray};
use proxy_common::{
    CT_KIND_SERVICE, CT4_MAP, CTR_MAX, Counter, Ct4Entry, Ct4Key, PKT_COUNTERS_MAP,
};

use super::{Dataplane, DataplaneError, Protocol, map_error};

/// Which of a flow's two conntrack entries this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtKind {
    /// Keyed by what the client sent (client -> frontend); value: the pinned backend.
    Service,
    /// Keyed by the translated tuple (client or SNAT address -> backend); value: the client
    /// and the frontend replies must show.
    Reverse,
}

/// One conntrack entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub kind: CtKind,
    pub proto: Protocol,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub entry: Ct4Entry,
}

fn sock(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be))
}

impl Dataplane {
    /// The packet counters, summed over every CPU, indexed by `proxy_common::CTR_*`.
    pub fn counters(&self) -> Result<[Counter; CTR_MAX as usize], DataplaneError> {
        let map = PKT_COUNTERS_MAP;
        let counters: PerCpuArray<_, Counter> = self.open(map)?;
        let mut out = [Counter::default(); CTR_MAX as usize];
        for (index, total) in (0..CTR_MAX).zip(out.iter_mut()) {
            let per_cpu = counters.get(&index, 0).map_err(map_error(map, "read"))?;
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        Ok(out)
    }

    /// Every conntrack entry (live or expired but not yet evicted).
    pub fn conntrack(&self) -> Result<Vec<CtEntry>, DataplaneError> {
        let ct: HashMap<&MapData, Ct4Key, Ct4Entry> = self.open(CT4_MAP)?;
        Ok(ct
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                Some(CtEntry {
                    kind: if k.kind == CT_KIND_SERVICE {
                        CtKind::Service
                    } else {
                        CtKind::Reverse
                    },
                    proto: Protocol::from_number(k.proto)?,
                    src: sock(k.saddr_be, k.sport_be),
                    dst: sock(k.daddr_be, k.dport_be),
                    entry: v,
                })
            })
            .collect())
    }
}

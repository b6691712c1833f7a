//! Reading what the datapath did: counters, conntrack and the Services in the maps, either
//! through a loaded [`Dataplane`] or straight from the maps pinned by a running agent
//! ([`PinnedMaps`], which is what `sluice services` and `sluice conntrack` use).
use std::{
    borrow::Borrow,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray};
use proxy_common::{
    CT_FLAG_ESTABLISHED, CT_FLAG_FIN_FWD, CT_FLAG_FIN_REPLY, CT_FLAG_RST, CT_KIND_REVERSE,
    CT_KIND_SERVICE, CT4_MAP, CT4_NEW_MAP, CTR_MAX, Counter, Ct4Entry, Ct4Key, LB4_BACKENDS_MAP,
    LB4_SERVICES_MAP, LB4_SRC_RANGES_MAP, Lb4Backend, Lb4Key, Lb4Service, PKT_COUNTERS_MAP,
    SrcRange4Key,
};

use super::{
    Backends, Dataplane, DataplaneError, Frontend, Protocol, map_error,
    raw::{hash_data, scan},
    services::{Ids, read_ranges},
};

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
    /// In `CT4_NEW`: the flow is not yet established (no reply yet, or none followed by a
    /// packet from the client), or it is a direct-server-return entry on the backend's node
    /// established by the backend's SYN-ACK whose next packet has not come yet. Otherwise in
    /// `CT4`.
    pub new: bool,
}

impl CtEntry {
    /// The entry's key in its table.
    pub fn key(&self) -> Ct4Key {
        Ct4Key {
            saddr_be: u32::from(*self.src.ip()).to_be(),
            daddr_be: u32::from(*self.dst.ip()).to_be(),
            sport_be: self.src.port().to_be(),
            dport_be: self.dst.port().to_be(),
            proto: self.proto.number(),
            kind: match self.kind {
                CtKind::Service => CT_KIND_SERVICE,
                CtKind::Reverse => CT_KIND_REVERSE,
            },
            _pad: [0; 2],
        }
    }

    /// When the entry dies (`CLOCK_MONOTONIC` ns), from its latest packet and its state now.
    pub fn expires_ns(&self) -> u64 {
        self.entry.expires_ns(self.proto.number())
    }
}

/// How full the conntrack tables are. An LRU map keeps an expired entry until it needs the
/// room, so `held` and `new_held` are what the maps hold and the rest counts live entries of
/// both only; a flow's state is in its reverse entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtFill {
    /// The size of `CT4`, established flows (two entries per flow).
    pub capacity: u32,
    /// Entries in `CT4`, live or expired.
    pub held: u64,
    /// The size of `CT4_NEW`, flows not yet established.
    pub new_capacity: u32,
    /// Entries in `CT4_NEW`, live or expired.
    pub new_held: u64,
    pub live_service: u64,
    pub live_reverse: u64,
    /// Live TCP flows not yet established (half-open: what a SYN flood makes).
    pub tcp_opening: u64,
    pub tcp_established: u64,
    /// Live TCP flows after a FIN or an RST.
    pub tcp_closing: u64,
    pub udp: u64,
    pub sctp: u64,
}

impl CtFill {
    /// The fill of tables of `capacity` (`CT4`) and `new_capacity` (`CT4_NEW`) holding
    /// `entries`, at `now` (`CLOCK_MONOTONIC` ns).
    pub fn of(entries: &[CtEntry], capacity: u32, new_capacity: u32, now: u64) -> Self {
        let new_held = entries.iter().filter(|e| e.new).count() as u64;
        let mut f = Self {
            capacity,
            held: entries.len() as u64 - new_held,
            new_capacity,
            new_held,
            ..Self::default()
        };
        for e in entries.iter().filter(|e| e.expires_ns() >= now) {
            if e.kind == CtKind::Service {
                f.live_service += 1;
                continue;
            }
            f.live_reverse += 1;
            let state = e.entry.state();
            match e.proto {
                Protocol::Udp => f.udp += 1,
                Protocol::Sctp => f.sctp += 1,
                Protocol::Tcp
                    if state & (CT_FLAG_FIN_FWD | CT_FLAG_FIN_REPLY | CT_FLAG_RST) != 0 =>
                {
                    f.tcp_closing += 1
                }
                Protocol::Tcp if state & CT_FLAG_ESTABLISHED != 0 => f.tcp_established += 1,
                Protocol::Tcp => f.tcp_opening += 1,
            }
        }
        f
    }
}

/// The decoded form of the packet counters: `proxy_common::CTR_*` index -> total.
pub type Counters = [Counter; CTR_MAX as usize];

/// A socket address from the network-order fields the maps hold.
pub fn sock_addr(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr_be)), u16::from_be(port_be))
}

fn read_counters<T: Borrow<MapData>>(
    counters: &PerCpuArray<T, Counter>,
) -> Result<Counters, DataplaneError> {
    let mut out = [Counter::default(); CTR_MAX as usize];
    for (index, total) in (0..CTR_MAX).zip(out.iter_mut()) {
        let per_cpu = counters
            .get(&index, 0)
            .map_err(map_error(PKT_COUNTERS_MAP, "read"))?;
        for c in per_cpu.iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
    }
    Ok(out)
}

/// A conntrack entry, decoded (`new`: from `CT4_NEW`); `None` for a protocol no frontend has.
fn ct_entry(k: Ct4Key, v: Ct4Entry, new: bool) -> Option<CtEntry> {
    Some(CtEntry {
        kind: if k.kind == CT_KIND_SERVICE {
            CtKind::Service
        } else {
            CtKind::Reverse
        },
        proto: Protocol::from_number(k.proto)?,
        src: sock_addr(k.saddr_be, k.sport_be),
        dst: sock_addr(k.daddr_be, k.dport_be),
        entry: v,
        new,
    })
}

impl Dataplane {
    /// The packet counters, summed over every CPU, indexed by `proxy_common::CTR_*`.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        read_counters(&self.open::<PerCpuArray<_, Counter>>(PKT_COUNTERS_MAP)?)
    }

    /// Every conntrack entry of both tables (live or expired but not yet evicted).
    pub fn conntrack(&self) -> Result<Vec<CtEntry>, DataplaneError> {
        let mut out = Vec::new();
        for table in super::CT_TABLES {
            let new = table == CT4_NEW_MAP;
            self.scan(table, |k, v| out.extend(ct_entry(k, v, new)))?;
        }
        Ok(out)
    }

    /// Removes the conntrack entry `e` from its table, as the LRU does when it evicts it (the
    /// datapath rebuilds a flow's reverse entry from its service entry).
    pub fn evict_conntrack_entry(&mut self, e: &CtEntry) -> Result<(), DataplaneError> {
        let table = if e.new { CT4_NEW_MAP } else { CT4_MAP };
        self.remove::<Ct4Key, Ct4Entry>(table, &e.key())
    }

    /// How full the conntrack tables are (a walk of both maps).
    pub fn conntrack_fill(&self) -> Result<CtFill, DataplaneError> {
        Ok(CtFill::of(
            &self.conntrack()?,
            self.config.conntrack_max,
            self.config.conntrack_new_max,
            super::monotonic_ns(),
        ))
    }
}

/// Read-only access to the maps a running agent pinned under its pin path. Opening them
/// loads no program and writes nothing.
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Checks that the maps are there (an agent has run with this pin path).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let maps = Self {
            dir: dir.to_owned(),
        };
        maps.map(LB4_SERVICES_MAP)?;
        Ok(maps)
    }

    fn map(&self, map: &'static str) -> Result<Map, DataplaneError> {
        let path = self.dir.join(map);
        let data = MapData::from_pin(&path).map_err(|source| DataplaneError::Pinned {
            map,
            path: path.clone(),
            source: Box::new(source),
        })?;
        Map::from_map_data(data).map_err(map_error(map, "open"))
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &self,
        map: &'static str,
    ) -> Result<HashMap<MapData, K, V>, DataplaneError> {
        HashMap::try_from(self.map(map)?).map_err(map_error(map, "open"))
    }

    /// Every frontend and its backends (in slot order).
    pub fn services(&self) -> Result<Vec<(Frontend, Backends)>, DataplaneError> {
        let backends: Vec<(u32, Lb4Backend)> = self
            .hash::<u32, Lb4Backend>(LB4_BACKENDS_MAP)?
            .iter()
            .filter_map(Result::ok)
            .collect();
        let entries: Vec<(Lb4Key, Lb4Service)> = self
            .hash::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP)?
            .iter()
            .filter_map(Result::ok)
            .collect();
        // Pins of an agent from before source ranges have no such map, and no ranges.
        let ranges = match self.map(LB4_SRC_RANGES_MAP) {
            Ok(m) => read_ranges(
                &LpmTrie::<MapData, SrcRange4Key, u8>::try_from(m)
                    .map_err(map_error(LB4_SRC_RANGES_MAP, "open"))?,
            ),
            Err(_) if !self.dir.join(LB4_SRC_RANGES_MAP).exists() => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Ids::from_entries(backends, &entries, ranges).services())
    }

    /// Whether the pins have `CT4_NEW` (an agent from before it had one table only).
    fn has_new_table(&self) -> bool {
        self.dir.join(CT4_NEW_MAP).exists()
    }

    /// Every conntrack entry of both tables.
    pub fn conntrack(&self) -> Result<Vec<CtEntry>, DataplaneError> {
        // `CT4_NEW` first: a flow moving to `CT4` meanwhile is then seen at least once.
        let mut out = Vec::new();
        for (table, new) in [(CT4_NEW_MAP, true), (CT4_MAP, false)] {
            if new && !self.has_new_table() {
                continue;
            }
            let map = self.map(table)?;
            scan(table, hash_data(&map, table)?, |k, v| {
                out.extend(ct_entry(k, v, new))
            })?;
        }
        Ok(out)
    }

    /// The size of a pinned map.
    fn capacity(&self, map: &'static str) -> Result<u32, DataplaneError> {
        Ok(MapData::from_pin(self.dir.join(map))
            .and_then(|m| m.info())
            .map_err(map_error(map, "read the size of"))?
            .max_entries())
    }

    /// How full the conntrack tables are (a walk of both maps: two system calls an entry).
    pub fn conntrack_fill(&self) -> Result<CtFill, DataplaneError> {
        let new_capacity = if self.has_new_table() {
            self.capacity(CT4_NEW_MAP)?
        } else {
            0
        };
        Ok(CtFill::of(
            &self.conntrack()?,
            self.capacity(CT4_MAP)?,
            new_capacity,
            super::monotonic_ns(),
        ))
    }

    /// The packet counters, summed over every CPU.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let map = PKT_COUNTERS_MAP;
        read_counters(&PerCpuArray::try_from(self.map(map)?).map_err(map_error(map, "open"))?)
    }
}

//! The frontend addresses (`LB4_FE_ADDRS2`): the ingress programs' first question about a
//! packet is whether its destination is an address some frontend is on. Most packets a node
//! forwards (pod to pod, and every connection socket LB translated at `connect()`) are not,
//! and pass with that one lookup and no conntrack work.
//!
//! What must hold: every address that a live conntrack flow's packets arrive at (the frontend of
//! its service entry, and the SNAT or hairpin address its replies come back to, if that is no
//! longer the configured one) is in the map. So an address goes in before its first frontend can be
//! seen, stays (with 0 frontends: "retired") after its last frontend goes, and leaves only once no
//! live flow names it ([`Dataplane::retire_fe_addrs`], from the agent's tick). An earlier SNAT or
//! hairpin address is marked `FE_ADDR_NAT` while a live flow is SNATed to it: the ingress programs
//! look replies up only there and at the configured ones. An agent that adopts pinned maps, of this
//! layout or of one without the map, writes every frontend's address and every address a live flow
//! names before its programs replace the old ones.
//!
//! Each address's entry also filters ports (`FeAddr4::ports`): a packet to the address on a port
//! whose bit is clear is no flow's. What must hold: the bit of every frontend's port is set before
//! the frontend can be seen, and the bit of a port whose frontend went stays while a live flow's
//! service entry names the address and port. The agent remembers such ports (`flow_ports`) and
//! [`Dataplane::retire_fe_addrs`] drops each once no live flow names it; an agent that adopts
//! pinned maps sets the port of every live flow.
//!
//! The pod clients (`LB4_POD_CLIENTS`) are the egress programs' first question in the same
//! way: a packet into a pod can be a reply to translate only if its destination has been the
//! client of a flow translated at TC. What must hold: the client of every live flow whose
//! replies can reach a pod's egress untranslated is in the map, or the map is marked full.
//! The programs add the client before the flow's first packet goes on. An agent that finds
//! older pins without the map marks it full at once: the older programs, which note nothing,
//! run until its own replace them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{Array, HashMap, MapData};
use proxy_common::{
    CT_KIND_SERVICE, Ct4Entry, Ct4Key, DP_STATE_POD_CLIENTS_FULL, FE_ADDR_CLUSTER_IP,
    FE_ADDR_COUNT, FE_ADDR_NAT, FE_PORT_WORDS, FeAddr4, LB4_DP_STATE_MAP, LB4_FE_ADDRS_MAP,
    LB4_POD_CLIENTS_MAP,
};

use super::{CT_TABLES, Dataplane, DataplaneError, map_error};

/// How long past its expiry (by this process's clock) an entry still counts as live here.
/// The programs may read the coarse clock, which runs up to a jiffy behind CLOCK_MONOTONIC:
/// an entry that looks just expired here may still be live to them, and renewed.
const LIVE_GRACE_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, which conntrack expiry uses.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Dataplane {
    /// Sets `addr`'s entry to `frontends` (0: retired, kept for its flows), marked if a
    /// ClusterIP frontend of the id tables is on it, with the port filter of every frontend
    /// on it in the id tables, of `port` (a frontend about to be), and of the ports live flows
    /// may still name there (`flow_ports`).
    pub(super) fn write_fe_addr(
        &mut self,
        addr: Ipv4Addr,
        frontends: u32,
        port: Option<u16>,
    ) -> Result<(), DataplaneError> {
        let max = self.config.services_max;
        let mut value = FeAddr4 {
            flags: frontends,
            ..Default::default()
        };
        if self.ids.cluster_ip_on(addr) {
            value.flags |= FE_ADDR_CLUSTER_IP;
        }
        if self.nat_addrs.contains(&addr) {
            value.flags |= FE_ADDR_NAT;
        }
        value.ports = self.frontend_ports(addr);
        if let Some(p) = port {
            value.add_port(p);
        }
        if let Some(bits) = self.flow_ports.get(&addr) {
            for (w, b) in value.ports.iter_mut().zip(bits) {
                *w |= b;
            }
        }
        self.insert::<u32, FeAddr4>(
            LB4_FE_ADDRS_MAP,
            max,
            u32::from(addr).to_be(),
            value,
            || format!("the address {addr}"),
        )
    }

    /// The port filter bits of the frontends on `addr` in the id tables.
    fn frontend_ports(&self, addr: Ipv4Addr) -> [u64; FE_PORT_WORDS] {
        let mut v = FeAddr4::default();
        for p in self.ids.ports_on(addr) {
            v.add_port(p);
        }
        v.ports
    }

    /// Remembers, of `live` (the port filter bits of live flows to `addr`), those no frontend
    /// on `addr` has: the filter keeps them beyond the frontends' own until
    /// [`Self::retire_fe_addrs`] finds their flows gone. Whether the remembered bits changed.
    fn keep_flow_ports(&mut self, addr: Ipv4Addr, live: [u64; FE_PORT_WORDS]) -> bool {
        let own = self.frontend_ports(addr);
        let mut extra = live;
        for (w, o) in extra.iter_mut().zip(own) {
            *w &= !o;
        }
        let before = self.flow_ports.get(&addr).copied();
        if extra == [0; FE_PORT_WORDS] {
            self.flow_ports.remove(&addr);
        } else {
            self.flow_ports.insert(addr, extra);
        }
        before != self.flow_ports.get(&addr).copied()
    }

    /// A frontend on `addr` with `port` went (it is out of the id tables): flows to it may
    /// live on, so its port stays in the address's filter (unless another frontend there has
    /// it) until [`Self::retire_fe_addrs`] finds none.
    pub(super) fn keep_flow_port(&mut self, addr: Ipv4Addr, port: u16) {
        let mut live = FeAddr4 {
            ports: self.flow_ports.get(&addr).copied().unwrap_or_default(),
            ..Default::default()
        };
        live.add_port(port);
        self.keep_flow_ports(addr, live.ports);
    }

    /// Rewrites `addr`'s entry, if it has one, with its marks as they are now; an address
    /// with neither frontends nor marks is left for [`Self::retire_fe_addrs`].
    pub(super) fn refresh_fe_addr(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        let m: HashMap<&MapData, u32, FeAddr4> = self.open(LB4_FE_ADDRS_MAP)?;
        match m.get(&u32::from(addr).to_be(), 0) {
            Ok(_) => {}
            Err(aya::maps::MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(map_error(LB4_FE_ADDRS_MAP, "read")(e)),
        }
        let n = self.ids.frontends_on(addr);
        self.write_fe_addr(addr, n, None)
    }

    /// The addresses marked `FE_ADDR_NAT`: earlier SNAT or hairpin addresses that live flows
    /// may still be SNATed to, whose replies the ingress programs look up.
    pub fn nat_marked_addrs(&self) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        let m: HashMap<&MapData, u32, FeAddr4> = self.open(LB4_FE_ADDRS_MAP)?;
        let mut v: Vec<Ipv4Addr> = m
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.flags & FE_ADDR_NAT != 0)
            .map(|(a, _)| Ipv4Addr::from(u32::from_be(a)))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Every address in the map, with its number of frontends.
    pub fn fe_addrs(&self) -> Result<Vec<(Ipv4Addr, u32)>, DataplaneError> {
        Ok(self
            .fe_addr_entries()?
            .into_iter()
            .map(|(a, v)| (a, v.flags & FE_ADDR_COUNT))
            .collect())
    }

    /// Every address in the map, with its entry (count, marks and port filter).
    pub fn fe_addr_entries(&self) -> Result<Vec<(Ipv4Addr, FeAddr4)>, DataplaneError> {
        let m: HashMap<&MapData, u32, FeAddr4> = self.open(LB4_FE_ADDRS_MAP)?;
        let mut v = Vec::new();
        for entry in m.iter() {
            let (a, value) = entry.map_err(map_error(LB4_FE_ADDRS_MAP, "read"))?;
            v.push((Ipv4Addr::from(u32::from_be(a)), value));
        }
        v.sort_unstable_by_key(|(a, _)| *a);
        Ok(v)
    }

    /// The addresses live conntrack flows arrive at: each flow's frontend, and the SNAT or
    /// hairpin address its replies come back to (which may no longer be the configured one);
    /// apart, those SNAT or hairpin addresses; and the port filter of each frontend address's
    /// live flows. An incomplete read is an error, never a shorter list.
    fn flow_addrs(&self) -> Result<LiveFlows, DataplaneError> {
        let now = monotonic_ns();
        let mut live = LiveFlows::default();
        for table in CT_TABLES {
            // Read in batches: this runs from the agent's tick over tables of up to hundreds
            // of thousands of entries.
            self.scan::<Ct4Key, Ct4Entry>(table, |k, v| {
                if k.kind != CT_KIND_SERVICE || v.expires_ns(k.proto) + LIVE_GRACE_NS < now {
                    return;
                }
                let addr = Ipv4Addr::from(u32::from_be(k.daddr_be));
                live.addrs.insert(addr);
                live.ports
                    .entry(addr)
                    .or_default()
                    .add_port(u16::from_be(k.dport_be));
                if v.nat_addr_be != 0 {
                    live.nat.insert(Ipv4Addr::from(u32::from_be(v.nat_addr_be)));
                }
            })?;
        }
        live.addrs.extend(&live.nat);
        Ok(live)
    }

    /// After adopting pinned maps: every frontend's address with its count, and every address
    /// a live flow names, retired, unless a frontend is on it; the ports of live flows in the
    /// filters (trimmed by the next [`Self::retire_fe_addrs`] as the flows end); the SNAT or
    /// hairpin addresses of live flows that are not configured now, marked.
    pub(super) fn adopt_fe_addrs(&mut self) -> Result<(), DataplaneError> {
        let live = self.flow_addrs()?;
        let configured = [self.config.snat, self.config.hairpin_snat];
        self.nat_addrs = live
            .nat
            .into_iter()
            .filter(|a| !configured.contains(&Some(*a)))
            .collect();
        for (addr, v) in &live.ports {
            self.keep_flow_ports(*addr, v.ports);
        }
        for addr in self.ids.frontend_addrs() {
            let n = self.ids.frontends_on(addr);
            self.write_fe_addr(addr, n, None)?;
        }
        for addr in live.addrs {
            if self.ids.frontends_on(addr) == 0 {
                self.write_fe_addr(addr, 0, None)?;
            }
        }
        Ok(())
    }

    /// Turns the egress filter off for good (as the programs do when they cannot add a
    /// client).
    pub(super) fn set_pod_clients_full(&mut self) -> Result<(), DataplaneError> {
        let mut state: Array<&mut MapData, u32> = self.open_mut(LB4_DP_STATE_MAP)?;
        let flags = state
            .get(&0, 0)
            .map_err(map_error(LB4_DP_STATE_MAP, "read"))?;
        state
            .set(0, &(flags | DP_STATE_POD_CLIENTS_FULL), 0)
            .map_err(map_error(LB4_DP_STATE_MAP, "write"))
    }

    /// The pod clients: the addresses `sluice_to_pod` looks up in conntrack, and whether the
    /// map filled up (then it looks every packet up).
    pub fn pod_clients(&self) -> Result<(Vec<Ipv4Addr>, bool), DataplaneError> {
        let m: HashMap<&MapData, u32, u32> = self.open(LB4_POD_CLIENTS_MAP)?;
        let mut v = Vec::new();
        for entry in m.keys() {
            let a = entry.map_err(map_error(LB4_POD_CLIENTS_MAP, "read"))?;
            v.push(Ipv4Addr::from(u32::from_be(a)));
        }
        v.sort_unstable();
        let state: Array<&MapData, u32> = self.open(LB4_DP_STATE_MAP)?;
        let flags = state
            .get(&0, 0)
            .map_err(map_error(LB4_DP_STATE_MAP, "read"))?;
        Ok((v, flags & DP_STATE_POD_CLIENTS_FULL != 0))
    }

    /// Removes the retired addresses (no frontend on them) that no live flow names any more,
    /// the `FE_ADDR_NAT` mark of addresses no live flow is SNATed to any more, and from the
    /// port filters the ports of gone frontends that no live flow names any more; how many
    /// addresses went. Reads conntrack only when some address is retired, marked or has
    /// such ports. Does nothing while a resize is unfinished: the programs not yet replaced
    /// still renew their flows in the old conntrack maps, which this does not read.
    pub fn retire_fe_addrs(&mut self) -> Result<usize, DataplaneError> {
        if self.resizing() {
            return Ok(0);
        }
        let retired: Vec<Ipv4Addr> = self
            .fe_addrs()?
            .into_iter()
            .filter(|(a, _)| self.ids.frontends_on(*a) == 0)
            .map(|(a, _)| a)
            .collect();
        if retired.is_empty() && self.nat_addrs.is_empty() && self.flow_ports.is_empty() {
            return Ok(0);
        }
        let live = self.flow_addrs()?;
        // Addresses no live flow is SNATed to lose their mark.
        let unmarked: Vec<Ipv4Addr> = self.nat_addrs.difference(&live.nat).copied().collect();
        for addr in unmarked {
            self.nat_addrs.remove(&addr);
            self.refresh_fe_addr(addr)?;
        }
        let gone: Vec<Ipv4Addr> = retired
            .into_iter()
            .filter(|a| !live.addrs.contains(a))
            .collect();
        for addr in &gone {
            self.flow_ports.remove(addr);
            self.remove::<u32, FeAddr4>(LB4_FE_ADDRS_MAP, &u32::from(*addr).to_be())?;
        }
        // The filters keep the ports of live flows only (and their frontends' own).
        let kept: Vec<Ipv4Addr> = self.flow_ports.keys().copied().collect();
        for addr in kept {
            let ports = live.ports.get(&addr).map(|v| v.ports).unwrap_or_default();
            if self.keep_flow_ports(addr, ports) {
                self.refresh_fe_addr(addr)?;
            }
        }
        Ok(gone.len())
    }
}

/// What the live conntrack flows name (see [`Dataplane::flow_addrs`]).
#[derive(Default)]
struct LiveFlows {
    /// Every address a live flow arrives at: frontends, and SNAT or hairpin addresses.
    addrs: BTreeSet<Ipv4Addr>,
    /// The SNAT or hairpin addresses live flows are SNATed to.
    nat: BTreeSet<Ipv4Addr>,
    /// Per frontend address, the port filter of its live flows.
    ports: BTreeMap<Ipv4Addr, FeAddr4>,
}

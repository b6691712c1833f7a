//! Writing Services into the maps, in the order that never shows the kernel a half-built one:
//! backends, then the reverse-NAT entry, then backend slots, then the frontend entry (slot 0)
//! last; removal in the reverse order. Ids are stable: a backend keeps its id while any
//! frontend uses it, a frontend keeps its reverse-NAT id while it exists, and both are
//! recovered from the (pinned) maps when a new process loads them.
use std::collections::{BTreeMap, HashMap as StdHashMap};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key as LpmKey};
use proxy_common::{
    AffinityMatchKey, BACKEND_FLAG_LOCAL, LB4_AFFINITY_MATCH_MAP, LB4_BACKENDS_MAP, LB4_MAGLEV_MAP,
    LB4_MAGLEV_MAX, LB4_REVNAT_MAP, LB4_SERVICES_MAP, LB4_SRC_RANGES_DEFAULT_MAX,
    LB4_SRC_RANGES_MAP, LOCAL_SLOT_BASE, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, MAGLEV_M,
    MaglevTable, SRC_RANGE_ID_BITS, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXT_LOCAL,
    SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_MAGLEV, SVC_FLAG_NO_LOCAL_DROP,
    SVC_FLAG_NODE_PORT, SVC_FLAG_SRC_RANGES, SVC_FLAG_SRC_RANGES_NODE, SrcRange4Key,
};

use super::{Dataplane, DataplaneError, map_error};
use crate::service::{
    Backend, Backends, Cidr4, Frontend, FrontendId, FrontendKind, Protocol, SourceRanges,
};

fn kind_flags(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => SVC_FLAG_CLUSTER_IP,
        FrontendKind::NodePort => SVC_FLAG_NODE_PORT,
        FrontendKind::ExternalIp => SVC_FLAG_EXTERNAL_IP,
        FrontendKind::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
    }
}

fn kind_from_flags(f: u16) -> FrontendKind {
    if f & SVC_FLAG_NODE_PORT != 0 {
        FrontendKind::NodePort
    } else if f & SVC_FLAG_EXTERNAL_IP != 0 {
        FrontendKind::ExternalIp
    } else if f & SVC_FLAG_LOAD_BALANCER != 0 {
        FrontendKind::LoadBalancer
    } else {
        FrontendKind::ClusterIp
    }
}

fn key(fe: FrontendId, slot: u16) -> Lb4Key {
    Lb4Key::new(
        u32::from(fe.addr).to_be(),
        fe.port.to_be(),
        slot,
        fe.proto.number(),
    )
}

type BeId = (std::net::Ipv4Addr, u16, Protocol);

#[derive(Clone, Debug)]
struct FeState {
    kind: FrontendKind,
    rev_nat_id: u32,
    /// The backend ids of slots 1..=all.len(): every origin's list.
    all: Vec<u32>,
    /// externalTrafficPolicy Local: the backend ids of slots LOCAL_SLOT_BASE+1..: the list for
    /// traffic from outside.
    external: Option<Vec<u32>>,
    /// loadBalancerSourceRanges: the ranges in `LB4_SRC_RANGES` under `rev_nat_id`.
    sources: Option<SourceRanges>,
    /// sessionAffinity's timeout (slot 0's `backend_id`); its backends are in
    /// `LB4_AFFINITY_MATCH` under `rev_nat_id`.
    affinity_timeout_s: Option<u32>,
    /// `SVC_FLAG_NO_LOCAL_DROP`: no backends, and new flows dropped rather than refused.
    no_local_endpoints: bool,
    /// `SVC_FLAG_MAGLEV`: its table (of `all`, when not empty) is in `LB4_MAGLEV` under
    /// `rev_nat_id`.
    maglev: bool,
}

impl FeState {
    /// Every backend id the frontend references, with repeats (one reference each).
    fn ids(&self) -> impl Iterator<Item = &u32> {
        self.all.iter().chain(self.external.iter().flatten())
    }

    /// Its `LB4_AFFINITY_MATCH` keys: each of its backends, with sessionAffinity.
    fn affinity_keys(&self) -> std::collections::BTreeSet<AffinityMatchKey> {
        if self.affinity_timeout_s.is_none() {
            return Default::default();
        }
        self.ids()
            .map(|&backend_id| AffinityMatchKey {
                backend_id,
                rev_nat_id: self.rev_nat_id,
            })
            .collect()
    }
}

/// The slot keys of a list starting after `base`.
fn slots(fe: FrontendId, base: u16, len: usize) -> impl Iterator<Item = Lb4Key> {
    (1..=len).map(move |i| key(fe, base + i as u16))
}

/// The id tables: what is in the maps, from userspace's side.
#[derive(Default, Debug)]
pub(super) struct Ids {
    frontends: BTreeMap<FrontendId, FeState>,
    backends: StdHashMap<BeId, (u32, u32)>, // -> (id, references)
    backend_by_id: StdHashMap<u32, (BeId, bool)>, // -> (backend, local)
    next_backend: u32,
    next_rev_nat: u32,
    used_rev_nat: std::collections::HashSet<u32>,
}

fn alloc(next: &mut u32, max: u32, used: impl Fn(u32) -> bool) -> Option<u32> {
    for _ in 0..max {
        *next = if *next >= max { 1 } else { *next + 1 };
        if !used(*next) {
            return Some(*next);
        }
    }
    None
}

/// The `LB4_SRC_RANGES` key of `range` for the frontend with reverse-NAT id `rev_nat_id`.
fn range_key(rev_nat_id: u32, range: Cidr4) -> LpmKey<SrcRange4Key> {
    let net = range.network();
    LpmKey::new(
        SRC_RANGE_ID_BITS + u32::from(net.prefix),
        SrcRange4Key {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr_be: u32::from(net.addr).to_be(),
        },
    )
}

/// Every range in an `LB4_SRC_RANGES` map, with the reverse-NAT id it is under.
pub(super) fn read_ranges<T: std::borrow::Borrow<MapData>>(
    m: &LpmTrie<T, SrcRange4Key, u8>,
) -> Vec<(u32, Cidr4)> {
    m.iter()
        .filter_map(Result::ok)
        .map(|(k, _)| {
            let data = k.data();
            let range = Cidr4 {
                addr: std::net::Ipv4Addr::from(u32::from_be(data.addr_be)),
                prefix: k.prefix_len().saturating_sub(SRC_RANGE_ID_BITS) as u8,
            };
            (u32::from_be(data.rev_nat_id_be), range)
        })
        .collect()
}

/// The ranges of `sources`, none when it is `None`.
fn cidrs(sources: Option<&SourceRanges>) -> &[Cidr4] {
    sources.map_or(&[], |s| s.cidrs.as_slice())
}

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOMEM)))
}

impl Dataplane {
    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        map: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DataplaneError> {
        self.open_mut(map)
    }

    pub(super) fn insert<K: aya::Pod, V: aya::Pod>(
        &mut self,
        map: &'static str,
        max: u32,
        key: K,
        value: V,
        what: impl FnOnce() -> String,
    ) -> Result<(), DataplaneError> {
        let mut m = self.hash::<K, V>(map)?;
        m.insert(&key, &value, 0).map_err(|source| {
            if is_full(&source) {
                DataplaneError::MapFull {
                    map,
                    max,
                    what: what(),
                }
            } else {
                map_error(map, "insert")(source)
            }
        })
    }

    /// Removes `key` from hash map `map`; a key that is not there is not an error.
    pub(super) fn remove<K: aya::Pod, V: aya::Pod>(
        &mut self,
        map: &'static str,
        key: &K,
    ) -> Result<(), DataplaneError> {
        let mut m = self.hash::<K, V>(map)?;
        match m.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(map_error(map, "remove")(source)),
        }
    }

    /// Writes each of `items` with `add`; on a failure, removes the ones written with `undo`
    /// and returns the error: all or none.
    fn add_all<T>(
        &mut self,
        items: &[T],
        add: impl Fn(&mut Self, &T) -> Result<(), DataplaneError>,
        undo: impl FnOnce(&mut Self, &[T]) -> Result<(), DataplaneError>,
    ) -> Result<(), DataplaneError> {
        for (i, item) in items.iter().enumerate() {
            if let Err(e) = add(self, item) {
                undo(self, &items[..i])?;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes `adding` under `rev_nat_id`, all or none.
    fn add_ranges(
        &mut self,
        frontend: Frontend,
        rev_nat_id: u32,
        adding: &[Cidr4],
    ) -> Result<(), DataplaneError> {
        let add = |dp: &mut Self, range: &Cidr4| {
            let mut m =
                dp.open_mut::<LpmTrie<&mut MapData, SrcRange4Key, u8>>(LB4_SRC_RANGES_MAP)?;
            m.insert(&range_key(rev_nat_id, *range), &1, 0)
                .map_err(|source| {
                    if is_full(&source) {
                        DataplaneError::MapFull {
                            map: LB4_SRC_RANGES_MAP,
                            max: LB4_SRC_RANGES_DEFAULT_MAX,
                            what: format!("source range {range} of {frontend}"),
                        }
                    } else {
                        map_error(LB4_SRC_RANGES_MAP, "insert")(source)
                    }
                })
        };
        self.add_all(adding, add, |dp, done| dp.remove_ranges(rev_nat_id, done))
    }

    /// Writes `keys` into `LB4_AFFINITY_MATCH`, all or none.
    fn add_matches(
        &mut self,
        frontend: Frontend,
        keys: &[AffinityMatchKey],
    ) -> Result<(), DataplaneError> {
        let add = |dp: &mut Self, k: &AffinityMatchKey| {
            let max = dp.config.services_max;
            dp.insert(LB4_AFFINITY_MATCH_MAP, max, *k, 1u8, || {
                format!("session affinity of {frontend}")
            })
        };
        self.add_all(keys, add, Self::remove_matches)
    }

    fn remove_matches(&mut self, keys: &[AffinityMatchKey]) -> Result<(), DataplaneError> {
        for k in keys {
            self.remove::<AffinityMatchKey, u8>(LB4_AFFINITY_MATCH_MAP, k)?;
        }
        Ok(())
    }

    /// Removes `ranges` from under `rev_nat_id`; one that is not there is not an error.
    fn remove_ranges(&mut self, rev_nat_id: u32, ranges: &[Cidr4]) -> Result<(), DataplaneError> {
        if ranges.is_empty() {
            return Ok(());
        }
        let mut m = self.open_mut::<LpmTrie<&mut MapData, SrcRange4Key, u8>>(LB4_SRC_RANGES_MAP)?;
        for range in ranges {
            match m.remove(&range_key(rev_nat_id, *range)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(s))
                    if s.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(LB4_SRC_RANGES_MAP, "remove")(e)),
            }
        }
        Ok(())
    }

    /// Makes `frontend` send new flows to `backends` (duplicates ignored), chosen uniformly at
    /// random, from every origin; an empty list makes it reject new connections. Flows already
    /// established keep their backend (conntrack pins them).
    pub fn upsert_service(
        &mut self,
        frontend: Frontend,
        backends: &[Backend],
    ) -> Result<(), DataplaneError> {
        self.upsert_frontend(frontend, &Backends::all(backends.to_vec()))
    }

    /// Makes `frontend` send new flows to `backends.all`, and traffic from outside to
    /// `backends.external` when that is set (externalTrafficPolicy Local).
    ///
    /// Each list is written where it lives (slots 1.. and LOCAL_SLOT_BASE+1..), new slots
    /// first, then the slots the old entry has, then the frontend entry (slot 0) with the new
    /// counts; slots past the new counts go last. So the programs only ever read, in each
    /// list, either an old or a new backend of that very list: the local list never holds an
    /// endpoint of another node, not even for a moment.
    pub fn upsert_frontend(
        &mut self,
        frontend: Frontend,
        backends: &Backends,
    ) -> Result<(), DataplaneError> {
        let dedup = |list: &[Backend]| {
            let mut out: Vec<Backend> = Vec::with_capacity(list.len());
            for b in list {
                if !out.iter().any(|o| o.addr == b.addr && o.port == b.port) {
                    out.push(*b);
                }
            }
            out
        };
        let all = dedup(&backends.all);
        let external = backends.external.as_deref().map(dedup);
        let max_slots = usize::from(LOCAL_SLOT_BASE) - 1;
        let longest = all.len().max(external.as_ref().map_or(0, Vec::len));
        if longest > max_slots {
            return Err(DataplaneError::MapFull {
                map: LB4_SERVICES_MAP,
                max: max_slots as u32,
                what: format!(
                    "{frontend} with {longest} backends (at most {max_slots} per frontend)"
                ),
            });
        }
        let fe = frontend.id();
        let old = self.ids.frontends.get(&fe).cloned();

        // 0. The address, before the frontend can be seen: the programs look at nothing of a
        //    packet to an address they do not know.
        if old.is_none() {
            let n = self.ids.frontends_on(fe.addr) + 1;
            self.write_fe_addr(fe.addr, n, Some(fe.port))?;
        }

        // 1. Backends (new ones get an id; every one is (re)written, which is idempotent).
        let mut taken = Vec::new();
        let all_ids = match self.acquire(frontend, &all, &mut taken) {
            Ok(ids) => ids,
            Err(e) => {
                self.release(&taken)?;
                return Err(e);
            }
        };
        let ext_ids = match &external {
            None => None,
            Some(list) => match self.acquire(frontend, list, &mut taken) {
                Ok(ids) => Some(ids),
                Err(e) => {
                    self.release(&taken)?;
                    return Err(e);
                }
            },
        };

        // 2. The reverse-NAT entry (what replies must show).
        let rev_nat_id = match &old {
            Some(o) => o.rev_nat_id,
            None => {
                let max = self.config.revnat_max;
                let used = &self.ids.used_rev_nat;
                let Some(id) = alloc(&mut self.ids.next_rev_nat, max, |i| used.contains(&i)) else {
                    self.release(&taken)?;
                    return Err(DataplaneError::IdsExhausted {
                        what: "reverse-NAT",
                        max,
                    });
                };
                id
            }
        };
        let rn = Lb4RevNat {
            addr_be: u32::from(frontend.addr).to_be(),
            port_be: frontend.port.to_be(),
            _pad: 0,
        };
        if let Err(e) = self.insert(
            LB4_REVNAT_MAP,
            self.config.revnat_max,
            rev_nat_id,
            rn,
            || format!("reverse NAT of {frontend}"),
        ) {
            self.release(&taken)?;
            return Err(e);
        }
        self.ids.used_rev_nat.insert(rev_nat_id);

        // 3. Source ranges the frontend gains (those it loses go once the frontend entry no
        //    longer names them, in 5.), backend slots, then 4. the frontend entry: only now
        //    can new flows use them.
        // As the map keys them: networks, once each.
        let new_sources = backends.sources.clone().map(|mut s| {
            s.cidrs = s.cidrs.iter().map(|c| c.network()).collect();
            s.cidrs.sort();
            s.cidrs.dedup();
            s
        });
        let old_ranges = cidrs(old.as_ref().and_then(|o| o.sources.as_ref()));
        let new_ranges = cidrs(new_sources.as_ref());
        let minus = |a: &[Cidr4], b: &[Cidr4]| -> Vec<Cidr4> {
            a.iter().filter(|c| !b.contains(c)).copied().collect()
        };
        let (gained, lost) = (minus(new_ranges, old_ranges), minus(old_ranges, new_ranges));
        if let Err(e) = self.add_ranges(frontend, rev_nat_id, &gained) {
            if old.is_none() {
                self.remove::<u32, Lb4RevNat>(LB4_REVNAT_MAP, &rev_nat_id)?;
                self.ids.used_rev_nat.remove(&rev_nat_id);
            }
            self.release(&taken)?;
            return Err(e);
        }
        let new_state = FeState {
            kind: frontend.kind,
            rev_nat_id,
            all: all_ids.clone(),
            external: ext_ids.clone(),
            sources: new_sources.clone(),
            affinity_timeout_s: backends.affinity_timeout_s,
            no_local_endpoints: backends.no_local_endpoints && all_ids.is_empty(),
            maglev: backends.maglev,
        };
        let old_matches = old.as_ref().map(FeState::affinity_keys).unwrap_or_default();
        let new_matches = new_state.affinity_keys();
        let gained_matches: Vec<AffinityMatchKey> =
            new_matches.difference(&old_matches).copied().collect();
        let lost_matches: Vec<AffinityMatchKey> =
            old_matches.difference(&new_matches).copied().collect();
        if let Err(e) = self.add_matches(frontend, &gained_matches) {
            self.remove_ranges(rev_nat_id, &gained)?;
            if old.is_none() {
                self.remove::<u32, Lb4RevNat>(LB4_REVNAT_MAP, &rev_nat_id)?;
                self.ids.used_rev_nat.remove(&rev_nat_id);
            }
            self.release(&taken)?;
            return Err(e);
        }
        let old_all = old.as_ref().map_or(&[][..], |o| o.all.as_slice());
        let old_ext = old
            .as_ref()
            .and_then(|o| o.external.as_deref())
            .unwrap_or(&[]);
        let empty = Vec::new();
        let new_ext = ext_ids.as_ref().unwrap_or(&empty);
        let mut result = self.write_slots(frontend, 0, &all_ids, old_all.len());
        if result.is_ok() {
            result = self.write_slots(frontend, LOCAL_SLOT_BASE, new_ext, old_ext.len());
        }
        // The Maglev table, before the frontend entry that names it: written whole, so new
        // flows see the old table or the new one.
        let new_table = backends.maglev && !all_ids.is_empty();
        if result.is_ok() && new_table {
            let addrs: Vec<(std::net::Ipv4Addr, u16)> =
                all.iter().map(|b| (b.addr, b.port)).collect();
            result = self.write_maglev(frontend, rev_nat_id, &addrs, &all_ids);
        }
        if result.is_ok() {
            let entry = Lb4Service {
                backend_id: backends.affinity_timeout_s.unwrap_or(0),
                count: all_ids.len() as u16,
                flags: kind_flags(frontend.kind)
                    | if ext_ids.is_some() {
                        SVC_FLAG_EXT_LOCAL
                    } else {
                        0
                    }
                    | match &backends.sources {
                        None => 0,
                        Some(s) if s.from_node => SVC_FLAG_SRC_RANGES | SVC_FLAG_SRC_RANGES_NODE,
                        Some(_) => SVC_FLAG_SRC_RANGES,
                    }
                    | if backends.affinity_timeout_s.is_some() {
                        SVC_FLAG_AFFINITY
                    } else {
                        0
                    }
                    | if backends.no_local_endpoints && all_ids.is_empty() {
                        SVC_FLAG_NO_LOCAL_DROP
                    } else {
                        0
                    }
                    | if backends.maglev { SVC_FLAG_MAGLEV } else { 0 },
                rev_nat_id,
                local_count: new_ext.len() as u16,
                _pad: 0,
            };
            result = self.insert(
                LB4_SERVICES_MAP,
                self.config.services_max,
                key(fe, 0),
                entry,
                || format!("frontend {frontend}"),
            );
        }
        if let Err(e) = result {
            // The old frontend entry (if any) still points only at slots it had, whose
            // contents may have changed: put them back, remove the slots past its counts,
            // undo our references, report.
            for (base, list, new_len) in [
                (0, old_all, all_ids.len()),
                (LOCAL_SLOT_BASE, old_ext, new_ext.len()),
            ] {
                let max = self.config.services_max;
                for (k, id) in slots(fe, base, list.len()).zip(list) {
                    let slot = Lb4Service {
                        backend_id: *id,
                        ..Default::default()
                    };
                    let _ = self.insert(LB4_SERVICES_MAP, max, k, slot, String::new);
                }
                for k in slots(fe, base, new_len).skip(list.len()) {
                    self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &k)?;
                }
            }
            self.remove_ranges(rev_nat_id, &gained)?;
            self.remove_matches(&gained_matches)?;
            // The table written for the new list, if it was: the old entry's table back (its
            // backends are still referenced), or none.
            if new_table {
                let old_table = old.as_ref().filter(|o| o.maglev && !o.all.is_empty());
                match old_table {
                    Some(o) => {
                        let addrs: Vec<(std::net::Ipv4Addr, u16)> = o
                            .all
                            .iter()
                            .filter_map(|id| self.ids.backend_by_id.get(id))
                            .map(|((a, p, _), _)| (*a, *p))
                            .collect();
                        let ids = o.all.clone();
                        if addrs.len() == ids.len() {
                            let _ = self.write_maglev(frontend, rev_nat_id, &addrs, &ids);
                        }
                    }
                    None => self.remove::<u32, MaglevTable>(LB4_MAGLEV_MAP, &rev_nat_id)?,
                }
            }
            if old.is_none() {
                self.remove::<u32, Lb4RevNat>(LB4_REVNAT_MAP, &rev_nat_id)?;
                self.ids.used_rev_nat.remove(&rev_nat_id);
            }
            self.release(&taken)?;
            return Err(e);
        }

        // 5. The ranges the frontend lost and the slots past the new counts are unreachable
        //    now: remove them, then release the old backends' references (removing backends
        //    nobody uses any more).
        self.remove_ranges(rev_nat_id, &lost)?;
        self.remove_matches(&lost_matches)?;
        if !new_table && old.as_ref().is_some_and(|o| o.maglev) {
            self.remove::<u32, MaglevTable>(LB4_MAGLEV_MAP, &rev_nat_id)?;
        }
        if let Some(o) = &old {
            for k in slots(fe, 0, o.all.len()).skip(all_ids.len()) {
                self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &k)?;
            }
            for k in slots(fe, LOCAL_SLOT_BASE, old_ext.len()).skip(new_ext.len()) {
                self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &k)?;
            }
            let old_ids: Vec<u32> = o.ids().copied().collect();
            self.release(&old_ids)?;
        }
        self.ids.frontends.insert(fe, new_state);
        // 6. A new ClusterIP's address is marked once its frontend can be found, so that its
        //    other ports are refused (never its own).
        if frontend.kind == FrontendKind::ClusterIp && old.is_none() {
            let n = self.ids.frontends_on(fe.addr);
            self.write_fe_addr(fe.addr, n, None)?;
        }
        Ok(())
    }

    /// Ids for `list`'s backends (one new reference each, pushed to `taken`), their entries
    /// (re)written.
    fn acquire(
        &mut self,
        frontend: Frontend,
        list: &[Backend],
        taken: &mut Vec<u32>,
    ) -> Result<Vec<u32>, DataplaneError> {
        let mut ids = Vec::with_capacity(list.len());
        for b in list {
            let bid = (b.addr, b.port, frontend.proto);
            let id = match self.ids.backends.get_mut(&bid) {
                Some((id, refs)) => {
                    *refs += 1;
                    *id
                }
                None => {
                    let max = self.config.backends_max;
                    let by_id = &self.ids.backend_by_id;
                    let Some(id) =
                        alloc(&mut self.ids.next_backend, max, |i| by_id.contains_key(&i))
                    else {
                        return Err(DataplaneError::IdsExhausted {
                            what: "backend",
                            max,
                        });
                    };
                    self.ids.backends.insert(bid, (id, 1));
                    id
                }
            };
            self.ids.backend_by_id.insert(id, (bid, b.local));
            taken.push(id);
            let value = Lb4Backend {
                addr_be: u32::from(b.addr).to_be(),
                port_be: b.port.to_be(),
                proto: frontend.proto.number(),
                flags: if b.local { BACKEND_FLAG_LOCAL } else { 0 },
            };
            let max = self.config.backends_max;
            self.insert(LB4_BACKENDS_MAP, max, id, value, || {
                format!("backend {}:{} of {frontend}", b.addr, b.port)
            })?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Writes a list of backend ids into the slots after `base`: the slots past `old_len` (new
    /// ones, the only inserts that can fail on a full map) first, then the ones the old entry
    /// has, so a failure leaves the old entry's slots as they were.
    fn write_slots(
        &mut self,
        frontend: Frontend,
        base: u16,
        ids: &[u32],
        old_len: usize,
    ) -> Result<(), DataplaneError> {
        let max = self.config.services_max;
        let keep = old_len.min(ids.len());
        for i in (keep..ids.len()).chain(0..keep) {
            let slot = Lb4Service {
                backend_id: ids[i],
                ..Default::default()
            };
            let n = base + i as u16 + 1;
            self.insert(LB4_SERVICES_MAP, max, key(frontend.id(), n), slot, || {
                format!("backend slot {n} of {frontend}")
            })?;
        }
        Ok(())
    }

    /// Writes the Maglev table of `frontend`'s backends `addrs` (with their ids `ids`, in the
    /// same order) under `rev_nat_id`.
    fn write_maglev(
        &mut self,
        frontend: Frontend,
        rev_nat_id: u32,
        addrs: &[(std::net::Ipv4Addr, u16)],
        ids: &[u32],
    ) -> Result<(), DataplaneError> {
        let seed = self.config.maglev_seed;
        let mut t = Box::new(MaglevTable {
            seed,
            ids: [0; MAGLEV_M],
        });
        for (slot, i) in t
            .ids
            .iter_mut()
            .zip(super::maglev::table(addrs, seed, MAGLEV_M))
        {
            *slot = ids[i];
        }
        self.insert(LB4_MAGLEV_MAP, LB4_MAGLEV_MAX, rev_nat_id, *t, || {
            format!("Maglev table of {frontend}")
        })
    }

    /// Removes `frontend`: new connections to it are no longer translated. Established flows
    /// keep working until their conntrack entries expire.
    pub fn remove_service(&mut self, frontend: Frontend) -> Result<(), DataplaneError> {
        let Some(old) = self.ids.frontends.get(&frontend.id()).cloned() else {
            return Ok(());
        };
        // The id tables forget the frontend only once the maps have: a failure part-way is
        // retried from the start (removing what is already gone is not an error).
        let fe = frontend.id();
        self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &key(fe, 0))?;
        let ext_len = old.external.as_ref().map_or(0, Vec::len);
        for k in slots(fe, 0, old.all.len()).chain(slots(fe, LOCAL_SLOT_BASE, ext_len)) {
            self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &k)?;
        }
        self.remove_ranges(old.rev_nat_id, cidrs(old.sources.as_ref()))?;
        self.remove_matches(&old.affinity_keys().into_iter().collect::<Vec<_>>())?;
        if old.maglev {
            self.remove::<u32, MaglevTable>(LB4_MAGLEV_MAP, &old.rev_nat_id)?;
        }
        self.remove::<u32, Lb4RevNat>(LB4_REVNAT_MAP, &old.rev_nat_id)?;
        self.ids.frontends.remove(&frontend.id());
        // The port stays in its address's filter while flows to it live (`retire_fe_addrs`
        // trims it): remembered at once, as the id tables forget the frontend, so that no
        // failure below (which the retry does not see again) can lose it.
        self.keep_flow_port(fe.addr, fe.port);
        self.ids.used_rev_nat.remove(&old.rev_nat_id);
        let old_ids: Vec<u32> = old.ids().copied().collect();
        self.release(&old_ids)?;
        // The address stays (retired at 0 when this was its last frontend) while flows to it
        // live: `retire_fe_addrs` removes it.
        let n = self.ids.frontends_on(fe.addr);
        self.write_fe_addr(fe.addr, n, None)
    }

    /// Drops one reference to each backend id; a backend nobody references is removed.
    fn release(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        for id in ids {
            let Some((bid, _)) = self.ids.backend_by_id.get(id).copied() else {
                continue;
            };
            let gone = match self.ids.backends.get_mut(&bid) {
                Some((_, refs)) => {
                    *refs -= 1;
                    *refs == 0
                }
                None => false,
            };
            if gone {
                self.ids.backends.remove(&bid);
                self.ids.backend_by_id.remove(id);
                self.remove::<u32, Lb4Backend>(LB4_BACKENDS_MAP, id)?;
            }
        }
        Ok(())
    }

    /// Every frontend and its backends, as the id tables hold them (which equal the maps).
    pub fn services(&self) -> Vec<(Frontend, Backends)> {
        self.ids.services()
    }

    /// Rebuilds the id tables from the maps (pinned maps adopted from an earlier process).
    pub(super) fn recover_ids(&mut self) -> Result<Ids, DataplaneError> {
        let backends: Vec<(u32, Lb4Backend)> = {
            let m = self.hash::<u32, Lb4Backend>(LB4_BACKENDS_MAP)?;
            m.iter().filter_map(Result::ok).collect()
        };
        let entries: Vec<(Lb4Key, Lb4Service)> = {
            let m = self.hash::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP)?;
            m.iter().filter_map(Result::ok).collect()
        };
        let ranges =
            read_ranges(&self.open::<LpmTrie<&MapData, SrcRange4Key, u8>>(LB4_SRC_RANGES_MAP)?);
        // Ranges no frontend names (an agent stopped between removing a frontend and its
        // ranges) go, so that no later frontend given the id inherits them.
        let ids = Ids::from_entries(backends, &entries, ranges.iter().copied());
        let mut orphans: BTreeMap<u32, Vec<Cidr4>> = BTreeMap::new();
        for (id, range) in ranges {
            let named = ids.frontends.values().any(|st| {
                st.rev_nat_id == id
                    && st
                        .sources
                        .as_ref()
                        .is_some_and(|s| s.cidrs.contains(&range))
            });
            if !named {
                orphans.entry(id).or_default().push(range);
            }
        }
        for (id, list) in orphans {
            self.remove_ranges(id, &list)?;
        }
        // Likewise the affinity backends no frontend names.
        let named: std::collections::BTreeSet<AffinityMatchKey> = ids
            .frontends
            .values()
            .flat_map(FeState::affinity_keys)
            .collect();
        let matches: Vec<AffinityMatchKey> = {
            let m = self.hash::<AffinityMatchKey, u8>(LB4_AFFINITY_MATCH_MAP)?;
            m.keys().filter_map(Result::ok).collect()
        };
        let unnamed: Vec<AffinityMatchKey> =
            matches.into_iter().filter(|k| !named.contains(k)).collect();
        self.remove_matches(&unnamed)?;
        // And the Maglev tables no Maglev frontend names (64 KiB each).
        let tables: Vec<u32> = {
            let m = self.hash::<u32, MaglevTable>(LB4_MAGLEV_MAP)?;
            m.keys().filter_map(Result::ok).collect()
        };
        for id in tables {
            if !ids
                .frontends
                .values()
                .any(|st| st.maglev && st.rev_nat_id == id)
            {
                self.remove::<u32, MaglevTable>(LB4_MAGLEV_MAP, &id)?;
            }
        }
        Ok(ids)
    }
}

impl Ids {
    /// The frontends on `addr`, with their ids.
    fn on_ids(&self, addr: std::net::Ipv4Addr) -> impl Iterator<Item = (&FrontendId, &FeState)> {
        let first = FrontendId {
            addr,
            port: 0,
            proto: Protocol::Tcp,
        };
        self.frontends
            .range(first..)
            .take_while(move |(fe, _)| fe.addr == addr)
    }

    /// The frontends on `addr`.
    fn on(&self, addr: std::net::Ipv4Addr) -> impl Iterator<Item = &FeState> {
        self.on_ids(addr).map(|(_, s)| s)
    }

    /// The ports of the frontends on `addr` (host order).
    pub(super) fn ports_on(&self, addr: std::net::Ipv4Addr) -> impl Iterator<Item = u16> + '_ {
        self.on_ids(addr).map(|(fe, _)| fe.port)
    }

    /// How many frontends are on `addr`.
    pub(super) fn frontends_on(&self, addr: std::net::Ipv4Addr) -> u32 {
        self.on(addr).count() as u32
    }

    /// Whether a ClusterIP frontend is on `addr`.
    pub(super) fn cluster_ip_on(&self, addr: std::net::Ipv4Addr) -> bool {
        self.on(addr).any(|s| s.kind == FrontendKind::ClusterIp)
    }

    /// Every address some frontend is on.
    pub(super) fn frontend_addrs(&self) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
        self.frontends.keys().map(|fe| fe.addr).collect()
    }

    /// The id tables that the entries of the backends and services maps describe.
    pub(super) fn from_entries(
        backends: Vec<(u32, Lb4Backend)>,
        entries: &[(Lb4Key, Lb4Service)],
        ranges: impl IntoIterator<Item = (u32, Cidr4)>,
    ) -> Self {
        let mut by_id: BTreeMap<u32, Vec<Cidr4>> = BTreeMap::new();
        for (id, range) in ranges {
            by_id.entry(id).or_default().push(range);
        }
        let mut ids = Ids::default();
        for (id, b) in backends {
            let Some(proto) = Protocol::from_number(b.proto) else {
                continue;
            };
            let bid = (
                std::net::Ipv4Addr::from(u32::from_be(b.addr_be)),
                u16::from_be(b.port_be),
                proto,
            );
            ids.backends.insert(bid, (id, 0));
            ids.backend_by_id
                .insert(id, (bid, b.flags & BACKEND_FLAG_LOCAL != 0));
            ids.next_backend = ids.next_backend.max(id);
        }
        let mut slots: BTreeMap<(FrontendId, u16), u32> = BTreeMap::new();
        for (k, v) in entries {
            let Some(proto) = Protocol::from_number(k.proto) else {
                continue;
            };
            let fe = FrontendId {
                addr: std::net::Ipv4Addr::from(u32::from_be(k.addr_be)),
                port: u16::from_be(k.port_be),
                proto,
            };
            if k.slot == 0 {
                let ext_local = v.flags & SVC_FLAG_EXT_LOCAL != 0;
                ids.frontends.insert(
                    fe,
                    FeState {
                        kind: kind_from_flags(v.flags),
                        rev_nat_id: v.rev_nat_id,
                        all: vec![0; usize::from(v.count)],
                        external: ext_local.then(|| vec![0; usize::from(v.local_count)]),
                        affinity_timeout_s: (v.flags & SVC_FLAG_AFFINITY != 0)
                            .then_some(v.backend_id),
                        no_local_endpoints: v.flags & SVC_FLAG_NO_LOCAL_DROP != 0,
                        maglev: v.flags & SVC_FLAG_MAGLEV != 0,
                        sources: (v.flags & SVC_FLAG_SRC_RANGES != 0).then(|| {
                            let mut cidrs = by_id.remove(&v.rev_nat_id).unwrap_or_default();
                            cidrs.sort();
                            SourceRanges {
                                cidrs,
                                from_node: v.flags & SVC_FLAG_SRC_RANGES_NODE != 0,
                            }
                        }),
                    },
                );
                ids.used_rev_nat.insert(v.rev_nat_id);
                ids.next_rev_nat = ids.next_rev_nat.max(v.rev_nat_id);
            } else {
                slots.insert((fe, k.slot), v.backend_id);
            }
        }
        for ((fe, slot), id) in slots {
            let Some(st) = ids.frontends.get_mut(&fe) else {
                continue;
            };
            let place = if slot > LOCAL_SLOT_BASE {
                st.external
                    .as_mut()
                    .and_then(|e| e.get_mut(usize::from(slot - LOCAL_SLOT_BASE) - 1))
            } else {
                st.all.get_mut(usize::from(slot) - 1)
            };
            if let Some(s) = place {
                *s = id;
                if let Some((bid, _)) = ids.backend_by_id.get(&id)
                    && let Some((_, refs)) = ids.backends.get_mut(bid)
                {
                    *refs += 1;
                }
            }
        }
        ids
    }

    /// Every frontend and its backends, as the id tables hold them (which equal the maps).
    pub(super) fn services(&self) -> Vec<(Frontend, Backends)> {
        self.frontends
            .iter()
            .map(|(id, st)| {
                let fe = Frontend {
                    addr: id.addr,
                    port: id.port,
                    proto: id.proto,
                    kind: st.kind,
                };
                let list = |ids: &[u32]| -> Vec<Backend> {
                    ids.iter()
                        .filter_map(|id| self.backend_by_id.get(id))
                        .map(|((a, p, _), local)| Backend {
                            addr: *a,
                            port: *p,
                            local: *local,
                        })
                        .collect()
                };
                let bes = Backends {
                    all: list(&st.all),
                    external: st.external.as_deref().map(list),
                    sources: st.sources.clone(),
                    affinity_timeout_s: st.affinity_timeout_s,
                    no_local_endpoints: st.no_local_endpoints,
                    maglev: st.maglev,
                };
                (fe, bes)
            })
            .collect()
    }
}

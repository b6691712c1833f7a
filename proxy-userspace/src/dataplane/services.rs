//! Writing Services into the maps, in the order that never shows the kernel a half-built one:
//! backends, then the reverse-NAT entry, then backend slots, then the frontend entry (slot 0)
//! last; removal in the reverse order. Ids are stable: a backend keeps its id while any
//! frontend uses it, a frontend keeps its reverse-NAT id while it exists, and both are
//! recovered from the (pinned) maps when a new process loads them.
use std::collections::{BTreeMap, HashMap as StdHashMap};

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{
    BACKEND_FLAG_LOCAL, LB4_BACKENDS_MAP, LB4_REVNAT_MAP, LB4_SERVICES_MAP, Lb4Backend, Lb4Key,
    Lb4RevNat, Lb4Service, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXT_LOCAL, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT,
};

use super::{Dataplane, DataplaneError, map_error};
use crate::service::{Backend, Backends, Frontend, FrontendId, FrontendKind, Protocol};

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
    Lb4Key {
        addr_be: u32::from(fe.addr).to_be(),
        port_be: fe.port.to_be(),
        slot,
        proto: fe.proto.number(),
        _pad: [0; 3],
    }
}

type BeId = (std::net::Ipv4Addr, u16, Protocol);

#[derive(Clone, Debug)]
struct FeState {
    kind: FrontendKind,
    rev_nat_id: u32,
    /// Every slot's backend id, in slot order: first the `count` slots for every origin, then
    /// (with `ext_local`) the slots for traffic from outside.
    backend_ids: Vec<u32>,
    count: usize,
    ext_local: bool,
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

    fn insert<K: aya::Pod, V: aya::Pod>(
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

    fn remove<K: aya::Pod, V: aya::Pod>(
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
        let mut wanted = dedup(&backends.all);
        let count = wanted.len();
        let ext_local = backends.external.is_some();
        if let Some(ext) = &backends.external {
            wanted.extend(dedup(ext));
        }
        let max_slots = usize::from(u16::MAX);
        if wanted.len() > max_slots {
            return Err(DataplaneError::MapFull {
                map: LB4_SERVICES_MAP,
                max: u32::from(u16::MAX),
                what: format!(
                    "{frontend} with {} backend slots (at most {max_slots} per frontend)",
                    wanted.len()
                ),
            });
        }
        let old = self.ids.frontends.get(&frontend.id()).cloned();

        // 1. Backends (new ones get an id; every one is (re)written, which is idempotent).
        let mut ids = Vec::with_capacity(wanted.len());
        let mut taken = Vec::new();
        for b in &wanted {
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
                        self.release(&taken)?;
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
            if let Err(e) = self.insert(LB4_BACKENDS_MAP, max, id, value, || {
                format!("backend {}:{} of {frontend}", b.addr, b.port)
            }) {
                self.release(&taken)?;
                return Err(e);
            }
            ids.push(id);
        }

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

        // 3. Backend slots, then 4. the frontend entry: only now can new flows use them.
        let max = self.config.services_max;
        let mut result = Ok(());
        // New slot keys first (the only inserts that can fail on a full map), then the slots
        // the old entry already has: a failure leaves the old frontend's slots untouched.
        let keep = old.as_ref().map_or(0, |o| o.backend_ids.len());
        let order = (keep.min(ids.len())..ids.len()).chain(0..keep.min(ids.len()));
        for i in order {
            let id = &ids[i];
            let slot = Lb4Service {
                backend_id: *id,
                ..Default::default()
            };
            result = self.insert(
                LB4_SERVICES_MAP,
                max,
                key(frontend.id(), i as u16 + 1),
                slot,
                || format!("backend slot {} of {frontend}", i + 1),
            );
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            let fe = Lb4Service {
                backend_id: 0,
                count: count as u16,
                flags: kind_flags(frontend.kind) | if ext_local { SVC_FLAG_EXT_LOCAL } else { 0 },
                rev_nat_id,
                local_count: (ids.len() - count) as u16,
                _pad: 0,
            };
            result = self.insert(LB4_SERVICES_MAP, max, key(frontend.id(), 0), fe, || {
                format!("frontend {frontend}")
            });
        }
        if let Err(e) = result {
            // The old frontend entry (if any) still points only at slots it had, whose
            // contents are unchanged unless the failure came after them; slots past its
            // count are unreachable. Restore the old slots, undo our references, report.
            if let Some(o) = &old {
                for (i, id) in o.backend_ids.iter().enumerate() {
                    let slot = Lb4Service {
                        backend_id: *id,
                        ..Default::default()
                    };
                    let _ = self.insert(
                        LB4_SERVICES_MAP,
                        max,
                        key(frontend.id(), i as u16 + 1),
                        slot,
                        String::new,
                    );
                }
            }
            for slot in keep + 1..=ids.len() {
                self.remove::<Lb4Key, Lb4Service>(
                    LB4_SERVICES_MAP,
                    &key(frontend.id(), slot as u16),
                )?;
            }
            if old.is_none() {
                self.remove::<u32, Lb4RevNat>(LB4_REVNAT_MAP, &rev_nat_id)?;
                self.ids.used_rev_nat.remove(&rev_nat_id);
            }
            self.release(&taken)?;
            return Err(e);
        }

        // 5. Slots past the new count are unreachable now: remove them, then release the old
        //    backends' references (removing backends nobody uses any more).
        if let Some(o) = &old {
            for slot in ids.len() + 1..=o.backend_ids.len() {
                self.remove::<Lb4Key, Lb4Service>(
                    LB4_SERVICES_MAP,
                    &key(frontend.id(), slot as u16),
                )?;
            }
            self.release(&o.backend_ids)?;
        }
        self.ids.frontends.insert(
            frontend.id(),
            FeState {
                kind: frontend.kind,
                rev_nat_id,
                backend_ids: ids,
                count,
                ext_local,
            },
        );
        Ok(())
    }

    /// Removes `frontend`: new connections to it are no longer translated. Established flows
    /// keep working until their conntrack entries expire.
    pub fn remove_service(&mut self, frontend: Frontend) -> Result<(), DataplaneError> {
        let Some(old) = self.ids.frontends.get(&frontend.id()).cloned() else {
            return Ok(());
        };
        // The id tables forget the frontend only once the maps have: a failure part-way is
        // retried from the start (removing what is already gone is not an error).
        self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &key(frontend.id(), 0))?;
        for slot in 1..=old.backend_ids.len() {
            self.remove::<Lb4Key, Lb4Service>(LB4_SERVICES_MAP, &key(frontend.id(), slot as u16))?;
        }
        self.remove::<u32, Lb4RevNat>(LB4_REVNAT_MAP, &old.rev_nat_id)?;
        self.ids.frontends.remove(&frontend.id());
        self.ids.used_rev_nat.remove(&old.rev_nat_id);
        self.release(&old.backend_ids)
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
        Ok(Ids::from_entries(backends, &entries))
    }
}

impl Ids {
    /// The id tables that the entries of the backends and services maps describe.
    pub(super) fn from_entries(
        backends: Vec<(u32, Lb4Backend)>,
        entries: &[(Lb4Key, Lb4Service)],
    ) -> Self {
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
                let local = if ext_local { v.local_count } else { 0 };
                ids.frontends.insert(
                    fe,
                    FeState {
                        kind: kind_from_flags(v.flags),
                        rev_nat_id: v.rev_nat_id,
                        backend_ids: vec![0; usize::from(v.count) + usize::from(local)],
                        count: usize::from(v.count),
                        ext_local,
                    },
                );
                ids.used_rev_nat.insert(v.rev_nat_id);
                ids.next_rev_nat = ids.next_rev_nat.max(v.rev_nat_id);
            } else {
                slots.insert((fe, k.slot), v.backend_id);
            }
        }
        for ((fe, slot), id) in slots {
            if let Some(st) = ids.frontends.get_mut(&fe)
                && let Some(s) = st.backend_ids.get_mut(usize::from(slot) - 1)
            {
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
                let (all, ext) = st.backend_ids.split_at(st.count.min(st.backend_ids.len()));
                let bes = Backends {
                    all: list(all),
                    external: st.ext_local.then(|| list(ext)),
                };
                (fe, bes)
            })
            .collect()
    }
}

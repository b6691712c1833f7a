//! Forgetting the UDP flows pinned to a backend that left its Service.
//!
//! Conntrack pins a flow to its backend and every client packet renews it, so a UDP client
//! with a fixed source port (a DNS forwarder, statsd) would keep sending to a dead pod, or to
//! whichever pod gets its address next. kube-proxy deletes the conntrack entries of a UDP
//! endpoint that goes away; so does the agent, here: the flow's next packet starts afresh, on
//! a live backend. TCP flows are left to end (the backend's RST ends them).
use std::{collections::HashSet, net::Ipv4Addr};

use aya::maps::{HashMap, MapData};
use proxy_common::{CT_KIND_REVERSE, CT_KIND_SERVICE, Ct4Entry, Ct4Key, IPPROTO_UDP};

use super::{CT_TABLES, Dataplane, DataplaneError, FrontendId, Protocol, socket::SocketTarget};

impl Dataplane {
    /// Removes the UDP flows (both entries) that a frontend of `targets` sent to its backend
    /// there; how many flows went.
    pub fn forget_udp_flows(
        &mut self,
        targets: &HashSet<SocketTarget>,
    ) -> Result<usize, DataplaneError> {
        let mut doomed: Vec<(Ct4Key, Ct4Key)> = Vec::new();
        // Both tables: a UDP flow that has had no reply and then a packet from its client is
        // still in `CT4_NEW` (a one-way flow, like statsd's, stays there).
        for table in CT_TABLES {
            let ct: HashMap<&MapData, Ct4Key, Ct4Entry> = self.open(table)?;
            let found = ct
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| {
                    k.kind == CT_KIND_SERVICE
                        && k.proto == IPPROTO_UDP
                        && targets.contains(&SocketTarget {
                            frontend: FrontendId {
                                addr: Ipv4Addr::from(u32::from_be(k.daddr_be)),
                                port: u16::from_be(k.dport_be),
                                proto: Protocol::Udp,
                            },
                            backend: (
                                Ipv4Addr::from(u32::from_be(v.addr_be)),
                                u16::from_be(v.port_be),
                            ),
                        })
                })
                .map(|(k, v)| {
                    // The reverse entry: from the client (or its SNAT address and port) to the
                    // backend.
                    let rev = Ct4Key {
                        saddr_be: if v.nat_addr_be != 0 {
                            v.nat_addr_be
                        } else {
                            k.saddr_be
                        },
                        daddr_be: v.addr_be,
                        sport_be: if v.nat_port_be != 0 {
                            v.nat_port_be
                        } else {
                            k.sport_be
                        },
                        dport_be: v.port_be,
                        proto: k.proto,
                        kind: CT_KIND_REVERSE,
                        _pad: [0; 2],
                    };
                    (k, rev)
                });
            doomed.extend(found);
        }
        let mut seen = HashSet::new();
        doomed.retain(|d| seen.insert(*d));
        for (service, reverse) in &doomed {
            // The service entry first: a packet in between starts a new flow (to a live
            // backend, so under another reverse key). From both tables: an entry is in one,
            // but the flow may have moved between the read and now.
            for table in CT_TABLES {
                self.remove::<Ct4Key, Ct4Entry>(table, service)?;
            }
            for table in CT_TABLES {
                self.remove::<Ct4Key, Ct4Entry>(table, reverse)?;
            }
        }
        Ok(doomed.len())
    }
}

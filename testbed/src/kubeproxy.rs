//! The rule sets kube-proxy itself writes, byte for byte where its source says so, for the
//! benchmark that sets sluice against kube-proxy's iptables mode and nftables mode.
//!
//! Generated per Service: what a ClusterIP Service needs and, for a port with a `nodePort`,
//! what a NodePort Service with `externalTrafficPolicy: Cluster` adds (the external chain that
//! marks every packet for masquerading, the NodePort dispatch and the no-endpoint reject). No
//! LoadBalancer or externalIP rules, no session affinity, no Local traffic policies. The fixed
//! scaffolding is all there as kube-proxy writes it: the jumps from the built-in chains,
//! KUBE-NODEPORTS and KUBE-FORWARD, the `service-nodeports` map, the no-endpoint and firewall
//! checks.
//!
//! Where the shapes come from (kubernetes/kubernetes):
//! - iptables: `pkg/proxy/iptables/proxier.go` (`syncProxyRules`, `writeServiceToEndpointRules`,
//!   `iptablesJumpChains`, `portProtoHash`, `servicePortEndpointChainName`,
//!   `serviceExternalChainName`), checked against the expected restore texts in
//!   `pkg/proxy/iptables/proxier_test.go` (`TestOverallIPTablesRules`).
//! - nftables: `pkg/proxy/nftables/proxier.go` (`setupNFTables`, `syncProxyRules`,
//!   `hashAndTruncate`, `nftElementStorage`) and the exact rules expected by
//!   `TestOverallNFTablesRules`/`TestSyncProxyRulesRepeated` in `proxier_test.go` (the version
//!   with the `filter-*-pre-dnat` base chains); the text is what knftables writes for `nft -f`.
//!
//! Settings are kube-proxy's defaults: masquerade bit 14, `--random-fully` supported, a
//! cluster-CIDR local-traffic detector, `localhostNodePorts` on (iptables), every address a
//! NodePort address in iptables mode and only the node's primary address in nftables mode.
//! Endpoints are ordered as kube-proxy orders them: by their `ip:port` string.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use sha2::{Digest, Sha256};

/// The masquerade mark as kube-proxy formats it: `fmt.Sprintf("%#08x", 1<<14)`. (Its unit tests
/// use "0x4000" because their fake proxier sets the field directly.)
pub const MASQUERADE_MARK: &str = "0x00004000";

/// Appends formatted text to a `String`; writing to a `String` cannot fail.
macro_rules! push_fmt {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = write!($out, $($arg)*);
    }};
}

/// Appends one formatted line to a `String`.
macro_rules! push_line {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `strings.ToLower(string(v1.Protocol))`, the spelling every rule and hash uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of a ClusterIP or NodePort Service with its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name; "" for an unnamed port.
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// The port's `nodePort` (a Service of type NodePort, `externalTrafficPolicy: Cluster`);
    /// `None` for a ClusterIP Service.
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// kube-proxy's `ServicePortName.String()`: "ns/name:port", or "ns/name" when unnamed.
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// Whether `other` is the same service port (its endpoints may differ).
    fn same_port(&self, other: &ServicePort) -> bool {
        self.namespace == other.namespace
            && self.name == other.name
            && self.port_name == other.port_name
            && self.protocol == other.protocol
    }

    /// The endpoints in kube-proxy's order (`byEndpoint`: by the `ip:port` string).
    fn sorted_endpoints(&self) -> Vec<Endpoint> {
        let mut eps: Vec<_> = self
            .endpoints
            .iter()
            .map(|e| {
                let ip = ipv4_string(*e.ip());
                let mut ip_port = String::with_capacity(21);
                ip_port.push_str(&ip);
                ip_port.push(':');
                push_decimal(&mut ip_port, e.port());
                Endpoint {
                    addr: *e,
                    ip,
                    ip_port,
                }
            })
            .collect();
        eps.sort_by(|a, b| a.ip_port.cmp(&b.ip_port));
        eps
    }
}

/// One endpoint with the strings its rules repeat, formatted once: a large rule set repeats
/// each of them several times.
struct Endpoint {
    addr: SocketAddrV4,
    ip: String,
    ip_port: String,
}

/// Appends every part: the hot paths build lines from strings formatted once.
fn push_all(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.push_str(part);
    }
}

/// What kube-proxy is told about the node and the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `--cluster-cidr`: the local-traffic detector; traffic from outside it is masqueraded.
    pub cluster_cidr: (Ipv4Addr, u8),
    /// The ServiceCIDR: nftables mode drops traffic to unallocated ClusterIPs in it.
    pub service_cidr: (Ipv4Addr, u8),
    /// The node's primary address: nftables mode's default `--nodeport-addresses=primary`.
    pub node_ip: Ipv4Addr,
}

/// Standard base32 (RFC 4648 section 6, Go's `base32.StdEncoding`), padded with '='.
#[cfg(test)]
fn base32(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    push_base32(&mut out, data);
    out
}

/// Appends standard base32 of `data` to `out`.
fn push_base32(out: &mut String, data: &[u8]) {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    for chunk in data.chunks(5) {
        let mut block = [0u8; 8];
        block[3..3 + chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes(block);
        let symbols = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < symbols {
                let index = (bits >> (35 - 5 * i)) & 31;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
}

/// Appends the first `chars` characters of base32(sha256(concatenation of `parts`)), the hash
/// every kube-proxy chain name carries. Only the 5-byte blocks those characters come from are
/// encoded: a large rule set needs 40 000 of these.
fn push_hash(out: &mut String, parts: &[&str], chars: usize) {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let start = out.len();
    push_base32(out, &digest[..chars.div_ceil(8) * 5]);
    out.truncate(start + chars);
}

/// Appends `n` in decimal. Addresses and ports are written with this rather than `fmt`, which
/// is slow per byte; a large rule set formats 60 000 of them.
fn push_decimal(out: &mut String, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).expect("decimal digits are ASCII"));
}

/// `n.to_string()`, faster.
fn decimal(n: u16) -> String {
    let mut out = String::with_capacity(5);
    push_decimal(&mut out, n);
    out
}

/// `ip.to_string()`, faster.
fn ipv4_string(ip: Ipv4Addr) -> String {
    let mut out = String::with_capacity(15);
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_decimal(&mut out, octet.into());
    }
    out
}

/// kube-proxy's iptables mode.
pub mod iptables {
    use super::*;

    /// The flags kube-proxy passes to `iptables-restore` for every sync (besides its `-w`
    /// lock-wait flags): rules of other owners stay, counters of rewritten chains are kept.
    pub const RESTORE_FLAGS: [&str; 2] = ["--noflush", "--counters"];

    /// Above this many endpoints (all services together) kube-proxy is in "large cluster
    /// mode": the per-endpoint rules lose their comments.
    pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

    /// `KUBE-SVC-` + base32(sha256("ns/name:port" + protocol))[:16].
    pub fn service_chain(sp: &ServicePort) -> String {
        svc_chain(&sp.port_name_string(), sp.protocol)
    }

    /// `KUBE-SEP-` + base32(sha256("ns/name:port" + protocol + "ip:port"))[:16].
    pub fn endpoint_chain(sp: &ServicePort, ep: SocketAddrV4) -> String {
        sep_chain(&sp.port_name_string(), sp.protocol, &ep.to_string())
    }

    /// `KUBE-EXT-` + the KUBE-SVC chain's hash (`serviceExternalChainName`, `portProtoHash`):
    /// the chain NodePort traffic jumps to.
    pub fn external_chain(sp: &ServicePort) -> String {
        ext_chain(&svc_chain(&sp.port_name_string(), sp.protocol))
    }

    fn svc_chain(name: &str, protocol: Protocol) -> String {
        let mut chain = String::with_capacity(25);
        chain.push_str("KUBE-SVC-");
        push_hash(&mut chain, &[name, protocol.as_str()], 16);
        chain
    }

    /// The KUBE-EXT chain of the service whose KUBE-SVC chain is `svc` (the same hash).
    fn ext_chain(svc: &str) -> String {
        let hash = svc
            .strip_prefix("KUBE-SVC-")
            .expect("a KUBE-SVC chain name");
        let mut chain = String::with_capacity(25);
        chain.push_str("KUBE-EXT-");
        chain.push_str(hash);
        chain
    }

    fn sep_chain(name: &str, protocol: Protocol, endpoint: &str) -> String {
        let mut chain = String::with_capacity(25);
        chain.push_str("KUBE-SEP-");
        push_hash(&mut chain, &[name, protocol.as_str(), endpoint], 16);
        chain
    }

    /// `fmt.Sprintf("%0.10f", 1.0/float64(n))`: the probability of the rule that picks the
    /// first of `n` remaining endpoints.
    pub fn probability(n: usize) -> String {
        format!("{:.10}", 1.0 / n as f64)
    }

    /// kube-proxy precomputes the 1/n strings because formatting floats is slow; so do we.
    #[derive(Default)]
    struct Probabilities(Vec<String>);

    impl Probabilities {
        fn get(&mut self, n: usize) -> &str {
            while self.0.len() <= n {
                let k = self.0.len();
                self.0.push(probability(k));
            }
            &self.0[n]
        }
    }

    /// What kube-proxy installs once, outside the restore: the canary chains of its monitor
    /// (mangle, nat, filter) and, for every entry of `iptablesJumpChains` and
    /// `iptablesKubeletJumpChains` in order, the target chain and a jump prepended to the
    /// built-in chain. kube-proxy does this with `iptables -N`/`-C`/`-I` calls; this is the
    /// same result as one text for `iptables-restore --noflush`. Its chain lines flush those
    /// chains, so load it once, into a fresh namespace, before [`full_restore`].
    pub fn bootstrap() -> String {
        // (table, built-in chain, kube-proxy chain, match arguments before the comment, comment)
        const NEW: &str = "-m conntrack --ctstate NEW ";
        #[rustfmt::skip]
        const JUMPS: [(&str, &str, &str, &str, &str); 14] = [
            ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES", NEW, "kubernetes externally-visible service portals"),
            ("filter", "FORWARD", "KUBE-EXTERNAL-SERVICES", NEW, "kubernetes externally-visible service portals"),
            ("filter", "INPUT", "KUBE-NODEPORTS", "", "kubernetes health check service ports"),
            ("filter", "FORWARD", "KUBE-SERVICES", NEW, "kubernetes service portals"),
            ("filter", "OUTPUT", "KUBE-SERVICES", NEW, "kubernetes service portals"),
            ("filter", "FORWARD", "KUBE-FORWARD", "", "kubernetes forwarding rules"),
            ("filter", "INPUT", "KUBE-PROXY-FIREWALL", NEW, "kubernetes load balancer firewall"),
            ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL", NEW, "kubernetes load balancer firewall"),
            ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", NEW, "kubernetes load balancer firewall"),
            ("nat", "OUTPUT", "KUBE-SERVICES", "", "kubernetes service portals"),
            ("nat", "PREROUTING", "KUBE-SERVICES", "", "kubernetes service portals"),
            ("nat", "POSTROUTING", "KUBE-POSTROUTING", "", "kubernetes postrouting rules"),
            // kubelet's firewall chain, which kube-proxy also ensures (without a comment).
            ("filter", "INPUT", "KUBE-FIREWALL", "", ""),
            ("filter", "OUTPUT", "KUBE-FIREWALL", "", ""),
        ];
        let mut out = String::with_capacity(4096);
        for table in ["mangle", "filter", "nat"] {
            push_line!(out, "*{table}");
            let mut chains: Vec<&str> = Vec::new();
            for (t, _, chain, _, _) in JUMPS {
                if t == table && !chains.contains(&chain) {
                    chains.push(chain);
                }
            }
            chains.push("KUBE-PROXY-CANARY");
            for chain in chains {
                push_line!(out, ":{chain} - [0:0]");
            }
            for (t, builtin, chain, args, comment) in JUMPS {
                if t != table {
                    continue;
                }
                if comment.is_empty() {
                    push_line!(out, "-I {builtin} {args}-j {chain}");
                } else {
                    push_line!(
                        out,
                        "-I {builtin} {args}-m comment --comment \"{comment}\" -j {chain}"
                    );
                }
            }
            push_line!(out, "COMMIT");
        }
        out
    }

    /// What kube-proxy's full sync pipes to `iptables-restore --noflush --counters` (filter
    /// and nat tables) on a node where none of its chains exist yet.
    pub fn full_restore(cfg: &ProxyConfig, services: &[ServicePort]) -> String {
        write_sync(cfg, services, None)
    }

    /// What a partial sync (MinimizeIPTablesRestore, on by default) writes after `old`
    /// changed into `new` (the same service port and nodePort, other endpoints); `services` is
    /// the whole new set and contains `new`. Every sync rewrites the filter table's chains,
    /// KUBE-SERVICES (one rule per service), KUBE-NODEPORTS (one rule per nodePort),
    /// KUBE-POSTROUTING and KUBE-MARK-MASQ; only the changed service's KUBE-EXT, KUBE-SVC and
    /// KUBE-SEP chains are rewritten; its endpoint chains that are gone are flushed and deleted
    /// (`-X`), and so are its KUBE-SVC and KUBE-EXT chains when it has no endpoints left.
    ///
    /// kube-proxy finds those stale chains by running `iptables-save -t nat` before the
    /// restore; in large cluster mode it does that (and the `-X`) at most once per
    /// `--iptables-sync-period` (30 s), so a change right after another one has no `-X`.
    pub fn partial_restore(
        cfg: &ProxyConfig,
        services: &[ServicePort],
        old: &ServicePort,
        new: &ServicePort,
    ) -> String {
        assert_eq!(
            old.node_port, new.node_port,
            "a partial sync here changes endpoints only"
        );
        write_sync(cfg, services, Some((old, new)))
    }

    /// One service port with endpoints, its strings formatted once.
    struct Rendered<'a> {
        sp: &'a ServicePort,
        name: String,
        ip: String,
        port: String,
        svc: String,
        /// The KUBE-EXT chain and the nodePort, for a port with a nodePort.
        external: Option<(String, String)>,
        /// With their KUBE-SEP chains; empty when this sync leaves the service's chains alone.
        endpoints: Vec<(Endpoint, String)>,
    }

    /// `syncProxyRules` for ClusterIP and NodePort (`externalTrafficPolicy: Cluster`) services:
    /// everything when `changed` is `None`, else the partial sync for that one change.
    ///
    /// Per service port, in kube-proxy's order: the filter REJECT rules of a port without
    /// endpoints (KUBE-SERVICES for its ClusterIP, KUBE-EXTERNAL-SERVICES for its nodePort);
    /// the nat KUBE-SERVICES and KUBE-NODEPORTS rules (written by every sync); then, when the
    /// service is rewritten, the KUBE-SVC masquerade rule, the KUBE-EXT rules, the KUBE-SVC
    /// dispatch and the KUBE-SEP chains, with the chain lines KUBE-EXT, KUBE-SVC, KUBE-SEP....
    ///
    /// kube-proxy adds a second KUBE-NODEPORTS rule per nodePort (`-d 127.0.0.0/8 ... -m nfacct
    /// --nfacct-name localhost_nps_accepted_pkts`) only when it could create that nfacct
    /// counter, which iptables-restore cannot; as with KUBE-FORWARD's INVALID rule, these are
    /// the rules of a node without nfacct.
    fn write_sync(
        cfg: &ProxyConfig,
        services: &[ServicePort],
        changed: Option<(&ServicePort, &ServicePort)>,
    ) -> String {
        let total_endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
        let cidr = format!("{}/{}", cfg.cluster_cidr.0, cfg.cluster_cidr.1);
        let rewritten = |sp: &ServicePort| changed.is_none_or(|(_, new)| sp.same_port(new));
        let rendered: Vec<Rendered> = services
            .iter()
            .filter(|sp| !sp.endpoints.is_empty())
            .map(|sp| {
                let name = sp.port_name_string();
                let endpoints = if rewritten(sp) {
                    sp.sorted_endpoints()
                        .into_iter()
                        .map(|e| {
                            let sep = sep_chain(&name, sp.protocol, &e.ip_port);
                            (e, sep)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let svc = svc_chain(&name, sp.protocol);
                Rendered {
                    sp,
                    ip: ipv4_string(sp.cluster_ip),
                    port: decimal(sp.port),
                    external: sp.node_port.map(|np| (ext_chain(&svc), decimal(np))),
                    svc,
                    name,
                    endpoints,
                }
            })
            .collect();
        let stale = changed.map_or_else(Vec::new, |(old, new)| stale_chains(old, new));

        // One allocation for the whole text: a generous estimate costs nothing, a realloc
        // copies megabytes.
        let mut capacity = 4096 + stale.len() * 80;
        for sp in services.iter().filter(|s| s.endpoints.is_empty()) {
            capacity += 160 + sp.name.len() + sp.namespace.len() + sp.port_name.len();
        }
        for r in &rendered {
            let n = r.name.len();
            capacity += 160 + n;
            if r.external.is_some() {
                capacity += 280 + 2 * n;
            }
            if !r.endpoints.is_empty() {
                capacity += 240 + n + r.endpoints.len() * (440 + 3 * n);
            }
        }
        let mut out = String::with_capacity(capacity);

        out.push_str("*filter\n");
        for chain in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-FIREWALL",
        ] {
            push_all(&mut out, &[":", chain, " - [0:0]\n"]);
        }
        out.push_str(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
             -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT \
             -j DROP\n",
        );
        for sp in services.iter().filter(|s| s.endpoints.is_empty()) {
            let p = sp.protocol.as_str();
            let name = sp.port_name_string();
            push_line!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {p} -p {p} \
                 -d {} --dport {} -j REJECT",
                sp.cluster_ip,
                sp.port
            );
            if let Some(node_port) = sp.node_port {
                push_line!(
                    out,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" \
                     -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {node_port} -j REJECT"
                );
            }
        }
        // kube-proxy adds `-m nfacct --nfacct-name ...` before `-j DROP` only when it could
        // create that nfacct counter; iptables-restore cannot, and without the counter the
        // match fails to load, so this is the rule of a node without nfacct.
        out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
        push_line!(
            out,
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark \
             --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j ACCEPT"
        );
        out.push_str(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
             -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n",
        );

        // kube-proxy collects chain lines and rules in two buffers and emits the chains first.
        out.push_str("*nat\n");
        for chain in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            push_all(&mut out, &[":", chain, " - [0:0]\n"]);
        }
        for r in rendered.iter().filter(|r| !r.endpoints.is_empty()) {
            if let Some((ext, _)) = &r.external {
                push_all(&mut out, &[":", ext, " - [0:0]\n"]);
            }
            push_all(&mut out, &[":", &r.svc, " - [0:0]\n"]);
            for (_, sep) in &r.endpoints {
                push_all(&mut out, &[":", sep, " - [0:0]\n"]);
            }
        }
        for chain in &stale {
            push_all(&mut out, &[":", chain, " - [0:0]\n"]);
        }
        push_line!(
            out,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
        );
        push_line!(
            out,
            "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"
        );
        out.push_str(
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring \
             SNAT\" -j MASQUERADE --random-fully\n",
        );
        push_line!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}");

        let mut probabilities = Probabilities::default();
        for r in &rendered {
            let (name, p, ip, port, svc) =
                (&r.name, r.sp.protocol.as_str(), &r.ip, &r.port, &r.svc);
            #[rustfmt::skip]
            push_all(&mut out, &[
                "-A KUBE-SERVICES -m comment --comment \"", name, " cluster IP\" -m ", p, " -p ", p,
                " -d ", ip, " --dport ", port, " -j ", svc, "\n",
            ]);
            if let Some((ext, node_port)) = &r.external {
                #[rustfmt::skip]
                push_all(&mut out, &[
                    "-A KUBE-NODEPORTS -m comment --comment ", name, " -m ", p, " -p ", p,
                    " --dport ", node_port, " -j ", ext, "\n",
                ]);
            }
            if r.endpoints.is_empty() {
                continue;
            }
            #[rustfmt::skip]
            push_all(&mut out, &[
                "-A ", svc, " -m comment --comment \"", name, " cluster IP\" -m ", p, " -p ", p,
                " -d ", ip, " --dport ", port, " ! -s ", &cidr, " -j KUBE-MARK-MASQ\n",
            ]);
            // externalTrafficPolicy: Cluster, so every packet to a nodePort is masqueraded:
            // the endpoint may be on another node.
            if let Some((ext, _)) = &r.external {
                #[rustfmt::skip]
                push_all(&mut out, &[
                    "-A ", ext, " -m comment --comment \"masquerade traffic for ", name,
                    " external destinations\" -j KUBE-MARK-MASQ\n",
                    "-A ", ext, " -j ", svc, "\n",
                ]);
            }
            let n = r.endpoints.len();
            for (i, (ep, sep)) in r.endpoints.iter().enumerate() {
                push_all(&mut out, &["-A ", svc]);
                if !large_cluster {
                    push_all(
                        &mut out,
                        &[" -m comment --comment \"", name, " -> ", &ep.ip_port, "\""],
                    );
                }
                if i + 1 < n {
                    out.push_str(" -m statistic --mode random --probability ");
                    out.push_str(probabilities.get(n - i));
                }
                push_all(&mut out, &[" -j ", sep, "\n"]);
            }
            let comment = if large_cluster {
                ""
            } else {
                " -m comment --comment "
            };
            let comment_name = if large_cluster { "" } else { name.as_str() };
            for (ep, sep) in &r.endpoints {
                #[rustfmt::skip]
                push_all(&mut out, &[
                    "-A ", sep, comment, comment_name, " -s ", &ep.ip, " -j KUBE-MARK-MASQ\n",
                    "-A ", sep, comment, comment_name, " -m ", p, " -p ", p,
                    " -j DNAT --to-destination ", &ep.ip_port, "\n",
                ]);
            }
        }
        for chain in &stale {
            push_all(&mut out, &["-X ", chain, "\n"]);
        }
        out.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this \
             must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j \
             KUBE-NODEPORTS\nCOMMIT\n",
        );
        out
    }

    /// The chains of `old` that `new` no longer uses. (kube-proxy walks a set here, so its
    /// order varies; this one is the endpoint chains, then KUBE-SVC, then KUBE-EXT.)
    fn stale_chains(old: &ServicePort, new: &ServicePort) -> Vec<String> {
        let name = old.port_name_string();
        let kept: HashSet<SocketAddrV4> = new.endpoints.iter().copied().collect();
        let mut stale: Vec<String> = old
            .sorted_endpoints()
            .into_iter()
            .filter(|e| !kept.contains(&e.addr))
            .map(|e| sep_chain(&name, old.protocol, &e.ip_port))
            .collect();
        if new.endpoints.is_empty() && !old.endpoints.is_empty() {
            let svc = svc_chain(&name, old.protocol);
            if old.node_port.is_some() {
                let ext = ext_chain(&svc);
                stale.push(svc);
                stale.push(ext);
            } else {
                stale.push(svc);
            }
        }
        stale
    }
}

/// kube-proxy's nftables mode: one transaction for `nft -f` per sync, in table `ip kube-proxy`.
pub mod nftables {
    use super::*;

    /// `chainNameBaseLengthMax`: knftables' name limit (256) minus the longest prefix (16).
    const CHAIN_NAME_BASE_LENGTH_MAX: usize = 240;

    /// `prefix` + `hashAndTruncate(name)`: base32(sha256(name))[:8] + "-" + name, cut to 240
    /// characters ending in "..." if longer.
    fn chain_name(prefix: &str, name: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + 9 + name.len());
        out.push_str(prefix);
        push_hash(&mut out, &[name], 8);
        out.push('-');
        out.push_str(name);
        if out.len() > prefix.len() + CHAIN_NAME_BASE_LENGTH_MAX {
            out.truncate(prefix.len() + CHAIN_NAME_BASE_LENGTH_MAX - 3);
            out.push_str("...");
        }
        out
    }

    /// `service-HASH-ns/name/protocol/portname`, e.g. `service-ULMVA6XW-ns1/svc1/tcp/p80`.
    pub fn service_chain(sp: &ServicePort) -> String {
        chain_name("service-", &base(sp))
    }

    /// `endpoint-HASH-ns/name/protocol/portname__ip/port`.
    pub fn endpoint_chain(sp: &ServicePort, ep: SocketAddrV4) -> String {
        ep_chain(&base(sp), ep)
    }

    /// `external-HASH-ns/name/protocol/portname` (`serviceExternalChainNamePrefix` + the
    /// service chain's base), e.g. `external-4AT6LBPK-ns3/svc3/tcp/p80`.
    pub fn external_chain(sp: &ServicePort) -> String {
        chain_name("external-", &base(sp))
    }

    fn base(sp: &ServicePort) -> String {
        format!(
            "{}/{}/{}/{}",
            sp.namespace,
            sp.name,
            sp.protocol.as_str(),
            sp.port_name
        )
    }

    fn ep_chain(base: &str, ep: SocketAddrV4) -> String {
        let mut name = String::with_capacity(base.len() + 24);
        name.push_str(base);
        name.push_str("__");
        name.push_str(&ipv4_string(*ep.ip()));
        name.push('/');
        push_decimal(&mut name, ep.port());
        chain_name("endpoint-", &name)
    }

    /// One service port's chain names and strings, endpoints in kube-proxy's order.
    struct Chains {
        service: String,
        /// The external chain and the nodePort, for a port with a nodePort.
        external: Option<(String, String)>,
        ip: String,
        protocol: &'static str,
        port: String,
        endpoints: Vec<(Endpoint, String)>,
    }

    impl Chains {
        fn of(sp: &ServicePort) -> Self {
            let base = base(sp);
            let endpoints = sp
                .sorted_endpoints()
                .into_iter()
                .map(|e| {
                    let chain = ep_chain(&base, e.addr);
                    (e, chain)
                })
                .collect();
            Self {
                service: chain_name("service-", &base),
                external: sp
                    .node_port
                    .map(|np| (chain_name("external-", &base), decimal(np))),
                ip: ipv4_string(sp.cluster_ip),
                protocol: sp.protocol.as_str(),
                port: decimal(sp.port),
                endpoints,
            }
        }

        /// Bytes this service port adds to a transaction, generously.
        fn estimate(&self) -> usize {
            let endpoints: usize = self.endpoints.iter().map(|(_, c)| 5 * c.len() + 260).sum();
            let external = self.external.as_ref().map_or(0, |(e, _)| 300 + 6 * e.len());
            400 + 6 * self.service.len() + external + endpoints
        }

        /// `ensureChain` for every chain of a port with endpoints, in kube-proxy's order:
        /// the endpoint chains, the service chain, the external chain.
        fn add_and_flush_chains(&self, out: &mut String) {
            for (_, ep) in &self.endpoints {
                add_and_flush_chain(out, ep);
            }
            add_and_flush_chain(out, &self.service);
            if let Some((external, _)) = &self.external {
                add_and_flush_chain(out, external);
            }
        }
    }

    /// The first sync's transaction: creates the table and everything in it (`setupNFTables`
    /// on a proxier that has not flushed yet, then every service).
    ///
    /// Per service port, in `syncProxyRules`' order: its chains created and flushed; its
    /// `cluster-ips` element; its `service-ips` element (or `no-endpoint-services`); its
    /// `service-nodeports` element (or `no-endpoint-nodeports`) if it has a nodePort; then the
    /// service chain's masquerade rule, the external chain's rules (`jump mark-for-masquerade`,
    /// `goto` the service chain: `externalTrafficPolicy: Cluster`), the service chain's
    /// dispatch and the endpoint chains' rules. NodePort traffic reaches the map through the
    /// `services` chain's `ip daddr @nodeport-ips ... vmap @service-nodeports` rule of
    /// [`setup`] (`--nodeport-addresses` defaults to the primary node IP in nftables mode).
    pub fn full(cfg: &ProxyConfig, services: &[ServicePort]) -> String {
        let chains: Vec<Chains> = services.iter().map(Chains::of).collect();
        let capacity = 16384 + chains.iter().map(Chains::estimate).sum::<usize>();
        let mut out = String::with_capacity(capacity);
        setup(cfg, &mut out);
        let cidr = format!("{}/{}", cfg.cluster_cidr.0, cfg.cluster_cidr.1);
        let mut cluster_ips = HashSet::with_capacity(services.len());
        for (sp, c) in services.iter().zip(&chains) {
            if !c.endpoints.is_empty() {
                c.add_and_flush_chains(&mut out);
            }
            // nftElementStorage adds an element once, however many ports share the address.
            if cluster_ips.insert(sp.cluster_ip) {
                push_all(
                    &mut out,
                    &["add element ip kube-proxy cluster-ips { ", &c.ip, " }\n"],
                );
            }
            if c.endpoints.is_empty() {
                add_no_endpoint_element(&mut out, sp, c);
                add_no_endpoint_nodeport_element(&mut out, sp, c);
            } else {
                add_service_element(&mut out, c);
                add_nodeport_element(&mut out, c);
                service_rules(&mut out, &cidr, c);
            }
        }
        out
    }

    /// The transaction kube-proxy's partial sync issues after `old` changed into `new` (the
    /// same service port and nodePort, other endpoints): every endpoint chain of `new`, its
    /// service chain and its external chain created (if missing), flushed and refilled; map
    /// elements only where the verdict changed; the chains `new` no longer uses flushed. Those
    /// are deleted by the next sync at least a second later, in a transaction of their own:
    /// [`delete_stale`].
    ///
    /// Before running it kube-proxy lists the table's chains and sets (`nft -j list chains ip`,
    /// `nft -j list sets ip`) to find stale ones; unchanged services add nothing.
    pub fn change(cfg: &ProxyConfig, old: &ServicePort, new: &ServicePort) -> String {
        assert_eq!(
            old.node_port, new.node_port,
            "a change here changes endpoints only"
        );
        let c = Chains::of(new);
        let mut out = String::with_capacity(1024 + c.estimate());
        if !c.endpoints.is_empty() {
            c.add_and_flush_chains(&mut out);
        }
        let (had, has) = (!old.endpoints.is_empty(), !new.endpoints.is_empty());
        match (had, has) {
            (false, true) => {
                add_service_element(&mut out, &c);
                add_nodeport_element(&mut out, &c);
            }
            (true, false) => {
                add_no_endpoint_element(&mut out, new, &c);
                add_no_endpoint_nodeport_element(&mut out, new, &c);
            }
            _ => {}
        }
        if has {
            let cidr = format!("{}/{}", cfg.cluster_cidr.0, cfg.cluster_cidr.1);
            service_rules(&mut out, &cidr, &c);
        }
        for stale in stale_chains(old, new) {
            push_all(&mut out, &["flush chain ip kube-proxy ", &stale, "\n"]);
        }
        // nftElementStorage.cleanupLeftoverKeys, map by map in kube-proxy's order
        // (service-ips, no-endpoint-services, no-endpoint-nodeports, service-nodeports): the
        // elements the service no longer has.
        let key = [c.ip.as_str(), " . ", c.protocol, " . ", &c.port, " }\n"];
        let delete_nodeport = |out: &mut String, map: &str| {
            if let Some((_, node_port)) = &c.external {
                #[rustfmt::skip]
                push_all(out, &[
                    "delete element ip kube-proxy ", map, " { ", c.protocol, " . ", node_port,
                    " }\n",
                ]);
            }
        };
        match (had, has) {
            (false, true) => {
                out.push_str("delete element ip kube-proxy no-endpoint-services { ");
                push_all(&mut out, &key);
                delete_nodeport(&mut out, "no-endpoint-nodeports");
            }
            (true, false) => {
                out.push_str("delete element ip kube-proxy service-ips { ");
                push_all(&mut out, &key);
                delete_nodeport(&mut out, "service-nodeports");
            }
            _ => {}
        }
        out
    }

    /// The transaction of the next sync (at least one second after [`change`]) that deletes
    /// the chains [`change`] flushed.
    pub fn delete_stale(old: &ServicePort, new: &ServicePort) -> String {
        let mut out = String::new();
        for stale in stale_chains(old, new) {
            push_all(&mut out, &["delete chain ip kube-proxy ", &stale, "\n"]);
        }
        out
    }

    /// Removes the table, as kube-proxy's cleanup does (between benchmark modes).
    pub fn teardown() -> String {
        "delete table ip kube-proxy\n".to_owned()
    }

    /// The chains of `old` that `new` no longer uses.
    fn stale_chains(old: &ServicePort, new: &ServicePort) -> Vec<String> {
        let base = base(old);
        let kept: HashSet<SocketAddrV4> = new.endpoints.iter().copied().collect();
        let mut stale: Vec<String> = old
            .sorted_endpoints()
            .into_iter()
            .filter(|e| !kept.contains(&e.addr))
            .map(|e| ep_chain(&base, e.addr))
            .collect();
        if new.endpoints.is_empty() && !old.endpoints.is_empty() {
            stale.push(chain_name("service-", &base));
            if old.node_port.is_some() {
                stale.push(chain_name("external-", &base));
            }
        }
        stale
    }

    /// `ensureChain`: add, then flush, so the chain exists and holds only this sync's rules.
    fn add_and_flush_chain(out: &mut String, chain: &str) {
        #[rustfmt::skip]
        push_all(out, &[
            "add chain ip kube-proxy ", chain, "\n",
            "flush chain ip kube-proxy ", chain, "\n",
        ]);
    }

    fn add_service_element(out: &mut String, c: &Chains) {
        #[rustfmt::skip]
        push_all(out, &[
            "add element ip kube-proxy service-ips { ", &c.ip, " . ", c.protocol, " . ", &c.port,
            " : goto ", &c.service, " }\n",
        ]);
    }

    fn add_no_endpoint_element(out: &mut String, sp: &ServicePort, c: &Chains) {
        #[rustfmt::skip]
        push_all(out, &[
            "add element ip kube-proxy no-endpoint-services { ", &c.ip, " . ", c.protocol, " . ",
            &c.port, " comment \"", &sp.port_name_string(), "\" : goto reject-chain }\n",
        ]);
    }

    /// A port with a nodePort and endpoints: its `service-nodeports` element.
    fn add_nodeport_element(out: &mut String, c: &Chains) {
        if let Some((external, node_port)) = &c.external {
            #[rustfmt::skip]
            push_all(out, &[
                "add element ip kube-proxy service-nodeports { ", c.protocol, " . ", node_port,
                " : goto ", external, " }\n",
            ]);
        }
    }

    /// A port with a nodePort and no endpoints: its `no-endpoint-nodeports` element.
    fn add_no_endpoint_nodeport_element(out: &mut String, sp: &ServicePort, c: &Chains) {
        if let Some((_, node_port)) = &c.external {
            #[rustfmt::skip]
            push_all(out, &[
                "add element ip kube-proxy no-endpoint-nodeports { ", c.protocol, " . ", node_port,
                " comment \"", &sp.port_name_string(), "\" : goto reject-chain }\n",
            ]);
        }
    }

    /// The service chain's masquerade rule, the external chain's rules, the service chain's
    /// dispatch rule, then each endpoint chain's rules.
    fn service_rules(out: &mut String, cidr: &str, c: &Chains) {
        let svc = &c.service;
        #[rustfmt::skip]
        push_all(out, &[
            "add rule ip kube-proxy ", svc, " ip daddr ", &c.ip, " ip saddr != ", cidr,
            " jump mark-for-masquerade\n",
        ]);
        // externalTrafficPolicy: Cluster, so every packet to the nodePort is masqueraded: the
        // endpoint may be on another node.
        if let Some((external, _)) = &c.external {
            #[rustfmt::skip]
            push_all(out, &[
                "add rule ip kube-proxy ", external, " jump mark-for-masquerade\n",
                "add rule ip kube-proxy ", external, " goto ", svc, "\n",
            ]);
        }
        push_all(
            out,
            &["add rule ip kube-proxy ", svc, " numgen random mod "],
        );
        push_fmt!(out, "{} vmap {{", c.endpoints.len());
        for (i, (_, ep)) in c.endpoints.iter().enumerate() {
            if i > 0 {
                out.push_str(" ,");
            }
            push_fmt!(out, " {i} : goto {ep}");
        }
        out.push_str(" }\n");
        for (ep, chain) in &c.endpoints {
            #[rustfmt::skip]
            push_all(out, &[
                "add rule ip kube-proxy ", chain, " ip saddr ", &ep.ip,
                " jump mark-for-masquerade\n",
                "add rule ip kube-proxy ", chain, " meta l4proto ", c.protocol, " dnat to ",
                &ep.ip_port, "\n",
            ]);
        }
    }

    /// `setupNFTables`, first run: the table, base chains (each added and deleted once, then
    /// created with its hook), jump chains, masquerading, the sets, maps and check chains, and
    /// the flushes of every set and map that services fill.
    fn setup(cfg: &ProxyConfig, out: &mut String) {
        // (name, type, hook, priority): filter before DNAT at dstnat-10, the rest at filter.
        const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
            ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
            ("filter-output-pre-dnat", "filter", "output", -110),
            ("filter-input", "filter", "input", 0),
            ("filter-forward", "filter", "forward", 0),
            ("filter-output", "filter", "output", 0),
            ("nat-prerouting", "nat", "prerouting", -100),
            ("nat-output", "nat", "output", -100),
            ("nat-postrouting", "nat", "postrouting", 100),
        ];
        // (chain jumped to, base chain, match before the jump)
        #[rustfmt::skip]
        const JUMPS: [(&str, &str, &str); 11] = [
            ("nodeport-endpoints-check", "filter-input", "ct state new "),
            ("service-endpoints-check", "filter-input", "ct state new "),
            ("service-endpoints-check", "filter-forward", "ct state new "),
            ("service-endpoints-check", "filter-output", "ct state new "),
            ("firewall-check", "filter-prerouting-pre-dnat", "ct state new "),
            ("firewall-check", "filter-output-pre-dnat", "ct state new "),
            ("services", "nat-output", ""),
            ("services", "nat-prerouting", ""),
            ("masquerading", "nat-postrouting", ""),
            ("cluster-ips-check", "filter-forward", "ct state new "),
            ("cluster-ips-check", "filter-output", "ct state new "),
        ];
        const ADDR_PROTO_PORT: &str = "ipv4_addr . inet_proto . inet_service : verdict";
        const PROTO_PORT: &str = "inet_proto . inet_service : verdict";

        out.push_str("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
        for (name, ..) in BASE_CHAINS {
            push_line!(out, "add chain ip kube-proxy {name}");
            push_line!(out, "delete chain ip kube-proxy {name}");
        }
        for (name, kind, hook, priority) in BASE_CHAINS {
            push_line!(
                out,
                "add chain ip kube-proxy {name} {{ type {kind} hook {hook} priority {priority} ; }}"
            );
            push_line!(out, "flush chain ip kube-proxy {name}");
        }
        let mut created: Vec<&str> = Vec::new();
        for (chain, from, args) in JUMPS {
            if !created.contains(&chain) {
                created.push(chain);
                add_and_flush_chain(out, chain);
            }
            push_line!(out, "add rule ip kube-proxy {from} {args}jump {chain}");
        }
        for chain in [
            "services",
            "cluster-ips-check",
            "masquerading",
            "mark-for-masquerade",
        ] {
            if !created.contains(&chain) {
                created.push(chain);
                add_and_flush_chain(out, chain);
            }
        }
        push_line!(
            out,
            "add rule ip kube-proxy mark-for-masquerade mark set mark or {MASQUERADE_MARK}"
        );
        push_line!(
            out,
            "add rule ip kube-proxy masquerading mark and {MASQUERADE_MARK} == 0 return"
        );
        push_line!(
            out,
            "add rule ip kube-proxy masquerading mark set mark xor {MASQUERADE_MARK}"
        );
        out.push_str("add rule ip kube-proxy masquerading masquerade fully-random\n");

        out.push_str(
            "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n",
        );
        out.push_str(
            "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \
             \"Reject traffic to invalid ports of ClusterIPs\"\n",
        );
        let (service_net, service_len) = cfg.service_cidr;
        push_line!(
            out,
            "add rule ip kube-proxy cluster-ips-check ip daddr {{ {service_net}/{service_len} }} \
             drop comment \"Drop traffic to unallocated ClusterIPs\""
        );
        out.push_str(
            "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept \
             NodePort traffic\" ; }\n",
        );
        out.push_str("flush set ip kube-proxy nodeport-ips\n");
        push_line!(
            out,
            "add element ip kube-proxy nodeport-ips {{ {} }}",
            cfg.node_ip
        );

        push_line!(
            out,
            "add map ip kube-proxy no-endpoint-services {{ type {ADDR_PROTO_PORT} ; comment \
             \"vmap to drop or reject packets to services with no endpoints\" ; }}"
        );
        push_line!(
            out,
            "add map ip kube-proxy no-endpoint-nodeports {{ type {PROTO_PORT} ; comment \"vmap \
             to drop or reject packets to service nodeports with no endpoints\" ; }}"
        );
        out.push_str(
            "add chain ip kube-proxy reject-chain { comment \"helper for @no-endpoint-services \
             / @no-endpoint-nodeports\" ; }\n",
        );
        out.push_str("flush chain ip kube-proxy reject-chain\n");
        out.push_str("add rule ip kube-proxy reject-chain reject\n");
        out.push_str(
            "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport \
             vmap @no-endpoint-services\n",
        );
        out.push_str(
            "add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta \
             l4proto . th dport vmap @no-endpoint-nodeports\n",
        );

        push_line!(
            out,
            "add map ip kube-proxy firewall-ips {{ type {ADDR_PROTO_PORT} ; comment \
             \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        );
        out.push_str(
            "add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap \
             @firewall-ips\n",
        );

        push_line!(
            out,
            "add map ip kube-proxy service-ips {{ type {ADDR_PROTO_PORT} ; comment \"ClusterIP, \
             ExternalIP and LoadBalancer IP traffic\" ; }}"
        );
        push_line!(
            out,
            "add map ip kube-proxy service-nodeports {{ type {PROTO_PORT} ; comment \"NodePort \
             traffic\" ; }}"
        );
        out.push_str(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap \
             @service-ips\n",
        );
        out.push_str(
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport \
             vmap @service-nodeports\n",
        );

        out.push_str("flush set ip kube-proxy cluster-ips\n");
        for map in [
            "service-ips",
            "firewall-ips",
            "no-endpoint-services",
            "no-endpoint-nodeports",
            "service-nodeports",
        ] {
            push_line!(out, "flush map ip kube-proxy {map}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(namespace: &str, name: &str, port_name: &str, protocol: Protocol) -> ServicePort {
        ServicePort {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
            cluster_ip: Ipv4Addr::new(198, 18, 128, 1),
            port: 80,
            node_port: None,
            endpoints: Vec::new(),
        }
    }

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().expect("test endpoint parses")
    }

    #[test]
    fn base32_matches_the_rfc_4648_test_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(input.as_bytes()), want, "base32({input:?})");
        }
    }

    /// Inputs and names copied from kube-proxy's pkg/proxy/iptables/proxier_test.go.
    #[test]
    fn iptables_chain_names_equal_kube_proxys_own_test_values() {
        let svc1 = sp("ns1", "svc1", "p80", Protocol::Tcp);
        let svc2 = sp("ns2", "svc2", "p8080", Protocol::Tcp);
        let svc3 = sp("ns3", "svc3", "p80", Protocol::Tcp);
        let svc4 = sp("ns4", "svc4", "p80", Protocol::Tcp);
        let cases = [
            (iptables::service_chain(&svc1), "KUBE-SVC-XPGD46QRK7WJZT7O"),
            (iptables::service_chain(&svc2), "KUBE-SVC-2VJB64SDSIJUP5T6"),
            (iptables::service_chain(&svc3), "KUBE-SVC-X27LE4BHSL4DOUIK"),
            (iptables::service_chain(&svc4), "KUBE-SVC-4SW47YFZTEDKD3PK"),
            // TestOverallIPTablesRules: the KUBE-EXT chains share the KUBE-SVC hash.
            (iptables::external_chain(&svc3), "KUBE-EXT-X27LE4BHSL4DOUIK"),
            (iptables::external_chain(&svc4), "KUBE-EXT-4SW47YFZTEDKD3PK"),
            (
                iptables::external_chain(&sp("ns2", "svc2", "p80", Protocol::Tcp)),
                "KUBE-EXT-GNZBNJ2PO5MGZ6GT",
            ),
            (
                iptables::external_chain(&sp("ns5", "svc5", "p80", Protocol::Tcp)),
                "KUBE-EXT-NUKIZ6OKUXPJNT4C",
            ),
            (
                iptables::endpoint_chain(&svc1, ep("10.180.0.1:80")),
                "KUBE-SEP-SXIVWICOYRO3J4NJ",
            ),
            (
                iptables::endpoint_chain(&svc1, ep("10.180.2.1:80")),
                "KUBE-SEP-ZX7GRIZKSNUQ3LAJ",
            ),
            (
                iptables::endpoint_chain(&svc1, ep("10.0.1.1:80")),
                "KUBE-SEP-SNQ3ZNILQDEJNDQO",
            ),
            (
                iptables::endpoint_chain(&svc2, ep("10.0.2.1:8080")),
                "KUBE-SEP-UHEGFW77JX3KXTOV",
            ),
            (
                iptables::endpoint_chain(&svc3, ep("10.0.3.1:80")),
                "KUBE-SEP-BSWRHOQ77KEXZLNL",
            ),
            (
                iptables::endpoint_chain(&svc3, ep("10.0.3.2:80")),
                "KUBE-SEP-DKCFIS26GWF2WLWC",
            ),
            (
                iptables::endpoint_chain(&svc4, ep("10.0.4.1:80")),
                "KUBE-SEP-AYCN5HPXMIRJNJXU",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(
                got, want,
                "kube-proxy's test names this chain {want}, we named it {got}"
            );
        }
    }

    /// Inputs and names copied from kube-proxy's pkg/proxy/nftables/proxier_test.go.
    #[test]
    fn nftables_chain_names_equal_kube_proxys_own_test_values() {
        let svc1 = sp("ns1", "svc1", "p80", Protocol::Tcp);
        let svc2 = sp("ns2", "svc2", "p80", Protocol::Tcp);
        let svc2b = sp("ns2", "svc2", "p8080", Protocol::Tcp);
        let svc3 = sp("ns3", "svc3", "p80", Protocol::Tcp);
        let cases = [
            (
                nftables::service_chain(&svc1),
                "service-ULMVA6XW-ns1/svc1/tcp/p80",
            ),
            (
                nftables::service_chain(&svc2),
                "service-42NFTM6N-ns2/svc2/tcp/p80",
            ),
            (
                nftables::service_chain(&svc2b),
                "service-MHHHYRWA-ns2/svc2/tcp/p8080",
            ),
            (
                nftables::service_chain(&svc3),
                "service-4AT6LBPK-ns3/svc3/tcp/p80",
            ),
            // TestOverallNFTablesRules: the external chains share the service chain's base.
            (
                nftables::external_chain(&svc3),
                "external-4AT6LBPK-ns3/svc3/tcp/p80",
            ),
            (
                nftables::external_chain(&svc2),
                "external-42NFTM6N-ns2/svc2/tcp/p80",
            ),
            (
                nftables::external_chain(&sp("ns5", "svc5", "p80", Protocol::Tcp)),
                "external-HVFWP5L3-ns5/svc5/tcp/p80",
            ),
            (
                nftables::endpoint_chain(&svc1, ep("10.180.0.1:80")),
                "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            ),
            (
                nftables::endpoint_chain(&svc1, ep("10.0.1.1:80")),
                "endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80",
            ),
            (
                nftables::endpoint_chain(&svc2, ep("10.180.0.2:80")),
                "endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80",
            ),
            (
                nftables::endpoint_chain(&svc2b, ep("10.0.2.1:8080")),
                "endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080",
            ),
            (
                nftables::endpoint_chain(&svc3, ep("10.0.3.2:80")),
                "endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(
                got, want,
                "kube-proxy's test names this chain {want}, we named it {got}"
            );
        }
    }

    #[test]
    fn probabilities_are_formatted_with_ten_decimals() {
        assert_eq!(iptables::probability(3), "0.3333333333");
        assert_eq!(iptables::probability(2), "0.5000000000");
        assert_eq!(iptables::probability(7), "0.1428571429");
    }

    #[test]
    fn an_unnamed_port_has_no_colon_in_its_name() {
        let mut unnamed = sp("bench", "dns", "", Protocol::Udp);
        assert_eq!(unnamed.port_name_string(), "bench/dns");
        unnamed.port_name = "udp".into();
        assert_eq!(unnamed.port_name_string(), "bench/dns:udp");
    }

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            cluster_cidr: (Ipv4Addr::new(198, 19, 0, 0), 16),
            service_cidr: (Ipv4Addr::new(198, 18, 128, 0), 18),
            node_ip: Ipv4Addr::new(198, 18, 0, 10),
        }
    }

    /// bench/web:http, TCP 198.18.128.1:80, three endpoints (given out of order, as an
    /// EndpointSlice may list them).
    fn web() -> ServicePort {
        ServicePort {
            endpoints: vec![
                ep("198.19.0.13:8080"),
                ep("198.19.0.11:8080"),
                ep("198.19.0.12:8080"),
            ],
            ..sp("bench", "web", "http", Protocol::Tcp)
        }
    }

    /// web() with 198.19.0.13 replaced by 198.19.0.14.
    fn web_changed() -> ServicePort {
        ServicePort {
            endpoints: vec![
                ep("198.19.0.11:8080"),
                ep("198.19.0.12:8080"),
                ep("198.19.0.14:8080"),
            ],
            ..web()
        }
    }

    /// bench/api:grpc, TCP 198.18.128.2:9090, one endpoint; it does not change.
    fn api() -> ServicePort {
        ServicePort {
            cluster_ip: Ipv4Addr::new(198, 18, 128, 2),
            port: 9090,
            endpoints: vec![ep("198.19.1.11:9090")],
            ..sp("bench", "api", "grpc", Protocol::Tcp)
        }
    }

    fn assert_text(what: &str, got: &str, want: &str) {
        if got == want {
            return;
        }
        let (g, w): (Vec<_>, Vec<_>) = (got.lines().collect(), want.lines().collect());
        let first = (0..g.len().max(w.len()))
            .find(|&i| g.get(i) != w.get(i))
            .unwrap_or(0);
        panic!(
            "{what} differs from kube-proxy's shape at line {}:\n  want: {:?}\n  got:  {:?}\n\
             whole text:\n{got}",
            first + 1,
            w.get(first),
            g.get(first)
        );
    }

    const FILTER_TABLE: &str = "*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
";

    #[test]
    fn iptables_full_restore_is_kube_proxys_text_for_one_service() {
        let want = FILTER_TABLE.to_owned()
            + "*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-SEP-TYQHSLZ5NGHODEHC - [0:0]
:KUBE-SEP-5HSOZTVHQMJW5KWP - [0:0]
:KUBE-SEP-ZIB6QAJMOESWRJBN - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 -j KUBE-SVC-ORYCKD7ZOX5JNSP3
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 ! -s 198.19.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.11:8080\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-TYQHSLZ5NGHODEHC
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.12:8080\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-5HSOZTVHQMJW5KWP
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.13:8080\" -j KUBE-SEP-ZIB6QAJMOESWRJBN
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -s 198.19.0.11 -j KUBE-MARK-MASQ
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.11:8080
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -s 198.19.0.12 -j KUBE-MARK-MASQ
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.12:8080
-A KUBE-SEP-ZIB6QAJMOESWRJBN -m comment --comment bench/web:http -s 198.19.0.13 -j KUBE-MARK-MASQ
-A KUBE-SEP-ZIB6QAJMOESWRJBN -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.13:8080
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_text(
            "full iptables restore",
            &iptables::full_restore(&cfg(), &[web()]),
            &want,
        );
    }

    #[test]
    fn iptables_partial_restore_rewrites_only_the_changed_service_and_deletes_its_stale_chain() {
        let want = FILTER_TABLE.to_owned()
            + "*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-SEP-TYQHSLZ5NGHODEHC - [0:0]
:KUBE-SEP-5HSOZTVHQMJW5KWP - [0:0]
:KUBE-SEP-PB4NS7FPK4JKFGOI - [0:0]
:KUBE-SEP-ZIB6QAJMOESWRJBN - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment \"bench/api:grpc cluster IP\" -m tcp -p tcp -d 198.18.128.2 --dport 9090 -j KUBE-SVC-VG2GQ5EPGBMD5Z2V
-A KUBE-SERVICES -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 -j KUBE-SVC-ORYCKD7ZOX5JNSP3
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 ! -s 198.19.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.11:8080\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-TYQHSLZ5NGHODEHC
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.12:8080\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-5HSOZTVHQMJW5KWP
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.14:8080\" -j KUBE-SEP-PB4NS7FPK4JKFGOI
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -s 198.19.0.11 -j KUBE-MARK-MASQ
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.11:8080
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -s 198.19.0.12 -j KUBE-MARK-MASQ
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.12:8080
-A KUBE-SEP-PB4NS7FPK4JKFGOI -m comment --comment bench/web:http -s 198.19.0.14 -j KUBE-MARK-MASQ
-A KUBE-SEP-PB4NS7FPK4JKFGOI -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.14:8080
-X KUBE-SEP-ZIB6QAJMOESWRJBN
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_text(
            "partial iptables restore",
            &iptables::partial_restore(&cfg(), &[api(), web_changed()], &web(), &web_changed()),
            &want,
        );
    }

    #[test]
    fn iptables_large_clusters_drop_the_per_endpoint_comments() {
        let many: Vec<ServicePort> = (0..400u16)
            .map(|i| ServicePort {
                name: format!("svc{i}"),
                ..web()
            })
            .collect();
        let text = iptables::full_restore(&cfg(), &many);
        let svc = iptables::service_chain(&many[0]);
        let sep = iptables::endpoint_chain(&many[0], ep("198.19.0.11:8080"));
        let want = [
            format!("-A {svc} -m statistic --mode random --probability 0.3333333333 -j {sep}\n"),
            format!("-A {sep} -s 198.19.0.11 -j KUBE-MARK-MASQ\n"),
            format!("-A {sep} -m tcp -p tcp -j DNAT --to-destination 198.19.0.11:8080\n"),
            format!(
                "-A {svc} -m comment --comment \"bench/svc0:http cluster IP\" -m tcp -p tcp -d \
                 198.18.128.1 --dport 80 ! -s 198.19.0.0/16 -j KUBE-MARK-MASQ\n"
            ),
        ];
        for line in want {
            assert!(
                text.contains(&line),
                "1200 endpoints is large-cluster mode, so expected the line\n{line}"
            );
        }
    }

    #[test]
    fn bootstrap_prepends_every_jump_kube_proxy_ensures() {
        let want = "*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-I INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-I OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-I FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-I OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-I INPUT -j KUBE-FIREWALL
-I OUTPUT -j KUBE-FIREWALL
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
COMMIT
";
        assert_text("bootstrap", &iptables::bootstrap(), want);
    }

    const NFT_SETUP: &str = "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }
add chain ip kube-proxy filter-prerouting-pre-dnat
delete chain ip kube-proxy filter-prerouting-pre-dnat
add chain ip kube-proxy filter-output-pre-dnat
delete chain ip kube-proxy filter-output-pre-dnat
add chain ip kube-proxy filter-input
delete chain ip kube-proxy filter-input
add chain ip kube-proxy filter-forward
delete chain ip kube-proxy filter-forward
add chain ip kube-proxy filter-output
delete chain ip kube-proxy filter-output
add chain ip kube-proxy nat-prerouting
delete chain ip kube-proxy nat-prerouting
add chain ip kube-proxy nat-output
delete chain ip kube-proxy nat-output
add chain ip kube-proxy nat-postrouting
delete chain ip kube-proxy nat-postrouting
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
flush chain ip kube-proxy filter-prerouting-pre-dnat
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
flush chain ip kube-proxy filter-output-pre-dnat
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
flush chain ip kube-proxy filter-input
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
flush chain ip kube-proxy filter-forward
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
flush chain ip kube-proxy filter-output
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
flush chain ip kube-proxy nat-prerouting
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
flush chain ip kube-proxy nat-output
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
flush chain ip kube-proxy nat-postrouting
add chain ip kube-proxy nodeport-endpoints-check
flush chain ip kube-proxy nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add chain ip kube-proxy service-endpoints-check
flush chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add chain ip kube-proxy firewall-check
flush chain ip kube-proxy firewall-check
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add chain ip kube-proxy services
flush chain ip kube-proxy services
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-prerouting jump services
add chain ip kube-proxy masquerading
flush chain ip kube-proxy masquerading
add rule ip kube-proxy nat-postrouting jump masquerading
add chain ip kube-proxy cluster-ips-check
flush chain ip kube-proxy cluster-ips-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add chain ip kube-proxy mark-for-masquerade
flush chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000
add rule ip kube-proxy masquerading mark and 0x00004000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x00004000
add rule ip kube-proxy masquerading masquerade fully-random
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add rule ip kube-proxy cluster-ips-check ip daddr { 198.18.128.0/18 } drop comment \"Drop traffic to unallocated ClusterIPs\"
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }
flush set ip kube-proxy nodeport-ips
add element ip kube-proxy nodeport-ips { 198.18.0.10 }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }
add chain ip kube-proxy reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }
flush chain ip kube-proxy reject-chain
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
flush set ip kube-proxy cluster-ips
flush map ip kube-proxy service-ips
flush map ip kube-proxy firewall-ips
flush map ip kube-proxy no-endpoint-services
flush map ip kube-proxy no-endpoint-nodeports
flush map ip kube-proxy service-nodeports
";

    #[test]
    fn nftables_full_is_kube_proxys_first_transaction_for_one_service() {
        let want = NFT_SETUP.to_owned()
            + "add chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
flush chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
add chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
flush chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
add chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
flush chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
add chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
add element ip kube-proxy cluster-ips { 198.18.128.1 }
add element ip kube-proxy service-ips { 198.18.128.1 . tcp . 80 : goto service-XS2ODQL6-bench/web/tcp/http }
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http ip daddr 198.18.128.1 ip saddr != 198.19.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http numgen random mod 3 vmap { 0 : goto endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 , 1 : goto endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 , 2 : goto endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080 }
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 ip saddr 198.19.0.11 jump mark-for-masquerade
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 meta l4proto tcp dnat to 198.19.0.11:8080
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 ip saddr 198.19.0.12 jump mark-for-masquerade
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 meta l4proto tcp dnat to 198.19.0.12:8080
add rule ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080 ip saddr 198.19.0.13 jump mark-for-masquerade
add rule ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080 meta l4proto tcp dnat to 198.19.0.13:8080
";
        assert_text(
            "full nft transaction",
            &nftables::full(&cfg(), &[web()]),
            &want,
        );
    }

    #[test]
    fn nftables_change_refills_the_service_and_flushes_the_stale_endpoint_chain() {
        let want = "add chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
flush chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
add chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
flush chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
add chain ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080
flush chain ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080
add chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http ip daddr 198.18.128.1 ip saddr != 198.19.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http numgen random mod 3 vmap { 0 : goto endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 , 1 : goto endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 , 2 : goto endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080 }
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 ip saddr 198.19.0.11 jump mark-for-masquerade
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 meta l4proto tcp dnat to 198.19.0.11:8080
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 ip saddr 198.19.0.12 jump mark-for-masquerade
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 meta l4proto tcp dnat to 198.19.0.12:8080
add rule ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080 ip saddr 198.19.0.14 jump mark-for-masquerade
add rule ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080 meta l4proto tcp dnat to 198.19.0.14:8080
flush chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
";
        assert_text(
            "nft change transaction",
            &nftables::change(&cfg(), &web(), &web_changed()),
            want,
        );
        assert_eq!(
            nftables::delete_stale(&web(), &web_changed()),
            "delete chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080\n"
        );
    }

    #[test]
    fn a_service_losing_all_endpoints_switches_to_the_reject_verdict() {
        let gone = ServicePort {
            endpoints: Vec::new(),
            ..web()
        };
        let want = "add element ip kube-proxy no-endpoint-services { 198.18.128.1 . tcp . 80 comment \"bench/web:http\" : goto reject-chain }
flush chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
flush chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
flush chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
flush chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
delete element ip kube-proxy service-ips { 198.18.128.1 . tcp . 80 }
";
        assert_text(
            "nft change to no endpoints",
            &nftables::change(&cfg(), &web(), &gone),
            want,
        );
        let restore = iptables::partial_restore(&cfg(), std::slice::from_ref(&gone), &web(), &gone);
        assert!(
            restore.contains(
                "-A KUBE-SERVICES -m comment --comment \"bench/web:http has no endpoints\" -m tcp \
                 -p tcp -d 198.18.128.1 --dport 80 -j REJECT\n"
            ) && restore.contains("-X KUBE-SVC-ORYCKD7ZOX5JNSP3\n"),
            "expected a REJECT rule in filter KUBE-SERVICES and the service chain deleted:\n{restore}"
        );
    }

    // ---- NodePort, externalTrafficPolicy: Cluster ----

    /// kube-proxy's own NodePort Service: `svc3` of `TestOverallIPTablesRules` and
    /// `TestOverallNFTablesRules` (type NodePort, default externalTrafficPolicy Cluster,
    /// ClusterIP 172.30.0.43:80, nodePort 3003, one endpoint 10.180.0.3:80; pod CIDR
    /// 10.0.0.0/8, ServiceCIDR 172.30.0.0/16, node IP 192.168.0.2).
    fn kube_proxy_svc3() -> (ProxyConfig, ServicePort) {
        let cfg = ProxyConfig {
            cluster_cidr: (Ipv4Addr::new(10, 0, 0, 0), 8),
            service_cidr: (Ipv4Addr::new(172, 30, 0, 0), 16),
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
        };
        let svc3 = ServicePort {
            cluster_ip: Ipv4Addr::new(172, 30, 0, 43),
            node_port: Some(3003),
            endpoints: vec![ep("10.180.0.3:80")],
            ..sp("ns3", "svc3", "p80", Protocol::Tcp)
        };
        (cfg, svc3)
    }

    /// The lines of `text` that belong to one service (they mention one of `needles`),
    /// sorted: kube-proxy's tests compare sorted dumps.
    fn lines_mentioning(text: &str, needles: &[&str], skip_prefix: &str) -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| needles.iter().any(|n| l.contains(n)))
            .filter(|l| skip_prefix.is_empty() || !l.starts_with(skip_prefix))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    /// Every svc3 line of `TestOverallIPTablesRules`' expected restore, verbatim, except the
    /// second KUBE-NODEPORTS rule (`-d 127.0.0.0/8 ... -m nfacct --nfacct-name
    /// localhost_nps_accepted_pkts`), which kube-proxy writes only when it could create that
    /// nfacct counter.
    #[test]
    fn iptables_nodeport_lines_equal_kube_proxys_test_for_svc3() {
        let (cfg, svc3) = kube_proxy_svc3();
        let mut want = vec![
            ":KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]",
            ":KUBE-SEP-OYPFS5VJICHGATKP - [0:0]",
            ":KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]",
            "-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK",
            "-A KUBE-SERVICES -m comment --comment \"ns3/svc3:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK",
            "-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment \"masquerade traffic for ns3/svc3:p80 external destinations\" -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK",
            "-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80",
            "-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment \"ns3/svc3:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment \"ns3/svc3:p80 -> 10.180.0.3:80\" -j KUBE-SEP-OYPFS5VJICHGATKP",
        ];
        want.sort_unstable();
        let text = iptables::full_restore(&cfg, &[svc3]);
        let got = lines_mentioning(&text, &["svc3", "X27LE4BHSL4DOUIK", "OYPFS5VJICHGATKP"], "");
        assert_eq!(got, want, "whole text:\n{text}");
        // With endpoints and externalTrafficPolicy Cluster kube-proxy adds nothing to the
        // filter table for a nodePort.
        let filter = text.split("*nat").next().expect("a filter table");
        assert_eq!(filter, FILTER_TABLE);
    }

    /// Every svc3 line of `TestOverallNFTablesRules`' expected dump, verbatim. (The fake
    /// nftables dump leaves out the transaction's `flush chain` lines.)
    #[test]
    fn nftables_nodeport_lines_equal_kube_proxys_test_for_svc3() {
        let (cfg, svc3) = kube_proxy_svc3();
        let mut want = vec![
            "add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80",
            "add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }",
            "add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80",
            "add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80",
            "add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80",
            "add element ip kube-proxy cluster-ips { 172.30.0.43 }",
            "add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }",
            "add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }",
        ];
        want.sort_unstable();
        let text = nftables::full(&cfg, &[svc3]);
        let got = lines_mentioning(&text, &["svc3", "172.30.0.43"], "flush chain ");
        assert_eq!(got, want, "whole text:\n{text}");
        // The setup already dispatches NodePort traffic: `--nodeport-addresses` defaults to
        // the primary node IP in nftables mode (`baseRules` in proxier_test.go).
        for line in [
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }\n",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
        ] {
            assert!(text.contains(line), "expected {line:?} in:\n{text}");
        }
    }

    /// web() as a NodePort Service: nodePort 30080.
    fn web_np() -> ServicePort {
        ServicePort {
            node_port: Some(30080),
            ..web()
        }
    }

    /// web_np() with 198.19.0.13 replaced by 198.19.0.14.
    fn web_np_changed() -> ServicePort {
        ServicePort {
            node_port: Some(30080),
            ..web_changed()
        }
    }

    /// api() as a NodePort Service: nodePort 30090; it does not change.
    fn api_np() -> ServicePort {
        ServicePort {
            node_port: Some(30090),
            ..api()
        }
    }

    /// The shape of svc3 in `TestOverallIPTablesRules`, in the order `syncProxyRules` writes
    /// it: chain lines KUBE-EXT, KUBE-SVC, KUBE-SEP...; rules KUBE-SERVICES, KUBE-NODEPORTS,
    /// the KUBE-SVC masquerade rule, the two KUBE-EXT rules, then the dispatch and endpoints.
    #[test]
    fn iptables_full_restore_is_kube_proxys_text_for_one_nodeport_service() {
        let want = FILTER_TABLE.to_owned()
            + "*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-EXT-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-SVC-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-SEP-TYQHSLZ5NGHODEHC - [0:0]
:KUBE-SEP-5HSOZTVHQMJW5KWP - [0:0]
:KUBE-SEP-ZIB6QAJMOESWRJBN - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 -j KUBE-SVC-ORYCKD7ZOX5JNSP3
-A KUBE-NODEPORTS -m comment --comment bench/web:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-ORYCKD7ZOX5JNSP3
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 ! -s 198.19.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-EXT-ORYCKD7ZOX5JNSP3 -m comment --comment \"masquerade traffic for bench/web:http external destinations\" -j KUBE-MARK-MASQ
-A KUBE-EXT-ORYCKD7ZOX5JNSP3 -j KUBE-SVC-ORYCKD7ZOX5JNSP3
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.11:8080\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-TYQHSLZ5NGHODEHC
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.12:8080\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-5HSOZTVHQMJW5KWP
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.13:8080\" -j KUBE-SEP-ZIB6QAJMOESWRJBN
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -s 198.19.0.11 -j KUBE-MARK-MASQ
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.11:8080
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -s 198.19.0.12 -j KUBE-MARK-MASQ
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.12:8080
-A KUBE-SEP-ZIB6QAJMOESWRJBN -m comment --comment bench/web:http -s 198.19.0.13 -j KUBE-MARK-MASQ
-A KUBE-SEP-ZIB6QAJMOESWRJBN -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.13:8080
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_text(
            "full iptables restore with a nodePort",
            &iptables::full_restore(&cfg(), &[web_np()]),
            &want,
        );
    }

    /// The changed NodePort service's KUBE-EXT chain is rewritten with its KUBE-SVC chain;
    /// the unchanged one keeps its chains but, like every sync, gets its KUBE-SERVICES and
    /// KUBE-NODEPORTS rules (they are written before `syncProxyRules` switches an unchanged
    /// service to the skipped buffers).
    #[test]
    fn iptables_partial_restore_rewrites_the_changed_services_external_chain() {
        let want = FILTER_TABLE.to_owned()
            + "*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-EXT-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-SVC-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-SEP-TYQHSLZ5NGHODEHC - [0:0]
:KUBE-SEP-5HSOZTVHQMJW5KWP - [0:0]
:KUBE-SEP-PB4NS7FPK4JKFGOI - [0:0]
:KUBE-SEP-ZIB6QAJMOESWRJBN - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment \"bench/api:grpc cluster IP\" -m tcp -p tcp -d 198.18.128.2 --dport 9090 -j KUBE-SVC-VG2GQ5EPGBMD5Z2V
-A KUBE-NODEPORTS -m comment --comment bench/api:grpc -m tcp -p tcp --dport 30090 -j KUBE-EXT-VG2GQ5EPGBMD5Z2V
-A KUBE-SERVICES -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 -j KUBE-SVC-ORYCKD7ZOX5JNSP3
-A KUBE-NODEPORTS -m comment --comment bench/web:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-ORYCKD7ZOX5JNSP3
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 198.18.128.1 --dport 80 ! -s 198.19.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-EXT-ORYCKD7ZOX5JNSP3 -m comment --comment \"masquerade traffic for bench/web:http external destinations\" -j KUBE-MARK-MASQ
-A KUBE-EXT-ORYCKD7ZOX5JNSP3 -j KUBE-SVC-ORYCKD7ZOX5JNSP3
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.11:8080\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-TYQHSLZ5NGHODEHC
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.12:8080\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-5HSOZTVHQMJW5KWP
-A KUBE-SVC-ORYCKD7ZOX5JNSP3 -m comment --comment \"bench/web:http -> 198.19.0.14:8080\" -j KUBE-SEP-PB4NS7FPK4JKFGOI
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -s 198.19.0.11 -j KUBE-MARK-MASQ
-A KUBE-SEP-TYQHSLZ5NGHODEHC -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.11:8080
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -s 198.19.0.12 -j KUBE-MARK-MASQ
-A KUBE-SEP-5HSOZTVHQMJW5KWP -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.12:8080
-A KUBE-SEP-PB4NS7FPK4JKFGOI -m comment --comment bench/web:http -s 198.19.0.14 -j KUBE-MARK-MASQ
-A KUBE-SEP-PB4NS7FPK4JKFGOI -m comment --comment bench/web:http -m tcp -p tcp -j DNAT --to-destination 198.19.0.14:8080
-X KUBE-SEP-ZIB6QAJMOESWRJBN
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_text(
            "partial iptables restore with nodePorts",
            &iptables::partial_restore(
                &cfg(),
                &[api_np(), web_np_changed()],
                &web_np(),
                &web_np_changed(),
            ),
            &want,
        );
    }

    /// svc3 of `TestOverallNFTablesRules` in transaction order (`syncProxyRules`): the chains
    /// (endpoints, service, external), the elements (cluster-ips, service-ips,
    /// service-nodeports), the service chain's masquerade rule, the external chain's rules,
    /// the dispatch, the endpoint chains' rules.
    #[test]
    fn nftables_full_is_kube_proxys_first_transaction_for_one_nodeport_service() {
        let want = NFT_SETUP.to_owned()
            + "add chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
flush chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
add chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
flush chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
add chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
flush chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
add chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
add chain ip kube-proxy external-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy external-XS2ODQL6-bench/web/tcp/http
add element ip kube-proxy cluster-ips { 198.18.128.1 }
add element ip kube-proxy service-ips { 198.18.128.1 . tcp . 80 : goto service-XS2ODQL6-bench/web/tcp/http }
add element ip kube-proxy service-nodeports { tcp . 30080 : goto external-XS2ODQL6-bench/web/tcp/http }
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http ip daddr 198.18.128.1 ip saddr != 198.19.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy external-XS2ODQL6-bench/web/tcp/http jump mark-for-masquerade
add rule ip kube-proxy external-XS2ODQL6-bench/web/tcp/http goto service-XS2ODQL6-bench/web/tcp/http
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http numgen random mod 3 vmap { 0 : goto endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 , 1 : goto endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 , 2 : goto endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080 }
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 ip saddr 198.19.0.11 jump mark-for-masquerade
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 meta l4proto tcp dnat to 198.19.0.11:8080
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 ip saddr 198.19.0.12 jump mark-for-masquerade
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 meta l4proto tcp dnat to 198.19.0.12:8080
add rule ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080 ip saddr 198.19.0.13 jump mark-for-masquerade
add rule ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080 meta l4proto tcp dnat to 198.19.0.13:8080
";
        assert_text(
            "full nft transaction with a nodePort",
            &nftables::full(&cfg(), &[web_np()]),
            &want,
        );
    }

    /// A partial sync refills the external chain like the service chain; the
    /// service-nodeports element keeps its verdict, so nftElementStorage leaves it alone.
    #[test]
    fn nftables_change_refills_the_external_chain() {
        let want = "add chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
flush chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
add chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
flush chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
add chain ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080
flush chain ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080
add chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
add chain ip kube-proxy external-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy external-XS2ODQL6-bench/web/tcp/http
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http ip daddr 198.18.128.1 ip saddr != 198.19.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy external-XS2ODQL6-bench/web/tcp/http jump mark-for-masquerade
add rule ip kube-proxy external-XS2ODQL6-bench/web/tcp/http goto service-XS2ODQL6-bench/web/tcp/http
add rule ip kube-proxy service-XS2ODQL6-bench/web/tcp/http numgen random mod 3 vmap { 0 : goto endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 , 1 : goto endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 , 2 : goto endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080 }
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 ip saddr 198.19.0.11 jump mark-for-masquerade
add rule ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080 meta l4proto tcp dnat to 198.19.0.11:8080
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 ip saddr 198.19.0.12 jump mark-for-masquerade
add rule ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080 meta l4proto tcp dnat to 198.19.0.12:8080
add rule ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080 ip saddr 198.19.0.14 jump mark-for-masquerade
add rule ip kube-proxy endpoint-4DXLETZP-bench/web/tcp/http__198.19.0.14/8080 meta l4proto tcp dnat to 198.19.0.14:8080
flush chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
";
        assert_text(
            "nft change transaction with a nodePort",
            &nftables::change(&cfg(), &web_np(), &web_np_changed()),
            want,
        );
    }

    /// A NodePort service without endpoints: kube-proxy rejects its ClusterIP and its
    /// nodePort (`TestNoEndpointsReject`; the filter rule's shape is the ns2/svc2 nodePort
    /// rule of `TestOverallIPTablesRules` with REJECT for DROP and "has no endpoints").
    #[test]
    fn a_nodeport_service_losing_all_endpoints_rejects_its_node_port() {
        let gone = ServicePort {
            endpoints: Vec::new(),
            ..web_np()
        };
        let want = "add element ip kube-proxy no-endpoint-services { 198.18.128.1 . tcp . 80 comment \"bench/web:http\" : goto reject-chain }
add element ip kube-proxy no-endpoint-nodeports { tcp . 30080 comment \"bench/web:http\" : goto reject-chain }
flush chain ip kube-proxy endpoint-YAJHH6Y5-bench/web/tcp/http__198.19.0.11/8080
flush chain ip kube-proxy endpoint-QLZOBDRZ-bench/web/tcp/http__198.19.0.12/8080
flush chain ip kube-proxy endpoint-ILCUDCQB-bench/web/tcp/http__198.19.0.13/8080
flush chain ip kube-proxy service-XS2ODQL6-bench/web/tcp/http
flush chain ip kube-proxy external-XS2ODQL6-bench/web/tcp/http
delete element ip kube-proxy service-ips { 198.18.128.1 . tcp . 80 }
delete element ip kube-proxy service-nodeports { tcp . 30080 }
";
        assert_text(
            "nft change of a nodePort service to no endpoints",
            &nftables::change(&cfg(), &web_np(), &gone),
            want,
        );
        assert_eq!(
            nftables::delete_stale(&web_np(), &gone).lines().last(),
            Some("delete chain ip kube-proxy external-XS2ODQL6-bench/web/tcp/http")
        );

        let want = "*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-SERVICES -m comment --comment \"bench/web:http has no endpoints\" -m tcp -p tcp -d 198.18.128.1 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment \"bench/web:http has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SEP-TYQHSLZ5NGHODEHC - [0:0]
:KUBE-SEP-5HSOZTVHQMJW5KWP - [0:0]
:KUBE-SEP-ZIB6QAJMOESWRJBN - [0:0]
:KUBE-SVC-ORYCKD7ZOX5JNSP3 - [0:0]
:KUBE-EXT-ORYCKD7ZOX5JNSP3 - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-X KUBE-SEP-TYQHSLZ5NGHODEHC
-X KUBE-SEP-5HSOZTVHQMJW5KWP
-X KUBE-SEP-ZIB6QAJMOESWRJBN
-X KUBE-SVC-ORYCKD7ZOX5JNSP3
-X KUBE-EXT-ORYCKD7ZOX5JNSP3
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_text(
            "partial iptables restore of a nodePort service to no endpoints",
            &iptables::partial_restore(&cfg(), std::slice::from_ref(&gone), &web_np(), &gone),
            want,
        );
    }

    #[test]
    fn teardown_deletes_the_table() {
        assert_eq!(nftables::teardown(), "delete table ip kube-proxy\n");
    }
}

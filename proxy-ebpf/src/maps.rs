//! The maps, declared once. Names come from `proxy_common` (checked at compile time below),
//! so both sides agree on them. Sizes here are defaults; the agent sets its own at load time.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use proxy_common::{
    Affinity4Key, Affinity4Value, AffinityMatchKey, CT4_DEFAULT_MAX, CT4_NEW_DEFAULT_MAX,
    CTR_SLOTS, Counter, Ct4Entry, Ct4Key, FeAddr4, Frag4Key, Frag4Ports, LB4_AFFINITY_DEFAULT_MAX,
    LB4_BACKENDS_DEFAULT_MAX, LB4_FLOW_TAILS_MAX, LB4_FRAGS_DEFAULT_MAX, LB4_MAGLEV_MAX,
    LB4_POD_CLIENTS_DEFAULT_MAX, LB4_REVNAT_DEFAULT_MAX, LB4_SERVICES_DEFAULT_MAX,
    LB4_SRC_RANGES_DEFAULT_MAX, LB4_TAILS_MAX, LB4_XDP_TAILS_MAX, LB4_XDP_TX_MAX, Lb4Backend,
    Lb4Config, Lb4Key, Lb4RevNat, Lb4Service, MaglevTable, RejectBudget, SOCK_REVNAT_DEFAULT_MAX,
    SockConfig, SockRevKey, SockRevValue, SrcRange4Key, SvcCidrs4,
};

#[map(name = "PKT_COUNTERS_V3")]
pub static PKT_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CTR_SLOTS, 0);

#[map(name = "LB4_SERVICES")]
pub static LB4_SERVICES: HashMap<Lb4Key, Lb4Service> =
    HashMap::with_max_entries(LB4_SERVICES_DEFAULT_MAX, 0);

#[map(name = "LB4_FE_ADDRS2")]
pub static LB4_FE_ADDRS: HashMap<u32, FeAddr4> =
    HashMap::with_max_entries(LB4_SERVICES_DEFAULT_MAX, 0);

#[map(name = "LB4_POD_CLIENTS")]
pub static LB4_POD_CLIENTS: HashMap<u32, u32> =
    HashMap::with_max_entries(LB4_POD_CLIENTS_DEFAULT_MAX, BPF_F_NO_PREALLOC);

#[map(name = "LB4_DP_STATE")]
pub static LB4_DP_STATE: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "LB4_REJECT_BUDGET")]
pub static LB4_REJECT_BUDGET: PerCpuArray<RejectBudget> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "LB4_BACKENDS")]
pub static LB4_BACKENDS: HashMap<u32, Lb4Backend> =
    HashMap::with_max_entries(LB4_BACKENDS_DEFAULT_MAX, 0);

#[map(name = "LB4_REVNAT")]
pub static LB4_REVNAT: HashMap<u32, Lb4RevNat> =
    HashMap::with_max_entries(LB4_REVNAT_DEFAULT_MAX, 0);

#[map(name = "LB4_AFFINITY")]
pub static LB4_AFFINITY: LruHashMap<Affinity4Key, Affinity4Value> =
    LruHashMap::with_max_entries(LB4_AFFINITY_DEFAULT_MAX, 0);

#[map(name = "LB4_AFFINITY_MATCH")]
pub static LB4_AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> =
    HashMap::with_max_entries(LB4_SERVICES_DEFAULT_MAX, 0);

#[map(name = "LB4_SRC_RANGES")]
pub static LB4_SRC_RANGES: LpmTrie<SrcRange4Key, u8> =
    LpmTrie::with_max_entries(LB4_SRC_RANGES_DEFAULT_MAX, 0);

#[map(name = "LB4_CONFIG_V2")]
pub static LB4_CONFIG: Array<Lb4Config> = Array::with_max_entries(1, 0);

#[map(name = "CT4")]
pub static CT4: LruHashMap<Ct4Key, Ct4Entry> = LruHashMap::with_max_entries(CT4_DEFAULT_MAX, 0);

#[map(name = "CT4_NEW")]
pub static CT4_NEW: LruHashMap<Ct4Key, Ct4Entry> =
    LruHashMap::with_max_entries(CT4_NEW_DEFAULT_MAX, 0);

#[map(name = "LB4_FRAGS")]
pub static LB4_FRAGS: LruHashMap<Frag4Key, Frag4Ports> =
    LruHashMap::with_max_entries(LB4_FRAGS_DEFAULT_MAX, 0);

#[map(name = "LB4_TAILS")]
pub static LB4_TAILS: ProgramArray = ProgramArray::with_max_entries(LB4_TAILS_MAX, 0);

#[map(name = "LB4_SVC_CIDRS")]
pub static LB4_SVC_CIDRS: Array<SvcCidrs4> = Array::with_max_entries(1, 0);

#[map(name = "LB4_FLOW_TAILS")]
pub static LB4_FLOW_TAILS: ProgramArray = ProgramArray::with_max_entries(LB4_FLOW_TAILS_MAX, 0);

#[map(name = "LB4_XDP_TAILS")]
pub static LB4_XDP_TAILS: ProgramArray = ProgramArray::with_max_entries(LB4_XDP_TAILS_MAX, 0);

#[map(name = "LB4_MAGLEV")]
pub static LB4_MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(LB4_MAGLEV_MAX, BPF_F_NO_PREALLOC);

#[map(name = "LB4_XDP_TX")]
pub static LB4_XDP_TX: HashMap<u32, u32> = HashMap::with_max_entries(LB4_XDP_TX_MAX, 0);

#[map(name = "LB4_UPLINK_MACS")]
pub static LB4_UPLINK_MACS: HashMap<u32, u64> = HashMap::with_max_entries(LB4_XDP_TX_MAX, 0);

#[map(name = "LB4_SOCK_REVNAT")]
pub static LB4_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(SOCK_REVNAT_DEFAULT_MAX, 0);

#[map(name = "SOCK_CONFIG")]
pub static SOCK_CONFIG: Array<SockConfig> = Array::with_max_entries(1, 0);

// The map macro takes a literal name; these keep each equal to the shared constant.
const _: () = {
    assert!(str_eq(proxy_common::PKT_COUNTERS_MAP, "PKT_COUNTERS_V3"));
    assert!(str_eq(proxy_common::LB4_SERVICES_MAP, "LB4_SERVICES"));
    assert!(str_eq(proxy_common::LB4_BACKENDS_MAP, "LB4_BACKENDS"));
    assert!(str_eq(proxy_common::LB4_POD_CLIENTS_MAP, "LB4_POD_CLIENTS"));
    assert!(str_eq(proxy_common::LB4_DP_STATE_MAP, "LB4_DP_STATE"));
    assert!(str_eq(
        proxy_common::LB4_REJECT_BUDGET_MAP,
        "LB4_REJECT_BUDGET"
    ));
    assert!(str_eq(proxy_common::LB4_FE_ADDRS_MAP, "LB4_FE_ADDRS2"));
    assert!(str_eq(proxy_common::LB4_REVNAT_MAP, "LB4_REVNAT"));
    assert!(str_eq(proxy_common::LB4_CONFIG_MAP, "LB4_CONFIG_V2"));
    assert!(str_eq(proxy_common::LB4_SRC_RANGES_MAP, "LB4_SRC_RANGES"));
    assert!(str_eq(proxy_common::LB4_AFFINITY_MAP, "LB4_AFFINITY"));
    assert!(str_eq(
        proxy_common::LB4_AFFINITY_MATCH_MAP,
        "LB4_AFFINITY_MATCH"
    ));
    assert!(str_eq(proxy_common::CT4_MAP, "CT4"));
    assert!(str_eq(proxy_common::CT4_NEW_MAP, "CT4_NEW"));
    assert!(str_eq(proxy_common::LB4_FRAGS_MAP, "LB4_FRAGS"));
    assert!(str_eq(proxy_common::LB4_TAILS_MAP, "LB4_TAILS"));
    assert!(str_eq(proxy_common::LB4_FLOW_TAILS_MAP, "LB4_FLOW_TAILS"));
    assert!(str_eq(proxy_common::LB4_SVC_CIDRS_MAP, "LB4_SVC_CIDRS"));
    assert!(str_eq(proxy_common::SOCK_REVNAT_MAP, "LB4_SOCK_REVNAT"));
    assert!(str_eq(proxy_common::SOCK_CONFIG_MAP, "SOCK_CONFIG"));
    assert!(str_eq(proxy_common::LB4_MAGLEV_MAP, "LB4_MAGLEV"));
    assert!(str_eq(proxy_common::LB4_XDP_TX_MAP, "LB4_XDP_TX"));
    assert!(str_eq(proxy_common::LB4_UPLINK_MACS_MAP, "LB4_UPLINK_MACS"));
    assert!(str_eq(proxy_common::LB4_XDP_TAILS_MAP, "LB4_XDP_TAILS"));
};

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

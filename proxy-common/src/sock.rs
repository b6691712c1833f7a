//! Socket-level load balancing: cgroup `connect4`, `sendmsg4`, `recvmsg4` and `getpeername4`
//! programs translate a socket's destination once, when it connects or sends, so its packets
//! go straight to the backend with no per-packet NAT and no conntrack entry.
//!
//! `connect4`/`sendmsg4` look the destination up in [`crate::LB4_SERVICES_MAP`] (every
//! frontend, with the backends of in-cluster traffic: slots 1..=count), rewrite it to a backend,
//! and remember the translation in [`SOCK_REVNAT_MAP`] under the socket's cookie;
//! `recvmsg4`/`getpeername4` put the frontend back, so an application sees what it dialled and
//! a UDP reply comes from the Service address.

/// `LB4_SOCK_REVNAT`: [`SockRevKey`] -> [`SockRevValue`]; LRU hash; written by `connect4` and
/// `sendmsg4`, read by `recvmsg4` and `getpeername4`, and by the agent to find the sockets
/// connected to a backend that went away.
pub const SOCK_REVNAT_MAP: &str = "LB4_SOCK_REVNAT";
/// Default size of [`SOCK_REVNAT_MAP`] (Cilium's default for its socket reverse map).
pub const SOCK_REVNAT_DEFAULT_MAX: u32 = 262_144;

/// Key of [`SOCK_REVNAT_MAP`]: a socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`: unique per socket for the kernel's lifetime (sock_diag reports
    /// the same value as `idiag_cookie`).
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

/// Value of [`SOCK_REVNAT_MAP`]: the frontend the socket dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 8);

/// `SOCK_CONFIG`: index 0 -> [`SockConfig`]; array of 1; written by the agent.
pub const SOCK_CONFIG_MAP: &str = "SOCK_CONFIG";

/// Value of [`SOCK_CONFIG_MAP`] index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// The network namespace cookie of the node's own namespace (where hostNetwork processes
    /// live). 0: the kernel's initial namespace (`bpf_get_netns_cookie(NULL)`).
    pub host_netns_cookie: u64,
    /// `SOCK_LB_*`.
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockConfig>() == 16);

/// Socket LB translates nothing (the programs may still be attached, briefly).
pub const SOCK_LB_OFF: u32 = 0;
/// Every socket in the cgroup tree: the node's own and its pods'.
pub const SOCK_LB_ALL: u32 = 1;
/// Only sockets of the node's own network namespace (hostNetwork); pods' traffic is left
/// to the TC path, so that a service mesh in the pod sees the Service address.
pub const SOCK_LB_HOST_ONLY: u32 = 2;

crate::impl_pod!(SockRevKey, SockRevValue, SockConfig);

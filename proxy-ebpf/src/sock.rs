//! Socket-level load balancing: cgroup `sock_addr` programs that translate a socket's
//! destination when it connects (TCP, connected UDP) or sends (unconnected UDP), and put the
//! frontend back where the application reads its peer (`getpeername`, `recvmsg`). The packets
//! then go straight to the backend: no per-packet NAT and no conntrack entry.
//!
//! | program                        | hook         | does                                       |
//! |--------------------------------|--------------|--------------------------------------------|
//! | `sluice_sock_connect4`         | connect4     | frontend -> backend; no backends: ECONNREFUSED |
//! | `sluice_sock_sendmsg4`         | sendmsg4     | the same for unconnected UDP                |
//! | `sluice_sock_connect4_eperm`   | connect4     | for kernels before 5.18 (no `bpf_set_retval`) |
//! | `sluice_sock_sendmsg4_eperm`   | sendmsg4     | likewise                                    |
//! | `sluice_sock_recvmsg4`         | recvmsg4     | a reply's source: backend -> frontend       |
//! | `sluice_sock_getpeername4`     | getpeername4 | the peer: backend -> frontend               |
//!
//! A LoadBalancer frontend with loadBalancerSourceRanges that hold none of the node's
//! addresses refuses the node's own calls with EPERM; a pod's go on untranslated, so that the
//! TC path checks the pod's address.
//!
//! A frontend without backends is refused at connect/sendmsg with ECONNREFUSED (as kube-proxy's
//! ICMP reject makes it) where the kernel lets a program set the error (`bpf_set_retval`,
//! Linux 5.18). Before that, the `_eperm` variants leave a pod's call untranslated, so the TC
//! path rejects it with ICMP port unreachable as today (ECONNREFUSED), and refuse a call from
//! the node's own namespace, which no TC program sees, with the only error they can give:
//! EPERM.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use proxy_common::{
    CTR_SOCK_CONNECT, CTR_SOCK_DENY_NO_LOCAL_BACKEND, CTR_SOCK_DENY_SOURCE_RANGE,
    CTR_SOCK_PASS_TO_TC, CTR_SOCK_REJECT_NO_BACKEND, CTR_SOCK_REVERSE, CTR_SOCK_REVNAT_WRITE,
    CTR_SOCK_SENDMSG, IPPROTO_TCP, IPPROTO_UDP, SOCK_LB_HOST_ONLY, SOCK_LB_OFF, SVC_FLAG_AFFINITY,
    SVC_FLAG_NO_LOCAL_DROP, SVC_FLAG_SRC_RANGES, SVC_FLAG_SRC_RANGES_NODE, SockRevKey,
    SockRevValue,
};

use crate::{
    lb,
    maps::{LB4_SOCK_REVNAT, SOCK_CONFIG},
    stats::count,
};

/// Let the call go on (with whatever was rewritten).
const PROCEED: i32 = 1;
/// Refuse the call: EPERM, or the error set with `bpf_set_retval`.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sluice_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, CTR_SOCK_CONNECT, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, CTR_SOCK_SENDMSG, true)
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_sock_connect4_eperm(ctx: SockAddrContext) -> i32 {
    forward(&ctx, CTR_SOCK_CONNECT, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sock_sendmsg4_eperm(ctx: SockAddrContext) -> i32 {
    forward(&ctx, CTR_SOCK_SENDMSG, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sluice_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // The verifier allows these hooks no other return value.
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    PROCEED
}

/// Whether the socket belongs to the node's own network namespace.
#[inline(always)]
fn in_host_netns(ctx: &SockAddrContext, host_cookie: u64) -> bool {
    // SAFETY: the helper takes the program's context, or NULL for the initial namespace.
    let mine = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = if host_cookie != 0 {
        host_cookie
    } else {
        unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) }
    };
    mine == host
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, counter: u32, set_retval: bool) -> i32 {
    let Some(cfg) = SOCK_CONFIG.get(0) else {
        return PROCEED;
    };
    if cfg.mode == SOCK_LB_OFF {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    // The context allows only 4-byte loads of these fields: volatile keeps LLVM from
    // narrowing them.
    // SAFETY: `sa` is the program's context pointer, valid for the program's run.
    let (proto, addr_be, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).protocol)),
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let proto = match proto {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return PROCEED,
    };
    // The port sits in the low 16 bits, in network order.
    let port_be = port as u16;
    let Some(fe) = lb::frontend(addr_be, port_be, proto) else {
        return PROCEED;
    };
    let host = in_host_netns(ctx, cfg.host_netns_cookie);
    if cfg.mode == SOCK_LB_HOST_ONLY && !host {
        return to_tc();
    }
    // loadBalancerSourceRanges: the client's address decides, which a socket may not have
    // yet. A pod's call goes on untranslated, for the TC path to check its address; the node's
    // may use the frontend only if a range holds the node's address, and is refused (EPERM)
    // otherwise, as kube-proxy's firewall drops it.
    if fe.flags & SVC_FLAG_SRC_RANGES != 0 {
        if !host {
            return to_tc();
        }
        if fe.flags & SVC_FLAG_SRC_RANGES_NODE == 0 {
            return refused(CTR_SOCK_DENY_SOURCE_RANGE);
        }
    }
    // internalTrafficPolicy Local with no endpoint here: kube-proxy drops the traffic. A pod's
    // call goes on untranslated for the TC path to drop; the node's, which no TC program
    // sees, is refused with EPERM rather than sent on to the ClusterIP.
    if fe.count == 0 && fe.flags & SVC_FLAG_NO_LOCAL_DROP != 0 {
        if !host {
            return to_tc();
        }
        return refused(CTR_SOCK_DENY_NO_LOCAL_BACKEND);
    }
    if fe.count == 0 {
        if set_retval {
            // SAFETY: a connect4/sendmsg4 program may set the syscall's error (Linux 5.18).
            unsafe { aya_ebpf::helpers::bpf_set_retval(-ECONNREFUSED) };
        } else if !host {
            // The TC path rejects it with ICMP port unreachable: ECONNREFUSED.
            return to_tc();
        }
        return refused(CTR_SOCK_REJECT_NO_BACKEND);
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // TCP: a fresh choice per connection. UDP: by the socket, so an unconnected socket keeps
    // sending to one backend while the backends stay the same.
    let r = if proto == IPPROTO_TCP {
        // SAFETY: no preconditions.
        unsafe { bpf_get_prandom_u32() }
    } else {
        (cookie ^ (cookie >> 32)) as u32
    };
    // sessionAffinity: keyed by the client's address, which only the TC path knows of a pod;
    // the node's own sockets share one entry (kube-proxy sees them all from the node's address).
    if fe.flags & SVC_FLAG_AFFINITY != 0 && !host {
        return to_tc();
    }
    let Some(be) = lb::choose(
        &fe,
        addr_be,
        port_be,
        proto,
        1,
        fe.count,
        0,
        false,
        r,
        crate::conntrack::now(),
    ) else {
        return PROCEED;
    };
    let key = SockRevKey {
        cookie,
        addr_be: be.addr_be,
        port_be: be.port_be,
        _pad: 0,
    };
    let value = SockRevValue {
        addr_be,
        port_be,
        proto,
        _pad: 0,
    };
    if LB4_SOCK_REVNAT.insert(&key, &value, 0).is_err() {
        count(CTR_SOCK_REVNAT_WRITE, 0);
    }
    // SAFETY: as above; these two fields may be written by connect4 and sendmsg4 programs.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), be.addr_be);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(be.port_be));
    }
    count(counter, 0);
    PROCEED
}

/// Leaves the call untranslated for the TC path, which sees the packets (and a pod's address).
#[inline(always)]
fn to_tc() -> i32 {
    count(CTR_SOCK_PASS_TO_TC, 0);
    PROCEED
}

/// Refuses the call (EPERM, or the error `bpf_set_retval` set), counted under `counter`.
#[inline(always)]
fn refused(counter: u32) -> i32 {
    count(counter, 0);
    REJECT
}

/// Shows the frontend a socket dialled where it would see the backend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `forward`.
    let (addr_be, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr_be,
        port_be: port as u16,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(v) = (unsafe { LB4_SOCK_REVNAT.get(&key) }).copied() else {
        return;
    };
    // A frontend that is gone shows the backend: the entry is stale.
    if lb::frontend(v.addr_be, v.port_be, v.proto).is_none() {
        let _ = LB4_SOCK_REVNAT.remove(&key);
        return;
    }
    // SAFETY: recvmsg4 and getpeername4 programs may write these fields.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), v.addr_be);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(v.port_be));
    }
    count(CTR_SOCK_REVERSE, 0);
}

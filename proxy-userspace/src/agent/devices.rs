//! Which devices the datapath sits on, kept up to date as devices come and go.
//!
//! - Pod-facing devices: names matching `--pod-interfaces` globs (the host side of pod veths),
//!   attached as they appear: a netlink socket subscribed to link and address events wakes the
//!   sync loop, which also re-checks every few seconds.
//! - Uplinks: `--uplinks`, or by default the devices holding the node's addresses.
//!
//! Attachments are persistent (see `Dataplane::attach_persistent`): they survive the agent's
//! exit, and a restarted agent replaces the programs in place. A device that disappears takes
//! its attachments with it; its link pins are then removed. A device that is no longer wanted
//! (flags changed) is detached by removing its pins.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use super::{
    XdpSetting, XdpTx,
    metrics::{Metrics, RoleLabel, XdpLabel},
    source::{Change, ChangeTx},
};
use crate::dataplane::{self, AttachMode, Dataplane, DataplaneError, XdpMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Pod,
    Uplink,
}

impl Role {
    fn label(self) -> RoleLabel {
        RoleLabel {
            role: match self {
                Role::Pod => "pod",
                Role::Uplink => "uplink",
            }
            .into(),
        }
    }
}

pub struct Devices {
    pod_globs: Vec<glob::Pattern>,
    uplinks: Vec<String>,
    mode: AttachMode,
    xdp: XdpSetting,
    xdp_tx: XdpTx,
    links_dir: PathBuf,
    /// The XDP mode of each attached uplink (`off`: TC alone), and whether XDP sends there.
    xdp_modes: BTreeMap<String, (&'static str, bool)>,
    /// Attached devices: role and ifindex (a device recreated under the same name has a new
    /// index and must be attached again).
    attached: BTreeMap<String, (Role, u32)>,
    /// Wanted devices refused for good (not Ethernet), with their ifindex: said once, not
    /// retried until the device is made anew.
    refused: BTreeMap<String, u32>,
    /// Wanted devices whose attach failed at the last reconcile (to be retried).
    failed: BTreeSet<String>,
    metrics: Arc<Metrics>,
}

/// The node's devices and their IPv4 addresses, in the current network namespace.
pub fn local_devices() -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in addrs {
        let entry = out.entry(ifa.interface_name.clone()).or_default();
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            entry.push(sin.ip());
        }
    }
    out
}

impl Devices {
    pub fn new(
        pod_globs: Vec<glob::Pattern>,
        uplinks: Vec<String>,
        mode: AttachMode,
        xdp: XdpSetting,
        xdp_tx: XdpTx,
        links_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pod_globs,
            uplinks,
            mode,
            xdp,
            xdp_tx,
            links_dir,
            xdp_modes: BTreeMap::new(),
            attached: BTreeMap::new(),
            refused: BTreeMap::new(),
            failed: BTreeSet::new(),
            metrics,
        }
    }

    fn role(&self, name: &str, addrs: &[Ipv4Addr], node_addrs: &[Ipv4Addr]) -> Option<Role> {
        if name == "lo" {
            return None;
        }
        if self.uplinks.iter().any(|u| u == name) {
            return Some(Role::Uplink);
        }
        if self.pod_globs.iter().any(|g| g.matches(name)) {
            return Some(Role::Pod);
        }
        if self.uplinks.is_empty() && addrs.iter().any(|a| node_addrs.contains(a)) {
            return Some(Role::Uplink);
        }
        None
    }

    /// Whether this dataplane's programs have replaced an earlier agent's on every device:
    /// the devices are all known (uplinks named, or the node's addresses known), the last
    /// reconcile attached to every device it wanted, and every device with a pinned link (TCX)
    /// is attached. With clsact there are no pins: each attach replaced the filter in place. A
    /// device an earlier agent attached to and this one does not want (the device flags
    /// changed) keeps that agent's filter, which nothing tracks; there, once the old pins go,
    /// the old programs' new flows find their tail-call slots empty and are dropped, counted.
    pub fn replaced_all(&self, node_known: bool) -> bool {
        replaced(
            node_known || !self.uplinks.is_empty(),
            &self.failed,
            &dataplane::pinned_link_devices(&self.links_dir),
            |name| self.attached.contains_key(name),
        )
    }

    /// Attaches to every wanted device not yet attached, forgets the ones that are gone.
    /// `node_known`: the node's addresses are known (its Node has been listed); until then a
    /// present device is never detached, since it may be an uplink found by address.
    pub fn reconcile(&mut self, dp: &mut Dataplane, node_addrs: &[Ipv4Addr], node_known: bool) {
        let present = local_devices();
        let mut wanted: BTreeMap<String, Role> = BTreeMap::new();
        for (name, addrs) in &present {
            if let Some(role) = self.role(name, addrs, node_addrs) {
                wanted.insert(name.clone(), role);
            }
        }
        let mut failed = BTreeSet::new();
        for (name, role) in &wanted {
            let index = nix::net::if_::if_nametoindex(name.as_str()).unwrap_or(0);
            if self.attached.get(name) == Some(&(*role, index))
                || self.refused.get(name) == Some(&index)
            {
                continue;
            }
            // Not a target of XDP's sending while its programs change (TC serves meanwhile);
            // `attach_xdp` lets it again.
            stop_xdp_tx(dp, name, index);
            let result = match role {
                Role::Pod => dp.attach_pod_device_persistent(name, self.mode, &self.links_dir),
                Role::Uplink => dp.attach_uplink_persistent(name, self.mode, &self.links_dir),
            };
            match result {
                Ok(()) => {
                    tracing::info!(device = %name, ?role, mode = %self.mode, "attached");
                    self.attached.insert(name.clone(), (*role, index));
                    if *role == Role::Uplink {
                        self.attach_xdp(dp, name, index);
                    } else {
                        self.forget_xdp_mode(name);
                        if let Err(error) = dataplane::detach_xdp(&self.links_dir, name) {
                            // An uplink of an earlier agent (the flags changed): no XDP on a
                            // pod device.
                            tracing::warn!(device = %name, %error, "could not detach an earlier XDP program");
                        }
                    }
                }
                Err(error @ DataplaneError::NotEthernet { .. }) => {
                    self.metrics.attach_errors.inc();
                    tracing::warn!(device = %name, ?role, %error, "not attached");
                    self.refused.insert(name.clone(), index);
                }
                Err(error) => {
                    self.metrics.attach_errors.inc();
                    failed.insert(name.clone());
                    let error = super::chain(&error);
                    tracing::warn!(device = %name, ?role, %error, "attach failed; will retry");
                }
            }
        }
        self.failed = failed;
        self.refused.retain(|name, _| wanted.contains_key(name));
        // A refused device is not ours: what an older agent attached there goes too.
        for name in self.refused.keys() {
            wanted.remove(name);
        }
        // Gone or no longer wanted: drop the pins (for a device still there, that detaches).
        let pinned: BTreeSet<String> = dataplane::pinned_link_devices(&self.links_dir)
            .into_iter()
            .chain(self.attached.keys().cloned())
            .collect();
        for name in pinned {
            if wanted.contains_key(&name) || (!node_known && present.contains_key(&name)) {
                continue;
            }
            // No longer a target of XDP's sending, before its programs go.
            let indexes = [
                self.attached.get(&name).map(|(_, i)| *i),
                nix::net::if_::if_nametoindex(name.as_str()).ok(),
            ];
            for index in indexes.into_iter().flatten() {
                stop_xdp_tx(dp, &name, index);
            }
            let result = dataplane::forget_device_links(&self.links_dir, &name).and_then(|()| {
                if self.mode == AttachMode::Clsact && present.contains_key(&name) {
                    dataplane::detach_clsact(&name)
                } else {
                    Ok(())
                }
            });
            if let Err(error) = result {
                tracing::warn!(device = %name, %error, "could not detach");
                continue;
            }
            self.forget_xdp_mode(&name);
            if self.attached.remove(&name).is_some() {
                let why = if present.contains_key(&name) {
                    "no longer wanted"
                } else {
                    "gone"
                };
                tracing::info!(device = %name, why, "detached");
            }
        }
        // Only the uplinks attached here and let send stay in `LB4_XDP_TX`: entries of devices
        // gone, made anew, or left by an earlier agent with other flags go (XDP would redirect
        // to them).
        let keep: BTreeSet<u32> = self
            .attached
            .iter()
            .filter(|(name, (role, _))| {
                *role == Role::Uplink && self.xdp_modes.get(*name).is_some_and(|(_, tx)| *tx)
            })
            .map(|(_, (_, index))| *index)
            .collect();
        match dp.retain_xdp_tx(&keep) {
            Ok(stale) if !stale.is_empty() => {
                tracing::info!(?stale, "devices no longer sent to from XDP");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not prune the uplinks XDP sends to"),
        }
        self.write_uplink_macs(dp);
        for role in [Role::Pod, Role::Uplink] {
            let n = self.attached.values().filter(|(r, _)| *r == role).count();
            self.metrics
                .attached_devices
                .get_or_create(&role.label())
                .set(n as i64);
        }
    }
}

impl Devices {
    /// Writes the MAC address of every uplink with sluice's XDP program into
    /// `LB4_UPLINK_MACS` (again at every sync: an address can change under the same index),
    /// and removes the others. XDP compares a new flow's frame with it: a frame for another
    /// host starts no flow (TC passes it, as the stack drops it). Where the address cannot be
    /// read or written, XDP does not check that uplink (TC still does).
    fn write_uplink_macs(&self, dp: &mut Dataplane) {
        let mut keep = BTreeSet::new();
        for (name, (role, index)) in &self.attached {
            let xdp_on = self
                .xdp_modes
                .get(name)
                .is_some_and(|(mode, _)| *mode != "off");
            if *role != Role::Uplink || !xdp_on {
                continue;
            }
            let written = dataplane::device_mac(name)
                .map_err(|e| e.to_string())
                .and_then(|mac| dp.set_uplink_mac(*index, mac).map_err(|e| e.to_string()));
            match written {
                Ok(()) => {
                    keep.insert(*index);
                }
                Err(error) => {
                    tracing::warn!(device = %name, %error, "could not write the uplink's MAC address for XDP");
                }
            }
        }
        if let Err(error) = dp.retain_uplink_macs(&keep) {
            tracing::warn!(%error, "could not prune the uplinks' MAC addresses");
        }
    }

    /// Forgets uplink `name`'s XDP mode, and its metric series.
    fn forget_xdp_mode(&mut self, name: &str) {
        if let Some((mode, tx)) = self.xdp_modes.remove(name) {
            self.metrics
                .xdp_uplinks
                .remove(&XdpLabel::new(name, mode, tx));
        }
    }

    /// Puts the XDP program on uplink `name` (just attached at TC) in the first mode of
    /// `--xdp-mode` that works, or takes an earlier agent's off it (`off`). A mode that fails
    /// is logged and the uplink left to TC, which serves everything XDP would: it is not
    /// retried until the device is made anew (a driver does not gain XDP at run time).
    fn attach_xdp(&mut self, dp: &mut Dataplane, name: &str, index: u32) {
        let mut chosen = None;
        for &mode in self.xdp.modes() {
            match dp.attach_xdp_persistent(name, mode, &self.links_dir) {
                Ok(()) => {
                    chosen = Some(mode);
                    break;
                }
                Err(error) => {
                    let level_warn = self.xdp != XdpSetting::Auto;
                    let error = super::chain(&error);
                    if level_warn {
                        self.metrics.attach_errors.inc();
                        tracing::warn!(device = %name, %mode, %error, "XDP not attached; the uplink is left to TC");
                    } else {
                        tracing::info!(device = %name, %mode, %error, "XDP mode not available; the uplink is left to TC");
                    }
                }
            }
        }
        if chosen.is_none()
            && let Err(error) = dataplane::detach_xdp(&self.links_dir, name)
        {
            tracing::warn!(device = %name, %error, "could not detach an earlier XDP program");
        }
        // Whether XDP sends the packets of flows SNATed to the node out itself here.
        let driver = dataplane::device_driver(name).ok();
        let tx_mode = chosen.filter(|&m| self.xdp_tx.allows(m, driver.as_deref()));
        let tx = match dp.set_xdp_tx(index, tx_mode) {
            Ok(()) => tx_mode.is_some(),
            Err(error) => {
                self.metrics.attach_errors.inc();
                tracing::warn!(device = %name, %error, "XDP left not sending; TC forwards");
                let _ = dp.set_xdp_tx(index, None);
                false
            }
        };
        let chosen = chosen.map_or("off", XdpMode::name);
        tracing::info!(
            device = %name, xdp = chosen, xdp_tx = tx, driver = driver.as_deref().unwrap_or("?"),
            setting = ?self.xdp, "XDP mode of uplink"
        );
        self.forget_xdp_mode(name);
        self.xdp_modes.insert(name.to_owned(), (chosen, tx));
        self.metrics
            .xdp_uplinks
            .get_or_create(&XdpLabel::new(name, chosen, tx))
            .set(1);
    }
}

/// Wakes the sync loop on every link or IPv4 address change (rtnetlink multicast groups).
pub fn watch_links(tx: ChangeTx) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right after.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32;
    // SAFETY: sa is a valid sockaddr_nl and the length says so.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("sluice-netlink".into())
        .spawn(move || {
            let mut buf = [0u8; 16384];
            loop {
                // SAFETY: buf is valid for writes of its length.
                let n = unsafe {
                    libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // Events were lost: a re-check covers them.
                        Some(libc::ENOBUFS) => {}
                        _ => {
                            tracing::warn!(error = %e, "netlink watch ended; devices are re-checked periodically");
                            return;
                        }
                    }
                }
                if tx.send(Change::Devices).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

/// [`Devices::replaced_all`]'s rule: the devices are known, no attach failed, and every device
/// with a pinned link is attached.
fn replaced(
    devices_known: bool,
    failed: &BTreeSet<String>,
    pinned: &[String],
    attached: impl Fn(&str) -> bool,
) -> bool {
    devices_known && failed.is_empty() && pinned.iter().all(|name| attached(name))
}

/// Takes device `name` (index `index`) out of what XDP may send to, saying so if that fails.
fn stop_xdp_tx(dp: &mut Dataplane, name: &str, index: u32) {
    if let Err(error) = dp.set_xdp_tx(index, None) {
        tracing::warn!(device = %name, %error, "could not stop XDP sending there");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_programs_are_replaced_only_once_every_device_is_known_and_attached() {
        let none = BTreeSet::new();
        let pinned = ["eth0".to_owned(), "pv1".to_owned()];
        let both = |n: &str| n == "eth0" || n == "pv1";
        assert!(replaced(true, &none, &pinned, both));
        assert!(
            replaced(true, &none, &[], |_| false),
            "clsact: no pins to wait for"
        );
        assert!(
            !replaced(false, &none, &pinned, both),
            "an uplink found by address may not be known yet"
        );
        let failed: BTreeSet<String> = ["pv2".to_owned()].into();
        assert!(
            !replaced(true, &failed, &[], |_| true),
            "a failed attach leaves the old filter there (clsact)"
        );
        assert!(
            !replaced(true, &none, &pinned, |n| n == "eth0"),
            "a pinned link still the old agent's"
        );
    }
}

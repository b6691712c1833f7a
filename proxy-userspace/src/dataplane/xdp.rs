//! The XDP program on uplinks ([`XDP_FROM_UPLINK`]): attached in front of the TC pair, native
//! or generic, as a pinned link that outlives the agent like the TC links do.
//!
//! Its link pin is `links/xdp-<mode>_<device>`: the mode is in the name because a link cannot
//! change mode, so a restart that asks for the other mode removes the old pin (which detaches
//! that program) and attaches anew. Between the two, TC serves every packet: XDP only takes
//! over what TC would do the same way, so a gap loses nothing.
use std::path::{Path, PathBuf};

use aya::programs::{ProgramError, links::FdLink, xdp::XdpLink};
use proxy_common::{
    LB4_UPLINK_MACS_MAP, LB4_XDP_TX_MAP, LB4_XDP_TX_MAX, XDP_TX_GENERIC, XDP_TX_NATIVE,
};

use super::{
    Dataplane, DataplaneError, XDP_FROM_UPLINK, c_name, encode_pin_name, ensure_ethernet,
    remove_pin, replace_pinned, xdp_mut,
};

/// How the XDP program is attached to an uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before an skb exists (`XDP_FLAGS_DRV_MODE`): where the gain is. Needs a
    /// driver with XDP support (veth has it).
    Native,
    /// In the stack, on the skb (`XDP_FLAGS_SKB_MODE`): any device, little gain over TC; for
    /// devices whose driver has no XDP.
    Generic,
}

impl XdpMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    fn aya(self) -> aya::programs::XdpMode {
        match self {
            Self::Native => aya::programs::XdpMode::Driver,
            Self::Generic => aya::programs::XdpMode::Skb,
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl XdpMode {
    /// Its value in `LB4_XDP_TX`.
    fn tx_value(self) -> u32 {
        match self {
            Self::Native => XDP_TX_NATIVE,
            Self::Generic => XDP_TX_GENERIC,
        }
    }

    const ALL: [Self; 2] = [Self::Native, Self::Generic];
}

/// `links_dir/xdp-<mode>_<interface>`.
fn xdp_pin(links_dir: &Path, interface: &str, mode: XdpMode) -> PathBuf {
    links_dir.join(format!(
        "{}_{}",
        xdp_pin_kind(mode),
        encode_pin_name(interface)
    ))
}

/// The part of an XDP link pin's name before `_<interface>`: `xdp-<mode>`.
fn xdp_pin_kind(mode: XdpMode) -> String {
    format!("xdp-{mode}")
}

/// Removes the XDP link pins of a device, in either mode: the program is detached from a
/// device still there (the pin held the last reference to its link).
pub fn detach_xdp(links_dir: &Path, interface: &str) -> Result<(), DataplaneError> {
    for mode in XdpMode::ALL {
        remove_pin(&xdp_pin(links_dir, interface, mode))?;
    }
    Ok(())
}

/// An uplink's XDP attachment as the node's agent left it, read from its pins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PinnedUplink {
    pub device: String,
    /// `native` or `generic`: the link pin's mode.
    pub mode: &'static str,
    /// How XDP sends the device's SNATed flows out (`LB4_XDP_TX`): `native`, `generic`, or
    /// `None` where it leaves them to TC.
    pub tx: Option<&'static str>,
    /// Its driver (`ethtool -i`), or `None` for a device not in this namespace.
    pub driver: Option<String>,
}

/// The uplinks with a pinned XDP link under `pin_path` (an agent's `--pin-path`), as seen from
/// the calling thread's network namespace; `None` if no agent has pinned anything there.
/// Reads pins and one map; changes nothing.
pub fn pinned_uplinks(pin_path: &Path) -> Option<Vec<PinnedUplink>> {
    let links = std::fs::read_dir(pin_path.join("links")).ok()?;
    // The map may be absent (pins of an agent from before XDP sent): then nothing sends.
    let tx: std::collections::BTreeMap<u32, u32> =
        aya::maps::MapData::from_pin(pin_path.join(LB4_XDP_TX_MAP))
            .ok()
            .and_then(|d| aya::maps::Map::from_map_data(d).ok())
            .and_then(|m| aya::maps::HashMap::<_, u32, u32>::try_from(m).ok())
            .map(|m| m.iter().filter_map(Result::ok).collect())
            .unwrap_or_default();
    let mut out: Vec<PinnedUplink> = links
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (kind, device) = name.split_once('_')?;
            let mode = XdpMode::ALL
                .into_iter()
                .find(|m| kind == xdp_pin_kind(*m))?;
            let device = super::decode_pin_name(device);
            let index = nix::net::if_::if_nametoindex(device.as_str()).ok();
            let tx = index.and_then(|i| tx.get(&i)).and_then(|v| {
                XdpMode::ALL
                    .into_iter()
                    .find(|m| m.tx_value() == *v)
                    .map(XdpMode::name)
            });
            Some(PinnedUplink {
                driver: device_driver(&device).ok(),
                device,
                mode: mode.name(),
                tx,
            })
        })
        .collect();
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Some(out)
}

impl Dataplane {
    /// Attaches [`XDP_FROM_UPLINK`] to `interface` in `mode`, in the calling thread's network
    /// namespace, for as long as this `Dataplane` lives.
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        let name = c_name(interface)?;
        ensure_ethernet(&name, interface)?;
        xdp_mut(&mut self.ebpf, XDP_FROM_UPLINK)?
            .attach(name.as_c_str(), mode.aya())
            .map_err(xdp_error(interface, mode))?;
        Ok(())
    }

    /// Attaches [`XDP_FROM_UPLINK`] to `interface` in `mode` so that it stays attached after
    /// this process exits, replacing atomically (`BPF_LINK_UPDATE`) the program an earlier
    /// agent attached in the same mode; one attached in the other mode is detached first.
    pub fn attach_xdp_persistent(
        &mut self,
        interface: &str,
        mode: XdpMode,
        links_dir: &Path,
    ) -> Result<(), DataplaneError> {
        let error = xdp_error(interface, mode);
        let name = c_name(interface)?;
        ensure_ethernet(&name, interface)?;
        std::fs::create_dir_all(links_dir).map_err(|source| DataplaneError::PinPath {
            path: links_dir.to_owned(),
            source,
        })?;
        for other in XdpMode::ALL.into_iter().filter(|m| *m != mode) {
            remove_pin(&xdp_pin(links_dir, interface, other))?;
        }
        let path = xdp_pin(links_dir, interface, mode);
        let prog = xdp_mut(&mut self.ebpf, XDP_FROM_UPLINK)?;
        let replaced = replace_pinned(&path, interface, &error, |fd| {
            let link = XdpLink::try_from(fd).ok()?;
            Some(
                prog.attach_to_link(link)
                    .and_then(|id| prog.take_link(id).map(drop)),
            )
        })?;
        if replaced {
            return Ok(());
        }
        let id = prog.attach(name.as_c_str(), mode.aya()).map_err(&error)?;
        // A link made by netlink (kernels before 5.9, which sluice does not support) has no fd
        // to pin: refused, and detached as it drops.
        let link =
            FdLink::try_from(prog.take_link(id).map_err(&error)?).map_err(|e| error(e.into()))?;
        link.pin(&path)
            .map_err(|source| DataplaneError::PinnedLink {
                path: path.clone(),
                source: Box::new(source),
            })?;
        Ok(())
    }
}

impl Dataplane {
    /// Lets the XDP program on the uplink with index `ifindex`, attached in `mode`, send the
    /// packets of flows SNATed to the node out itself (XDP_TX, or XDP_REDIRECT to another
    /// uplink let in the same mode); `None` leaves them to TC there. A veth in native mode
    /// drops what XDP sends it unless its peer takes XDP frames (an XDP program or GRO on the
    /// peer): only the operator can say so (`--xdp-tx`).
    pub fn set_xdp_tx(
        &mut self,
        ifindex: u32,
        mode: Option<XdpMode>,
    ) -> Result<(), DataplaneError> {
        match mode {
            Some(mode) => self.insert(
                LB4_XDP_TX_MAP,
                LB4_XDP_TX_MAX,
                ifindex,
                mode.tx_value(),
                || format!("the uplink with index {ifindex}"),
            ),
            None => self.remove::<u32, u32>(LB4_XDP_TX_MAP, &ifindex),
        }
    }

    /// Removes from `LB4_XDP_TX` every uplink not in `keep` (devices gone, made anew under
    /// another index, no longer uplinks, or let send by an earlier agent): XDP reads the map
    /// for where it may redirect to, and a device without its program there drops what it is
    /// sent. Returns the indexes removed.
    pub fn retain_xdp_tx(
        &mut self,
        keep: &std::collections::BTreeSet<u32>,
    ) -> Result<Vec<u32>, DataplaneError> {
        self.retain_uplinks::<u32>(LB4_XDP_TX_MAP, keep)
    }

    /// Writes the MAC address of the uplink with index `ifindex` into `LB4_UPLINK_MACS`, where
    /// XDP reads it to leave frames for other hosts to TC (XDP has no `skb->pkt_type`).
    pub fn set_uplink_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<(), DataplaneError> {
        self.insert(
            LB4_UPLINK_MACS_MAP,
            LB4_XDP_TX_MAX,
            ifindex,
            uplink_mac_value(mac),
            || format!("the uplink with index {ifindex}"),
        )
    }

    /// Removes from `LB4_UPLINK_MACS` every uplink not in `keep` (no XDP program there any
    /// more, gone, or made anew). Returns the indexes removed.
    pub fn retain_uplink_macs(
        &mut self,
        keep: &std::collections::BTreeSet<u32>,
    ) -> Result<Vec<u32>, DataplaneError> {
        self.retain_uplinks::<u64>(LB4_UPLINK_MACS_MAP, keep)
    }

    /// Removes from `map` (uplink ifindex -> `V`) every uplink not in `keep`.
    fn retain_uplinks<V: aya::Pod>(
        &mut self,
        map: &'static str,
        keep: &std::collections::BTreeSet<u32>,
    ) -> Result<Vec<u32>, DataplaneError> {
        let m: aya::maps::HashMap<&mut aya::maps::MapData, u32, V> = self.open_mut(map)?;
        let stale: Vec<u32> = m
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !keep.contains(i))
            .collect();
        for i in &stale {
            self.remove::<u32, V>(map, i)?;
        }
        Ok(stale)
    }
}

/// A MAC address as `LB4_UPLINK_MACS` holds it: its six bytes first in memory, as the XDP
/// program reads a frame's destination.
pub fn uplink_mac_value(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&mac);
    u64::from_ne_bytes(b)
}

/// The MAC address of `interface` (SIOCGIFHWADDR), in the calling thread's network namespace.
pub fn device_mac(interface: &str) -> std::io::Result<[u8; 6]> {
    let mut ifr = ifreq_named(interface)?;
    // SAFETY: SIOCGIFHWADDR reads the name in `ifr` and writes the address into it.
    unsafe { device_ioctl(libc::SIOCGIFHWADDR, &mut ifr) }?;
    // SAFETY: SIOCGIFHWADDR filled the union's `sockaddr` member.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

/// Runs the device ioctl `request` on `ifr` through a fresh datagram socket.
///
/// # Safety
/// `request` must be one that reads and writes only `ifr` and what its data pointer (if the
/// request uses one) points to, which must be valid for the call.
unsafe fn device_ioctl(request: libc::Ioctl, ifr: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: a plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours; the caller vouches for `request` and `ifr`.
    let rc = unsafe { libc::ioctl(fd, request, ifr as *mut libc::ifreq) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// An all-zero `ifreq` naming `interface` (NUL-terminated).
fn ifreq_named(interface: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

/// The name of `interface`'s driver, as `ethtool -i` reports it (`veth`, `mlx5_core`, ...), in
/// the calling thread's network namespace.
pub fn device_driver(interface: &str) -> std::io::Result<String> {
    // `struct ethtool_drvinfo` (linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    let mut ifr = ifreq_named(interface)?;
    ifr.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL reads `ifr` and writes `info`, which outlives the call.
    unsafe { device_ioctl(libc::SIOCETHTOOL, &mut ifr) }?;
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn xdp_error(interface: &str, mode: XdpMode) -> impl Fn(ProgramError) -> DataplaneError {
    let interface = interface.to_owned();
    move |source| DataplaneError::AttachXdp {
        interface: interface.clone(),
        mode,
        source: Box::new(source),
    }
}

//! Every map of the loaded object as bytes, whatever its key and value types: what
//! [`Dataplane::reset`] clears, and what its test compares with a freshly loaded object. aya's
//! typed maps need each map's Rust types, so this speaks the BPF syscall's element commands
//! itself. A map of a kind it does not know is an error, never silently left as it was.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::maps::{Map, MapData};

use super::{Dataplane, DataplaneConfig, DataplaneError};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
pub(super) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(super) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_ELEM`'s flag: create only, never overwrite.
pub(super) const BPF_NOEXIST: u64 = 1;
/// `BPF_MAP_UPDATE_ELEM`'s flag: overwrite only, never create.
pub(super) const BPF_EXIST: u64 = 2;
/// `map_flags`: programs may only read the map (aya's `.rodata`, frozen after load).
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// The element commands' part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_BATCH`'s part of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries read per `BPF_MAP_LOOKUP_BATCH` call. A hash map's batch ends at a bucket's end, so
/// a call can return fewer; a bucket holding more than this would fail (`ENOSPC`), which a
/// hash map's buckets (a few entries each) never come near.
const BATCH: usize = 4096;

/// Calls `f` with every entry of the hash or LRU map `data` (not per-CPU; named `name` in
/// errors), read [`BATCH`] at a time with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6, LRU maps
/// included): one syscall per batch, where listing the keys and reading each value takes two
/// per entry (the datapath bench's tidy scan of 262,048 conntrack entries: 223 ms key by key,
/// 35 ms in batches).
/// The walk goes bucket by bucket, so an entry that is neither added nor removed meanwhile is
/// seen exactly once; one added or removed during the walk may be seen or not, as with any
/// walk of a live hash map.
pub(super) fn scan<K: aya::Pod, V: aya::Pod>(
    name: &str,
    data: &MapData,
    mut f: impl FnMut(K, V),
) -> Result<(), DataplaneError> {
    let error = |op: &'static str| {
        move |source: io::Error| DataplaneError::Raw {
            map: name.into(),
            op,
            source,
        }
    };
    let info = data
        .info()
        .map_err(|e| error("read the info of")(io::Error::other(e)))?;
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    if info.key_size() as usize != ks || info.value_size() as usize != vs {
        return Err(error("read as the expected key and value types")(
            io::ErrorKind::InvalidData.into(),
        ));
    }
    let mut keys = vec![0u8; ks * BATCH];
    let mut values = vec![0u8; vs * BATCH];
    // The kernel's opaque position (a hash map's bucket index), carried from call to call.
    let (mut at, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &at as *const u64 as u64 },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: data.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr` for the batch commands; the kernel writes at
        // most `count` keys and values into buffers sized for that many, and its position
        // (4 bytes for a hash map) into `next`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        // Entries come back with the last batch too (its error is ENOENT: the walk's end);
        // with any other error the kernel may not have written `count` at all.
        let last = r < 0;
        if last {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(error("read in batches")(e));
            }
        }
        for i in 0..(attr.count as usize).min(BATCH) {
            // SAFETY: each slot holds a key and a value the kernel wrote, of `K`'s and `V`'s
            // sizes (checked above); both are plain data, read unaligned.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<K>()),
                    std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<V>()),
                )
            };
            f(k, v);
        }
        if last {
            return Ok(());
        }
        at = next;
        first = false;
    }
}

/// The data of `map`, a hash or LRU map (named `name`), for [`scan`].
pub(super) fn hash_data<'a>(
    map: &'a Map,
    name: &'static str,
) -> Result<&'a MapData, DataplaneError> {
    match map {
        Map::HashMap(d) | Map::LruHashMap(d) => Ok(d),
        _ => Err(DataplaneError::Raw {
            map: name.into(),
            op: "read as a hash map",
            source: io::ErrorKind::Unsupported.into(),
        }),
    }
}

fn elem(cmd: libc::c_long, fd: BorrowedFd<'_>, key: *const u8, value: *mut u8) -> io::Result<()> {
    elem_with(cmd, fd, key, value, 0)
}

/// `elem` with the command's flags (`BPF_NOEXIST` for an update that must not overwrite).
pub(super) fn elem_with(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the element commands; the kernel reads
    // and writes at most `key_size` bytes at `key` and the map's value size at `value`, which
    // the callers' buffers hold.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How a map holds state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Hash, LRU and LPM maps: entries come and go.
    Keyed,
    /// Arrays: every index always exists; empty is all zeros.
    Indexed,
    /// Read-only to programs (`.rodata`) or a stream (ring buffer, perf events): nothing a
    /// packet can leave behind for the next one to read.
    Stateless,
}

/// One map of the object.
pub(super) struct RawMap<'a> {
    name: &'a str,
    data: &'a MapData,
    kind: Kind,
    key_size: usize,
    /// For per-CPU maps, every CPU's value, each rounded up to 8 bytes, as the syscall wants.
    value_size: usize,
    pub(super) max_entries: u32,
}

/// The maps of `dp`, by name.
fn maps(dp: &Dataplane) -> Result<Vec<RawMap<'_>>, DataplaneError> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, source)| DataplaneError::Raw {
            map: "(possible CPUs)".into(),
            op: "count",
            source,
        })?
        .get() as usize;
    let mut maps = Vec::new();
    for (name, map) in dp.ebpf.maps() {
        let (data, kind, per_cpu) = match map {
            Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) => (d, Kind::Keyed, false),
            Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) => (d, Kind::Keyed, true),
            Map::Array(d) => (d, Kind::Indexed, false),
            Map::PerCpuArray(d) => (d, Kind::Indexed, true),
            // The tail-call map holds programs the load put there, which no packet changes.
            Map::RingBuf(d) | Map::PerfEventArray(d) | Map::ProgramArray(d) => {
                (d, Kind::Stateless, false)
            }
            _ => {
                return Err(DataplaneError::Raw {
                    map: name.into(),
                    op: "classify (a map kind a reset does not know how to clear)",
                    source: io::ErrorKind::Unsupported.into(),
                });
            }
        };
        let info = data.info().map_err(|e| DataplaneError::Raw {
            map: name.into(),
            op: "read the info of",
            source: io::Error::other(e),
        })?;
        let kind = if info.map_flags() & BPF_F_RDONLY_PROG != 0 {
            Kind::Stateless
        } else {
            kind
        };
        let value_size = info.value_size() as usize;
        maps.push(RawMap {
            name,
            data,
            kind,
            key_size: info.key_size() as usize,
            value_size: if per_cpu {
                value_size.next_multiple_of(8) * cpus
            } else {
                value_size
            },
            max_entries: info.max_entries(),
        });
    }
    maps.sort_by_key(|m| m.name);
    Ok(maps)
}

impl<'a> RawMap<'a> {
    /// A hash or LRU map (not per-CPU) by its info, wherever it came from (a pin, say).
    pub(super) fn keyed(name: &'a str, data: &'a MapData) -> Result<Self, DataplaneError> {
        let info = data.info().map_err(|e| DataplaneError::Raw {
            map: name.into(),
            op: "read the info of",
            source: io::Error::other(e),
        })?;
        Ok(Self {
            name,
            data,
            kind: Kind::Keyed,
            key_size: info.key_size() as usize,
            value_size: info.value_size() as usize,
            max_entries: info.max_entries(),
        })
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    /// The value at `key`, if the map has it.
    pub(super) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut value = vec![0u8; self.value_size];
        elem(
            BPF_MAP_LOOKUP_ELEM,
            self.fd(),
            key.as_ptr(),
            value.as_mut_ptr(),
        )
        .ok()
        .map(|()| value)
    }

    /// The key and value sizes, in bytes.
    pub(super) fn layout(&self) -> (usize, usize) {
        (self.key_size, self.value_size)
    }

    fn error(&self, op: &'static str) -> impl FnOnce(io::Error) -> DataplaneError + '_ {
        move |source| DataplaneError::Raw {
            map: self.name.into(),
            op,
            source,
        }
    }

    /// Every key, in the kernel's order: array indexes, or a hash map's keys.
    pub(super) fn keys(&self) -> Result<Vec<Vec<u8>>, DataplaneError> {
        match self.kind {
            Kind::Stateless => Ok(Vec::new()),
            Kind::Indexed => Ok((0..self.max_entries)
                .map(|i| i.to_ne_bytes()[..self.key_size].to_vec())
                .collect()),
            Kind::Keyed => {
                let mut keys: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut next = vec![0u8; self.key_size];
                    let prev = keys.last().map_or(std::ptr::null(), |k| k.as_ptr());
                    match elem(BPF_MAP_GET_NEXT_KEY, self.fd(), prev, next.as_mut_ptr()) {
                        Ok(()) => keys.push(next),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                        Err(e) => return Err(self.error("list the keys of")(e)),
                    }
                }
            }
        }
    }

    /// Every entry, sorted by key; an array's every index.
    pub(super) fn entries(&self) -> Result<Vec<RawEntry>, DataplaneError> {
        let mut entries = Vec::new();
        for key in self.keys()? {
            let mut value = vec![0u8; self.value_size];
            match elem(
                BPF_MAP_LOOKUP_ELEM,
                self.fd(),
                key.as_ptr(),
                value.as_mut_ptr(),
            ) {
                Ok(()) => entries.push((key, value)),
                // Gone since it was listed (an LRU evicting, a program deleting).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(self.error("read")(e)),
            }
        }
        entries.sort();
        Ok(entries)
    }

    /// Deletes every entry (its keys are enough), or zeroes every index that is not zero.
    fn clear(&self) -> Result<(), DataplaneError> {
        match self.kind {
            Kind::Keyed => {
                for key in self.keys()? {
                    match elem(
                        BPF_MAP_DELETE_ELEM,
                        self.fd(),
                        key.as_ptr(),
                        std::ptr::null_mut(),
                    ) {
                        Ok(()) => {}
                        // Gone since it was listed.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(self.error("delete from")(e)),
                    }
                }
            }
            Kind::Indexed => {
                let zero = vec![0u8; self.value_size];
                for (key, value) in self.entries()? {
                    if value != zero {
                        elem(
                            BPF_MAP_UPDATE_ELEM,
                            self.fd(),
                            key.as_ptr(),
                            zero.as_ptr().cast_mut(),
                        )
                        .map_err(self.error("zero"))?;
                    }
                }
            }
            Kind::Stateless => {}
        }
        Ok(())
    }
}

/// Every map of an object by name, each with its entries as (key, value) bytes, sorted by key;
/// an array's every index; nothing for a map programs cannot change (see `Kind::Stateless`).
pub type RawDump = Vec<(String, Vec<RawEntry>)>;

/// A map entry's key and value bytes (per-CPU maps: every CPU's value, each 8-byte aligned).
pub type RawEntry = (Vec<u8>, Vec<u8>);

impl Dataplane {
    /// [`scan`] of the object's hash or LRU map `name`.
    pub(super) fn scan<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        f: impl FnMut(K, V),
    ) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap { map: name })?;
        scan(name, hash_data(map, name)?, f)
    }

    /// The map `name` of the object.
    pub(super) fn raw_map(&self, name: &str) -> Result<RawMap<'_>, DataplaneError> {
        maps(self)?
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| DataplaneError::Raw {
                map: name.into(),
                op: "find (not in the object)",
                source: io::ErrorKind::NotFound.into(),
            })
    }

    /// Every map of the object, as bytes.
    pub fn raw_dump(&self) -> Result<RawDump, DataplaneError> {
        maps(self)?
            .iter()
            .map(|m| Ok((m.name.to_owned(), m.entries()?)))
            .collect()
    }

    /// Makes this dataplane what [`Dataplane::load_with`]`(config)` would give, unpinned,
    /// without loading again (the verifier is most of a load's time): every map emptied, the
    /// allocator and the retired addresses forgotten, `config` written. For tests, which share
    /// one loaded object between them; the programs stay loaded and attached where they were.
    /// The map sizes are fixed at load, so `config`'s must be this dataplane's.
    pub fn reset(&mut self, config: DataplaneConfig) -> Result<(), DataplaneError> {
        let pinned = self.config.pin_path.is_some() || config.pin_path.is_some();
        if pinned || config.map_sizes() != self.config.map_sizes() {
            return Err(DataplaneError::Raw {
                map: "(all)".into(),
                op: "reset to other map sizes or a pin path",
                source: io::ErrorKind::InvalidInput.into(),
            });
        }
        for map in maps(self)? {
            map.clear()?;
        }
        self.ids = Default::default();
        self.nat_addrs = Default::default();
        self.config = config;
        self.write_config()
    }
}

//! A pinned map whose size the config changed (`--conntrack-max` raised, say) is carried over,
//! not refused: the kernel cannot resize a map, and the loader refuses a pin whose size differs
//! from the one asked for, so without this an agent restarted with a new size would fail to
//! start until someone deleted its pins, and every flow and id with them.
//!
//! How (see `Dataplane::load_with`):
//! 1. Before the load, [`set_aside`] checks every resized map: a hash map (Services, backends,
//!    reverse NAT, frontend addresses) holding more than its new size is an error, and nothing
//!    is touched. Then it renames the tail-call maps' pins and each resized map's pin to
//!    `<map>_resizing<n>`, keeping the old maps open. The previous agent's programs, still
//!    attached, keep using them.
//! 2. The load makes those maps anew (the new size; new tail-call maps) and pins them.
//! 3. [`Resize::copy`] copies every entry of the old maps into the new ones before anything
//!    reads them (the ids the agent adopts are in there), and keeps what it copied.
//! 4. Once this agent's programs have replaced the old ones on every device,
//!    `Dataplane::finish_resize` applies to the new maps what the old programs changed since
//!    step 3 (added, changed or deleted entries), unless this agent changed that entry too,
//!    and removes the old pins.
//!
//! Rules:
//! - Step 3 never overwrites (`BPF_NOEXIST`); step 4 changes an entry only if it still holds
//!   what step 3 copied. So whatever the new agent or its programs wrote or deleted stands:
//!   a flow the agent forgot, a Service it removed, does not come back.
//! - The tail-call maps are set aside uncopied: each generation of programs must tail-call its
//!   own new-flow programs, or the old programs' packets would open flows in the new tables,
//!   where the old programs never look for the replies.
//! - An LRU map (conntrack, socket reverse NAT) shrunk below what it holds keeps what fits, as
//!   under load: conntrack entries are copied least recently seen first, so the LRU keeps the
//!   most recent, and the entries lost are counted and logged.
//! - Pins an interrupted resize left behind (`<map>_resizing*`) are copied from at the next
//!   start, newest first (the newest value of an entry wins), and then removed. A resize
//!   interrupted after its copy has been merged once already: entries the interrupted agent
//!   deleted since may come back from them, for their timeout.
use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};

use proxy_common::{CT4_MAP, CT4_NEW_MAP, Ct4Entry, LB4_FLOW_TAILS_MAP, LB4_TAILS_MAP};

use super::{
    Dataplane, DataplaneError,
    raw::{
        BPF_EXIST, BPF_MAP_DELETE_ELEM, BPF_MAP_UPDATE_ELEM, BPF_NOEXIST, RawEntry, RawMap,
        elem_with,
    },
};

/// The suffix of a pin set aside for a resize; a number follows. (bpffs refuses dots.)
const RESIZING: &str = "_resizing";

/// The tail-call maps, set aside (not copied) whenever a map is resized.
const TAIL_MAPS: [&str; 2] = [LB4_TAILS_MAP, LB4_FLOW_TAILS_MAP];

// Conntrack entries are ordered by `seen_ns`, read from the first 8 bytes of a value.
const _: () = assert!(core::mem::offset_of!(Ct4Entry, seen_ns) == 0);

/// One old map: to copy from, unless it is a tail-call map.
struct Source {
    map: &'static str,
    path: PathBuf,
    data: MapData,
    max_entries: u32,
    /// What step 3 copied from it: the old map's entries then.
    copied: HashMap<Vec<u8>, Vec<u8>>,
}

impl Source {
    fn open(map: &'static str, path: PathBuf) -> Result<Self, DataplaneError> {
        let data = MapData::from_pin(&path).map_err(|source| DataplaneError::Pinned {
            map,
            path: path.clone(),
            source: Box::new(source),
        })?;
        let max_entries = RawMap::keyed(map, &data)?.max_entries;
        Ok(Self {
            map,
            path,
            data,
            max_entries,
            copied: HashMap::new(),
        })
    }

    fn is_copied(&self) -> bool {
        !TAIL_MAPS.contains(&self.map)
    }

    fn raw(&self) -> Result<RawMap<'_>, DataplaneError> {
        RawMap::keyed(self.map, &self.data)
    }
}

/// The old maps of the resizes under way, newest first (none: nothing was resized), and what
/// step 3 did.
#[derive(Default)]
pub(super) struct Resize {
    sources: Vec<Source>,
    loaded: Copied,
}

fn pin_error(path: &Path) -> impl FnOnce(io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::PinPath {
        path: path.to_path_buf(),
        source,
    }
}

/// Pins of resizes an earlier start did not finish: `<map>_resizing<n>`, newest (highest `n`)
/// first.
fn leftovers(dir: &Path, map: &str) -> Result<Vec<(u32, PathBuf)>, DataplaneError> {
    let prefix = format!("{map}{RESIZING}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(pin_error(dir))? {
        let entry = entry.map_err(pin_error(dir))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        found.push((n, entry.path()));
    }
    found.sort();
    found.reverse();
    Ok(found)
}

/// Whether a pin an earlier agent could have left of `map` exists: the map itself, or one a
/// resize set aside.
pub(super) fn pinned(dir: &Path, map: &str) -> bool {
    dir.join(map).exists() || leftovers(dir, map).is_ok_and(|l| !l.is_empty())
}

/// Moves aside the pins under `dir` of the maps in `sizes` whose size differs, and then the
/// tail-call maps, after checking that what each hash map holds (with what interrupted resizes
/// left of it) fits its new size: a hash map's entries are Services and ids, never dropped.
/// On an error nothing has been moved.
pub(super) fn set_aside(
    dir: &Path,
    sizes: &[(&'static str, u32)],
) -> Result<Resize, DataplaneError> {
    let mut left: Vec<(&'static str, Vec<(u32, PathBuf)>)> = Vec::new();
    for map in sizes.iter().map(|&(map, _)| map).chain(TAIL_MAPS) {
        left.push((map, leftovers(dir, map)?));
    }
    let left_of = |map: &str| {
        left.iter()
            .find(|(m, _)| *m == map)
            .map_or(&[][..], |(_, l)| l.as_slice())
    };
    let mut moves: Vec<(&'static str, PathBuf)> = Vec::new();
    let mut resized = false;
    for &(map, max) in sizes {
        let path = dir.join(map);
        let current = if path.exists() {
            Some(Source::open(map, path.clone())?)
        } else {
            None
        };
        let changed = current.as_ref().is_some_and(|c| c.max_entries != max);
        if changed {
            moves.push((map, path));
        }
        resized |= changed || !left_of(map).is_empty();
        // What the new map will be filled with: the map itself (resized or reused by the
        // load) and what interrupted resizes left of it.
        let mut olds: Vec<Source> = current.into_iter().collect();
        for (_, p) in left_of(map) {
            olds.push(Source::open(map, p.clone())?);
        }
        let Some(first) = olds.first() else { continue };
        let lru = matches!(
            first.data.info().map(|i| i.map_type()),
            Ok(Ok(MapType::LruHash))
        );
        if !lru && (changed || olds.len() > 1) {
            let mut keys = std::collections::HashSet::new();
            for old in &olds {
                keys.extend(old.raw()?.keys()?);
            }
            if keys.len() > max as usize {
                return Err(DataplaneError::ResizeTooSmall {
                    map,
                    held: keys.len(),
                    max,
                    was: first.max_entries,
                });
            }
        }
    }
    // Tail-call maps first: an agent that dies between two renames then never leaves resized
    // maps with shared tail calls.
    if resized {
        let tails = TAIL_MAPS
            .iter()
            .map(|&map| (map, dir.join(map)))
            .filter(|(_, path)| path.exists());
        moves.splice(0..0, tails.collect::<Vec<_>>());
    }
    let mut resize = Resize::default();
    for (map, path) in moves {
        let next = leftovers(dir, map)?.first().map_or(0, |(n, _)| n + 1);
        let aside = dir.join(format!("{map}{RESIZING}{next}"));
        std::fs::rename(&path, &aside).map_err(pin_error(&path))?;
        let source = Source::open(map, aside)?;
        tracing::info!(
            map,
            from = source.max_entries,
            pin = %source.path.display(),
            "map size changed: the old map is set aside until this agent's programs replace the old ones"
        );
        resize.sources.push(source);
    }
    // Then what earlier resizes left, newest first, after what this one set aside.
    for (map, list) in left {
        for (_, path) in list {
            resize.sources.push(Source::open(map, path)?);
        }
    }
    Ok(resize)
}

/// What a resize did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Entries written to the new maps (added, or changed by the old programs since the load).
    pub written: usize,
    /// Entries deleted from the new maps because the old programs deleted them since the load.
    pub deleted: usize,
    /// Entries left as they were because the new agent or its programs had written or
    /// deleted them (or a newer old map had them).
    pub kept: usize,
    /// Entries an LRU map shrunk below its contents could not keep.
    pub lost: usize,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, o: Self) {
        self.written += o.written;
        self.deleted += o.deleted;
        self.kept += o.kept;
        self.lost += o.lost;
    }
}

/// Writes `value` at `key` in `to` with `flags`: whether it was written (false: the flags
/// refused it). A full hash map is an error.
fn write(
    source: &Source,
    to: &RawMap<'_>,
    key: &[u8],
    value: &[u8],
    flags: u64,
) -> Result<bool, DataplaneError> {
    match elem_with(
        BPF_MAP_UPDATE_ELEM,
        to.fd(),
        key.as_ptr(),
        value.as_ptr().cast_mut(),
        flags,
    ) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)) => Ok(false),
        // A hash map's new size was checked against what the old ones held: these are entries
        // the old programs added since. Nothing is dropped: the agent says so.
        Err(e) if e.raw_os_error() == Some(libc::E2BIG) => Err(DataplaneError::MapFull {
            map: source.map,
            max: to.max_entries,
            what: format!("an entry of the old map ({})", source.path.display()),
        }),
        Err(e) => Err(DataplaneError::Raw {
            map: source.map.into(),
            op: "copy an old entry into",
            source: e,
        }),
    }
}

/// The map of the same name in `dp`, checked to have the old map's key and value sizes.
fn target<'a>(dp: &'a Dataplane, source: &Source) -> Result<RawMap<'a>, DataplaneError> {
    let to = dp.raw_map(source.map)?;
    if to.layout() != source.raw()?.layout() {
        return Err(DataplaneError::Raw {
            map: source.map.into(),
            op: "copy (its key or value size changed, so its layout did: such a change must \
                 rename the map) into",
            source: io::ErrorKind::InvalidData.into(),
        });
    }
    Ok(to)
}

/// Orders entries for an LRU copy: conntrack by `seen_ns`, least recent first.
fn lru_order(map: &str, entries: &mut [RawEntry]) {
    if map == CT4_MAP || map == CT4_NEW_MAP {
        entries.sort_by_key(|(_, v)| {
            v.get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_ne_bytes)
        });
    }
}

impl Resize {
    pub(super) fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Step 3: copies every old map's entries into `dp`'s map of the same name, never
    /// overwriting, and keeps what it copied.
    pub(super) fn copy(&mut self, dp: &Dataplane) -> Result<(), DataplaneError> {
        for source in self.sources.iter_mut().filter(|s| s.is_copied()) {
            let to = target(dp, source)?;
            let mut entries = source.raw()?.entries()?;
            lru_order(source.map, &mut entries);
            let mut copied = Copied::default();
            for (key, value) in &entries {
                if write(source, &to, key, value, BPF_NOEXIST)? {
                    copied.written += 1;
                } else {
                    copied.kept += 1;
                }
            }
            // An LRU insert evicts instead of failing: what is not there now did not fit.
            copied.lost = entries.iter().filter(|(k, _)| to.get(k).is_none()).count();
            log(source, &to, copied, "copied the old map's entries");
            source.copied = entries.into_iter().collect();
            self.loaded += copied;
        }
        Ok(())
    }

    /// Step 4: applies to `dp`'s maps what the old programs changed in the old maps since
    /// step 3, where the new map still holds what step 3 copied; returns what the resize did
    /// in all (both steps).
    pub(super) fn apply_changes(&self, dp: &Dataplane) -> Result<Copied, DataplaneError> {
        let mut total = self.loaded;
        for source in self.sources.iter().filter(|s| s.is_copied()) {
            let to = target(dp, source)?;
            let mut now = source.raw()?.entries()?;
            lru_order(source.map, &mut now);
            let mut changes = Copied::default();
            let mut added = Vec::new();
            for (key, value) in &now {
                match source.copied.get(key) {
                    Some(then) if then == value => {}
                    Some(then) => {
                        if to.get(key).as_ref() == Some(then)
                            && write(source, &to, key, value, BPF_EXIST)?
                        {
                            changes.written += 1;
                        } else {
                            changes.kept += 1;
                        }
                    }
                    None => {
                        if write(source, &to, key, value, BPF_NOEXIST)? {
                            changes.written += 1;
                            added.push(key);
                        } else {
                            changes.kept += 1;
                        }
                    }
                }
            }
            let now: HashMap<&Vec<u8>, &Vec<u8>> = now.iter().map(|(k, v)| (k, v)).collect();
            for (key, then) in &source.copied {
                if now.contains_key(key) {
                    continue;
                }
                if to.get(key).as_ref() == Some(then) {
                    match elem_with(
                        BPF_MAP_DELETE_ELEM,
                        to.fd(),
                        key.as_ptr(),
                        std::ptr::null_mut(),
                        0,
                    ) {
                        Ok(()) => changes.deleted += 1,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            return Err(DataplaneError::Raw {
                                map: source.map.into(),
                                op: "delete an entry the old programs deleted from",
                                source: e,
                            });
                        }
                    }
                } else {
                    changes.kept += 1;
                }
            }
            changes.lost = added.iter().filter(|k| to.get(k).is_none()).count();
            log(
                source,
                &to,
                changes,
                "applied the old programs' changes since the load",
            );
            total += changes;
        }
        Ok(total)
    }

    /// Removes the old pins: the maps go once the last program using them does.
    pub(super) fn remove(self) -> Result<(), DataplaneError> {
        for source in self.sources {
            std::fs::remove_file(&source.path).map_err(pin_error(&source.path))?;
        }
        Ok(())
    }
}

fn log(source: &Source, to: &RawMap<'_>, c: Copied, what: &str) {
    if c.lost > 0 {
        tracing::warn!(
            map = source.map,
            from = source.max_entries,
            to = to.max_entries,
            lost = c.lost,
            "the map was shrunk below what it held: the entries that did not fit are gone"
        );
    }
    tracing::info!(
        map = source.map,
        from = source.max_entries,
        to = to.max_entries,
        written = c.written,
        deleted = c.deleted,
        kept = c.kept,
        "{what}"
    );
}

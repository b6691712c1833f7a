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
//! 3. [`Resize::copy`] copies the old maps' entries into the new ones before anything reads
//!    them (the ids the agent adopts are in there), and keeps what it read.
//! 4. Once this agent's programs have replaced the old ones on every device,
//!    `Dataplane::finish_resize` applies to the new maps what the old programs changed since
//!    step 3 (entries added or changed, flows moved from `CT4_NEW` to `CT4`), unless this agent
//!    changed that entry too, and removes the old pins.
//!
//! Rules:
//! - Step 3 never overwrites (`BPF_NOEXIST`, after a lookup: a refused LRU insert can still
//!   evict); step 4 changes an entry only if it still holds what step 3 copied, and removes
//!   only what moved to `CT4`. So whatever the new agent or its programs wrote or deleted
//!   stands (a flow it forgot does not come back), and an entry the old LRU evicted to make
//!   room stays in the new map. A removal by the old programs themselves (a stale entry
//!   forgotten) is not applied: the new programs find such an entry stale or let it expire.
//! - A hash map (Services, backends, reverse NAT, frontend addresses, affinity matches) is
//!   written by the agent alone, so its newest old map is its whole state: only that one is
//!   copied. Conntrack and socket reverse NAT take the union of their old maps, the newer
//!   map's entry first.
//! - The tail-call maps are set aside uncopied: each generation of programs must tail-call its
//!   own new-flow programs, or the old programs' packets would open flows in the new tables,
//!   where the old programs never look for the replies.
//! - An LRU map shrunk below what it holds keeps what fits, as under load: conntrack entries
//!   are copied least recently seen first, so the LRU keeps the most recent, and the entries
//!   lost are counted and logged.
//! - Pins an interrupted resize left behind (`<map>_resizing*`) are merged at the next start,
//!   newest first, and then removed. A resize interrupted after its copy has been merged once
//!   already: conntrack entries the interrupted agent deleted since may come back from them,
//!   for their timeout.
//! - Step 4 reads an entry and then writes it while the new programs run: one they touch in
//!   between (microseconds) can be written back to what the old programs last had.
use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};

use proxy_common::{
    CT4_MAP, CT4_NEW_MAP, Ct4Entry, LB4_FLOW_TAILS_MAP, LB4_TAILS_MAP, LB4_XDP_TAILS_MAP,
};

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
const TAIL_MAPS: [&str; 3] = [LB4_TAILS_MAP, LB4_FLOW_TAILS_MAP, LB4_XDP_TAILS_MAP];

// Conntrack entries are ordered by `seen_ns`, read from the first 8 bytes of a value.
const _: () = assert!(core::mem::offset_of!(Ct4Entry, seen_ns) == 0);

/// One old map: to copy from, unless it is a tail-call map.
struct Source {
    map: &'static str,
    path: PathBuf,
    data: MapData,
    max_entries: u32,
    /// An LRU map (conntrack, socket reverse NAT): written by programs, and evicting.
    lru: bool,
    /// Whether its entries go into the new map: not for a tail-call map, nor for a hash map
    /// that a newer old map of the same name supersedes (only the agent writes those, and its
    /// last state is whole).
    merged: bool,
    /// What step 3 read from it: the old map's entries then.
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
        let lru = matches!(data.info().map(|i| i.map_type()), Ok(Ok(MapType::LruHash)));
        Ok(Self {
            map,
            path,
            data,
            max_entries,
            lru,
            merged: !TAIL_MAPS.contains(&map),
            copied: HashMap::new(),
        })
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
    /// What step 3 did; after step 4, what both did.
    done: Copied,
    /// Step 4 is done: only the old pins are left to remove.
    merged: bool,
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
        // A hash map is filled from the newest old map alone (see `Source::merged`): that one
        // must fit.
        let Some(newest) = olds.first() else { continue };
        if !newest.lru && newest.max_entries != max {
            let held = newest.raw()?.keys()?.len();
            if held > max as usize {
                return Err(DataplaneError::ResizeTooSmall {
                    map,
                    held,
                    max,
                    was: newest.max_entries,
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
    // A hash map that is no resize of this start's (its pin was reused) is its own newest
    // state: what interrupted resizes left of it is only removed.
    for source in resize.sources.iter_mut() {
        if !source.lru && dir.join(source.map).exists() {
            source.merged = false;
        }
    }
    let mut seen = std::collections::HashSet::new();
    for source in resize.sources.iter_mut().filter(|s| !s.lru && s.merged) {
        source.merged = seen.insert(source.map);
    }
    Ok(resize)
}

/// What a resize did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Entries written to the new maps (added, or changed by the old programs since the load).
    pub written: usize,
    /// Entries deleted from the new `CT4_NEW` because the old programs moved their flow to
    /// `CT4` since the load (the only removal a resize applies).
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
        // A hash map's new size was checked against its newest old map, the only one copied,
        // so this is not expected; if it happens nothing is dropped: the agent says so.
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

    /// Step 3: copies the old maps' entries into `dp`'s maps of the same names, never
    /// overwriting: for each map, the entries of its old maps, newest map first (an entry in
    /// two goes in as the newer has it), conntrack least recently seen first, so that an LRU
    /// shrunk below them keeps the most recent. Keeps what it read of each old map.
    pub(super) fn copy(&mut self, dp: &Dataplane) -> Result<(), DataplaneError> {
        let mut maps: Vec<&'static str> = Vec::new();
        for source in self.sources.iter().filter(|s| s.merged) {
            if !maps.contains(&source.map) {
                maps.push(source.map);
            }
        }
        for map in maps {
            let mut union: Vec<RawEntry> = Vec::new();
            let mut keys = std::collections::HashSet::new();
            let mut first = None;
            for (i, source) in self.sources.iter_mut().enumerate() {
                if source.map != map || !source.merged {
                    continue;
                }
                first.get_or_insert(i);
                let entries = source.raw()?.entries()?;
                for (k, v) in &entries {
                    if keys.insert(k.clone()) {
                        union.push((k.clone(), v.clone()));
                    }
                }
                source.copied = entries.into_iter().collect();
            }
            let Some(first) = first else { continue };
            let source = &self.sources[first];
            let to = target(dp, source)?;
            lru_order(map, &mut union);
            let mut copied = Copied::default();
            for (key, value) in &union {
                // Looked up first: a refused LRU insert can still evict another entry.
                if to.get(key).is_none() && write(source, &to, key, value, BPF_NOEXIST)? {
                    copied.written += 1;
                } else {
                    copied.kept += 1;
                }
            }
            // An LRU insert evicts instead of failing: what is not there now did not fit.
            copied.lost = union.iter().filter(|(k, _)| to.get(k).is_none()).count();
            log(source, &to, copied, "copied the old maps' entries");
            self.done += copied;
        }
        Ok(())
    }

    /// Step 4: applies to `dp`'s maps what the old programs changed in the old maps since
    /// step 3: an entry they added goes in if the new map has none; one they changed is
    /// changed if the new map still holds what step 3 copied; one they moved from `CT4_NEW` to
    /// `CT4` leaves the new `CT4_NEW` (if unchanged there). No other removal is applied: an
    /// entry an LRU map evicted to make room is gone from the old map too, and is no flow's
    /// end. Returns what the resize did in all (both steps).
    fn apply_changes(&self, dp: &Dataplane) -> Result<Copied, DataplaneError> {
        let mut total = self.done;
        let ct = dp.raw_map(CT4_MAP)?;
        for source in self.sources.iter().filter(|s| s.merged) {
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
                        if to.get(key).is_none() && write(source, &to, key, value, BPF_NOEXIST)? {
                            changes.written += 1;
                            added.push(key);
                        } else {
                            changes.kept += 1;
                        }
                    }
                }
            }
            if source.map == CT4_NEW_MAP {
                let now: std::collections::HashSet<&Vec<u8>> = now.iter().map(|(k, _)| k).collect();
                for (key, then) in &source.copied {
                    if now.contains(key)
                        || ct.get(key).is_none()
                        || to.get(key).as_ref() != Some(then)
                    {
                        continue;
                    }
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
                                op: "delete a flow the old programs moved to CT4 from",
                                source: e,
                            });
                        }
                    }
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

    /// Ends the resize (step 4 once, then the old pins' removal, until it succeeds): returns
    /// what it did in all.
    pub(super) fn finish(&mut self, dp: &Dataplane) -> Result<Copied, DataplaneError> {
        if !self.merged {
            self.done = self.apply_changes(dp)?;
            self.merged = true;
        }
        // The maps go once the last program using them does.
        while let Some(source) = self.sources.first() {
            match std::fs::remove_file(&source.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_error(&source.path)(e)),
            }
            self.sources.remove(0);
        }
        Ok(self.done)
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

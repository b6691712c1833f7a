//! A pinned map whose size the config changed (`--conntrack-max` raised, say) is carried over,
//! not refused: the kernel cannot resize a map, and the loader refuses a pin whose size differs
//! from the one asked for, so without this an agent restarted with a new size would fail to
//! start until someone deleted its pins, and every flow and id with them.
//!
//! How (see `Dataplane::load_with`):
//! 1. Before the load, [`set_aside`] checks every resized map: a hash map (Services, backends,
//!    reverse NAT, frontend addresses) holding more than its new size is an error, and nothing
//!    is touched. Then it moves each resized pin to `<map>_resizing<n>` (bpffs renames), keeping
//!    the old map open. The previous agent's programs, still attached, keep using it.
//! 2. The load makes the map anew at the new size and pins it.
//! 3. [`Resize::copy`] copies every entry of the old map into the new one before anything
//!    reads it (the ids the agent adopts are in there).
//! 4. Once the agent has attached its own programs, [`Dataplane::finish_resize`] copies again
//!    (what the old programs wrote in between) and removes the old pins.
//!
//! Copies never overwrite (`BPF_NOEXIST`): an entry already in the new map was written there
//! by the new agent or its programs, and is newer. An LRU map (conntrack, socket reverse NAT)
//! shrunk below what it holds keeps what fits, as it would under load, and says how many
//! entries it lost. Pins an interrupted resize left behind (`<map>_resizing*`) are copied from
//! and removed at the next start.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};

use proxy_common::{LB4_FLOW_TAILS_MAP, LB4_TAILS_MAP};

use super::{
    Dataplane, DataplaneError,
    raw::{BPF_MAP_UPDATE_ELEM, BPF_NOEXIST, RawMap, elem_with},
};

/// The suffix of a pin set aside for a resize; a number follows. (bpffs refuses dots.)
const RESIZING: &str = "_resizing";

/// The tail-call maps. A resize sets them aside too, without copying: the earlier agent's
/// programs, attached until this one's replace them, must tail-call their own generation's
/// programs, which use the old maps. (Were the slots shared, the new flow programs would open
/// flows in the new tables, where the old programs never look for the replies.)
const TAIL_MAPS: [&str; 2] = [LB4_TAILS_MAP, LB4_FLOW_TAILS_MAP];

/// One old map: to copy from, unless it is a tail-call map.
struct Source {
    map: &'static str,
    path: PathBuf,
    data: MapData,
    max_entries: u32,
}

impl Source {
    fn copied(&self) -> bool {
        !TAIL_MAPS.contains(&self.map)
    }
}

/// The old maps of the resizes under way (none: nothing was resized).
#[derive(Default)]
pub(super) struct Resize {
    sources: Vec<Source>,
}

fn pin_error(path: &Path) -> impl FnOnce(io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::PinPath {
        path: path.to_path_buf(),
        source,
    }
}

fn open(map: &'static str, path: &Path) -> Result<MapData, DataplaneError> {
    MapData::from_pin(path).map_err(|source| DataplaneError::Pinned {
        map,
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

fn raw<'a>(map: &'a str, data: &'a MapData) -> Result<RawMap<'a>, DataplaneError> {
    RawMap::keyed(map, data)
}

/// Pins of resizes an earlier start did not finish: `<map>_resizing<n>`, oldest first.
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
    Ok(found)
}

/// Moves aside the pins under `dir` of the maps in `sizes` whose size differs, after checking
/// that what each holds fits its new size (a hash map's entries cannot be dropped: they are
/// Services and ids). On an error nothing has been moved.
pub(super) fn set_aside(
    dir: &Path,
    sizes: &[(&'static str, u32)],
) -> Result<Resize, DataplaneError> {
    let mut resize = Resize::default();
    let tracked = sizes.iter().map(|&(map, _)| map).chain(TAIL_MAPS);
    for map in tracked {
        for (_, path) in leftovers(dir, map)? {
            let data = open(map, &path)?;
            let max_entries = raw(map, &data)?.max_entries;
            resize.sources.push(Source {
                map,
                path,
                data,
                max_entries,
            });
        }
    }
    let mut moves = Vec::new();
    for &(map, max) in sizes {
        let path = dir.join(map);
        if !path.exists() {
            continue;
        }
        let data = open(map, &path)?;
        let info = data.info().map_err(|source| DataplaneError::Pinned {
            map,
            path: path.clone(),
            source: Box::new(source),
        })?;
        if info.max_entries() == max {
            continue;
        }
        let lru = matches!(info.map_type(), Ok(MapType::LruHash));
        if !lru {
            let held = raw(map, &data)?.keys()?.len();
            if held > max as usize {
                return Err(DataplaneError::ResizeTooSmall {
                    map,
                    held,
                    max,
                    was: info.max_entries(),
                });
            }
        }
        moves.push((map, path, data, info.max_entries()));
    }
    if !moves.is_empty() {
        for map in TAIL_MAPS {
            let path = dir.join(map);
            if path.exists() {
                let data = open(map, &path)?;
                let max_entries = raw(map, &data)?.max_entries;
                moves.push((map, path, data, max_entries));
            }
        }
    }
    for (map, path, data, max_entries) in moves {
        let next = leftovers(dir, map)?.last().map_or(0, |(n, _)| n + 1);
        let aside = dir.join(format!("{map}{RESIZING}{next}"));
        std::fs::rename(&path, &aside).map_err(pin_error(&path))?;
        tracing::info!(
            map,
            from = max_entries,
            pin = %aside.display(),
            "map size changed: the old map is set aside until this agent's programs replace the old ones"
        );
        resize.sources.push(Source {
            map,
            path: aside,
            data,
            max_entries,
        });
    }
    Ok(resize)
}

/// What a copy did, for one old map.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Entries written to the new map.
    pub written: usize,
    /// Entries the new map already had (written since by the new agent; kept).
    pub present: usize,
    /// Entries an LRU map shrunk below its contents could not keep.
    pub lost: usize,
}

impl Resize {
    pub(super) fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Copies every old map's entries into `dp`'s map of the same name, never overwriting.
    pub(super) fn copy(&self, dp: &Dataplane) -> Result<Copied, DataplaneError> {
        let mut total = Copied::default();
        for source in self.sources.iter().filter(|s| s.copied()) {
            let from = raw(source.map, &source.data)?;
            let to = dp.raw_map(source.map)?;
            let mut copied = Copied::default();
            for (key, value) in from.entries()? {
                match elem_with(
                    BPF_MAP_UPDATE_ELEM,
                    to.fd(),
                    key.as_ptr(),
                    value.as_ptr().cast_mut(),
                    BPF_NOEXIST,
                ) {
                    Ok(()) => copied.written += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => copied.present += 1,
                    // A hash map's new size was checked against what the old one held; this is
                    // the old map and an interrupted resize's together, or entries the old
                    // programs added since. Nothing is dropped: the agent stops and says so.
                    Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                        return Err(DataplaneError::MapFull {
                            map: source.map,
                            max: to.max_entries,
                            what: format!("an entry of the old map ({})", source.path.display()),
                        });
                    }
                    Err(e) => {
                        return Err(DataplaneError::Raw {
                            map: source.map.into(),
                            op: "copy an old entry into",
                            source: e,
                        });
                    }
                }
            }
            // An LRU insert evicts instead of failing: what is not there now did not fit.
            copied.lost = from
                .entries()?
                .iter()
                .filter(|(k, _)| !to.contains(k))
                .count();
            if copied.lost > 0 {
                tracing::warn!(
                    map = source.map,
                    from = source.max_entries,
                    to = to.max_entries,
                    lost = copied.lost,
                    "the map was shrunk below what it held: the entries that did not fit are gone"
                );
            }
            tracing::info!(
                map = source.map,
                from = source.max_entries,
                to = to.max_entries,
                written = copied.written,
                present = copied.present,
                "copied the old map's entries"
            );
            total.written += copied.written;
            total.present += copied.present;
            total.lost += copied.lost;
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

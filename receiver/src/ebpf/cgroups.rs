//! Cgroups as the eBPF receiver sees them: the cgroup2 mount, the index from cgroup id (the
//! directory's inode number, what `bpf_get_current_cgroup_id()` returns) to path, the cgroups
//! removed since the last walk (from the kernel's record of each removal), each cgroup's series
//! start time, path globs for the filter, and the container id found in a path.
//!
//! The attribution rules (`docs/metrics.md`): a cgroup's data is reported with its path and
//! container id, also after the cgroup was removed — at the first collection after the removal,
//! and for data that arrives later still (sockets outlive their cgroup) while the removal is
//! remembered. Once a cgroup's map entries are freed, its series restart: data counted after that
//! carries the time they were freed as its start time, so a cumulative series never goes back
//! under the same start time.
//!
//! The index and the container id parser live in `podscope_k8s::cgroup`, shared with the
//! Kubernetes processor; what this module adds is the receiver's own.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use podscope_ebpf::abi::RemovedCgroup;
use podscope_ebpf::{abi, objects};

use super::kernel_memory::Typical;
use super::object::{
    tp_btf, Global, HashTable, KernelFeatures, MapDef, ObjectSettings, ProbeError, ProbeObject,
    ProbeSpec,
};

pub use podscope_k8s::cgroup::{cgroup2_mount, container_id, CgroupIndex};

/// The kernel side of the removed-cgroup record (`cgroups.bpf.c`): not a probe, loaded by the
/// receiver beside them.
pub const REMOVED_CGROUPS_SPEC: ProbeSpec = ProbeSpec {
    name: "cgroups",
    object: objects::CGROUPS,
    programs: &[tp_btf("podscope_cgroup_rmdir", "cgroup_rmdir")],
    maps: &[REMOVED, REMOVED_SCRATCH],
};

/// Removed cgroup id → path, until the receiver reads it.
const REMOVED: MapDef = MapDef::entries("removed_cgroups")
    .counted(abi::CGROUPS_MAP_REMOVED)
    .typically(Typical::PerNode(100));
const REMOVED_SCRATCH: MapDef = MapDef::fixed("removed_scratch");

/// The kernel's record of removed cgroups, read at every walk.
pub struct RemovedCgroups {
    object: ProbeObject,
    removed: HashTable<u64, RemovedCgroup>,
}

impl RemovedCgroups {
    pub fn load(
        features: &KernelFeatures,
        globals: &[Global],
    ) -> Result<RemovedCgroups, ProbeError> {
        let mut object = ProbeObject::load(
            &REMOVED_CGROUPS_SPEC,
            features,
            globals,
            &Default::default(),
            &ObjectSettings::default(),
        )?;
        Ok(RemovedCgroups {
            removed: object.hash(&REMOVED)?,
            object,
        })
    }

    pub fn object_mut(&mut self) -> &mut ProbeObject {
        &mut self.object
    }

    /// The cgroups removed since the last call, with their paths (each is removed once, so
    /// deleting what was read loses nothing recorded meanwhile).
    fn take(&mut self) -> Vec<(u64, String)> {
        let removed = self.removed.entries();
        self.removed.remove(removed.keys().copied());
        removed
            .into_iter()
            .map(|(id, record)| (id, record.path()))
            .collect()
    }
}

/// Removed cgroups are remembered this long after their data was last reported (late data, such
/// as a socket closing after its container, keeps their identity), and at most this many.
const REMOVED_KEPT_FOR: Duration = Duration::from_secs(15 * 60);
const REMOVED_KEPT_AT_MOST: usize = 4096;

/// What the receiver knows of a cgroup it has data for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupState<'a> {
    /// Found at the last walk.
    Live(&'a str),
    /// Removed since the receiver started (the kernel recorded the removal).
    Removed(&'a str),
    /// Created after the last walk: known at the next one.
    New,
    /// Neither: removed without a record (the record map was full, or forgotten long ago).
    Unknown,
}

/// A removed cgroup: its path, and when its map entries were last freed.
#[derive(Debug)]
struct Removed {
    path: Option<String>,
    freed_ns: Option<u64>,
    since: Instant,
}

/// The receiver's view of cgroups over time: the live ones (walked at each collection), the
/// removed ones (from the kernel's record) until their data was reported, and each cgroup's
/// series start time.
#[derive(Debug)]
pub struct CgroupTable {
    live: CgroupIndex,
    /// The highest cgroup id any walk found: higher ids are cgroups created since the last.
    walked_up_to: u64,
    removed: HashMap<u64, Removed>,
    /// Live cgroups whose map entries were freed (the filter stopped selecting them), and when.
    freed_live: HashMap<u64, u64>,
    start_ns: u64,
    /// The start time of cgroups forgotten after their entries were freed: the latest such free.
    forgotten_freed_ns: u64,
}

impl CgroupTable {
    pub fn new(live: CgroupIndex, start_ns: u64) -> CgroupTable {
        CgroupTable {
            live,
            walked_up_to: 0,
            removed: HashMap::new(),
            freed_live: HashMap::new(),
            start_ns,
            forgotten_freed_ns: 0,
        }
    }

    /// Walks the cgroup tree again, then takes the kernel's record of removals (in this order:
    /// a cgroup removed between the two is then known either way).
    pub fn refresh(&mut self, record: Option<&mut RemovedCgroups>) {
        self.live.refresh();
        // Not lowered when the newest cgroup goes: every id up to it existed before this walk.
        let newest = self.live.iter().map(|(id, _)| id).max().unwrap_or(0);
        self.walked_up_to = self.walked_up_to.max(newest);
        self.note_removed(record.map(RemovedCgroups::take).unwrap_or_default());
        self.expire(Instant::now());
    }

    fn note_removed(&mut self, record: Vec<(u64, String)>) {
        for (id, path) in record {
            let freed_ns = self.freed_live.remove(&id);
            let removed = self.removed.entry(id).or_insert(Removed {
                path: None,
                freed_ns,
                since: Instant::now(),
            });
            removed.path = Some(path);
        }
    }

    /// Forgets removed cgroups whose entries were freed long ago, and the oldest beyond the
    /// limit, keeping their latest free time as the start of any later data of theirs.
    fn expire(&mut self, now: Instant) {
        // A freed cgroup gone without a record keeps its free time.
        let gone: Vec<(u64, u64)> = self
            .freed_live
            .iter()
            .filter(|(id, _)| self.live.path(**id).is_none())
            .map(|(id, freed)| (*id, *freed))
            .collect();
        for (id, freed_ns) in gone {
            self.freed_live.remove(&id);
            self.removed.entry(id).or_insert(Removed {
                path: None,
                freed_ns: Some(freed_ns),
                since: now,
            });
        }
        let mut forgotten = Vec::new();
        self.removed.retain(|_, r| {
            let keep = r.freed_ns.is_none() || now.duration_since(r.since) < REMOVED_KEPT_FOR;
            if !keep {
                forgotten.push(r.freed_ns);
            }
            keep
        });
        if self.removed.len() > REMOVED_KEPT_AT_MOST {
            let mut oldest: Vec<(Instant, u64)> =
                self.removed.iter().map(|(id, r)| (r.since, *id)).collect();
            oldest.sort();
            for (_, id) in oldest
                .iter()
                .take(self.removed.len() - REMOVED_KEPT_AT_MOST)
            {
                if let Some(r) = self.removed.remove(id) {
                    forgotten.push(r.freed_ns);
                }
            }
        }
        for freed in forgotten.into_iter().flatten() {
            self.forgotten_freed_ns = self.forgotten_freed_ns.max(freed);
        }
    }

    pub fn state(&self, id: u64) -> CgroupState<'_> {
        if let Some(path) = self.live.path(id) {
            return CgroupState::Live(path);
        }
        match self.removed.get(&id) {
            Some(Removed {
                path: Some(path), ..
            }) => CgroupState::Removed(path),
            _ if id > self.walked_up_to => CgroupState::New,
            _ => CgroupState::Unknown,
        }
    }

    /// The start time of the cgroup's series: when its entries were last freed, else when the
    /// receiver started (the maps count from their creation).
    pub fn start_ns(&self, id: u64) -> u64 {
        if let Some(&freed) = self.freed_live.get(&id) {
            return freed;
        }
        match self.removed.get(&id) {
            Some(r) => r.freed_ns.unwrap_or(self.start_ns),
            None if self.live.path(id).is_none() => self.start_ns.max(self.forgotten_freed_ns),
            None => self.start_ns,
        }
    }

    /// Notes that the map entries of `ids` were freed at `now_ns`: data counted for them from now
    /// on starts a new series.
    pub fn freed(&mut self, ids: &HashSet<u64>, now_ns: u64) {
        for &id in ids {
            if self.live.path(id).is_some() {
                self.freed_live.insert(id, now_ns);
                continue;
            }
            let removed = self.removed.entry(id).or_insert(Removed {
                path: None,
                freed_ns: None,
                since: Instant::now(),
            });
            removed.freed_ns = Some(now_ns);
            removed.since = Instant::now();
        }
    }

    /// When the receiver started: the start of every series that never restarted (the host's).
    pub fn receiver_start_ns(&self) -> u64 {
        self.start_ns
    }

    /// The highest cgroup id any walk found (the filter has decided on every cgroup up to it).
    pub fn walked_up_to(&self) -> u64 {
        self.walked_up_to
    }

    /// Every live (id, path).
    pub fn live(&self) -> &CgroupIndex {
        &self.live
    }
}

/// A cgroup path glob: `*` matches within one segment, `**` any number of segments.
#[derive(Debug, Clone)]
pub struct CgroupGlob {
    segments: Vec<String>,
}

impl CgroupGlob {
    pub fn new(glob: &str) -> Result<Self, String> {
        if !glob.starts_with('/') {
            return Err(format!(
                "{glob:?}: a cgroup glob starts with '/' (relative to the cgroup2 mount)"
            ));
        }
        Ok(CgroupGlob {
            segments: glob
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    /// The glob's segments before its first wildcard, as a path (`/` when it starts with one).
    pub fn fixed_prefix(&self) -> String {
        let fixed: Vec<&str> = self
            .segments
            .iter()
            .take_while(|s| !s.contains('*'))
            .map(String::as_str)
            .collect();
        format!("/{}", fixed.join("/"))
    }

    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match_segments(&self.segments, &parts)
    }
}

fn match_segments(glob: &[String], path: &[&str]) -> bool {
    match glob.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => {
                match_one(first, segment) && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

/// `*` wildcards within one segment.
fn match_one(pattern: &str, text: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('*').collect();
    if pieces.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn removed_cgroups_keep_their_path_and_freed_ones_restart_their_series() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        let a = std::fs::metadata(root.path().join("a")).unwrap().ino();
        let mut table = CgroupTable::new(CgroupIndex::new(root.path().to_path_buf()), 100);
        table.refresh(None);
        assert_eq!(table.state(a), CgroupState::Live("/a"));
        assert_eq!(table.start_ns(a), 100);
        // Ids above the last walk's are new; below, without a record, unknown.
        assert_eq!(table.state(u64::MAX), CgroupState::New);
        assert_eq!(table.state(1), CgroupState::Unknown);

        // Removed: known by its record until its entries were freed and long after.
        std::fs::remove_dir(root.path().join("a")).unwrap();
        table.refresh(None);
        table.note_removed(vec![(a, "/a".to_string())]);
        assert_eq!(table.state(a), CgroupState::Removed("/a"));
        assert_eq!(table.start_ns(a), 100);
        table.freed(&[a].into_iter().collect(), 200);
        assert_eq!(table.state(a), CgroupState::Removed("/a"));
        assert_eq!(table.start_ns(a), 200, "late data starts a new series");

        // Forgotten: later data of an unknown cgroup starts no earlier than that last free.
        table.expire(Instant::now() + REMOVED_KEPT_FOR);
        assert_eq!(table.state(a), CgroupState::Unknown);
        assert_eq!(table.start_ns(a), 200);
    }

    #[test]
    fn a_live_cgroup_freed_by_the_filter_restarts_its_series_and_keeps_that_start_when_removed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("b")).unwrap();
        let b = std::fs::metadata(root.path().join("b")).unwrap().ino();
        let mut table = CgroupTable::new(CgroupIndex::new(root.path().to_path_buf()), 100);
        table.refresh(None);
        table.freed(&[b].into_iter().collect(), 300);
        assert_eq!(table.start_ns(b), 300);
        std::fs::remove_dir(root.path().join("b")).unwrap();
        table.note_removed(vec![(b, "/b".to_string())]);
        table.refresh(None);
        assert_eq!(table.start_ns(b), 300);
    }

    #[test]
    fn globs() {
        let g = CgroupGlob::new("/kubepods.slice/**").unwrap();
        assert!(g.matches("/kubepods.slice/kubepods-besteffort.slice/x.scope"));
        assert!(g.matches("/kubepods.slice"));
        assert!(!g.matches("/system.slice/cron.service"));
        let g = CgroupGlob::new("/system.slice/*.service").unwrap();
        assert!(g.matches("/system.slice/cron.service"));
        assert!(!g.matches("/system.slice/cron.service/child"));
        assert!(!g.matches("/system.slice/cron.socket"));
        let g = CgroupGlob::new("/**/cri-containerd-*.scope").unwrap();
        assert!(g.matches("/kubepods.slice/a.slice/cri-containerd-abc.scope"));
        assert_eq!(g.fixed_prefix(), "/");
        let g = CgroupGlob::new("/kubepods.slice/kubepods-burstable.slice/**").unwrap();
        assert_eq!(g.fixed_prefix(), "/kubepods.slice/kubepods-burstable.slice");
        assert!(CgroupGlob::new("kubepods").is_err());
    }
}

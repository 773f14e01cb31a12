//! Uprobes inside containers (`container:<path>` uprobe entries, the http probe's libssl): which
//! containers have the files, which file the kernel sees behind each, and one attachment per such
//! file, kept while a live container uses it (or for good, when attached on the host).
//!
//! Containers are found in `/proc`: each is looked at once per root directory, through the first
//! of its processes seen with that root (a runtime moves a container's first process into its
//! cgroup before switching to the container's root, so a process seen in between shows the host's
//! root and must not settle the container). The file is reached as `/proc/<pid>/root/<path>`.
//!
//! On overlayfs, `stat` through each container's root gives the overlay's device, a different one
//! per container, while the kernel attaches uprobes to the layer's file: containers of one image
//! share it, and a second attachment would count every call twice. So the file is identified as
//! the kernel sees it: the agent maps it and an iterator over the agent's own mappings
//! (`iter/task_vma`) reports the device and inode of the file behind the mapping. Their hits are
//! still told apart by cgroup. Without that iterator (an older kernel), `stat`'s device and inode
//! stand in.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::programs::uprobe::{UProbeLinkId, UProbeScope};
use aya::programs::{Iter, UProbe};
use podscope_ebpf::abi::MappedFile;

use crate::ebpf::object::{error_chain, KernelFeatures, ProbeObject};

/// The iterator program over the agent's own mappings.
const MAPPED_FILES_ITERATOR: &str = "podscope_uprobe_mapped_files";

/// A file as the kernel knows it: its filesystem's device and its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// A container as the scan tells them apart: its id, and its root directory's device and inode.
type ContainerRoot = (String, u64, u64);

/// One uprobe program of an object, attached to one symbol of each file.
pub struct SymbolProbe {
    pub program: &'static str,
    pub symbol: String,
    /// A file without this symbol gets none of the programs (else it is merely skipped).
    pub required: bool,
}

/// What one scan changed: files attached in containers seen for the first time, and files
/// detached because no live container uses them anymore (their containers stopped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    pub attached: usize,
    pub detached: usize,
}

/// The files to attach to inside a container, given the container's root as seen from here.
pub type ContainerPaths = Box<dyn Fn(&Path) -> Vec<PathBuf> + Send>;

/// The attachments to one file, and the live containers that use the file.
struct Attachment {
    links: Vec<(&'static str, UProbeLinkId)>,
    users: HashSet<ContainerRoot>,
    /// Attached on the host: kept whatever the containers do.
    on_host: bool,
}

/// What an object has attached in containers, and in which containers it has looked.
pub struct ContainerTargets {
    paths: ContainerPaths,
    probes: Vec<SymbolProbe>,
    /// What is attached (`binary:symbol`, `http (libssl)`), for messages.
    location: String,
    /// The iterator telling the files the kernel sees is loaded.
    sees_kernel_files: bool,
    /// Processes looked at, by (pid, root device, root inode), and the container each is in.
    /// Pruned to the live processes at each scan; with the root in the key, a process seen before
    /// it switched root is looked at again.
    seen: HashMap<(u32, u64, u64), Option<ContainerRoot>>,
    /// Containers looked at.
    containers: HashSet<ContainerRoot>,
    attachments: HashMap<FileId, Attachment>,
}

impl ContainerTargets {
    /// For attaching `probes` (loaded programs of `object`) to the files `paths` names inside
    /// containers; loads the object's iterator over the agent's mappings, or says once why files
    /// are told apart by `stat` instead.
    pub fn new(
        object: &mut ProbeObject,
        features: &KernelFeatures,
        paths: ContainerPaths,
        probes: Vec<SymbolProbe>,
        location: String,
    ) -> ContainerTargets {
        let sees_kernel_files = match load_iterator(object, features) {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(uprobe = %location, reason = %reason, "iter/task_vma cannot be loaded: files in containers are told apart by stat, so containers of one image on overlayfs may each attach, and their calls count once per attachment");
                false
            }
        };
        ContainerTargets {
            paths,
            probes,
            location,
            sees_kernel_files,
            seen: HashMap::new(),
            containers: HashSet::new(),
            attachments: HashMap::new(),
        }
    }

    /// Attaches to a file of the host, for good; a file the kernel sees as one already attached
    /// (a symlink, a second path) is skipped. Returns whether it attached.
    pub fn attach_on_host(&mut self, object: &mut ProbeObject, path: &Path) -> Result<bool, String> {
        let Some(file) = self.files_of(object, &[path]).pop().flatten() else {
            return Err(format!("{}: no such file", path.display()));
        };
        if let Some(attachment) = self.attachments.get_mut(&file) {
            attachment.on_host = true;
            return Ok(false);
        }
        let links = self.attach(object, path)?;
        self.attachments.insert(
            file,
            Attachment {
                links,
                users: HashSet::new(),
                on_host: true,
            },
        );
        Ok(true)
    }

    /// Attaches to the files of the containers not looked at yet (once per file the kernel sees)
    /// and detaches from the files no live container uses anymore. Returns how many files were
    /// attached and detached.
    pub fn scan(&mut self, object: &mut ProbeObject, proc_root: &Path) -> ScanOutcome {
        let Ok(entries) = std::fs::read_dir(proc_root) else {
            return ScanOutcome::default();
        };
        let live: HashSet<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        self.seen.retain(|(pid, _, _), _| live.contains(pid));
        let mut new: Vec<(ContainerRoot, PathBuf)> = Vec::new();
        let mut new_containers: HashSet<ContainerRoot> = HashSet::new();
        for pid in live {
            let root = proc_root.join(pid.to_string()).join("root");
            let Ok(root_meta) = std::fs::metadata(&root) else {
                continue;
            };
            let process = (pid, root_meta.dev(), root_meta.ino());
            if self.seen.contains_key(&process) {
                continue;
            }
            let container = podscope_k8s::cgroup::process_cgroup_path(proc_root, pid)
                .and_then(|path| podscope_k8s::cgroup::container_id(&path))
                .map(|id| (id, root_meta.dev(), root_meta.ino()));
            self.seen.insert(process, container.clone());
            if let Some(container) = container {
                if !self.containers.contains(&container) && new_containers.insert(container.clone())
                {
                    let paths = (self.paths)(&root);
                    if paths.is_empty() {
                        tracing::debug!(uprobe = %self.location, container = %container.0, "file not in this container");
                    }
                    new.extend(paths.into_iter().map(|path| (container.clone(), path)));
                }
            }
        }
        self.containers.extend(new_containers);
        let paths: Vec<&Path> = new.iter().map(|(_, path)| path.as_path()).collect();
        let files = self.files_of(object, &paths);
        let mut attached = 0;
        for ((container, path), file) in new.into_iter().zip(files) {
            let Some(file) = file else {
                tracing::debug!(uprobe = %self.location, container = %container.0, file = %path.display(), "file not in this container");
                continue;
            };
            if let Some(attachment) = self.attachments.get_mut(&file) {
                // A file another container uses (one image layer): already attached.
                attachment.users.insert(container);
                continue;
            }
            match self.attach(object, &path) {
                Ok(links) => {
                    attached += 1;
                    tracing::info!(uprobe = %self.location, container = %container.0, file = %path.display(), "uprobe attached in container");
                    self.attachments.insert(
                        file,
                        Attachment {
                            links,
                            users: HashSet::from([container]),
                            on_host: false,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(uprobe = %self.location, container = %container.0, error = %e, "cannot attach the uprobe in this container");
                }
            }
        }
        let detached = self.detach_unused(object);
        ScanOutcome { attached, detached }
    }

    /// Forgets the containers that have no live process, and detaches from the files none of the
    /// others uses. Returns how many files were detached (a failed detach is warned about, not
    /// counted).
    fn detach_unused(&mut self, object: &mut ProbeObject) -> usize {
        let live: HashSet<&ContainerRoot> = self.seen.values().flatten().collect();
        self.containers.retain(|container| live.contains(container));
        let mut unused = Vec::new();
        for (file, attachment) in &mut self.attachments {
            attachment.users.retain(|container| live.contains(container));
            if attachment.users.is_empty() && !attachment.on_host {
                unused.push(*file);
            }
        }
        let mut detached = 0;
        for file in unused {
            let Some(attachment) = self.attachments.remove(&file) else {
                continue;
            };
            match detach(object, attachment.links) {
                Ok(()) => {
                    detached += 1;
                    tracing::info!(uprobe = %self.location, "uprobe detached: no container uses its file anymore")
                }
                Err(e) => {
                    tracing::warn!(uprobe = %self.location, error = %e, "cannot detach the uprobe from a file no container uses")
                }
            }
        }
        detached
    }

    /// Attaches every probe to its symbol in the file; if a required symbol is missing, what was
    /// attached is detached again and the file refused.
    fn attach(
        &self,
        object: &mut ProbeObject,
        path: &Path,
    ) -> Result<Vec<(&'static str, UProbeLinkId)>, String> {
        let mut links = Vec::new();
        for probe in &self.probes {
            let attached = program(object, probe.program).and_then(|p| {
                p.attach(probe.symbol.as_str(), path, UProbeScope::AllProcesses)
                    .map_err(|e| format!("{}: {}", probe.symbol, error_chain(&e)))
            });
            match attached {
                Ok(link) => links.push((probe.program, link)),
                Err(e) if probe.required => {
                    // Best effort: what could not be detached goes with the object.
                    let _ = detach(object, links);
                    return Err(e);
                }
                Err(_) => {}
            }
        }
        Ok(links)
    }

    /// The file at each path (`None`: missing or unreadable), as the kernel sees it when the
    /// iterator is loaded, else by `stat`.
    fn files_of(&self, object: &mut ProbeObject, paths: &[&Path]) -> Vec<Option<FileId>> {
        if paths.is_empty() {
            return Vec::new();
        }
        if self.sees_kernel_files {
            match kernel_files(object, paths) {
                Ok(files) => return files,
                Err(e) => {
                    tracing::warn!(uprobe = %self.location, error = %e, "cannot ask the kernel which files back the containers' binaries; telling them apart by stat")
                }
            }
        }
        paths
            .iter()
            .map(|path| {
                let meta = std::fs::metadata(path).ok()?;
                Some(FileId {
                    dev: meta.dev(),
                    ino: meta.ino(),
                })
            })
            .collect()
    }
}

fn detach(
    object: &mut ProbeObject,
    links: Vec<(&'static str, UProbeLinkId)>,
) -> Result<(), String> {
    let mut result = Ok(());
    for (function, link) in links {
        if let Err(e) = program(object, function)
            .and_then(|p| p.detach(link).map_err(|e| error_chain(&e)))
        {
            result = Err(e);
        }
    }
    result
}

fn program<'a>(object: &'a mut ProbeObject, function: &str) -> Result<&'a mut UProbe, String> {
    object
        .program_mut(function)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))
}

fn load_iterator(object: &mut ProbeObject, features: &KernelFeatures) -> Result<(), String> {
    let btf = features.btf.as_ref().map_err(Clone::clone)?;
    let program: &mut Iter = object
        .program_mut(MAPPED_FILES_ITERATOR)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    program.load("task_vma", btf).map_err(|e| error_chain(&e))
}

/// A read-only private mapping of a file's first page, unmapped on drop.
struct Mapping {
    address: *mut libc::c_void,
}

impl Mapping {
    fn of(path: &Path) -> Option<Mapping> {
        let file = std::fs::File::open(path).ok()?;
        // SAFETY: a new private read-only mapping of an open file; nothing writes through it,
        // and it is unmapped once, on drop.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        (address != libc::MAP_FAILED).then_some(Mapping { address })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, unmapped once (one byte rounds up to its page).
        unsafe { libc::munmap(self.address, 1) };
    }
}

/// The files the kernel sees behind `paths`: each is mapped into the agent, then the iterator
/// over the agent's mappings reports the device and inode of the file behind each mapping.
fn kernel_files(object: &mut ProbeObject, paths: &[&Path]) -> Result<Vec<Option<FileId>>, String> {
    let mappings: Vec<Option<Mapping>> = paths.iter().map(|path| Mapping::of(path)).collect();
    let program: &mut Iter = object
        .program_mut(MAPPED_FILES_ITERATOR)?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    let link = program.attach().map_err(|e| error_chain(&e))?;
    let link = program.take_link(link).map_err(|e| error_chain(&e))?;
    let mut output = Vec::new();
    link.into_file()
        .map_err(|e| error_chain(&e))?
        .read_to_end(&mut output)
        .map_err(|e| e.to_string())?;
    let behind: HashMap<u64, FileId> = output
        .chunks_exact(std::mem::size_of::<MappedFile>())
        .filter_map(MappedFile::from_bytes)
        .map(|m| {
            (
                m.start,
                FileId {
                    dev: m.dev.into(),
                    ino: m.ino,
                },
            )
        })
        .collect();
    Ok(mappings
        .iter()
        .map(|mapping| behind.get(&(mapping.as_ref()?.address as u64)).copied())
        .collect())
}

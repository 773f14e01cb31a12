//! One exporter's queue on disk: a folder with one file per request, named
//! `<sequence>.<signal>.<items>.req` so that the order, the signal and the items are known
//! without reading it (a corrupt file is still counted in items). A file is
//!
//! ```text
//! "PSQ1" | format (u8) | 3 zero bytes | crc32 of format and payload (u32 LE)
//!        | payload length (u64 LE) | payload
//! ```
//!
//! written to `<name>.tmp` and renamed, so a crash mid-write leaves a `.tmp` (never
//! acknowledged, deleted at the next start) and never a short `.req` from a crash. A `.req` that
//! fails its checks all the same (a disk or filesystem fault, a hand edit) is set aside as
//! `.corrupt` for inspection ([`DiskQueue::quarantine`]) and counted by its user; it no longer
//! counts against the size limit.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use podscope_core::Signal;

use super::metrics::QueueMetrics;

const MAGIC: &[u8; 4] = b"PSQ1";
const HEADER: usize = 4 + 4 + 4 + 8;

/// A request on disk, as the queue knows it without reading the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub path: PathBuf,
    pub sequence: u64,
    pub signal: Signal,
    pub items: usize,
    /// Size of the file.
    pub bytes: u64,
}

/// Why a request could not be written: the caller drops and counts it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("queue storage {dir} is full: {used} of {limit} bytes used, a request of {needed} bytes does not fit (file_storage max_size_mib)")]
    LimitReached {
        dir: PathBuf,
        used: u64,
        limit: u64,
        needed: u64,
    },
    #[error("cannot write queue file {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
}

impl StoreError {
    /// The reason its items are counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::LimitReached { .. } => "storage_full",
            StoreError::Io { error, .. } if error.raw_os_error() == Some(libc_enospc()) => {
                "storage_full"
            }
            StoreError::Io { .. } => "storage_error",
        }
    }
}

/// ENOSPC (28 on every Linux architecture).
const fn libc_enospc() -> i32 {
    28
}

/// A queue file that failed its checks.
#[derive(Debug, thiserror::Error)]
#[error("corrupt queue file {path}: {reason}")]
pub struct CorruptRecord {
    pub path: PathBuf,
    pub reason: String,
}

/// The folder of one exporter's requests. Its methods do blocking file I/O: call them from
/// `spawn_blocking`.
pub struct DiskQueue {
    dir: PathBuf,
    fsync: bool,
    limit: u64,
    /// Shared by every queue of the same `file_storage` extension.
    used: Arc<AtomicU64>,
    next_sequence: AtomicU64,
    /// What an earlier run left, oldest first, until taken.
    recovered: Mutex<Vec<StoredRequest>>,
    /// What the folder holds, in the agent's telemetry.
    metrics: QueueMetrics,
}

impl DiskQueue {
    /// Opens (creating it) the folder and lists what an earlier run left.
    pub fn open(
        dir: PathBuf,
        fsync: bool,
        limit: u64,
        used: Arc<AtomicU64>,
        metrics: QueueMetrics,
    ) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let mut recovered = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                // A write the crash interrupted: never acknowledged, so nobody waits for it.
                if let Err(error) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), %error, "cannot remove an unfinished queue file");
                }
                continue;
            }
            if name.ends_with(".corrupt") {
                continue;
            }
            match parse_name(name) {
                Some((sequence, signal, items)) => recovered.push(StoredRequest {
                    bytes: entry.metadata()?.len(),
                    path,
                    sequence,
                    signal,
                    items,
                }),
                None => {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not a queue file")
                }
            }
        }
        recovered.sort_by_key(|r| r.sequence);
        let next = recovered.last().map_or(1, |r| r.sequence + 1);
        used.fetch_add(recovered.iter().map(|r| r.bytes).sum(), Ordering::Relaxed);
        for request in &recovered {
            metrics.held(request);
        }
        Ok(DiskQueue {
            dir,
            fsync,
            limit,
            used,
            next_sequence: AtomicU64::new(next),
            recovered: Mutex::new(recovered),
            metrics,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What an earlier run left, oldest first (empty after the first call).
    pub fn take_recovered(&self) -> Vec<StoredRequest> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes one request; once this returns `Ok` it is on disk (and, with `fsync`, on the
    /// device). Sequence numbers follow the calls: callers that need an order serialize them.
    /// `format` is the sender's tag for how `payload` is encoded, checked when it is read back.
    pub fn append(
        &self,
        signal: Signal,
        items: usize,
        format: u8,
        payload: &[u8],
    ) -> Result<StoredRequest, StoreError> {
        let needed = (HEADER + payload.len()) as u64;
        let used = self.used.fetch_add(needed, Ordering::Relaxed);
        if used + needed > self.limit {
            self.used.fetch_sub(needed, Ordering::Relaxed);
            return Err(StoreError::LimitReached {
                dir: self.dir.clone(),
                used,
                limit: self.limit,
                needed,
            });
        }
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!("{sequence:020}.{}.{items}.req", signal.as_str()));
        let tmp = path.with_extension("tmp");
        let written = self.write_file(&tmp, format, payload).and_then(|()| {
            fs::rename(&tmp, &path)?;
            if self.fsync {
                // The rename itself reaches the device only with the folder's fsync.
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        });
        if let Err(error) = written {
            self.used.fetch_sub(needed, Ordering::Relaxed);
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io { path, error });
        }
        let stored = StoredRequest {
            path,
            sequence,
            signal,
            items,
            bytes: needed,
        };
        self.metrics.held(&stored);
        Ok(stored)
    }

    fn write_file(&self, path: &Path, format: u8, payload: &[u8]) -> io::Result<()> {
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(MAGIC);
        header[4] = format;
        header[8..12].copy_from_slice(&checksum(format, payload).to_le_bytes());
        header[12..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
        file.write_all(&header)?;
        file.write_all(payload)?;
        if self.fsync {
            file.sync_data()?;
        }
        Ok(())
    }

    /// The format tag and payload of a stored request, checked (length and checksum).
    pub fn read(&self, request: &StoredRequest) -> Result<(u8, Bytes), CorruptRecord> {
        read_checked(&request.path).map_err(|reason| CorruptRecord {
            path: request.path.clone(),
            reason,
        })
    }

    /// Sets a file that failed its checks aside as `.corrupt`, for inspection: it is never read
    /// again and no longer counts against the size limit.
    pub fn quarantine(&self, request: &StoredRequest) {
        let corrupt = request.path.with_extension("corrupt");
        if let Err(error) = fs::rename(&request.path, &corrupt) {
            tracing::warn!(path = %request.path.display(), %error, "cannot rename a corrupt queue file");
        }
        self.used.fetch_sub(request.bytes, Ordering::Relaxed);
        self.metrics.set_aside(request);
    }

    /// Deletes a request the backend took (or the exporter gave up).
    pub fn remove(&self, request: &StoredRequest) {
        match fs::remove_file(&request.path) {
            Ok(()) => {
                self.used.fetch_sub(request.bytes, Ordering::Relaxed);
                self.metrics.released(request);
            }
            Err(error) => {
                // It will be sent again at the next start: at least once, never lost.
                tracing::warn!(path = %request.path.display(), %error, "cannot remove a sent request from the queue");
            }
        }
    }

    /// Bytes of queue files of the whole storage directory.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

fn checksum(format: u8, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[format]);
    hasher.update(payload);
    hasher.finalize()
}

fn read_checked(path: &Path) -> Result<(u8, Bytes), String> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if data.len() < HEADER {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER}-byte header",
            data.len()
        ));
    }
    if &data[..4] != MAGIC {
        return Err("not a podscope queue file (bad magic)".to_string());
    }
    let format = data[4];
    let crc = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(data[12..20].try_into().expect("8 bytes"));
    let actual = (data.len() - HEADER) as u64;
    if actual != len {
        return Err(format!(
            "truncated: the header says {len} payload bytes, the file has {actual}"
        ));
    }
    let payload = Bytes::from(data).slice(HEADER..);
    if checksum(format, &payload) != crc {
        return Err("checksum mismatch".to_string());
    }
    Ok((format, payload))
}

/// `(sequence, signal, items)` from `<sequence>.<signal>.<items>.req`.
fn parse_name(name: &str) -> Option<(u64, Signal, usize)> {
    let mut parts = name.strip_suffix(".req")?.split('.');
    let sequence = parts.next()?.parse().ok()?;
    let signal = Signal::parse(parts.next()?)?;
    let items = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((sequence, signal, items))
}

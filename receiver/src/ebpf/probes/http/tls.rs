//! HTTPS through OpenSSL: uprobes on `SSL_read`/`SSL_write` (and the `_ex` forms) of every
//! libssl the config names, on the host and inside containers (`container:<path>`, attached
//! as containers are found, once per file: containers of one image share it). The kernel side
//! ties an SSL object to its socket through the syscalls its calls make on the same thread.
//!
//! Statically linked TLS (Go's crypto/tls, BoringSSL inside a binary) has no libssl to probe:
//! not covered.

use std::path::{Path, PathBuf};

use aya::programs::UProbe;

use super::super::uprobes::ContainerTargets;
use crate::ebpf::object::{error_chain, ProbeObject};

/// (program, symbol) pairs attached to each libssl: entry uprobes and return uprobes.
/// The required symbols come first, so that a file without them gets nothing attached.
const ATTACHMENTS: [(&str, &str); 8] = [
    ("podscope_http_ssl_write", "SSL_write"),
    ("podscope_http_ssl_read", "SSL_read"),
    ("podscope_http_ssl_write_return", "SSL_write"),
    ("podscope_http_ssl_read_return", "SSL_read"),
    ("podscope_http_ssl_write", "SSL_write_ex"),
    ("podscope_http_ssl_write_return", "SSL_write_ex"),
    ("podscope_http_ssl_read_ex", "SSL_read_ex"),
    ("podscope_http_ssl_read_return", "SSL_read_ex"),
];

/// Symbols every probed libssl must have (the `_ex` forms are OpenSSL 1.1.1+).
const REQUIRED: [&str; 2] = ["SSL_read", "SSL_write"];

/// The files a `tls.libraries` pattern names under `root`: the path itself, or, when its file
/// name ends in `*`, every file of that directory whose name starts with the rest.
pub fn expand(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let relative = pattern.trim_start_matches('/');
    let path = root.join(relative);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let Some(prefix) = name.strip_suffix('*') else {
        return vec![path];
    };
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The libssl uprobes of the http probe: loaded once, attached per file.
pub struct TlsProbes {
    /// `tls.libraries` entries inside containers (without `container:`).
    container_patterns: Vec<String>,
    containers: ContainerTargets,
    /// Files attached, for the start-up line and tests.
    attached: Vec<PathBuf>,
}

impl TlsProbes {
    /// Loads the uprobe programs and attaches them to the host's libraries.
    pub fn load(object: &mut ProbeObject, libraries: &[String]) -> Result<TlsProbes, String> {
        let mut programs: Vec<&str> = ATTACHMENTS.iter().map(|(p, _)| *p).collect();
        programs.sort();
        programs.dedup();
        for name in programs {
            let program: &mut UProbe = object
                .program_mut(name)?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
            program.load().map_err(|e| format!("{name}: {}", error_chain(&e)))?;
        }
        let mut probes = TlsProbes {
            container_patterns: libraries
                .iter()
                .filter_map(|l| l.strip_prefix("container:").map(str::to_string))
                .collect(),
            containers: ContainerTargets::default(),
            attached: Vec::new(),
        };
        for pattern in libraries.iter().filter(|l| !l.starts_with("container:")) {
            for file in expand(Path::new("/"), pattern) {
                if probes.attached.iter().any(|a| same_file(a, &file)) {
                    continue;
                }
                match attach_file(object, &file) {
                    Ok(()) => {
                        probes.containers.attached_on_host(&file);
                        // The file's own name rather than a symlink to it (libssl.so).
                        probes.attached.push(std::fs::canonicalize(&file).unwrap_or(file));
                    }
                    Err(e) => {
                        tracing::debug!(file = %file.display(), error = %e, "http: not a libssl to probe")
                    }
                }
            }
        }
        Ok(probes)
    }

    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }

    pub fn watches_containers(&self) -> bool {
        !self.container_patterns.is_empty()
    }

    /// Attaches in containers not looked at yet; returns how many files were attached.
    pub fn rescan(&mut self, object: &mut ProbeObject, proc_root: &Path) -> usize {
        if self.container_patterns.is_empty() {
            return 0;
        }
        let patterns = &self.container_patterns;
        let mut newly = Vec::new();
        let n = self.containers.scan(
            proc_root,
            "http (libssl)",
            |root| patterns.iter().flat_map(|p| expand(root, p)).collect(),
            |file| {
                attach_file(object, file)?;
                newly.push(file.to_path_buf());
                Ok(())
            },
        );
        self.attached.extend(newly);
        n
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Attaches every program to its symbols in `file`; a file without `SSL_read` and `SSL_write`
/// is refused before anything is attached to it.
fn attach_file(object: &mut ProbeObject, file: &Path) -> Result<(), String> {
    for (program, symbol) in ATTACHMENTS {
        let required = REQUIRED.contains(&symbol);
        let uprobe: &mut UProbe = object
            .program_mut(program)?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
        match uprobe.attach(symbol, file, aya::programs::uprobe::UProbeScope::AllProcesses) {
            Ok(_) => {}
            Err(e) if required => return Err(format!("{symbol}: {}", error_chain(&e))),
            // OpenSSL before 1.1.1 has no _ex forms.
            Err(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_expand_to_the_files_of_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("usr/lib");
        std::fs::create_dir_all(&lib).unwrap();
        for name in ["libssl.so.3", "libssl.so", "libcrypto.so.3"] {
            std::fs::write(lib.join(name), b"").unwrap();
        }
        let found = expand(dir.path(), "/usr/lib/libssl.so*");
        assert_eq!(found, [lib.join("libssl.so"), lib.join("libssl.so.3")]);
        assert_eq!(expand(dir.path(), "/usr/lib/libcrypto.so.3"), [lib.join("libcrypto.so.3")]);
        assert!(expand(dir.path(), "/nowhere/libssl.so*").is_empty());
    }
}

//! HTTPS through OpenSSL: uprobes on `SSL_read`/`SSL_write` (and the `_ex` forms) of every
//! libssl the config names, on the host and inside containers (`container:<path>`, attached
//! as containers are found, once per file: containers of one image share it). The kernel side
//! ties an SSL object to its socket through the syscalls its calls make on the same thread.
//!
//! Statically linked TLS (Go's crypto/tls, BoringSSL inside a binary) has no libssl to probe:
//! not covered.

use std::path::{Path, PathBuf};

use aya::programs::UProbe;

use super::super::uprobes::{ContainerTargets, ScanOutcome, SymbolProbe};
use crate::ebpf::object::{error_chain, KernelFeatures, ProbeObject};

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

/// The libssl uprobes of the http probe: loaded once, attached per file the kernel sees (a
/// library shared by the host and containers, or by containers of one image, once).
pub struct TlsProbes {
    containers: ContainerTargets,
    /// Some `tls.libraries` entries are inside containers.
    watches_containers: bool,
    /// Host files attached, for the start-up line.
    attached: Vec<PathBuf>,
}

impl TlsProbes {
    /// Loads the uprobe programs and attaches them to the host's libraries.
    pub fn load(
        object: &mut ProbeObject,
        features: &KernelFeatures,
        libraries: &[String],
    ) -> Result<TlsProbes, String> {
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
        let in_containers: Vec<String> = libraries
            .iter()
            .filter_map(|l| l.strip_prefix("container:").map(str::to_string))
            .collect();
        let watches_containers = !in_containers.is_empty();
        let probes = ATTACHMENTS
            .iter()
            .map(|(program, symbol)| SymbolProbe {
                program,
                symbol: symbol.to_string(),
                required: REQUIRED.contains(symbol),
            })
            .collect();
        let mut tls = TlsProbes {
            containers: ContainerTargets::new(
                object,
                features,
                Box::new(move |root| in_containers.iter().flat_map(|p| expand(root, p)).collect()),
                probes,
                "http (libssl)".to_string(),
            ),
            watches_containers,
            attached: Vec::new(),
        };
        for pattern in libraries.iter().filter(|l| !l.starts_with("container:")) {
            for file in expand(Path::new("/"), pattern) {
                match tls.containers.attach_on_host(object, &file) {
                    // The file's own name rather than a symlink to it (libssl.so).
                    Ok(true) => tls
                        .attached
                        .push(std::fs::canonicalize(&file).unwrap_or(file)),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(file = %file.display(), error = %e, "http: not a libssl to probe")
                    }
                }
            }
        }
        Ok(tls)
    }

    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }

    pub fn watches_containers(&self) -> bool {
        self.watches_containers
    }

    /// Attaches in containers not looked at yet, detaches from files no container uses anymore;
    /// returns how many files were attached and detached.
    pub fn rescan(&mut self, object: &mut ProbeObject, proc_root: &Path) -> ScanOutcome {
        if !self.watches_containers {
            return ScanOutcome::default();
        }
        self.containers.scan(object, proc_root)
    }
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

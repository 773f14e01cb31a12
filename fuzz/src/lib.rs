//! The fuzz harnesses: one function per target, each feeding its input to the function the agent
//! itself calls on that kind of untrusted input, and checking what a user relies on beyond "no
//! panic" where there is something to check. `cargo +nightly fuzz run <target>` drives them
//! (fuzz_targets/), and the main workspace's `fuzz_corpus_replay` test feeds them every committed
//! corpus file on stable (fuzz/replay.rs), so a crash once found stays fixed.
//!
//! This file is compiled twice (as the `podscope_fuzz` crate and as a module of that test): it
//! names its dependencies by crate, never through `crate::`.

use std::io::Write as _;

use bytes::Bytes;
use podscope_core::otlp::{otlp, Encoding};
use podscope_core::Signal;

const SIGNALS: [Signal; 3] = [Signal::Metrics, Signal::Traces, Signal::Profiles];

/// The config loader, as `podscope run --config` and `podscope validate` call it: a config is
/// either loaded or refused with errors that each say something.
pub fn config_loader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = podscope::config::load_str(text, "fuzz.yaml") {
        for error in &errors.0 {
            assert!(
                !error.to_string().trim().is_empty(),
                "a config error without a message"
            );
        }
    }
}

/// An OTLP/gRPC or OTLP/HTTP protobuf export request, as the `otlp` receiver decodes it (the
/// scanner that lets a valid request through still encoded, then prost). What is accepted can be
/// sent on: encoded again and decoded, it holds as many items.
pub fn otlp_protobuf(data: &[u8]) {
    otlp_request(data, Encoding::Protobuf);
}

/// An OTLP/HTTP JSON export request, as the `otlp` receiver decodes it. What is accepted can be
/// sent on in protobuf (what an `otlp` exporter does with it) with as many items.
pub fn otlp_json(data: &[u8]) {
    otlp_request(data, Encoding::Json);
}

fn otlp_request(data: &[u8], encoding: Encoding) {
    for signal in SIGNALS {
        let wire = otlp(signal);
        let Ok(batch) = wire.decode_request(Bytes::copy_from_slice(data), encoding) else {
            continue;
        };
        let sent = wire.encode_request(&batch, Encoding::Protobuf);
        let again = wire
            .decode_request(sent, Encoding::Protobuf)
            .unwrap_or_else(|e| {
                panic!("{signal:?}: an accepted request re-encoded is refused: {e}")
            });
        assert_eq!(
            again.item_count(),
            batch.item_count(),
            "{signal:?}: items changed on the way through"
        );
    }
}

/// A cgroup path (from `/proc/<pid>/cgroup` or the cgroup index), as the container and pod
/// lookups parse it. A container id found is always 64 lowercase hex characters.
pub fn cgroup_path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for path in [
        Some(text.to_string()),
        podscope_k8s::cgroup::cgroup_path_from_proc(text),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(parsed) = podscope_k8s::cgroup::parse_container_cgroup(&path) {
            if let Some(id) = parsed.container_id {
                assert!(
                    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                    "container id {id:?} from {path:?}"
                );
            }
        }
    }
}

/// A Pod as the API server sends it, trimmed as the pod cache trims it on arrival (every
/// metadata key, and label and annotation rules with keys and regexes).
pub fn pod_trim(data: &[u8]) {
    use podscope_k8s::k8s_metadata::{ExtractConfig, Extractor, FieldExtract};
    let Ok(pod) = serde_json::from_slice::<k8s_openapi::api::core::v1::Pod>(data) else {
        return;
    };
    let rules: Vec<FieldExtract> = serde_json::from_value(serde_json::json!([
        {"key": "app"},
        {"key_regex": "^(.*)\\.io/(.*)$", "tag_name": "k8s.$1.$2"},
        {"key_regex": ".*", "from": "pod"}
    ]))
    .expect("the harness's extract rules");
    let extract = ExtractConfig {
        labels: rules.clone(),
        annotations: rules,
        ..ExtractConfig::default()
    };
    let extractor = Extractor::new(&extract).expect("the harness's extract rules compile");
    let mut interner = Default::default();
    let trimmed = extractor.pod(&pod, &mut interner);
    let meta = &pod.metadata;
    assert_eq!(
        trimmed.is_some(),
        meta.namespace.is_some() && meta.name.is_some() && meta.uid.is_some(),
        "a pod is kept exactly when it has a namespace, a name and a UID"
    );
}

/// The http probe's ring-buffer records (a head and the bytes a syscall read or wrote), through
/// the whole userspace side: heads of HTTP/1.x and HTTP/2 put together, requests paired with
/// responses, trace context, routes, RED and spans. The input is a sequence of records, each
/// preceded by its length (2 bytes, little endian); see [`frame_records`].
pub fn http_events(data: &[u8]) {
    let config = podscope_receiver::ebpf::HttpProbeConfig::default();
    let mut events = podscope_receiver::ebpf::HttpRecordedEvents::new(&config);
    for record in unframe_records(data) {
        events.apply(record);
    }
    let _spans = events.finish();
}

/// The input of [`http_events`] holding `records`.
pub fn frame_records(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        let len = u16::try_from(record.len()).expect("a record under 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(record);
    }
    out
}

fn unframe_records(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let end = (2 + len).min(data.len());
        let record = &data[2..end];
        data = &data[end..];
        Some(record)
    })
}

/// A user's eBPF object (ELF with BTF), as the agent and `podscope program check` read it before
/// anything reaches the kernel: its programs, maps and BTF, and every map's key and value layout
/// described from that BTF.
pub fn user_program_elf(data: &[u8]) {
    let Ok(info) = podscope_receiver::ebpf::programs::inspect(data) else {
        return;
    };
    if let Some(btf) = &info.btf {
        for map in &info.maps {
            for id in [map.key_type, map.value_type].into_iter().flatten() {
                let _ = btf.describe(id);
                let _ = btf.members(id);
                let _ = btf.whole(id);
            }
        }
    }
}

/// A binary the profiler symbolizes (any ELF file a profiled process maps): its load segments,
/// build id, unwind tables and symbol table (with MiniDebugInfo), then names looked up across
/// its text. The profiler reads it from a file, so the input goes through one.
pub fn elf_symbols(data: &[u8]) {
    use podscope_receiver::ebpf::profiling::ElfModule;
    let mut file = tempfile::NamedTempFile::new().expect("a temp file");
    file.write_all(data).expect("write the temp file");
    let Ok(module) = ElfModule::read(file.path(), 1 << 20) else {
        return;
    };
    for segment in module.segments.iter().filter(|s| s.executable).take(4) {
        let step = (segment.file_size / 64).max(1);
        for i in 0..64u64 {
            let _ = module
                .symbols
                .lookup(segment.vaddr.wrapping_add(i.wrapping_mul(step)));
        }
    }
}

/// The text inputs of symbolization: a JIT's perf map (`/tmp/perf-<pid>.map`),
/// `/proc/kallsyms`, `/proc/<pid>/maps` lines, and the names they hold demangled.
pub fn symbol_maps(data: &[u8]) {
    use podscope_receiver::ebpf::profiling::{demangle, KernelSymbols, MapsLine, PerfMap};
    let text = String::from_utf8_lossy(data);
    let perf_map = PerfMap::parse(&text);
    let kernel = KernelSymbols::parse(&text);
    for line in text.lines() {
        if let Some(mapping) = MapsLine::parse(line) {
            assert!(mapping.path.len() <= line.len());
            for address in [mapping.start, mapping.end, mapping.offset] {
                if let Some(name) = perf_map.lookup(address) {
                    let _ = demangle(name);
                }
                let _ = kernel.lookup(address);
            }
        }
        for word in line.split_whitespace().take(4) {
            let _ = demangle(word);
        }
    }
}

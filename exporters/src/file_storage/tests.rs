use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use podscope_core::component::SharedState;
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::Signal;

use super::*;

fn queue_in(dir: &std::path::Path, limit: u64) -> DiskQueue {
    DiskQueue::open(
        dir.join("q"),
        false,
        limit,
        Arc::new(AtomicU64::new(0)),
        StorageMetrics::default().for_queue("file_storage", "otlp"),
    )
    .unwrap()
}

/// A `file_storage` over `dir` whose metrics are in `telemetry`, as the agent builds it.
fn storage_in(dir: &std::path::Path, telemetry: &AgentTelemetry) -> FileStorage {
    let metrics = StorageMetrics::shared(&SharedState::default(), telemetry).unwrap();
    let config = FileStorageConfig {
        directory: dir.to_path_buf(),
        fsync: false,
        ..Default::default()
    };
    FileStorage::open(config, "file_storage/disk", metrics).unwrap()
}

/// The agent-telemetry lines of the `file_storage` metrics, sorted.
fn storage_lines(telemetry: &AgentTelemetry) -> Vec<String> {
    let mut lines: Vec<String> = telemetry
        .encode_text()
        .lines()
        .filter(|l| l.starts_with("podscope_file_storage_"))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn on_disk(requests: &[&StoredRequest]) -> u64 {
    requests
        .iter()
        .map(|r| std::fs::metadata(&r.path).unwrap().len())
        .sum()
}

#[test]
fn what_a_queue_holds_is_in_gauges_through_writes_removals_a_restart_and_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let telemetry = AgentTelemetry::new();
    let storage = storage_in(dir.path(), &telemetry);
    let queue = storage.open_queue("otlp/a").unwrap();
    let traces: Vec<StoredRequest> = [100usize, 250, 40]
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            queue
                .append(Signal::Traces, 10 * (i + 1), 1, &vec![7u8; size])
                .unwrap()
        })
        .collect();
    let metrics = queue.append(Signal::Metrics, 5, 1, &[1u8; 60]).unwrap();
    // A file is the 20-byte header and the payload.
    assert_eq!(on_disk(&traces.iter().collect::<Vec<_>>()), 3 * 20 + 390);
    assert_eq!(on_disk(&[&metrics]), 80);
    let series = |signal: &str, bytes: u64, requests: u64, items: u64| {
        let labels =
            format!(r#"{{storage="file_storage/disk",queue="exporter/otlp/a",signal="{signal}"}}"#);
        vec![
            format!("podscope_file_storage_bytes{labels} {bytes}"),
            format!("podscope_file_storage_items{labels} {items}"),
            format!("podscope_file_storage_requests{labels} {requests}"),
        ]
    };
    let expected = |lines: Vec<Vec<String>>| {
        let mut lines: Vec<String> = lines.into_iter().flatten().collect();
        lines.sort();
        lines
    };
    assert_eq!(
        storage_lines(&telemetry),
        expected(vec![
            series("traces", 450, 3, 60),
            series("metrics", 80, 1, 5)
        ])
    );

    // The backend took the first traces request and the metrics one: deleted, released.
    queue.remove(&traces[0]);
    queue.remove(&metrics);
    let left = on_disk(&[&traces[1], &traces[2]]);
    assert_eq!(left, 330);
    assert_eq!(
        storage_lines(&telemetry),
        expected(vec![
            series("traces", 330, 2, 50),
            series("metrics", 0, 0, 0)
        ])
    );
    drop((queue, storage));

    // A restart over the same directory: the recovered files, counted before any is sent.
    let telemetry = AgentTelemetry::new();
    let storage = storage_in(dir.path(), &telemetry);
    let queue = storage.open_queue("otlp/a").unwrap();
    assert_eq!(
        storage_lines(&telemetry),
        expected(vec![series("traces", 330, 2, 50)])
    );
    let recovered = queue.take_recovered();
    assert_eq!(recovered.len(), 2);
    // One of them fails its checks when read: set aside, no longer held, counted.
    queue.quarantine(&recovered[0]);
    let mut lines = expected(vec![series("traces", 60, 1, 30)]);
    lines.push(
        r#"podscope_file_storage_corrupt_requests_total{storage="file_storage/disk",queue="exporter/otlp/a",signal="traces"} 1"#
            .to_string(),
    );
    lines.sort();
    assert_eq!(storage_lines(&telemetry), lines);
    assert_eq!(on_disk(&[&recovered[1]]), 60);
}

#[test]
fn requests_come_back_after_a_reopen_in_the_order_they_were_written() {
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_in(dir.path(), 1 << 20);
    for i in 0..5u8 {
        queue
            .append(Signal::Traces, 10 + i as usize, 7, &[i; 100])
            .unwrap();
    }
    let first = queue.take_recovered();
    assert!(first.is_empty(), "a new folder has nothing to recover");
    drop(queue);

    let reopened = queue_in(dir.path(), 1 << 20);
    let recovered = reopened.take_recovered();
    let items: Vec<usize> = recovered.iter().map(|r| r.items).collect();
    assert_eq!(items, vec![10, 11, 12, 13, 14]);
    assert!(recovered.iter().all(|r| r.signal == Signal::Traces));
    for (i, request) in recovered.iter().enumerate() {
        let (format, payload) = reopened.read(request).unwrap();
        assert_eq!(format, 7);
        assert_eq!(&payload[..], &[i as u8; 100][..]);
    }
    assert_eq!(reopened.used_bytes(), 5 * 120);
    // New requests are numbered after the old ones.
    let next = reopened.append(Signal::Metrics, 1, 7, b"x").unwrap();
    assert_eq!(next.sequence, 6);
}

#[test]
fn every_signal_comes_back_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_in(dir.path(), 1 << 20);
    for signal in Signal::ALL {
        queue
            .append(signal, 2, 1, signal.as_str().as_bytes())
            .unwrap();
    }
    drop(queue);
    let reopened = queue_in(dir.path(), 1 << 20);
    let signals: Vec<Signal> = reopened.take_recovered().iter().map(|r| r.signal).collect();
    assert_eq!(signals, Signal::ALL);
}

#[test]
fn removed_requests_are_gone_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_in(dir.path(), 1 << 20);
    let a = queue.append(Signal::Metrics, 3, 1, b"aaa").unwrap();
    let b = queue.append(Signal::Metrics, 4, 1, b"bbbb").unwrap();
    queue.remove(&a);
    assert_eq!(queue.used_bytes(), b.bytes);
    drop(queue);
    let recovered = queue_in(dir.path(), 1 << 20).take_recovered();
    assert_eq!(recovered, vec![b]);
}

#[test]
fn a_flipped_byte_or_a_truncated_file_is_reported_with_its_path_and_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_in(dir.path(), 1 << 20);
    let flipped = queue.append(Signal::Traces, 2, 1, b"hello world").unwrap();
    let truncated = queue.append(Signal::Traces, 3, 1, b"hello world").unwrap();
    let good = queue.append(Signal::Traces, 4, 1, b"hello world").unwrap();
    let mut bytes = std::fs::read(&flipped.path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01;
    std::fs::write(&flipped.path, bytes).unwrap();
    let bytes = std::fs::read(&truncated.path).unwrap();
    std::fs::write(&truncated.path, &bytes[..bytes.len() - 3]).unwrap();

    let error = queue.read(&flipped).unwrap_err();
    assert_eq!(error.path, flipped.path);
    assert_eq!(error.reason, "checksum mismatch");
    assert!(error
        .to_string()
        .contains(&flipped.path.display().to_string()));
    let error = queue.read(&truncated).unwrap_err();
    assert_eq!(
        error.reason,
        "truncated: the header says 11 payload bytes, the file has 8"
    );
    assert_eq!(queue.read(&good).unwrap().1.as_ref(), b"hello world");

    queue.quarantine(&flipped);
    assert!(flipped.path.with_extension("corrupt").exists());
    assert!(!flipped.path.exists());
    drop(queue);
    // Set aside: not read again at the next start.
    let recovered = queue_in(dir.path(), 1 << 20).take_recovered();
    let sequences: Vec<u64> = recovered.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, vec![truncated.sequence, good.sequence]);
}

#[test]
fn the_size_limit_refuses_a_request_and_counts_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    // Two files of 20 + 100 bytes fit, a third does not.
    let queue = queue_in(dir.path(), 250);
    let first = queue.append(Signal::Metrics, 1, 1, &[0; 100]).unwrap();
    queue.append(Signal::Metrics, 1, 1, &[0; 100]).unwrap();
    let error = queue.append(Signal::Metrics, 1, 1, &[0; 100]).unwrap_err();
    assert_eq!(error.reason(), "storage_full");
    assert!(
        error.to_string().contains("240 of 250 bytes used"),
        "{error}"
    );
    assert_eq!(queue.used_bytes(), 240);
    assert_eq!(std::fs::read_dir(dir.path().join("q")).unwrap().count(), 2);
    // Room again once a request is sent.
    queue.remove(&first);
    queue.append(Signal::Metrics, 1, 1, &[0; 100]).unwrap();
}

#[test]
fn an_unfinished_write_is_deleted_at_open_and_foreign_files_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("q");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("00000000000000000009.traces.5.tmp"), b"PSQ1").unwrap();
    std::fs::write(folder.join("notes.txt"), b"mine").unwrap();
    let queue = queue_in(dir.path(), 1 << 20);
    assert!(queue.take_recovered().is_empty());
    assert!(!folder.join("00000000000000000009.traces.5.tmp").exists());
    assert!(folder.join("notes.txt").exists());
}

#[test]
fn each_component_gets_its_own_folder_once() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(
        FileStorageConfig {
            directory: dir.path().join("storage"),
            ..Default::default()
        },
        "file_storage",
        StorageMetrics::default(),
    )
    .unwrap();
    let a = storage.open_queue("otlp/a").unwrap();
    let b = storage.open_queue("otlp_2fa").unwrap();
    assert_ne!(a.dir(), b.dir());
    assert_eq!(a.dir(), dir.path().join("storage/exporter_otlp_2fa"));
    let again = storage.open_queue("otlp/a").err().unwrap();
    assert_eq!(
        again.to_string(),
        "extension file_storage: otlp/a already has a queue here"
    );
}

#[test]
fn a_directory_that_cannot_be_made_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let error = FileStorage::open(
        FileStorageConfig {
            directory: file.join("below"),
            ..Default::default()
        },
        "file_storage/q",
        StorageMetrics::default(),
    )
    .err()
    .unwrap();
    assert!(
        format!("{error:#}").starts_with(&format!(
            "extension file_storage/q: cannot create directory {}",
            file.join("below").display()
        )),
        "{error:#}"
    );
}

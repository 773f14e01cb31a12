//! podscope exporters. Each folder is one component (config, runtime, tests); `helper` turns
//! batches into requests and holds the sending queue / retry / timeout machinery every exporter
//! but `prometheus` and `nop` reuses; `http_client` and `tls` are the HTTP client and TLS settings
//! the network exporters share.
//!
//! - `debug`: logs a summary or a dump of every batch.
//! - `file_storage` (an extension): the directory where sending queues outlive the process
//!   (`sending_queue.storage`).
//! - `file`: OTLP-JSON lines, one export request per line, with size-based rotation.
//! - `nop`: discards everything (benchmarks, processor-only pipelines).
//! - `otlp`, `otlphttp`, `jaeger`: OTLP over gRPC or HTTP, with TLS, retries and a sending queue.
//! - `pprof`: profiles as pprof files in a directory with rotation, and the pprof and folded
//!   stack formats `podscope profile` writes.
//! - `prometheus`: a scrape endpoint in Prometheus text or OpenMetrics format.
//! - `prometheusremotewrite`: Prometheus remote write 1.0.

pub mod debug;
pub mod file;
pub mod file_storage;
pub mod helper;
pub mod http_client;
pub mod nop;
pub mod otlp;
pub mod pprof;
pub mod prometheus;
pub mod prometheusremotewrite;
pub mod tls;

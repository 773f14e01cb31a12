//! `kubectl podscope profile`: the profiling probe run for the target containers for the
//! request's duration (one [`LocalProfile`] per container cgroup, as `podscope profile` runs
//! it), the profiles turned into one pprof (gzip) or folded file and sent as `Message::File`.
//!
//! The file formats live with the pprof exporter, which this crate does not depend on: the
//! agent binary hands the extension its encoder ([`ProfileEncoder`]); without one, profile
//! requests are refused.

use std::time::Duration;

use base64::Engine as _;
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_core::session::{write_line, EndReason, ErrorCode, Message, ProfileFormat, Target};
use podscope_k8s::cgroup::{cgroup2_mount, CgroupIndex};
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

use super::server::{error, write_welcome, Ending, Outcome};
use super::targets::resolve;
use super::Shared;
use crate::ebpf::profiling::{LocalProfile, ProfileTarget, ProfilingProbeConfig};

/// The longest profile served.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// How often the profilers hand over what they summed.
const PROFILE_INTERVAL: Duration = Duration::from_secs(1);

/// Turns on-CPU profiles into a file of the format asked for.
pub type EncodeProfiles = fn(&[ProfilesData], ProfileFormat) -> Vec<u8>;

/// The agent binary's profile encoder, if it gave one (not a setting: it is set in code).
#[derive(Clone, Copy, Default)]
pub struct ProfileEncoder(pub Option<EncodeProfiles>);

impl PartialEq for ProfileEncoder {
    /// Settings compare equal whatever encoder the binary gave.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ProfileEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProfileEncoder(set)"
        } else {
            "ProfileEncoder(none)"
        })
    }
}

/// The file name the plugin is told, by format.
pub fn file_name(format: ProfileFormat) -> &'static str {
    match format {
        ProfileFormat::Pprof => "profile.pb.gz",
        ProfileFormat::Folded => "profile.folded",
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    write: &mut OwnedWriteHalf,
    shared: &Shared,
    targets: &[Target],
    duration: Duration,
    format: ProfileFormat,
    frequency_hz: Option<u32>,
    gone: &CancellationToken,
) -> std::io::Result<Outcome> {
    let Some(encode) = shared.config.profile_encoder.0 else {
        return Ok(Outcome::Refused(error(
            ErrorCode::Internal,
            "this agent build cannot write profile files",
        )));
    };
    if duration.is_zero() || duration > MAX_DURATION {
        return Ok(Outcome::Refused(error(
            ErrorCode::BadRequest,
            format!("a profile lasts more than 0s and at most {MAX_DURATION:?}, not {duration:?}"),
        )));
    }
    let mut config = ProfilingProbeConfig::default();
    if let Some(frequency) = frequency_hz {
        config.frequency = u64::from(frequency);
    }
    let mut errors = Vec::new();
    config.validate("frequency_hz", &mut errors);
    if let Some(e) = errors.first() {
        return Ok(Outcome::Refused(error(
            ErrorCode::BadRequest,
            e.to_string(),
        )));
    }
    let root = cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into());
    let cgroups = if targets.is_empty() {
        vec![root.clone()]
    } else {
        let mut index = CgroupIndex::new(root);
        index.refresh();
        match resolve(&index, targets, &shared.node) {
            Ok(containers) => containers.into_iter().map(|c| c.path).collect(),
            Err(e) => return Ok(Outcome::Refused(error(ErrorCode::TargetNotFound, e))),
        }
    };
    let mut profilers = Vec::new();
    for cgroup in cgroups {
        match LocalProfile::start(&ProfileTarget::Cgroup(cgroup), &config, PROFILE_INTERVAL) {
            Ok(profiler) => profilers.push(profiler),
            Err(e) => {
                return Ok(Outcome::Refused(error(
                    ErrorCode::ProbeUnavailable,
                    format!(
                        "the profiling probe cannot run on node {}: {e:#}",
                        shared.node
                    ),
                )))
            }
        }
    }
    write_welcome(write, shared).await?;
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + duration;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = gone.cancelled() => return Ok(Outcome::Ended(None)),
            _ = shared.stopping.cancelled() => return Ok(Outcome::Ended(Some(Ending::of(EndReason::AgentStopping)))),
            _ = tokio::time::sleep_until(deadline) => break,
            _ = ticker.tick() => {
                for profiler in &mut profilers {
                    while let Ok(profiles) = profiler.profiles.try_recv() {
                        data.push(profiles);
                    }
                }
            }
        }
    }
    let mut lost = 0;
    for profiler in &mut profilers {
        profiler.stop();
        while let Some(profiles) = profiler.profiles.recv().await {
            data.push(profiles);
        }
        lost += profiler.progress().1;
    }
    drop(profilers);
    if lost > 0 {
        write_line(
            write,
            &Message::Lost {
                count: lost,
                reason: "stack samples the kernel could not queue (ring buffer full)".to_string(),
            },
        )
        .await?;
    }
    let bytes = encode(&data, format);
    write_line(
        write,
        &Message::File {
            name: file_name(format).to_string(),
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        },
    )
    .await?;
    Ok(Outcome::Ended(Some(Ending::of(EndReason::Duration))))
}

//! `podscope profile`: profiles one process or cgroup for a while, without a config or a
//! cluster, and writes a flame graph (SVG), a pprof file or folded stacks. It runs the
//! receiver's profiling probe directly ([`LocalProfile`]) and converts its OTLP profiles with
//! the pprof formats of `podscope_exporters::pprof`; it must not need a pipeline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_exporters::pprof::{encode_gzip, fold, PprofBuilder};
use podscope_receiver::ebpf::profiling::{LocalProfile, ProfileTarget, ProfilingProbeConfig};

/// What is written, from the output file's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// `.svg`: an interactive flame graph.
    Svg,
    /// `.pb.gz`: gzip-compressed pprof.
    Pprof,
    /// `.folded`: `frame;frame;… count` lines.
    Folded,
}

impl OutputFormat {
    pub fn from_path(path: &Path) -> anyhow::Result<OutputFormat> {
        let name = path.to_string_lossy();
        if name.ends_with(".svg") {
            Ok(OutputFormat::Svg)
        } else if name.ends_with(".pb.gz") {
            Ok(OutputFormat::Pprof)
        } else if name.ends_with(".folded") {
            Ok(OutputFormat::Folded)
        } else {
            bail!("-o {name}: the output's name must end in .svg, .pb.gz or .folded (the format)")
        }
    }
}

/// What to profile, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetArg {
    Pid(u32),
    Cgroup(PathBuf),
    /// A container id (or a unique prefix of one), found in the cgroup tree.
    Container(String),
}

pub struct ProfileOptions {
    pub target: TargetArg,
    pub duration: Duration,
    pub off_cpu: bool,
    pub frequency: u64,
    pub output: PathBuf,
}

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileSummary {
    /// Samples (on-CPU), or nanoseconds blocked (off-CPU), in the output.
    pub total: i64,
    /// Distinct stacks.
    pub stacks: usize,
    /// Samples the kernel could not queue (ring buffer full).
    pub lost: u64,
}

/// Records, showing a progress line on `progress`, and writes the output.
pub fn run(
    options: &ProfileOptions,
    progress: &mut dyn std::io::Write,
) -> anyhow::Result<ProfileSummary> {
    let format = OutputFormat::from_path(&options.output)?;
    let target = resolve_target(&options.target)?;
    let config = ProfilingProbeConfig {
        frequency: options.frequency,
        off_cpu: options.off_cpu,
        ..Default::default()
    };
    let mut errors = Vec::new();
    config.validate("--frequency", &mut errors);
    if let Some(error) = errors.first() {
        bail!("{error}");
    }
    let mut profiler = LocalProfile::start(&target, &config, Duration::from_secs(1))
        .context("cannot start profiling (root and a kernel with BTF are needed)")?;
    let started = Instant::now();
    let mut data: Vec<ProfilesData> = Vec::new();
    loop {
        let elapsed = started.elapsed();
        let target_gone = matches!(target, ProfileTarget::Pid(pid) if !Path::new(&format!("/proc/{pid}")).exists());
        if elapsed >= options.duration || target_gone {
            break;
        }
        std::thread::sleep((options.duration - elapsed).min(Duration::from_millis(500)));
        while let Ok(profiles) = profiler.profiles.try_recv() {
            data.push(profiles);
        }
        let (read, lost) = profiler.progress();
        let _ = write!(
            progress,
            "\rrecording {:>4.0}s / {}s: {read} samples read, {lost} lost ",
            started
                .elapsed()
                .as_secs_f64()
                .min(options.duration.as_secs_f64()),
            options.duration.as_secs()
        );
        let _ = progress.flush();
    }
    profiler.stop();
    while let Some(profiles) = profiler.profiles.blocking_recv() {
        data.push(profiles);
    }
    let (_, lost) = profiler.progress();
    let _ = writeln!(progress);
    let sample_type = if options.off_cpu {
        "off_cpu"
    } else {
        "samples"
    };
    let mut folded = BTreeMap::new();
    fold(&data, sample_type, &mut folded);
    let summary = ProfileSummary {
        total: folded.values().sum(),
        stacks: folded.len(),
        lost,
    };
    let bytes = match format {
        OutputFormat::Folded => folded_text(&folded).into_bytes(),
        OutputFormat::Svg => flame_graph(&folded, options)?,
        OutputFormat::Pprof => {
            let mut builder = PprofBuilder::new(sample_type);
            for profiles in &data {
                builder.add(profiles);
            }
            encode_gzip(&builder.finish())
        }
    };
    std::fs::write(&options.output, bytes)
        .with_context(|| format!("cannot write {}", options.output.display()))?;
    Ok(summary)
}

/// Folded stacks as text, one `frame;frame;… count` line each.
pub fn folded_text(folded: &BTreeMap<String, i64>) -> String {
    folded
        .iter()
        .map(|(stack, count)| format!("{stack} {count}\n"))
        .collect()
}

fn flame_graph(
    folded: &BTreeMap<String, i64>,
    options: &ProfileOptions,
) -> anyhow::Result<Vec<u8>> {
    let lines: Vec<String> = folded
        .iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect();
    let mut flame = inferno::flamegraph::Options::default();
    flame.title = if options.off_cpu {
        "podscope: off-CPU time".to_string()
    } else {
        "podscope: on-CPU samples".to_string()
    };
    flame.subtitle = Some(format!(
        "{:?}, {}s",
        options.target,
        options.duration.as_secs()
    ));
    flame.count_name = if options.off_cpu { "ns" } else { "samples" }.to_string();
    let mut svg = Vec::new();
    if lines.is_empty() {
        bail!("no samples were recorded: nothing to draw (is the target running on a CPU?)");
    }
    inferno::flamegraph::from_lines(&mut flame, lines.iter().map(String::as_str), &mut svg)
        .context("cannot render the flame graph")?;
    Ok(svg)
}

fn resolve_target(target: &TargetArg) -> anyhow::Result<ProfileTarget> {
    match target {
        TargetArg::Pid(pid) => Ok(ProfileTarget::Pid(*pid)),
        TargetArg::Cgroup(path) => Ok(ProfileTarget::Cgroup(path.clone())),
        TargetArg::Container(id) => {
            let root = podscope_receiver::ebpf::cgroup2_mount()
                .context("no cgroup2 mount found in /proc/self/mountinfo")?;
            container_cgroup(&root, id).map(ProfileTarget::Cgroup)
        }
    }
}

/// The cgroup directory of the container whose id is `id` or starts with it.
fn container_cgroup(root: &Path, id: &str) -> anyhow::Result<PathBuf> {
    let id = id.to_ascii_lowercase();
    if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--container {id}: a container id is hexadecimal (at least 4 digits)");
    }
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let relative = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
            match podscope_receiver::ebpf::container_id(&relative) {
                // A container's own cgroup; below it only its processes' sub-cgroups.
                Some(container) if container.starts_with(&id) => found.push(path),
                Some(_) => {}
                None => todo.push(path),
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "--container {id}: no container cgroup with that id under {}",
            root.display()
        ),
        n => bail!("--container {id}: {n} containers' ids start with it; give more digits"),
    }
}

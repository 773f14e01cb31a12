//! The profiling probe against real programs (root only; CI runs as root): programs built here
//! from source with a known call chain, run in a kubelet-style pod cgroup, profiled through the
//! real kernel programs, unwound and symbolized on the node; the tests read the OTLP profiles.

use podscope_testkit::BuildContextForTests as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::profiles::v1development::ProfilesData;
use podscope_integration::test_programs::{
    compile_c, cpu_seconds, ended, with_mini_debug_info, BURN_C, BURN_CHAIN as CHAIN, SLEEPER_C,
};
use podscope_receiver::ebpf::profiling::{LocalProfile, ProfileTarget, ProfilingProbeConfig};
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};

/// One sample as a test reads it: its frames (leaf first) and its value.
#[derive(Debug, Clone)]
struct ReadSample {
    /// The function name of each frame, or `None` where the node found none.
    functions: Vec<Option<String>>,
    /// Each frame's mapping file and build id (empty when it has none) and address.
    locations: Vec<(String, String, u64)>,
    value: i64,
    sample_type: String,
    container_id: Option<String>,
}

fn read_samples(data: &ProfilesData) -> Vec<ReadSample> {
    let d = data.dictionary.as_ref().expect("a dictionary");
    let s = |i: i32| d.string_table[i as usize].clone();
    let mut out = Vec::new();
    for rp in &data.resource_profiles {
        let container_id = rp.resource.as_ref().and_then(|r| {
            r.attributes
                .iter()
                .find(|kv| kv.key == "container.id")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(v) => Some(v.clone()),
                    _ => None,
                })
        });
        for p in rp.scope_profiles.iter().flat_map(|sp| &sp.profiles) {
            let sample_type = s(p.sample_type.expect("a sample type").type_strindex);
            for sample in &p.samples {
                let stack = &d.stack_table[sample.stack_index as usize];
                let mut functions = Vec::new();
                let mut locations = Vec::new();
                for &li in &stack.location_indices {
                    let location = &d.location_table[li as usize];
                    functions.push(location.lines.first().map(|line| {
                        s(d.function_table[line.function_index as usize].name_strindex)
                    }));
                    let mapping = &d.mapping_table[location.mapping_index as usize];
                    let build_id = mapping
                        .attribute_indices
                        .iter()
                        .map(|&a| &d.attribute_table[a as usize])
                        .find(|a| s(a.key_strindex) == "process.executable.build_id.gnu")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            any_value::Value::StringValue(v) => Some(v.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    locations.push((s(mapping.filename_strindex), build_id, location.address));
                }
                out.push(ReadSample {
                    functions,
                    locations,
                    value: sample.values[0],
                    sample_type: sample_type.clone(),
                    container_id: container_id.clone(),
                });
            }
        }
    }
    out
}

/// Profiles `target` with `config` from before `start` starts the program until it ended, then
/// stops and returns every interval's profiles and the CPU time the program used.
/// A profiled program's CPU time, and the time the hypervisor took from this VM's CPUs (all of
/// them) while it ran.
#[derive(Clone, Copy)]
struct CpuTime {
    seconds: f64,
    stolen: f64,
}

/// The time the hypervisor has taken from this VM's CPUs since boot (`steal` in /proc/stat).
fn stolen_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: f64 = stat
        .lines()
        .next()
        .and_then(|cpu| cpu.split_whitespace().nth(8))
        .and_then(|steal| steal.parse().ok())
        .expect("the steal column of /proc/stat");
    // SAFETY: sysconf reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn profile_run(
    target: ProfileTarget,
    config: &ProfilingProbeConfig,
    start: impl FnOnce() -> u32,
) -> (Vec<ProfilesData>, CpuTime) {
    let mut profiler = LocalProfile::start(&target, config, Duration::from_secs(1))
        .expect("the profiling probe loads (root, perf events)");
    let stolen_before = stolen_seconds();
    let pid = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ended(pid) {
        assert!(
            Instant::now() < deadline,
            "the profiled program did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpu = CpuTime {
        seconds: cpu_seconds(pid),
        stolen: stolen_seconds() - stolen_before,
    };
    profiler.stop();
    let mut all = Vec::new();
    while let Some(data) = profiler.profiles.blocking_recv() {
        all.push(data);
    }
    (all, cpu)
}

/// A scratch directory for programs built by a test.
fn workdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

/// The share of samples whose user frames start with `chain` (leaf first).
fn share_with_chain(samples: &[ReadSample], chain: &[&str]) -> (f64, u64) {
    let total: i64 = samples.iter().map(|s| s.value).sum();
    let with: i64 = samples
        .iter()
        .filter(|s| {
            let names: Vec<&str> = s
                .functions
                .iter()
                .map(|f| f.as_deref().unwrap_or("?"))
                .collect();
            names.windows(chain.len()).any(|w| w == chain)
        })
        .map(|s| s.value)
        .sum();
    (with as f64 / total.max(1) as f64, total as u64)
}

fn profiling_config(frequency: u64) -> ProfilingProbeConfig {
    ProfilingProbeConfig {
        frequency,
        ..Default::default()
    }
}

/// Runs `command` (a shell command that execs the program) in a new pod cgroup while the cgroup
/// is profiled at `frequency` Hz; returns the samples, the program's CPU seconds and the pod's
/// container id.
fn profile_in_pod(command: &str, frequency: u64) -> (Vec<ReadSample>, CpuTime, String) {
    let (pod_uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&pod_uid, &container);
    let pod_path = pod.path().to_path_buf();
    let (profiles, cpu) = profile_run(
        ProfileTarget::Cgroup(pod_path),
        &profiling_config(frequency),
        || pod.spawn_shell(command),
    );
    let samples: Vec<ReadSample> = profiles.iter().flat_map(read_samples).collect();
    assert!(
        samples
            .iter()
            .all(|s| s.container_id.as_deref() == Some(container.as_str())),
        "only the pod's container is profiled"
    );
    (samples, cpu, container)
}

/// cpu-clock samples the time the program ran: `frequency` per CPU second (the machine is
/// shared, so that can be less than its wall time). The guest's clock also runs while the
/// hypervisor has taken the CPU from under the program (steal), which its CPU time leaves out:
/// a heavily loaded host adds up to that many seconds of samples (seen in CI: 1.4-1.6 times the
/// CPU time), so the upper bound allows the steal of the run.
fn assert_sample_total(samples: &[ReadSample], cpu: CpuTime, frequency: u64) {
    let total: i64 = samples.iter().map(|s| s.value).sum();
    let (expected, stolen) = (
        cpu.seconds * frequency as f64,
        cpu.stolen * frequency as f64,
    );
    assert!(
        (total as f64) >= expected * 0.8 && (total as f64) <= (expected + stolen) * 1.2 + 5.0,
        "{total} samples for {:.2} s of CPU ({:.2} s stolen meanwhile) at {frequency} Hz",
        cpu.seconds,
        cpu.stolen
    );
}

fn assert_chain_share(samples: &[ReadSample], chain: &[&str]) {
    let (share, total) = share_with_chain(samples, chain);
    eprintln!("{:.1}% of {total} samples carry the chain", share * 100.0);
    assert!(
        share >= 0.9,
        "{:.1}% of {total} samples carry {chain:?}; first samples: {:#?}",
        share * 100.0,
        &samples[..samples.len().min(5)]
    );
}

#[test]
fn c_program_without_frame_pointers_unwinds_its_whole_chain_in_a_pod_cgroup() {
    let dir = workdir();
    let burn = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    let (samples, cpu, _) = profile_in_pod(&format!("exec {} 2", burn.display()), 99);
    assert_sample_total(&samples, cpu, 99);
    assert_chain_share(&samples, &CHAIN);
    let sample = samples
        .iter()
        .find(|s| s.functions.first().and_then(|f| f.as_deref()) == Some("burn_leaf"))
        .expect("a sample in burn_leaf");
    assert_eq!(sample.sample_type, "samples");
    assert_eq!(sample.locations[0].0, burn.display().to_string());
    assert_eq!(
        sample.locations[0].1,
        build_id(&burn),
        "the mapping carries the binary's GNU build id"
    );
}

/// The Rust twin of `BURN_C` (CPU seconds too): the same chain, names demangled
/// (`burn_rs::burn_leaf`).
const BURN_RS: &str = r#"
use std::hint::black_box;
#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
extern "C" {
    fn clock_gettime(clock: i32, t: *mut Timespec) -> i32;
}
/// CPU seconds used (CLOCK_PROCESS_CPUTIME_ID): the same samples however busy the machine.
fn cpu_seconds() -> f64 {
    let mut t = Timespec { sec: 0, nsec: 0 };
    unsafe { clock_gettime(2, &mut t) };
    t.sec as f64 + t.nsec as f64 / 1e9
}
#[inline(never)]
fn burn_leaf(n: u64) -> u64 {
    let mut x = n;
    for i in 0..2_000_000u64 {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
    }
    x
}
#[inline(never)]
fn inner_work(n: u64) -> u64 { black_box(burn_leaf(n) ^ n) }
#[inline(never)]
fn middle_step(n: u64) -> u64 { black_box(inner_work(n + 1).wrapping_add(3)) }
#[inline(never)]
fn outer_loop(n: u64) -> u64 { black_box(middle_step(n.wrapping_mul(2)).wrapping_sub(5)) }
fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3.0);
    let start = cpu_seconds();
    let mut n = 0u64;
    while cpu_seconds() - start < seconds {
        n = n.wrapping_add(outer_loop(n));
    }
    black_box(n);
}
"#;

#[test]
fn rust_program_unwinds_with_demangled_names() {
    let dir = workdir();
    let src = dir.path().join("burn_rs.rs");
    std::fs::write(&src, BURN_RS).unwrap();
    let out = dir.path().join("burn_rs");
    let status = Command::new("rustc")
        .args(["-C", "opt-level=2", "-C", "force-frame-pointers=no", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("rustc runs");
    assert!(status.success(), "rustc failed");
    let (samples, cpu, _) = profile_in_pod(&format!("exec {} 2", out.display()), 99);
    assert_sample_total(&samples, cpu, 99);
    assert_chain_share(
        &samples,
        &[
            "burn_rs::burn_leaf",
            "burn_rs::inner_work",
            "burn_rs::middle_step",
            "burn_rs::outer_loop",
            "burn_rs::main",
        ],
    );
}

/// The GNU build id of `path` in hex, as `readelf -n` prints it (read with the `object` crate).
fn build_id(path: &Path) -> String {
    use object::Object as _;
    let bytes = std::fs::read(path).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    let id = file.build_id().unwrap().expect("a build id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The file offsets of each function of `path`'s symbol table.
fn function_offsets(path: &Path) -> std::collections::HashMap<String, std::ops::Range<u64>> {
    use object::read::elf::{ElfFile64, ProgramHeader as _};
    use object::{Object as _, ObjectSymbol as _};
    let bytes = std::fs::read(path).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*bytes).unwrap();
    let endian = elf.endian();
    let loads: Vec<(u64, u64, u64)> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
        .map(|ph| (ph.p_vaddr(endian), ph.p_offset(endian), ph.p_filesz(endian)))
        .collect();
    elf.symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
        .filter_map(|s| {
            let (vaddr, offset, _) = loads
                .iter()
                .find(|(v, _, size)| s.address() >= *v && s.address() < v + size)?;
            let start = s.address() - vaddr + offset;
            Some((s.name().ok()?.to_string(), start..start + s.size()))
        })
        .collect()
}

#[test]
fn a_stripped_binary_keeps_build_id_and_file_offsets() {
    let dir = workdir();
    let burn = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    let stripped = dir.path().join("burn-stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&burn)
        .status()
        .expect("strip runs");
    assert!(status.success());
    let offsets = function_offsets(&burn);
    let (samples, _, _) = profile_in_pod(&format!("exec {} 2", stripped.display()), 99);
    let total: i64 = samples.iter().map(|s| s.value).sum();
    let expected_id = build_id(&burn);
    // Unnamed on the node, but each of the chain's frames is the stripped file at an offset
    // inside the function the unstripped copy names there.
    let in_chain: i64 = samples
        .iter()
        .filter(|s| {
            s.locations.len() >= CHAIN.len()
                && CHAIN.iter().enumerate().all(|(i, name)| {
                    let (file, id, offset) = &s.locations[i];
                    s.functions[i].is_none()
                        && file == &stripped.display().to_string()
                        && id == &expected_id
                        && offsets[*name].contains(offset)
                })
        })
        .map(|s| s.value)
        .sum();
    assert!(total > 0, "samples of the stripped program");
    assert!(
        in_chain as f64 >= 0.9 * total as f64,
        "{in_chain} of {total} samples carry the chain as build id + offsets: {:#?}",
        &samples[..samples.len().min(3)]
    );
}

/// A binary stripped as Fedora ships them, its local functions only in the xz-compressed
/// MiniDebugInfo of `.gnu_debugdata`: the chain is still named.
#[test]
fn a_stripped_binary_with_mini_debug_info_is_named_from_gnu_debugdata() {
    let dir = workdir();
    let burn = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    let fedora_like = dir.path().join("burn-minidebuginfo");
    with_mini_debug_info(&burn, &fedora_like);
    let sections = Command::new("readelf")
        .arg("-SW")
        .arg(&fedora_like)
        .output()
        .expect("readelf runs");
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        sections.contains(".gnu_debugdata") && !sections.contains(".symtab"),
        "no symbol table, only MiniDebugInfo:\n{sections}"
    );
    let (samples, cpu, _) = profile_in_pod(&format!("exec {} 2", fedora_like.display()), 99);
    assert_sample_total(&samples, cpu, 99);
    assert_chain_share(&samples, &CHAIN);
}

#[test]
fn a_binary_in_a_container_root_is_symbolized_through_the_process() {
    let dir = workdir();
    let burn = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    // The container's own filesystem: a tmpfs mounted in a mount namespace of its own, so its
    // files exist only for the container (the host sees an empty directory at that path), as an
    // image's files in a container runtime's rootfs.
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let inside = rootfs.join("burn-in-container");
    let (samples, cpu, _) = profile_in_pod(
        &format!(
            "exec unshare --mount --propagation private sh -c 'mount -t tmpfs tmpfs {root} && cp {burn} {inside} && exec {inside} 2'",
            root = rootfs.display(),
            burn = burn.display(),
            inside = inside.display(),
        ),
        99,
    );
    assert!(
        !inside.exists(),
        "the host does not see the container's file"
    );
    assert_sample_total(&samples, cpu, 99);
    assert_chain_share(&samples, &CHAIN);
    let leaf = samples
        .iter()
        .find(|s| s.functions.first().and_then(|f| f.as_deref()) == Some("burn_leaf"))
        .expect("a sample in burn_leaf");
    assert_eq!(leaf.locations[0].0, inside.display().to_string());
    assert_eq!(leaf.locations[0].1, build_id(&burn));
}

/// A "JIT": copies a counting loop into anonymous executable memory, names it in its perf map
/// (`/tmp/perf-<pid>.map`, as Node and the JVM's agent write it) and runs it for argv[1] seconds
/// of CPU.
const JIT_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    /* mov rax, rdi; L: dec rax; jnz L; ret */
    static const unsigned char code[] = {0x48, 0x89, 0xf8, 0x48, 0xff, 0xc8, 0x75, 0xfb, 0xc3};
    unsigned char *page = mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) return 1;
    memcpy(page + 64, code, sizeof code);
    char path[64];
    snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
    FILE *map = fopen(path, "w");
    if (!map) return 2;
    fprintf(map, "%lx %zx jit_hot_loop\n", (unsigned long)(page + 64), sizeof code);
    fclose(map);
    unsigned long (*hot)(unsigned long) = (unsigned long (*)(unsigned long))(page + 64);
    double seconds = argc > 1 ? atof(argv[1]) : 3;
    double start = now();
    while (now() - start < seconds) hot(50000000);
    return 0;
}
"#;

/// Removes a file when the test ends, passed or failed.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn jit_frames_are_named_from_the_perf_map() {
    let dir = workdir();
    let jit = compile_c(dir.path(), "jit", JIT_C, &["-O2"]);
    let (pod_uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&pod_uid, &container);
    let pod_path = pod.path().to_path_buf();
    let mut pid = 0;
    let mut perf_map = None;
    let (profiles, _) = profile_run(
        ProfileTarget::Cgroup(pod_path),
        &profiling_config(99),
        || {
            pid = pod.spawn_shell(&format!("exec {} 2", jit.display()));
            perf_map = Some(RemoveOnDrop(PathBuf::from(format!("/tmp/perf-{pid}.map"))));
            pid
        },
    );
    let samples: Vec<ReadSample> = profiles.iter().flat_map(read_samples).collect();
    let total: i64 = samples.iter().map(|s| s.value).sum();
    let named: i64 = samples
        .iter()
        .filter(|s| {
            s.functions.first().and_then(|f| f.as_deref()) == Some("jit_hot_loop")
                && s.locations[0].0 == format!("/tmp/perf-{pid}.map")
        })
        .map(|s| s.value)
        .sum();
    assert!(total > 0);
    assert!(
        named as f64 >= 0.9 * total as f64,
        "{named} of {total} samples in jit_hot_loop: {:#?}",
        &samples[..samples.len().min(3)]
    );
    drop(perf_map);
}

#[test]
fn off_cpu_time_of_a_known_block_is_measured_within_10_percent() {
    let dir = workdir();
    let sleeper = compile_c(
        dir.path(),
        "sleeper",
        SLEEPER_C,
        &["-O2", "-fomit-frame-pointer"],
    );
    let (pod_uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&pod_uid, &container);
    let pod_path = pod.path().to_path_buf();
    // 4 sleeps of 500 ms: 2 s blocked in wait_in_sleep. Off-CPU time runs from switch-out to
    // switch-in, so it includes the wait for a CPU after each wake-up: few wake-ups keep that
    // small on a busy machine.
    let config = ProfilingProbeConfig {
        off_cpu: true,
        ..profiling_config(19)
    };
    let (profiles, _) = profile_run(ProfileTarget::Cgroup(pod_path), &config, || {
        pod.spawn_shell(&format!("exec {} 4 500", sleeper.display()))
    });
    let samples: Vec<ReadSample> = profiles.iter().flat_map(read_samples).collect();
    let off_cpu: Vec<&ReadSample> = samples
        .iter()
        .filter(|s| s.sample_type == "off_cpu")
        .collect();
    let in_sleep: i64 = off_cpu
        .iter()
        .filter(|s| {
            let names: Vec<&str> = s
                .functions
                .iter()
                .map(|f| f.as_deref().unwrap_or("?"))
                .collect();
            names
                .windows(3)
                .any(|w| w == ["wait_in_sleep", "wait_outer", "main"])
        })
        .map(|s| s.value)
        .sum();
    let expected = 2_000_000_000f64;
    eprintln!("{:.4} s blocked in wait_in_sleep", in_sleep as f64 / 1e9);
    assert!(
        (in_sleep as f64 - expected).abs() <= 0.1 * expected,
        "{:.3} s blocked in wait_in_sleep, expected 2 s; off-CPU samples: {off_cpu:#?}",
        in_sleep as f64 / 1e9
    );
}

/// Keeps the profiles the receiver sends.
#[derive(Default)]
struct CollectedProfiles(std::sync::Mutex<Vec<ProfilesData>>);

#[async_trait::async_trait]
impl podscope_core::Consumer for CollectedProfiles {
    async fn consume(
        &self,
        batch: podscope_core::Batch,
    ) -> Result<(), podscope_core::ConsumeError> {
        if let podscope_core::Batch::Profiles(data) = batch {
            self.0.lock().unwrap().push((*data).clone());
        }
        Ok(())
    }
}

/// A started eBPF receiver with `config`, its profiles (and spans, with `traces`) sent to the
/// consumers given; every probe attached.
async fn started_receiver(
    config: serde_json::Value,
    profiles: std::sync::Arc<dyn podscope_core::Consumer>,
    traces: Option<std::sync::Arc<dyn podscope_core::Consumer>>,
) -> podscope_receiver::ebpf::EbpfReceiver {
    use podscope_core::Component as _;
    let receiver = podscope_receiver::ebpf::EbpfReceiver::new(
        podscope_core::config::parse_component_config(config).unwrap(),
        podscope_core::BuildContext::for_tests("ebpf"),
        podscope_core::ReceiverConsumers {
            metrics: None,
            traces,
            profiles: Some(profiles),
            logs: None,
        },
    )
    .unwrap();
    receiver.start().await.unwrap();
    assert!(
        receiver.skipped_probes().is_empty(),
        "{:?}",
        receiver.skipped_probes()
    );
    receiver
}

/// The probe inside the receiver: a profiles pipeline gets one profile per interval for the
/// cgroups `cgroup_filter` selects, and nothing of a pod it leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_sends_profiles_of_selected_cgroups_only() {
    use podscope_core::Component as _;
    let dir = workdir();
    let burn = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    let (uid, selected_container) = unique_ids();
    let mut selected = PodCgroup::with_ids(&uid, &selected_container);
    let (other_uid, other_container) = unique_ids();
    let mut other = PodCgroup::with_ids(&other_uid, &other_container);
    let collected = std::sync::Arc::new(CollectedProfiles::default());
    let receiver = started_receiver(
        serde_json::json!({
            "collection_interval": "1s",
            "cgroup_filter": {"include": [selected.relative_path()]},
            "probes": {"profiling": {"frequency": 99}},
        }),
        collected.clone(),
        None,
    )
    .await;
    let stolen_before = stolen_seconds();
    let selected_pid = selected.spawn_shell(&format!("exec {} 1.5", burn.display()));
    let other_pid = other.spawn_shell(&format!("exec {} 1.5", burn.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(ended(selected_pid) && ended(other_pid)) {
        assert!(Instant::now() < deadline, "the programs did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = CpuTime {
        seconds: cpu_seconds(selected_pid),
        stolen: stolen_seconds() - stolen_before,
    };
    // The last interval's profiles come at the next collection: poll for them.
    let samples = loop {
        let samples: Vec<ReadSample> = collected
            .0
            .lock()
            .unwrap()
            .iter()
            .flat_map(read_samples)
            .collect();
        let total: i64 = samples.iter().map(|s| s.value).sum();
        if total as f64 >= cpu.seconds * 99.0 * 0.8 || Instant::now() >= deadline {
            break samples;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    receiver.shutdown().await.unwrap();
    assert!(
        samples
            .iter()
            .all(|s| s.container_id.as_deref() == Some(selected_container.as_str())),
        "only the selected pod's container: {:?}",
        samples
            .iter()
            .map(|s| &s.container_id)
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(!samples
        .iter()
        .any(|s| s.container_id.as_deref() == Some(other_container.as_str())));
    assert_sample_total(&samples, cpu, 99);
    assert_chain_share(&samples, &CHAIN);
}

#[test]
fn a_binary_replaced_on_disk_is_read_through_its_mapping() {
    let dir = workdir();
    let burn = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    let (uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&uid, &container);
    let pid = pod.spawn_shell(&format!("exec {} 2", burn.display()));
    // Wait for the exec, then replace the file under the running program (as a redeploy does)
    // before the profiler starts: its path now names another file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .as_deref()
        != Some(burn.as_path())
    {
        assert!(Instant::now() < deadline, "the program did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(&burn).unwrap();
    std::fs::copy("/bin/true", &burn).unwrap();
    let (profiles, _) = profile_run(
        ProfileTarget::Cgroup(pod.path().to_path_buf()),
        &profiling_config(99),
        || pid,
    );
    let samples: Vec<ReadSample> = profiles.iter().flat_map(read_samples).collect();
    assert_chain_share(&samples, &CHAIN);
    let leaf = samples
        .iter()
        .find(|s| s.functions.first().and_then(|f| f.as_deref()) == Some("burn_leaf"))
        .expect("a sample in burn_leaf");
    // The mapping names the file as the kernel does now.
    assert_eq!(leaf.locations[0].0, format!("{} (deleted)", burn.display()));
}

/// An HTTP/1.1 server on 127.0.0.1 (a free port, written to argv[1] once it listens), one
/// connection at a time, keep-alive: for each request it burns argv[2] rounds in
/// `request_work`, answers, then burns half as many in `between_requests` before it reads the
/// next request; `GET /quit` makes it answer and exit. A second thread burns 3 × argv[2] rounds
/// in `other_thread_work` meanwhile. Work is counted in rounds, not time: the machine is shared.
const REQUEST_BURNER_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
static volatile unsigned long sink;
static inline __attribute__((always_inline)) unsigned long spin(unsigned long rounds) {
    unsigned long x = rounds;
    for (unsigned long i = 0; i < rounds; i++) x = x * 6364136223846793005UL + i;
    return x;
}
__attribute__((noinline)) void request_work(unsigned long rounds) { sink = spin(rounds); }
__attribute__((noinline)) void between_requests(unsigned long rounds) { sink = spin(rounds); }
__attribute__((noinline)) void *other_thread_work(void *rounds) {
    sink = spin((unsigned long)rounds);
    return 0;
}
int main(int argc, char **argv) {
    unsigned long rounds = strtoul(argv[2], 0, 10);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8) ||
        getsockname(s, (struct sockaddr *)&a, &len))
        return 2;
    pthread_t other;
    pthread_create(&other, 0, other_thread_work, (void *)(rounds * 3));
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    FILE *f = fopen(tmp, "w");
    fprintf(f, "%d\n", ntohs(a.sin_port));
    fclose(f);
    rename(tmp, argv[1]);
    static const char response[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0)
            return 3;
        char buf[4096];
        size_t have = 0;
        for (;;) {
            char *end = strstr(buf, "\r\n\r\n");
            if (have == 0 || !end) {
                ssize_t n = recv(c, buf + have, sizeof buf - 1 - have, 0);
                if (n <= 0) {
                    close(c);
                    break;
                }
                have += n;
                buf[have] = 0;
                continue;
            }
            int quit = strncmp(buf, "GET /quit ", 10) == 0;
            if (!quit)
                request_work(rounds);
            send(c, response, sizeof response - 1, 0);
            if (quit) {
                pthread_join(other, 0);
                return 0;
            }
            between_requests(rounds / 2);
            size_t used = end + 4 - buf;
            memmove(buf, buf + used, have - used);
            have -= used;
            buf[have] = 0;
        }
    }
}
"#;

/// Keeps every batch the receiver sends (spans and profiles).
#[derive(Default)]
struct CollectedBatches(std::sync::Mutex<Vec<podscope_core::Batch>>);

#[async_trait::async_trait]
impl podscope_core::Consumer for CollectedBatches {
    async fn consume(
        &self,
        batch: podscope_core::Batch,
    ) -> Result<(), podscope_core::ConsumeError> {
        self.0.lock().unwrap().push(batch);
        Ok(())
    }
}

impl CollectedBatches {
    /// (trace id, span id) of every server span, in hex.
    fn server_spans(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for batch in self.0.lock().unwrap().iter() {
            if let podscope_core::Batch::Traces(rss) = batch {
                for span in rss
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .flat_map(|ss| &ss.spans)
                    .filter(|s| s.kind == 2)
                {
                    out.push((hex(&span.trace_id), hex(&span.span_id)));
                }
            }
        }
        out
    }

    /// Every on-CPU sample: its function names (leaf first), its link (trace id, span id in
    /// hex) and its value.
    fn linked_samples(&self) -> Vec<LinkedSample> {
        let mut out = Vec::new();
        for batch in self.0.lock().unwrap().iter() {
            let podscope_core::Batch::Profiles(data) = batch else {
                continue;
            };
            let d = data.dictionary.as_ref().expect("a dictionary");
            let s = |i: i32| d.string_table[i as usize].clone();
            for p in data
                .resource_profiles
                .iter()
                .flat_map(|rp| &rp.scope_profiles)
                .flat_map(|sp| &sp.profiles)
            {
                if s(p.sample_type.expect("a sample type").type_strindex) != "samples" {
                    continue;
                }
                for sample in &p.samples {
                    let functions = d.stack_table[sample.stack_index as usize]
                        .location_indices
                        .iter()
                        .map(|&li| {
                            d.location_table[li as usize]
                                .lines
                                .first()
                                .map(|l| {
                                    s(d.function_table[l.function_index as usize].name_strindex)
                                })
                                .unwrap_or_default()
                        })
                        .collect();
                    let link = (sample.link_index != 0).then(|| {
                        let link = &d.link_table[sample.link_index as usize];
                        (hex(&link.trace_id), hex(&link.span_id))
                    });
                    out.push((functions, link, sample.values[0]));
                }
            }
        }
        out
    }
}

/// A sample's function names (leaf first), its link (trace id, span id in hex) and its value.
type LinkedSample = (Vec<String>, Option<(String, String)>, i64);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `GET path` with `traceparent` on `stream` and reads the whole answer.
fn get(stream: &mut std::net::TcpStream, path: &str, traceparent: &str) {
    use std::io::{Read as _, Write as _};
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: burner\r\ntraceparent: {traceparent}\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.ends_with(b"\r\n\r\nok") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed the connection");
        answer.extend_from_slice(&buf[..n]);
    }
}

/// The trace link: a server in a pod burns CPU in `request_work` while it serves requests with
/// known traceparents (keep-alive, two connections, one thread). Every sample in
/// `request_work` carries its request's trace id and the id of the SERVER span the http probe
/// sent for it; the samples between requests on the same thread and those of another thread
/// carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_taken_while_serving_a_request_carry_its_trace_and_span_id() {
    use podscope_core::Component as _;
    let dir = workdir();
    let server = compile_c(
        dir.path(),
        "request_burner",
        REQUEST_BURNER_C,
        &["-O2", "-fomit-frame-pointer", "-pthread"],
    );
    let (uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&uid, &container);
    let collected = std::sync::Arc::new(CollectedBatches::default());
    let receiver = started_receiver(
        serde_json::json!({
            "collection_interval": "1s",
            "cgroup_filter": {"include": [pod.relative_path()]},
            "probes": {"http": {}, "profiling": {"frequency": 99}},
        }),
        collected.clone(),
        Some(collected.clone()),
    )
    .await;
    let port_file = dir.path().join("port");
    let pid = pod.spawn_shell(&format!(
        "exec {} {} 150000000",
        server.display(),
        port_file.display()
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    let port: u16 = loop {
        if let Ok(text) = std::fs::read_to_string(&port_file) {
            break text.trim().parse().unwrap();
        }
        assert!(!ended(pid), "the server exited before it listened");
        assert!(Instant::now() < deadline, "the server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Four requests on one keep-alive connection, two on another, then /quit.
    let traces: Vec<String> = (1..=6u64)
        .map(|i| format!("{:032x}", 0xa11c_e000 + i))
        .collect();
    let traceparents: Vec<String> = (0..6)
        .map(|i| format!("00-{}-{:016x}-01", traces[i], 0xb0b0 + i))
        .collect();
    let client = tokio::task::spawn_blocking(move || {
        let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        // The server serves one connection at a time: the first is closed before the second.
        {
            let mut first = connect();
            for (i, traceparent) in traceparents[..4].iter().enumerate() {
                get(&mut first, &format!("/work/{i}"), traceparent);
            }
        }
        let mut second = connect();
        for (i, traceparent) in traceparents[4..].iter().enumerate() {
            get(&mut second, &format!("/work/{}", i + 4), traceparent);
        }
        get(
            &mut second,
            "/quit",
            &format!("00-{:032x}-{:016x}-01", 0xdead, 0xbeef),
        );
    });
    client.await.unwrap();
    while !ended(pid) {
        assert!(Instant::now() < deadline, "the server did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every request's span is out: the http probe has published every window.
    let spans = loop {
        let spans = collected.server_spans();
        if spans.len() >= 7 || Instant::now() >= deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The profiler flushes what it holds at shutdown.
    receiver.shutdown().await.unwrap();
    assert_eq!(spans.len(), 7, "one SERVER span per request: {spans:?}");
    let span_of: std::collections::HashMap<&str, &str> = spans
        .iter()
        .map(|(trace, span)| (trace.as_str(), span.as_str()))
        .collect();
    for trace in &traces {
        assert!(
            span_of.contains_key(trace.as_str()),
            "a span of trace {trace}"
        );
    }
    let samples = collected.linked_samples();
    let in_function = |name: &str| {
        samples
            .iter()
            .filter(|(functions, _, _)| functions.iter().any(|f| f == name))
            .collect::<Vec<_>>()
    };
    let mut per_trace: std::collections::BTreeMap<&str, i64> = Default::default();
    let in_requests = in_function("request_work");
    for (functions, link, value) in &in_requests {
        let Some((trace, span)) = link else {
            panic!("a sample in request_work without a link: {functions:?}");
        };
        assert!(
            traces.contains(trace),
            "sample in request_work linked to trace {trace}, not one of the requests'"
        );
        assert_eq!(
            span_of[trace.as_str()],
            span.as_str(),
            "the span id is that of the SERVER span sent for trace {trace}"
        );
        *per_trace.entry(trace.as_str()).or_default() += value;
    }
    eprintln!("samples in request_work per trace: {per_trace:?}");
    // 150 M rounds are about 0.2 CPU s: about 20 samples at 99 Hz.
    for trace in &traces {
        let n = per_trace.get(trace.as_str()).copied().unwrap_or(0);
        assert!(
            n >= 5,
            "{n} samples of request_work linked to trace {trace}"
        );
    }
    for outside in ["between_requests", "other_thread_work"] {
        let found = in_function(outside);
        let total: i64 = found.iter().map(|(_, _, v)| v).sum();
        assert!(total >= 5, "{total} samples in {outside}");
        assert!(
            found.iter().all(|(_, link, _)| link.is_none()),
            "samples in {outside} carry no link: {found:?}"
        );
    }
}

//! `podscope profile` end to end, through the real binary (root only; CI runs as root): a C
//! program built here without frame pointers burns CPU in a known call chain in a pod cgroup;
//! the command profiles it by pid, cgroup or container id and writes pprof (read back by the
//! `pprof-format` npm package, a decoder we did not write), folded stacks or an SVG flame graph
//! (parsed by Python's XML parser).

use std::path::{Path, PathBuf};
use std::process::Command;

use podscope_integration::pprof_format;
use podscope_integration::test_programs::{compile_c, BURN_C, BURN_CHAIN as CHAIN, SLEEPER_C};
use podscope_testkit::pod_cgroup::{unique_ids, PodCgroup};

struct Burning {
    _dir: tempfile::TempDir,
    pod: PodCgroup,
    container: String,
    pid: u32,
    binary: PathBuf,
}

/// The program, built with -O2 -fomit-frame-pointer, burning for 10 s in a new pod cgroup.
fn burning_in_a_pod() -> Burning {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_c(dir.path(), "burn", BURN_C, &["-O2", "-fomit-frame-pointer"]);
    let (uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&uid, &container);
    let pid = pod.spawn_shell(&format!("exec {} 10", binary.display()));
    Burning {
        _dir: dir,
        pod,
        container,
        pid,
        binary,
    }
}

/// Runs `podscope profile ARGS --duration 3s -o OUTPUT`; returns the total it reports.
fn profile(args: &[&str], output: &Path) -> i64 {
    profile_summary(args, output)
        .parse()
        .expect("a sample count")
}

/// Runs `podscope profile ARGS --duration 3s -o OUTPUT`; returns the total from its summary
/// line (`wrote <path>: <total> samples in <m> stacks (<l> lost)`) as printed.
fn profile_summary(args: &[&str], output: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_podscope"))
        .arg("profile")
        .args(args)
        .args(["--duration", "3s", "-o"])
        .arg(output)
        .output()
        .expect("podscope runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "podscope profile failed: {stderr}");
    assert!(
        stderr.contains("recording") && stderr.contains("samples read"),
        "a progress line while recording: {stderr}"
    );
    let total = stdout
        .split(": ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("a summary line: {stdout}"));
    assert!(
        total.parse::<f64>().is_ok_and(|t| t > 0.0),
        "something was recorded: {stdout}"
    );
    total.to_string()
}

#[test]
fn pprof_by_cgroup_is_read_back_by_pprof_format_with_the_reported_total() {
    let burning = burning_in_a_pod();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("cpu.pb.gz");
    let reported = profile(&["--cgroup", burning.pod.relative_path()], &output);
    let decoded = pprof_format::decode(&output);
    assert_eq!(
        decoded.sample_types,
        vec![("samples".to_string(), "count".to_string())]
    );
    assert_eq!(
        decoded.total(),
        reported,
        "the file holds every sample reported"
    );
    let chained: i64 = decoded
        .samples
        .iter()
        .filter(|s| s.functions.windows(CHAIN.len()).any(|w| w == CHAIN))
        .map(|s| s.values[0])
        .sum();
    assert!(
        chained as f64 >= 0.9 * reported as f64,
        "{chained} of {reported} samples carry the chain"
    );
    assert!(decoded.samples.iter().all(|s| s
        .labels
        .contains(&format!("container.id={}", burning.container))));
    assert!(decoded
        .samples
        .iter()
        .all(|s| s.labels.contains(&format!("pid={}", burning.pid))));
    let binary = burning.binary.display().to_string();
    let (_, build_id) = decoded
        .mappings
        .iter()
        .find(|(file, _)| *file == binary)
        .expect("the program's mapping");
    assert_eq!(build_id.len(), 40, "its GNU build id");
}

#[test]
fn folded_stacks_by_pid_sum_to_the_reported_total() {
    let burning = burning_in_a_pod();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("cpu.folded");
    let reported = profile(&["--pid", &burning.pid.to_string()], &output);
    let text = std::fs::read_to_string(&output).unwrap();
    let mut total = 0;
    let mut chained = 0;
    let root_first: Vec<&str> = CHAIN.iter().rev().copied().collect();
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ').expect("`stack count` lines");
        let count: i64 = count.parse().expect("a count");
        let frames: Vec<&str> = stack.split(';').collect();
        assert_eq!(frames[0], "burn", "stacks start with the thread's name");
        total += count;
        if frames.windows(CHAIN.len()).any(|w| w == root_first) {
            chained += count;
        }
    }
    assert_eq!(total, reported);
    assert!(chained as f64 >= 0.9 * total as f64, "{chained} of {total}");
}

#[test]
fn svg_by_container_id_is_a_valid_svg_with_the_function_names() {
    let burning = burning_in_a_pod();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("cpu.svg");
    profile(&["--container", &burning.container[..12]], &output);
    let parsed = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; print(E.parse(sys.argv[1]).getroot().tag)",
        ])
        .arg(&output)
        .output()
        .expect("python3 runs");
    assert!(
        parsed.status.success(),
        "not well-formed XML: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&parsed.stdout).trim(),
        "{http://www.w3.org/2000/svg}svg"
    );
    let svg = std::fs::read_to_string(&output).unwrap();
    for name in CHAIN {
        assert!(svg.contains(&format!(">{name} (")), "{name} is drawn");
    }
}

#[test]
fn a_bad_output_name_or_target_is_a_clear_error() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .arg("profile")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--pid", "1", "-o", "out.txt"]).contains("must end in .svg, .pb.gz or .folded"));
    assert!(run(&["--container", "ffffffffffff", "-o", "x.svg"])
        .contains("--container ffffffffffff: no container cgroup with that id"));
    assert!(run(&["--pid", "1", "--cgroup", "/x", "-o", "x.svg"]).contains("cannot be used with"));
}

#[test]
fn off_cpu_folded_stacks_hold_the_blocked_time_reported() {
    let dir = tempfile::tempdir().unwrap();
    let sleeper = compile_c(
        dir.path(),
        "sleeper",
        SLEEPER_C,
        &["-O2", "-fomit-frame-pointer"],
    );
    let (uid, container) = unique_ids();
    let mut pod = PodCgroup::with_ids(&uid, &container);
    // 24 sleeps of 250 ms: it blocks for the whole recording.
    let pid = pod.spawn_shell(&format!("exec {} 24 250", sleeper.display()));
    let output = dir.path().join("off.folded");
    let seconds: f64 = profile_summary(&["--pid", &pid.to_string(), "--off-cpu"], &output)
        .parse()
        .expect("seconds blocked");
    let text = std::fs::read_to_string(&output).unwrap();
    let mut total = 0i64;
    let mut in_sleep = 0i64;
    for line in text.lines() {
        let (stack, ns) = line.rsplit_once(' ').expect("`stack ns` lines");
        let ns: i64 = ns.parse().expect("nanoseconds");
        total += ns;
        if stack.contains(";main;wait_outer;wait_in_sleep;") {
            in_sleep += ns;
        }
    }
    // The summary prints seconds with 3 decimals.
    assert!(
        (total as f64 / 1e9 - seconds).abs() <= 0.0005,
        "{total} ns vs {seconds} s"
    );
    // Blocks end while recording: at least 2 of the 3 s, all in the known function.
    assert!(
        in_sleep >= 2_000_000_000,
        "{in_sleep} ns in wait_in_sleep: {text}"
    );
    assert!(
        in_sleep as f64 >= 0.99 * total as f64,
        "{in_sleep} of {total} ns"
    );
}

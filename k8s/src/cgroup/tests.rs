use super::*;

const ID: &str = "4f1c9b0e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e";
const UID: &str = "7a1d6f2e-9c3b-4e8a-b5d4-0f1e2d3c4b5a";
const UID_: &str = "7a1d6f2e_9c3b_4e8a_b5d4_0f1e2d3c4b5a";

fn expect(
    container: Option<(&str, Runtime)>,
    pod: Option<&str>,
    qos: Option<QosClass>,
) -> Option<ContainerCgroup> {
    Some(ContainerCgroup {
        container_id: container.map(|(id, _)| id.to_string()),
        runtime: container.map(|(_, r)| r),
        pod_uid: pod.map(str::to_string),
        qos,
    })
}

/// Paths as real nodes show them in `/proc/<pid>/cgroup` and under the cgroup mounts.
#[test]
fn real_world_paths() {
    use QosClass::*;
    use Runtime::*;
    let table: Vec<(String, Option<ContainerCgroup>)> = vec![
        // cgroup v2 (and v1 with the systemd driver): containerd, each QoS class.
        (
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            expect(Some((ID, Containerd)), Some(UID), Some(BestEffort)),
        ),
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            expect(Some((ID, Containerd)), Some(UID), Some(Burstable)),
        ),
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            expect(Some((ID, Containerd)), Some(UID), Some(Guaranteed)),
        ),
        // CRI-O, systemd driver; its conmon scope is the pod's but not the container's.
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"),
            expect(Some((ID, CriO)), Some(UID), Some(Burstable)),
        ),
        (
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            expect(None, Some(UID), Some(Burstable)),
        ),
        // CRI-O on cgroup v2 nests the container's processes in a `container` child.
        (
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope/container"),
            expect(Some((ID, CriO)), Some(UID), Some(Guaranteed)),
        ),
        // docker (dockershim / cri-dockerd), systemd driver.
        (
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"),
            expect(Some((ID, Docker)), Some(UID), Some(BestEffort)),
        ),
        // cgroupfs driver (v1 and v2 alike): bare ids, dashed UIDs.
        (
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            expect(Some((ID, Unknown)), Some(UID), Some(Burstable)),
        ),
        (
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            expect(Some((ID, Unknown)), Some(UID), Some(BestEffort)),
        ),
        (
            format!("/kubepods/pod{UID}/{ID}"),
            expect(Some((ID, Unknown)), Some(UID), Some(Guaranteed)),
        ),
        // The pod's own cgroup (the pause container's parent): pod, no container.
        (
            format!("/kubepods/burstable/pod{UID}"),
            expect(None, Some(UID), Some(Burstable)),
        ),
        (
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
            expect(None, Some(UID), Some(BestEffort)),
        ),
        // kind: the kubelet's slices nest under kubelet.slice.
        (
            format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            expect(Some((ID, Containerd)), Some(UID), Some(BestEffort)),
        ),
        // A node inside a docker container (k3d, docker-in-docker).
        (
            format!("/docker/{}/kubepods/besteffort/pod{UID}/{ID}", ID.replace('4', "5")),
            expect(Some((ID, Unknown)), Some(UID), Some(BestEffort)),
        ),
        // Static pods: the UID is the manifest hash, 32 hex characters.
        (
            format!("/kubepods/burstable/pod8c3b2a1f0e9d8c7b6a5f4e3d2c1b0a99/{ID}"),
            expect(Some((ID, Unknown)), Some("8c3b2a1f0e9d8c7b6a5f4e3d2c1b0a99"), Some(Burstable)),
        ),
        // A process that made its own child cgroup inside the container.
        (
            format!("/kubepods/pod{UID}/{ID}/worker"),
            expect(Some((ID, Unknown)), Some(UID), Some(Guaranteed)),
        ),
        // Outside Kubernetes: docker and podman containers, no pod.
        (
            format!("/system.slice/docker-{ID}.scope"),
            expect(Some((ID, Docker)), None, None),
        ),
        (
            format!("/machine.slice/libpod-{ID}.scope/container"),
            expect(Some((ID, Podman)), None, None),
        ),
        (format!("/docker/{ID}"), expect(Some((ID, Unknown)), None, None)),
        // Upper-case hex is read as the same id.
        (
            format!("/kubepods/pod{UID}/{}", ID.to_uppercase()),
            expect(Some((ID, Unknown)), Some(UID), Some(Guaranteed)),
        ),
    ];
    for (path, expected) in table {
        assert_eq!(parse_container_cgroup(&path), expected, "{path}");
    }
}

#[test]
fn malformed_paths_match_nothing() {
    let long = "a".repeat(10_000);
    let paths = [
        String::new(),
        "/".to_string(),
        "////".to_string(),
        "/user.slice/user-0.slice/session-1.scope".to_string(),
        "/system.slice/cron.service".to_string(),
        "/kubepods.slice".to_string(),
        "/kubepods/burstable".to_string(),
        // Too short, not hex, wrong UID shapes.
        "/kubepods/burstable/pod1234/abc".to_string(),
        format!("/kubepods/burstable/pod{}/{ID}", &UID[1..]),
        format!("/kubepods/burstable/podzz1d6f2e-9c3b-4e8a-b5d4-0f1e2d3c4b5a/{ID}"),
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod.slice/cri-containerd-{ID}.scope"),
        format!("/system.slice/cri-containerd-{}.scope", &ID[1..]),
        format!("/system.slice/cri-containerd-{}x.scope", &ID[1..]),
        format!("/system.slice/{ID}.scope"),
        format!("/{long}"),
        "/kubepods/pod\u{e9}\u{e9}/\u{1F600}".to_string(),
    ];
    for path in paths {
        assert_eq!(parse_container_cgroup(&path), None, "{path:?}");
    }
}

#[test]
fn proc_cgroup_prefers_the_line_that_names_a_container() {
    // Hybrid host where the kubelet uses cgroup v1: the v2 line is the root.
    let hybrid = format!(
        "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n4:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
    );
    assert_eq!(
        cgroup_path_from_proc(&hybrid).as_deref(),
        Some(format!("/kubepods/besteffort/pod{UID}/{ID}").as_str())
    );
    let unified =
        format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n");
    assert_eq!(
        container_id(&cgroup_path_from_proc(&unified).unwrap()).as_deref(),
        Some(ID)
    );
    assert_eq!(
        cgroup_path_from_proc("0::/user.slice\n").as_deref(),
        Some("/user.slice")
    );
    assert_eq!(cgroup_path_from_proc("garbage"), None);
}

#[test]
fn this_process_has_a_cgroup_path() {
    let path = process_cgroup_path(Path::new("/proc"), std::process::id());
    assert!(path.is_some_and(|p| p.starts_with('/')));
    assert_eq!(process_cgroup_path(Path::new("/proc"), u32::MAX), None);
}

#[test]
fn the_index_maps_directory_inodes_to_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("a.slice/b.scope")).unwrap();
    let mut index = CgroupIndex::new(dir.path().to_path_buf());
    index.refresh();
    let ino = std::fs::metadata(dir.path().join("a.slice/b.scope"))
        .unwrap()
        .ino();
    assert_eq!(index.path(ino), Some("/a.slice/b.scope"));
    assert_eq!(
        index.path(std::fs::metadata(dir.path()).unwrap().ino()),
        Some("/")
    );
}

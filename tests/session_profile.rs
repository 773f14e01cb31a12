//! `kubectl podscope profile` on the agent side (root, real eBPF): the `session` extension as
//! the registry builds it profiles a pod's busy container for the request's duration and sends
//! one folded or pprof file.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use podscope::registry;
use podscope_core::session::{
    ContainerRef, Hello, Message, ProfileFormat, Request, Target, Welcome, PROTOCOL_VERSION,
};
use podscope_core::{BuildContext, Component as _};
use podscope_receiver::session::SessionExtension;
use podscope_testkit::pod_cgroup::PodCgroup;
use podscope_testkit::BuildContextForTests as _;

fn profile(format: ProfileFormat) -> (String, Vec<u8>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let factory = registry::extensions()
        .into_iter()
        .find(|f| f.type_name == "session")
        .expect("the session extension is registered");
    let extension = (factory.create)(serde_json::json!({"endpoint": "127.0.0.1:0"}))
        .unwrap()
        .build(BuildContext::for_tests("session"))
        .unwrap();
    let any: Arc<dyn std::any::Any + Send + Sync> = extension.clone();
    let session = any.downcast::<SessionExtension>().unwrap();
    runtime.block_on(session.start()).unwrap();

    let mut pod = PodCgroup::new();
    pod.spawn_shell("while :; do :; done");
    let stream = TcpStream::connect(session.local_addr().unwrap()).unwrap();
    // A bound on a broken test, not a measurement.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client_version: "test".into(),
        request: Request::Profile {
            targets: vec![Target {
                namespace: "shop".into(),
                pod: "busy-0".into(),
                pod_uid: "u".into(),
                containers: vec![ContainerRef {
                    name: "app".into(),
                    id: format!("containerd://{}", pod.container_id()),
                }],
            }],
            duration: Duration::from_secs(2),
            format,
            frequency_hz: Some(99),
        },
    };
    let mut line = serde_json::to_string(&hello).unwrap();
    line.push('\n');
    (&stream).write_all(line.as_bytes()).unwrap();
    let mut read = || {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line
    };
    let welcome: Welcome = serde_json::from_str(&read()).unwrap();
    assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");
    let file = loop {
        match serde_json::from_str::<Message>(&read()).unwrap() {
            Message::File { name, data } => break (name, data),
            Message::Lost { .. } => continue,
            other => panic!("{other:?}"),
        }
    };
    let end: Message = serde_json::from_str(&read()).unwrap();
    assert!(matches!(end, Message::End { error: None, .. }), "{end:?}");
    runtime.block_on(session.shutdown()).unwrap();
    (
        file.0,
        base64::engine::general_purpose::STANDARD
            .decode(file.1)
            .unwrap(),
    )
}

#[test]
fn a_profile_of_a_busy_container_comes_back_as_folded_stacks() {
    let (name, bytes) = profile(ProfileFormat::Folded);
    assert_eq!(name, "profile.folded");
    let text = String::from_utf8(bytes).unwrap();
    let mut samples = 0u64;
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ').expect("`stack count` lines");
        assert!(!stack.is_empty(), "{line}");
        samples += count.parse::<u64>().unwrap();
    }
    // A shell spinning for 2 s at 99 Hz: sampled, however loaded the machine is.
    assert!(samples > 0, "{text}");
    assert!(text.contains("sh"), "the spinning shell's stacks: {text}");
}

#[test]
fn a_profile_comes_back_as_gzip_pprof() {
    let (name, bytes) = profile(ProfileFormat::Pprof);
    assert_eq!(name, "profile.pb.gz");
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic");
}

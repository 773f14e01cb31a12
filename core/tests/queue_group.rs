//! A batch handed to a group of queues (one per exporter of a pipeline): every queue takes it or
//! none does, and a queue that drops when full drops only its own copy.

use std::time::Duration;

use podscope_core::config::{QueueSettings, WhenFull};
use podscope_core::queue::{bounded_queue, QueueGroup, QueueReceiver};
use podscope_core::telemetry::AgentTelemetry;
use podscope_core::{Batch, Consumer as _};
use podscope_testkit::fake_otlp;

fn settings(capacity: usize, when_full: WhenFull) -> QueueSettings {
    QueueSettings {
        enabled: true,
        capacity,
        when_full,
        block_timeout: Duration::from_millis(50),
    }
}

fn spans(n: usize) -> Batch {
    fake_otlp::spans(n, &[])
}

#[tokio::test]
async fn a_group_refuses_for_all_when_one_queue_stays_full() {
    let telemetry = AgentTelemetry::new();
    let (a, a_rx) = bounded_queue("a", &settings(10, WhenFull::Block), &telemetry);
    let (b, b_rx) = bounded_queue("b", &settings(3, WhenFull::Block), &telemetry);
    let (c, c_rx) = bounded_queue("c", &settings(1, WhenFull::DropNewest), &telemetry);
    let group = QueueGroup::new(vec![a.clone(), b.clone(), c.clone()]);
    group.consume(spans(3)).await.unwrap();
    // b is full: nobody takes the next batch, and a's room is given back.
    assert_eq!(
        group.consume(spans(2)).await.unwrap_err().reason(),
        "queue_full"
    );
    assert_eq!(a_rx.len_items(), 3);
    assert_eq!(b_rx.recv().await.unwrap().item_count(), 3);
    // c is full and drops its copy; a and b take theirs.
    group.consume(spans(2)).await.unwrap();
    for queue in [&a, &b, &c] {
        queue.close();
    }
    let drain = |rx: QueueReceiver<Batch>| async move {
        let mut items = Vec::new();
        while let Some(batch) = rx.recv().await {
            items.push(batch.item_count());
        }
        items
    };
    assert_eq!(drain(a_rx).await, vec![3, 2]);
    assert_eq!(drain(b_rx).await, vec![2]);
    assert_eq!(drain(c_rx).await, vec![3]);
    assert!(telemetry
        .encode_text()
        .contains("podscope_queue_dropped_items_total{queue=\"c\",signal=\"traces\"} 2"));
}

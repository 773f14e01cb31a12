//! `http` as a `TraceSession` probe: the exchanges the eBPF receivers' http probes publish
//! (`exchanges`), those of the session's cgroups, one event each as `trace … http` prints them
//! (method, path, route, status, latency), summarized as the top `METHOD ROUTE STATUS` keys
//! (the path when no route is known) and the latencies' quantiles.
//!
//! It needs an eBPF receiver with the http probe naming the session extension; without one it
//! does not start, and says what to enable.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use podscope_core::session::TraceProbe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::events::exchange_event;
use super::exchanges::{ExchangeSubscription, ExchangeTap, HttpExchange};
use super::server::{ProcessNames, HTTP_FIX};
use super::session_probes::RunSink;

/// The summary key of an exchange: `GET /users/{id} 200` (the path without a route).
pub fn summary_key(exchange: &HttpExchange) -> String {
    let target = if exchange.route.is_empty() {
        &exchange.path
    } else {
        &exchange.route
    };
    format!("{} {target} {}", exchange.method, exchange.status())
}

/// A session's http probe running.
pub struct HttpRun {
    subscription: ExchangeSubscription,
    count: Arc<AtomicU64>,
    counter: JoinHandle<()>,
}

impl HttpRun {
    /// Subscribes to the exchanges of `cgroups`; refused when no http probe publishes here.
    pub fn start(tap: &Arc<ExchangeTap>, cgroups: &[u64], sink: RunSink) -> Result<Self, String> {
        if !tap.has_publisher() {
            return Err(format!("probe http: {HTTP_FIX}"));
        }
        let mut subscription = tap.subscribe(Some(cgroups.iter().copied().collect()));
        // The counting task owns the receiver; dropping the subscription closes it.
        let (_, idle) = mpsc::channel(1);
        let mut exchanges = std::mem::replace(&mut subscription.exchanges, idle);
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let counter = tokio::spawn(async move {
            let mut process_names = ProcessNames::default();
            while let Some(exchange) = exchanges.recv().await {
                if !sink.rate.admit(exchange.start_ns) {
                    continue;
                }
                counted.fetch_add(1, Ordering::Relaxed);
                sink.summary().add_keyed(
                    TraceProbe::Http,
                    summary_key(&exchange),
                    Some(exchange.duration_ns),
                );
                let labels = sink.labels(exchange.cgroup);
                let comm = process_names.comm(exchange.tgid);
                let event = exchange_event(&exchange, &labels, &sink.node, sink.clock_offset, comm);
                sink.keep(&event);
            }
            tracing::debug!(session = %sink.session, "TraceSession: its http exchanges ended");
        });
        Ok(HttpRun {
            subscription,
            count,
            counter,
        })
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn lost_since(&mut self) -> u64 {
        self.subscription.lost_since()
    }

    pub fn retarget(&mut self, cgroups: &[u64]) {
        self.subscription
            .retarget(cgroups.iter().copied().collect::<HashSet<u64>>());
    }

    /// Unsubscribes and counts what was queued; (count, lost).
    pub async fn finish(mut self) -> (u64, u64) {
        let lost = self.subscription.lost_since();
        drop(self.subscription);
        let _ = (&mut self.counter).await;
        (self.count.load(Ordering::Relaxed), lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::exchanges::tests::exchange;

    #[test]
    fn the_summary_key_is_the_route_when_known_else_the_path() {
        let mut exchange = exchange(1, 404);
        exchange.path = "/users/7".into();
        exchange.route = "/users/{id}".into();
        assert_eq!(summary_key(&exchange), "GET /users/{id} 404");
        exchange.route.clear();
        assert_eq!(summary_key(&exchange), "GET /users/7 404");
    }
}

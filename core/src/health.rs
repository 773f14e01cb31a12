//! Readiness of the agent, served at `/readyz`: ready once every pipeline has started and no
//! component reports that it is still waiting (for example, Kubernetes metadata not yet synced).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    pipelines_started: AtomicBool,
    /// component id → why it is not ready.
    not_ready: Mutex<BTreeMap<String, String>>,
}

impl Readiness {
    pub fn set_pipelines_started(&self, started: bool) {
        self.inner
            .pipelines_started
            .store(started, Ordering::SeqCst);
    }

    /// A component says it is not ready, and why.
    pub fn set_not_ready(&self, component: &str, why: impl Into<String>) {
        self.lock().insert(component.to_string(), why.into());
    }

    pub fn set_ready(&self, component: &str) {
        self.lock().remove(component);
    }

    /// `Ok` when ready, else the reasons, one per line.
    pub fn check(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if !self.inner.pipelines_started.load(Ordering::SeqCst) {
            reasons.push("pipelines not started".to_string());
        }
        reasons.extend(self.lock().iter().map(|(id, why)| format!("{id}: {why}")));
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("\n"))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.inner
            .not_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

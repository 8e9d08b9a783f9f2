//! Which namespaces the admission webhook managed by this process serves:
//! one entry per running certificate manager (the leader's job, with the
//! controllers), each a filter of namespaces. The binding controller reads
//! it to tell "injected at admission" from "needs the webhook", and to look
//! for missed injections. A value passed to both, not a global: two
//! operators in one process (tests) never see each other's webhook.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Filter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The namespaces served at admission (see the module).
#[derive(Clone, Default)]
pub struct AdmissionScope {
    serving: Arc<Mutex<BTreeMap<u64, Filter>>>,
    next: Arc<AtomicU64>,
}

impl AdmissionScope {
    /// Whether a webhook of this process intercepts pods of namespace `ns`.
    pub fn serves(&self, ns: &str) -> bool {
        self.serving
            .lock()
            .map(|s| s.values().any(|intercepts| intercepts(ns)))
            .unwrap_or(false)
    }

    /// Registers a webhook intercepting the namespaces `intercepts` accepts,
    /// until the returned guard is dropped.
    pub fn register(
        &self,
        intercepts: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> AdmissionRegistration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut serving) = self.serving.lock() {
            serving.insert(id, Arc::new(intercepts));
        }
        AdmissionRegistration {
            scope: self.clone(),
            id,
        }
    }
}

/// Keeps a webhook registered in its [`AdmissionScope`] while alive.
pub struct AdmissionRegistration {
    scope: AdmissionScope,
    id: u64,
}

impl Drop for AdmissionRegistration {
    fn drop(&mut self) {
        if let Ok(mut serving) = self.scope.serving.lock() {
            serving.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_served_while_a_registration_covering_it_lives() {
        let scope = AdmissionScope::default();
        assert!(!scope.serves("shop"));
        let shop = scope.register(|ns| ns == "shop");
        let other = scope.clone().register(|ns| ns == "batch");
        assert!(scope.serves("shop") && scope.serves("batch"));
        assert!(!scope.serves("kube-system"));
        drop(shop);
        assert!(!scope.serves("shop"));
        assert!(scope.serves("batch"));
        drop(other);
        assert!(!scope.serves("batch"));
    }
}

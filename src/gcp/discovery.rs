//! Retries and memory around `instances.get`: the last known answer per
//! instance survives later failures.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;

use super::{AdminApi, DatabaseInstance, GcpError};
use crate::budget::DiscoveredInstance;

/// How retryable failures are retried within one refresh: exponential backoff
/// with jitter from `first_delay`, capped at `max_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Requests per refresh, the first included (at least 1).
    pub attempts: usize,
    /// Delay before the first retry.
    pub first_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, 0.5 s then doubling up to 8 s: about 4 s of retrying
    /// before the caller sees the error.
    fn default() -> Self {
        Self {
            attempts: 4,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// What is known about one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The last successful answer, kept through later failures.
    pub instance: Option<DatabaseInstance>,
    /// When `instance` was fetched.
    pub fetched_at: Option<Instant>,
    /// The error of the latest refresh; `None` once a refresh succeeds.
    pub last_error: Option<GcpError>,
}

/// `instances.get` with retries, plus the last known answer per connection
/// name, so the capacity stays known while the Admin API fails.
///
/// Share it behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct CapacityDiscovery {
    api: AdminApi,
    retry: RetryPolicy,
    observations: Mutex<HashMap<String, Observation>>,
}

impl CapacityDiscovery {
    /// Discovery through `api`, with the default [`RetryPolicy`].
    pub fn new(api: AdminApi) -> Self {
        Self {
            api,
            retry: RetryPolicy::default(),
            observations: Mutex::new(HashMap::new()),
        }
    }

    /// The same discovery with another retry policy.
    pub fn with_retry(self, retry: RetryPolicy) -> Self {
        Self { retry, ..self }
    }

    /// Asks the Admin API about `connection_name` now, retrying retryable
    /// failures (429, 5xx, transport) with backoff, and records the outcome:
    /// a success replaces the last known answer, a failure is recorded next
    /// to it without erasing it.
    pub async fn refresh(&self, connection_name: &str) -> Result<DatabaseInstance, GcpError> {
        let result = (|| self.api.get_instance(connection_name))
            .retry(self.retry.backoff())
            .when(GcpError::is_retryable)
            .notify(|error, delay| {
                tracing::warn!(
                    connection_name,
                    reason = error.reason(),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "Cloud SQL Admin API instances.get failed, retrying: {error}"
                );
            })
            .await;
        let mut observations = self.lock();
        let observation = observations
            .entry(connection_name.to_owned())
            .or_insert(Observation {
                instance: None,
                fetched_at: None,
                last_error: None,
            });
        match &result {
            Ok(instance) => {
                observation.instance = Some(instance.clone());
                observation.fetched_at = Some(Instant::now());
                observation.last_error = None;
            }
            Err(error) => observation.last_error = Some(error.clone()),
        }
        result
    }

    /// The last known answer when it was fetched less than `max_age` ago and
    /// the latest refresh succeeded; otherwise [`refresh`](Self::refresh).
    /// Lets every reconcile ask without spending Admin API quota each time.
    pub async fn refresh_if_stale(
        &self,
        connection_name: &str,
        max_age: Duration,
    ) -> Result<DatabaseInstance, GcpError> {
        let fresh = self.observation(connection_name).and_then(|seen| {
            let young = seen.fetched_at?.elapsed() < max_age;
            (young && seen.last_error.is_none())
                .then_some(seen.instance)
                .flatten()
        });
        match fresh {
            Some(instance) => Ok(instance),
            None => self.refresh(connection_name).await,
        }
    }

    /// What is known about `connection_name`, without asking the API.
    pub fn observation(&self, connection_name: &str) -> Option<Observation> {
        self.lock().get(connection_name).cloned()
    }

    /// The last known version, tier and flags of `connection_name`, for
    /// capacity resolution, without asking the API.
    pub fn discovered(&self, connection_name: &str) -> Option<DiscoveredInstance> {
        self.lock()
            .get(connection_name)
            .and_then(|seen| seen.instance.as_ref())
            .map(DatabaseInstance::discovered)
    }

    /// Forgets `connection_name` (its `CloudSqlInstance` was deleted).
    pub fn forget(&self, connection_name: &str) {
        self.lock().remove(connection_name);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Observation>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each update is one assignment), so a poisoned lock is still good.
        self.observations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

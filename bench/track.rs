//! Watching, from outside the operator, until every expected object is in the
//! wanted state: the moment a benchmark stops its clock.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How a watch ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// When the last expected object reached the wanted state (None: never,
    /// before the deadline).
    pub done_at: Option<Instant>,
    /// How many were in the wanted state at the end.
    pub done: usize,
    pub total: usize,
}

/// A watch running in the background; stopped when dropped.
pub struct Watch {
    handle: Option<JoinHandle<Outcome>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

impl Watch {
    /// Starts watching `api` until every object named in `expected` satisfies
    /// `wanted` (or `deadline`); returns once the initial list is through, so
    /// nothing that happens afterwards is missed.
    pub async fn start(
        api: Api<DynamicObject>,
        expected: BTreeSet<String>,
        wanted: impl Fn(&DynamicObject) -> bool + Send + Sync + 'static,
        deadline: Instant,
    ) -> anyhow::Result<Watch> {
        let (synced_tx, synced_rx) = oneshot::channel();
        let handle = tokio::spawn(async move {
            let total = expected.len();
            let mut state: HashMap<String, bool> = HashMap::new();
            let mut done = 0usize;
            let mut synced = Some(synced_tx);
            let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
            let deadline = tokio::time::Instant::from_std(deadline);
            let mut update = |o: &DynamicObject, done: &mut usize| {
                let Some(name) = o.metadata.name.as_ref() else {
                    return;
                };
                if !expected.contains(name) {
                    return;
                }
                let now = wanted(o);
                let before = state.insert(name.clone(), now).unwrap_or(false);
                match (before, now) {
                    (false, true) => *done += 1,
                    (true, false) => *done -= 1,
                    _ => {}
                }
            };
            loop {
                let event = tokio::select! {
                    e = stream.next() => e,
                    _ = tokio::time::sleep_until(deadline) => break,
                };
                match event {
                    Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => {
                        update(&o, &mut done)
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        eprintln!("bench: watch error (retrying): {err}");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    None => break,
                }
                if synced.is_none() && done == total {
                    return Outcome {
                        done_at: Some(Instant::now()),
                        done,
                        total,
                    };
                }
            }
            Outcome {
                done_at: None,
                done,
                total,
            }
        });
        synced_rx
            .await
            .map_err(|_| anyhow::anyhow!("the watch ended before its initial list"))?;
        Ok(Watch {
            handle: Some(handle),
        })
    }

    /// Waits for the watch to end.
    pub async fn finish(mut self) -> Outcome {
        let none = Outcome {
            done_at: None,
            done: 0,
            total: 0,
        };
        match self.handle.take() {
            Some(handle) => handle.await.unwrap_or(none),
            None => none,
        }
    }
}

fn path<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(v, |v, k| v.get(k))
}

fn template_annotations(o: &DynamicObject) -> Option<&serde_json::Map<String, Value>> {
    path(&o.data, &["spec", "template", "metadata", "annotations"])?.as_object()
}

fn template_containers(o: &DynamicObject) -> impl Iterator<Item = &Value> {
    let spec = path(&o.data, &["spec", "template", "spec"]);
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(move |key| {
            spec.and_then(|s| s.get(key))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
}

/// A workload whose pod template carries cloudsql-binder's injection: the
/// config-hash annotation and the proxy container.
pub fn binder_injected(o: &DynamicObject) -> bool {
    let hashed = template_annotations(o)
        .is_some_and(|a| a.contains_key(cloudsql_binder::api::CONFIG_HASH_ANNOTATION));
    let proxy = template_containers(o).any(|c| {
        c.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n.starts_with(cloudsql_binder::plan::PROXY_CONTAINER_NAME))
    });
    hashed && proxy
}

/// The pool size injected into the workload's app container `app`
/// (`DB_POOL_MAX_CONNS`).
pub fn binder_grant(o: &DynamicObject) -> Option<String> {
    template_containers(o)
        .filter(|c| c.get("name").and_then(Value::as_str) == Some("app"))
        .flat_map(|c| c.get("env").and_then(Value::as_array).into_iter().flatten())
        .find(|e| e.get("name").and_then(Value::as_str) == Some("DB_POOL_MAX_CONNS"))
        .and_then(|e| e.get("value").and_then(Value::as_str))
        .map(str::to_string)
}

fn condition_true(o: &DynamicObject, type_: &str, per_condition_generation: bool) -> bool {
    let generation = o.metadata.generation;
    let Some(conditions) = path(&o.data, &["status", "conditions"]).and_then(Value::as_array)
    else {
        return false;
    };
    let observed = if per_condition_generation {
        conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
            .and_then(|c| c.get("observedGeneration"))
            .and_then(Value::as_i64)
    } else {
        path(&o.data, &["status", "observedGeneration"]).and_then(Value::as_i64)
    };
    observed == generation
        && conditions.iter().any(|c| {
            c.get("type").and_then(Value::as_str) == Some(type_)
                && c.get("status").and_then(Value::as_str) == Some("True")
        })
}

/// A CloudSqlBinding (or CloudSqlInstance) with `Ready=True` for its current generation.
pub fn binder_ready(o: &DynamicObject) -> bool {
    condition_true(o, "Ready", false)
}

/// An AuthProxyWorkload with `UpToDate=True` for its current generation.
pub fn google_up_to_date(o: &DynamicObject) -> bool {
    condition_true(o, "UpToDate", true)
}

/// A workload whose pod template carries the annotation Google's operator
/// sets for AuthProxyWorkload `apw` (`cloudsql.cloud.google.com/<name>`).
pub fn google_annotated(o: &DynamicObject, apw: &str) -> bool {
    template_annotations(o)
        .is_some_and(|a| a.contains_key(&format!("cloudsql.cloud.google.com/{apw}")))
}

/// A Pod (as returned by its creation) that an admission webhook injected:
/// a container or init container running a Cloud SQL proxy.
pub fn pod_injected(pod: &DynamicObject) -> bool {
    ["initContainers", "containers"].iter().any(|key| {
        path(&pod.data, &["spec", key])
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                let name = c.get("name").and_then(Value::as_str).unwrap_or("");
                let image = c.get("image").and_then(Value::as_str).unwrap_or("");
                name.starts_with(cloudsql_binder::plan::PROXY_CONTAINER_NAME)
                    || name.starts_with("csql-")
                    || image.contains("cloud-sql-proxy")
            })
    })
}

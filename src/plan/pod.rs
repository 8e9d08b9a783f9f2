//! [`PodInjection`]: merging every plan that selects one pod template into it,
//! and [`remove`]: taking the injection out again.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, PodSpec, Volume, VolumeMount,
};

use crate::api::WorkloadKind;

use super::conflict::{Conflict, ConflictKind, ExistingEnv};
use super::injection::{BindingKey, InjectionMode, InjectionPlan, Listener, short_hash};
use super::proxy::ProxyPorts;
use super::record::{CloudRunRecord, Record};
use super::{
    CLOUD_RUN_INSTANCES_ANNOTATION, CONFIG_HASH_ANNOTATION, DEFAULT_ADMIN_PORT, DEFAULT_HTTP_PORT,
    INJECTED_ANNOTATION, PROXY_CONTAINER_NAME, SOCKET_DIR, SOCKET_VOLUME_NAME,
};

/// Longest container or volume name Kubernetes accepts (a DNS label).
const MAX_NAME_LEN: usize = 63;

/// Where the pod template runs, which decides how the proxy is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A Kubernetes pod: the proxy runs as a sidecar we inject.
    Kubernetes,
    /// A Cloud Run (Knative) revision template: no sidecar; Cloud Run mounts
    /// `/cloudsql/<connection name>` itself for the connection names listed in
    /// `run.googleapis.com/cloudsql-instances`.
    CloudRun,
}

impl Platform {
    /// The platform of a workload kind's pod template.
    pub fn of(kind: WorkloadKind) -> Platform {
        match kind {
            WorkloadKind::KnativeService => Platform::CloudRun,
            _ => Platform::Kubernetes,
        }
    }
}

/// Everything injected into one pod template by all the bindings that select it.
///
/// Two bindings on one pod get two proxies, one each. `--max-connections`
/// caps all connections through one proxy process together, so one proxy
/// serving two instances could not hold two separate grants (one app could
/// starve the other's pool); two processes also fail, restart and roll out
/// independently. They are named `cloud-sql-proxy-<binding name>` (one binding
/// alone: `cloud-sql-proxy`), in binding key order, with distinct health ports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodInjection {
    plans: Vec<InjectionPlan>,
}

/// A template with the injection merged in, and the record of what is ours.
pub(crate) struct Merged {
    pub pod: PodSpec,
    pub annotations: Option<BTreeMap<String, String>>,
    pub record: Record,
}

impl PodInjection {
    /// The injection of these plans, sorted by binding key (a binding given
    /// twice counts once).
    pub fn new(mut plans: Vec<InjectionPlan>) -> PodInjection {
        plans.sort_by(|a, b| a.binding().cmp(b.binding()));
        plans.dedup_by(|later, earlier| later.binding() == earlier.binding());
        PodInjection { plans }
    }

    /// The plans, in binding key order.
    pub fn plans(&self) -> &[InjectionPlan] {
        &self.plans
    }

    /// Whether no binding selects the template (applying removes our injection).
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// The combined hash of every plan for a Kubernetes pod template: the
    /// value of `cloudsql.dev/config-hash`. It changes exactly when what the
    /// bindings inject changes, the grant included. Names and ports chosen to
    /// avoid the user's own only move when the user's template changes, which
    /// rolls the workload out anyway. For a Knative service use
    /// [`PodInjection::config_hash_for`].
    pub fn config_hash(&self) -> String {
        self.config_hash_on(Platform::Kubernetes)
    }

    /// The combined hash for the template of workload `kind` (a Knative
    /// service hashes only what Cloud Run gets: env and instances).
    pub fn config_hash_for(&self, kind: WorkloadKind) -> String {
        self.config_hash_on(Platform::of(kind))
    }

    fn config_hash_on(&self, platform: Platform) -> String {
        let parts: Vec<Vec<u8>> = self
            .plans
            .iter()
            .map(|p| p.canonical_bytes(platform))
            .collect();
        short_hash(&parts)
    }

    /// Merges the injection into a Kubernetes pod spec and its template
    /// annotations, in place, replacing any previous injection of ours. On
    /// conflict nothing is changed and every conflict is returned.
    ///
    /// The annotations are a map here; use [`PodInjection::apply_for`] with
    /// the template's `Option` to have [`remove_for`] restore an absent map.
    pub fn apply(
        &self,
        pod: &mut PodSpec,
        annotations: &mut BTreeMap<String, String>,
    ) -> Result<(), Vec<Conflict>> {
        let mut wrapped = Some(std::mem::take(annotations));
        let result = self.apply_on(Platform::Kubernetes, pod, &mut wrapped);
        *annotations = wrapped.unwrap_or_default();
        result
    }

    /// [`PodInjection::apply`] for the pod template of a workload `kind`
    /// (Knative services get the Cloud Run treatment), with the template's
    /// annotations as they are in the object (`None`: no annotations at all).
    pub fn apply_for(
        &self,
        kind: WorkloadKind,
        pod: &mut PodSpec,
        annotations: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), Vec<Conflict>> {
        self.apply_on(Platform::of(kind), pod, annotations)
    }

    /// [`PodInjection::apply_for`] by platform.
    pub fn apply_on(
        &self,
        platform: Platform,
        pod: &mut PodSpec,
        annotations: &mut Option<BTreeMap<String, String>>,
    ) -> Result<(), Vec<Conflict>> {
        let merged = self.merge(platform, pod, annotations)?;
        *pod = merged.pod;
        *annotations = merged.annotations;
        Ok(())
    }

    /// The template with our previous injection taken out and this one merged in.
    pub(crate) fn merge(
        &self,
        platform: Platform,
        pod: &PodSpec,
        annotations: &Option<BTreeMap<String, String>>,
    ) -> Result<Merged, Vec<Conflict>> {
        let mut pod = pod.clone();
        let mut annotations = annotations.clone();
        remove_for(&mut pod, &mut annotations);
        let mut record = Record::default();
        if self.plans.is_empty() {
            return Ok(Merged {
                pod,
                annotations,
                record,
            });
        }
        let mut conflicts = Vec::new();

        let apps = &pod.containers;
        let mut env_add: Vec<Vec<EnvVar>> = vec![Vec::new(); apps.len()];
        let mut env_owner: Vec<BTreeMap<String, (BindingKey, String)>> =
            vec![BTreeMap::new(); apps.len()];
        let mut needs_mount = vec![false; apps.len()];

        for plan in &self.plans {
            if platform == Platform::CloudRun && plan.mode() == InjectionMode::ProxyTcp {
                conflicts.push(Conflict {
                    binding: plan.binding().clone(),
                    container: None,
                    kind: ConflictKind::TcpOnCloudRun,
                });
                continue;
            }
            let selected: Vec<usize> = (0..apps.len())
                .filter(|&i| selects(plan, i, &apps[i]))
                .collect();
            if selected.is_empty() {
                conflicts.push(Conflict {
                    binding: plan.binding().clone(),
                    container: None,
                    kind: ConflictKind::NoSelectedContainer {
                        wanted: plan.containers().to_vec(),
                        present: apps.iter().map(|c| c.name.clone()).collect(),
                    },
                });
                continue;
            }
            for i in selected {
                let app = &apps[i];
                let conflict = |kind| Conflict {
                    binding: plan.binding().clone(),
                    container: Some(app.name.clone()),
                    kind,
                };
                for item in plan.env() {
                    let users: Vec<&EnvVar> = app
                        .env
                        .iter()
                        .flatten()
                        .filter(|e| e.name == item.name)
                        .collect();
                    if let Some(differs) = users.iter().find(|e| {
                        e.value_from.is_some()
                            || e.value.as_deref().unwrap_or_default() != item.value
                    }) {
                        let existing = match (&differs.value_from, &differs.value) {
                            (Some(_), _) => ExistingEnv::ValueFrom,
                            (None, value) => ExistingEnv::Value(value.clone().unwrap_or_default()),
                        };
                        conflicts.push(conflict(ConflictKind::UserEnv {
                            name: item.name.clone(),
                            existing,
                            ours: item.value.clone(),
                        }));
                        continue;
                    }
                    if !users.is_empty() {
                        // The user already sets exactly our value: it stays the
                        // user's (not recorded, so removing never deletes it).
                        continue;
                    }
                    match env_owner[i].get(&item.name) {
                        Some((other, value)) if *value != item.value => {
                            conflicts.push(conflict(ConflictKind::BindingEnv {
                                name: item.name.clone(),
                                other: other.clone(),
                                other_value: value.clone(),
                                ours: item.value.clone(),
                            }));
                        }
                        Some(_) => {}
                        None => {
                            env_owner[i].insert(
                                item.name.clone(),
                                (plan.binding().clone(), item.value.clone()),
                            );
                            env_add[i].push(EnvVar {
                                name: item.name.clone(),
                                value: Some(item.value.clone()),
                                value_from: None,
                            });
                        }
                    }
                }
                if plan.volume().is_some() {
                    if let Some(mount) = app
                        .volume_mounts
                        .iter()
                        .flatten()
                        .find(|m| is_socket_dir(&m.mount_path))
                    {
                        conflicts.push(conflict(ConflictKind::SocketDir {
                            volume: mount.name.clone(),
                        }));
                    } else if platform == Platform::Kubernetes {
                        needs_mount[i] = true;
                    }
                }
            }
        }

        let sidecars = match platform {
            Platform::Kubernetes => self.sidecars(&pod, &mut conflicts),
            Platform::CloudRun => Sidecars::default(),
        };
        if !conflicts.is_empty() {
            return Err(conflicts);
        }

        for (i, (app, add)) in pod.containers.iter_mut().zip(env_add).enumerate() {
            let key = app.name.clone();
            if !add.is_empty() {
                if app.env.is_none() {
                    record.mark_created(format!("env:{key}"));
                }
                record
                    .env
                    .insert(key.clone(), add.iter().map(|e| e.name.clone()).collect());
                app.env.get_or_insert_with(Vec::new).extend(add);
            }
            if let (true, Some(volume)) = (needs_mount[i], &sidecars.volume) {
                if app.volume_mounts.is_none() {
                    record.mark_created(format!("volumeMounts:{key}"));
                }
                app.volume_mounts
                    .get_or_insert_with(Vec::new)
                    .push(VolumeMount {
                        name: volume.clone(),
                        mount_path: SOCKET_DIR.to_owned(),
                        ..VolumeMount::default()
                    });
                record
                    .volume_mounts
                    .insert(key, vec![SOCKET_DIR.to_owned()]);
            }
        }
        if let Some(volume) = sidecars.volume {
            if pod.volumes.is_none() {
                record.mark_created("volumes".to_owned());
            }
            pod.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: volume.clone(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".to_owned()),
                    ..Default::default()
                }),
                ..Volume::default()
            });
            record.volumes.push(volume);
        }
        for proxy in sidecars.proxies {
            if proxy.restart_policy.is_some() {
                if pod.init_containers.is_none() {
                    record.mark_created("initContainers".to_owned());
                }
                record.init_containers.push(proxy.name.clone());
                // Appended, as server-side apply places a new list item after
                // the existing ones: the webhook and the controller agree.
                pod.init_containers.get_or_insert_with(Vec::new).push(proxy);
            } else {
                record.containers.push(proxy.name.clone());
                // After the user's containers: the first one stays the
                // default of `kubectl logs` and `kubectl exec`.
                pod.containers.push(proxy);
            }
        }

        if annotations.is_none() {
            record.mark_created("annotations".to_owned());
        }
        let map = annotations.get_or_insert_with(BTreeMap::new);
        if platform == Platform::CloudRun {
            record.cloud_run = self.merge_cloud_run_instances(map);
        }
        map.insert(
            CONFIG_HASH_ANNOTATION.to_owned(),
            self.config_hash_on(platform),
        );
        map.insert(INJECTED_ANNOTATION.to_owned(), record.to_json());
        Ok(Merged {
            pod,
            annotations,
            record,
        })
    }

    /// Names, ports and containers of the proxies, and the socket volume.
    fn sidecars(&self, pod: &PodSpec, conflicts: &mut Vec<Conflict>) -> Sidecars {
        let all_containers = || {
            pod.containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
        };
        let mut taken_names: BTreeSet<String> = all_containers().map(|c| c.name.clone()).collect();
        let user_ports: BTreeMap<u16, String> = all_containers()
            .flat_map(|c| {
                c.ports.iter().flatten().filter_map(move |p| {
                    u16::try_from(p.container_port)
                        .ok()
                        .map(|port| (port, c.name.clone()))
                })
            })
            .collect();
        let mut taken_ports: BTreeSet<u16> = user_ports.keys().copied().collect();

        let proxied: Vec<&InjectionPlan> =
            self.plans.iter().filter(|p| p.proxy().is_some()).collect();
        let mut listeners: BTreeMap<u16, BindingKey> = BTreeMap::new();
        let mut sockets: BTreeMap<&str, BindingKey> = BTreeMap::new();
        for plan in &proxied {
            let Some(proxy) = plan.proxy() else { continue };
            let binding = plan.binding().clone();
            match proxy.listener {
                Listener::Tcp { port } => {
                    if let Some(container) = user_ports.get(&port) {
                        conflicts.push(Conflict {
                            binding,
                            container: Some(container.clone()),
                            kind: ConflictKind::UserPort { port },
                        });
                    } else if let Some(other) = listeners.get(&port) {
                        conflicts.push(Conflict {
                            binding,
                            container: None,
                            kind: ConflictKind::BindingPort {
                                port,
                                other: other.clone(),
                            },
                        });
                    } else {
                        listeners.insert(port, binding);
                    }
                }
                Listener::UnixSocket => {
                    if let Some(other) = sockets.get(proxy.connection_name.as_str()) {
                        conflicts.push(Conflict {
                            binding,
                            container: None,
                            kind: ConflictKind::SameSocket {
                                connection_name: proxy.connection_name.clone(),
                                other: other.clone(),
                            },
                        });
                    } else {
                        sockets.insert(&proxy.connection_name, binding);
                    }
                }
            }
        }
        taken_ports.extend(listeners.keys().copied());

        let volume = proxied.iter().any(|p| p.volume().is_some()).then(|| {
            let taken: BTreeSet<String> = pod
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.clone())
                .collect();
            unique_name(SOCKET_VOLUME_NAME, &taken)
        });

        let mut proxies = Vec::new();
        for plan in &proxied {
            let Some(proxy) = plan.proxy() else { continue };
            let base = if proxied.len() == 1 {
                PROXY_CONTAINER_NAME.to_owned()
            } else {
                proxy_name_for(&plan.binding().name)
            };
            let name = unique_name(&base, &taken_names);
            taken_names.insert(name.clone());
            let http = free_port(DEFAULT_HTTP_PORT, &mut taken_ports);
            let admin = if proxy.native {
                Some(None)
            } else {
                free_port(DEFAULT_ADMIN_PORT, &mut taken_ports).map(Some)
            };
            let (Some(http), Some(admin)) = (http, admin) else {
                conflicts.push(Conflict {
                    binding: plan.binding().clone(),
                    container: None,
                    kind: ConflictKind::NoFreePort,
                });
                continue;
            };
            proxies.push(proxy.container(&name, volume.as_deref(), ProxyPorts { http, admin }));
        }
        Sidecars { volume, proxies }
    }

    /// Appends our connection names to the Cloud Run instances annotation,
    /// keeping what is there first and adding no duplicates.
    fn merge_cloud_run_instances(
        &self,
        map: &mut BTreeMap<String, String>,
    ) -> Option<CloudRunRecord> {
        let before = map.get(CLOUD_RUN_INSTANCES_ANNOTATION).cloned();
        let mut present: Vec<String> = split_instances(before.as_deref().unwrap_or_default());
        let mut added = Vec::new();
        for plan in &self.plans {
            if plan.mode() != InjectionMode::ProxyUnixSocket {
                continue;
            }
            if let Some(conn) = plan.cloud_run_instance()
                && !present.iter().any(|p| p == conn)
            {
                present.push(conn.to_owned());
                added.push(conn.to_owned());
            }
        }
        if added.is_empty() {
            return None;
        }
        map.insert(
            CLOUD_RUN_INSTANCES_ANNOTATION.to_owned(),
            join_instances(before.as_deref(), &added),
        );
        Some(CloudRunRecord { added, before })
    }
}

#[derive(Default)]
struct Sidecars {
    volume: Option<String>,
    proxies: Vec<Container>,
}

/// Whether a binding selects the app container at `index`. An unnamed
/// container (a single-container Knative service) is the app container when
/// it is the first.
fn selects(plan: &InjectionPlan, index: usize, container: &Container) -> bool {
    if container.name.is_empty() {
        return index == 0;
    }
    plan.containers().is_empty() || plan.containers().contains(&container.name)
}

fn is_socket_dir(path: &str) -> bool {
    path.trim_end_matches('/') == SOCKET_DIR
}

/// `cloud-sql-proxy-<binding name>`, made a valid container name (a DNS label
/// of at most 63 characters; a long name keeps a hash of the whole).
fn proxy_name_for(binding: &str) -> String {
    let sanitized: String = binding
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = format!("{PROXY_CONTAINER_NAME}-{}", sanitized.trim_matches('-'));
    if name.len() <= MAX_NAME_LEN {
        return name;
    }
    let hash = short_hash(&[binding.as_bytes().to_vec()]);
    let stem = name[..MAX_NAME_LEN - hash.len() - 1].trim_end_matches('-');
    format!("{stem}-{hash}")
}

/// `base`, or the first of `base-1`, `base-2`... not in `taken`.
fn unique_name(base: &str, taken: &BTreeSet<String>) -> String {
    if !taken.contains(base) {
        return base.to_owned();
    }
    (1u32..)
        .map(|n| {
            let suffix = format!("-{n}");
            let stem: String = base
                .chars()
                .take(MAX_NAME_LEN.saturating_sub(suffix.len()))
                .collect();
            format!("{}{suffix}", stem.trim_end_matches('-'))
        })
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_else(|| base.to_owned())
}

/// The first port from `start` up that is not taken, now taken.
fn free_port(start: u16, taken: &mut BTreeSet<u16>) -> Option<u16> {
    let port = (start..=u16::MAX).find(|p| !taken.contains(p))?;
    taken.insert(port);
    Some(port)
}

fn split_instances(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The annotation value after appending `added` to `before`.
fn join_instances(before: Option<&str>, added: &[String]) -> String {
    let added = added.join(",");
    match before.map(|b| b.trim_end_matches([',', ' '])) {
        Some(b) if !b.trim().is_empty() => format!("{b},{added}"),
        _ => added,
    }
}

/// Takes out exactly what we injected (as recorded in our annotation),
/// leaving the user's containers, env, volumes and annotations as they were.
/// Without our annotation it changes nothing but our two annotation keys.
pub fn remove(pod: &mut PodSpec, annotations: &mut BTreeMap<String, String>) {
    remove_recorded(pod, annotations);
}

/// [`remove`] on a template's optional annotations: when the annotations did
/// not exist before we injected and nothing else is left in them, they go
/// back to absent.
pub fn remove_for(pod: &mut PodSpec, annotations: &mut Option<BTreeMap<String, String>>) {
    let Some(map) = annotations.as_mut() else {
        return;
    };
    let record = remove_recorded(pod, map);
    if record.is_some_and(|r| r.was_created("annotations")) && map.is_empty() {
        *annotations = None;
    }
}

fn remove_recorded(
    pod: &mut PodSpec,
    annotations: &mut BTreeMap<String, String>,
) -> Option<Record> {
    let record = Record::read(annotations);
    annotations.remove(CONFIG_HASH_ANNOTATION);
    annotations.remove(INJECTED_ANNOTATION);
    let record = record?;

    pod.containers
        .retain(|c| !record.containers.contains(&c.name));
    retain_created(
        &mut pod.init_containers,
        record.was_created("initContainers"),
        |c| !record.init_containers.contains(&c.name),
    );
    retain_created(&mut pod.volumes, record.was_created("volumes"), |v| {
        !record.volumes.contains(&v.name)
    });
    for (key, names) in &record.env {
        if let Some(app) = pod.containers.iter_mut().find(|c| c.name == *key) {
            retain_created(
                &mut app.env,
                record.was_created(&format!("env:{key}")),
                |e| !names.contains(&e.name),
            );
        }
    }
    for (key, paths) in &record.volume_mounts {
        if let Some(app) = pod.containers.iter_mut().find(|c| c.name == *key) {
            retain_created(
                &mut app.volume_mounts,
                record.was_created(&format!("volumeMounts:{key}")),
                |m| !paths.contains(&m.mount_path),
            );
        }
    }
    if let Some(cloud_run) = &record.cloud_run {
        restore_cloud_run_instances(annotations, cloud_run);
    }
    Some(record)
}

/// Keeps the items `keep` says; a list we created that ends up empty is
/// absent again.
fn retain_created<T>(list: &mut Option<Vec<T>>, created: bool, keep: impl FnMut(&T) -> bool) {
    if let Some(items) = list.as_mut() {
        items.retain(keep);
        if created && items.is_empty() {
            *list = None;
        }
    }
}

fn restore_cloud_run_instances(
    annotations: &mut BTreeMap<String, String>,
    record: &CloudRunRecord,
) {
    let Some(current) = annotations.get(CLOUD_RUN_INSTANCES_ANNOTATION).cloned() else {
        return;
    };
    if current == join_instances(record.before.as_deref(), &record.added) {
        match &record.before {
            Some(before) => {
                annotations.insert(CLOUD_RUN_INSTANCES_ANNOTATION.to_owned(), before.clone())
            }
            None => annotations.remove(CLOUD_RUN_INSTANCES_ANNOTATION),
        };
        return;
    }
    // Edited since: take out only our names.
    let kept: Vec<String> = split_instances(&current)
        .into_iter()
        .filter(|c| !record.added.contains(c))
        .collect();
    if kept.is_empty() && record.before.is_none() {
        annotations.remove(CLOUD_RUN_INSTANCES_ANNOTATION);
    } else {
        annotations.insert(CLOUD_RUN_INSTANCES_ANNOTATION.to_owned(), kept.join(","));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_binding_names_give_valid_distinct_proxy_names() {
        let a = proxy_name_for(&format!("{}-a", "x".repeat(80)));
        let b = proxy_name_for(&format!("{}-b", "x".repeat(80)));
        assert!(a.len() <= MAX_NAME_LEN && b.len() <= MAX_NAME_LEN);
        assert_ne!(a, b);
        assert_eq!(proxy_name_for("orders.api"), "cloud-sql-proxy-orders-api");
    }

    #[test]
    fn a_taken_name_gets_the_next_free_suffix() {
        let taken: BTreeSet<String> = ["cloudsql", "cloudsql-1"].map(String::from).into();
        assert_eq!(unique_name("cloudsql", &taken), "cloudsql-2");
        assert_eq!(unique_name("other", &taken), "other");
    }

    #[test]
    fn cloud_run_instances_keep_what_is_there_first() {
        assert_eq!(join_instances(Some("a, b"), &["c".into()]), "a, b,c");
        assert_eq!(join_instances(Some(""), &["c".into()]), "c");
        assert_eq!(join_instances(None, &["c".into(), "d".into()]), "c,d");
    }
}

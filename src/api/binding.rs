//! `CloudSqlBinding`: an application team binds its workloads to an instance.

// Several `printcolumn(...)` attributes repeat `type_ = "string"`; they are
// distinct columns, not duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// CEL rule shared by every env-name field.
const ENV_NAME_RULE: &str = "self.matches('^[A-Za-z_][A-Za-z0-9_]*$')";
/// Message shared by every env-name field.
const ENV_NAME_MESSAGE: &str =
    "must be a valid environment variable name: letters, digits and '_', not starting with a digit";

/// Binds workloads in this namespace to a CloudSqlInstance: the operator injects
/// the Cloud SQL Auth Proxy or connector settings and a connection pool limit.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "cloudsql.dev",
    version = "v1alpha1",
    kind = "CloudSqlBinding",
    namespaced,
    shortname = "sqlbinding",
    shortname = "sqlbindings",
    category = "cloudsql",
    status = "CloudSqlBindingStatus",
    derive = "PartialEq",
    doc = "Binds workloads in this namespace to a CloudSqlInstance: the operator injects the Cloud SQL Auth Proxy or connector settings, and the per-pod connection pool it granted.",
    validation = Rule::new("!has(self.spec.proxy) || self.spec.mode == 'Proxy'").message("spec.proxy may only be set with spec.mode: Proxy").field_path(".spec.proxy"),
    printcolumn(name = "Instance", type_ = "string", json_path = ".spec.instanceRef.name", description = "The CloudSqlInstance bound to"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode", description = "Proxy or Connector"),
    printcolumn(name = "Workloads", type_ = "string", json_path = ".status.workloadsSummary", description = "Injected / matched workloads"),
    printcolumn(name = "Pool", type_ = "string", json_path = ".status.pool.summary", description = "Granted / requested connections per pod"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct CloudSqlBindingSpec {
    /// The CloudSqlInstance (cluster-scoped) these workloads connect to.
    pub instance_ref: InstanceRef,

    /// The workloads to bind, each by `name` or by label `selector` (exactly one).
    /// A workload matched by several entries is bound once.
    #[schemars(length(min = 1, max = 64))]
    pub workloads: Vec<WorkloadSelector>,

    /// Names of the app containers that receive the env (default: all app
    /// containers of the pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,

    /// `Proxy` (the Cloud SQL Auth Proxy as a sidecar, the default) or
    /// `Connector` (no sidecar; the app uses a Cloud SQL Language Connector and
    /// only receives configuration).
    #[serde(default)]
    pub mode: Mode,

    /// The database and user the app connects as.
    pub database: DatabaseSpec,

    /// Which IP of the instance to connect to: `Public` (default), `Private`
    /// (VPC) or `PSC` (Private Service Connect).
    #[serde(default)]
    pub network: Network,

    /// Settings of the proxy sidecar; only with `mode: Proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySpec>,

    /// The per-pod connection pool the app would like, and what it cannot do without.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.minPerPod <= self.maxPerPod").message("minPerPod must be less than or equal to maxPerPod"))]
    pub pool: PoolSpec,

    /// Names of the environment variables injected into app containers.
    #[serde(default)]
    pub env: EnvNames,

    /// How the injection reaches the pods of workloads that have a mutable pod
    /// template (Deployment, StatefulSet, DaemonSet, ReplicaSet, CronJob,
    /// Knative Service):
    ///
    /// - `Template` (the default): the operator applies the proxy and env to
    ///   the workload's pod template (server-side apply, visible in
    ///   `kubectl get -o yaml`); needs no webhook.
    /// - `Admission`: the workload object is left untouched except for one
    ///   template annotation, `cloudsql.dev/admission-config-hash`, which
    ///   changes with what would be injected (the grant included) so running
    ///   pods roll; the admission webhook injects each pod as it is created.
    ///
    /// Jobs and bare Pods always go through admission, whatever this says:
    /// their pod templates cannot change after creation. Admission needs the
    /// operator's webhook (`cloudsql-binder run --webhook-...`).
    #[serde(default)]
    pub injection: Injection,

    /// Roll the owner of a Pod that was created without its injection (the
    /// admission webhook was unreachable, and its `failurePolicy: Ignore` let
    /// the Pod through) once the webhook answers again: the operator bumps the
    /// annotation `cloudsql.dev/rolled-for-missed-injection` on the owner's pod
    /// template (Deployment, StatefulSet or DaemonSet), once per miss.
    /// Default `false`: the miss is only reported (condition reason
    /// `InjectionMissed` on this binding, and an Event on the Pod). Pods of
    /// Jobs and bare Pods cannot be rolled; delete them to have them recreated.
    #[serde(default)]
    pub roll_on_missed_injection: bool,
}

impl CloudSqlBindingSpec {
    /// Whether this binding's injection reaches pods of a workload of `kind`
    /// at their admission (Jobs and Pods always; other kinds with
    /// `injection: Admission`) rather than through the workload's template.
    pub fn injects_at_admission(&self, kind: WorkloadKind) -> bool {
        !kind.has_mutable_template() || self.injection == Injection::Admission
    }

    /// Whether some workload entry other than bare Pods reaches its pods at
    /// admission (Jobs, CronJobs, or any kind with `injection: Admission`).
    pub fn admits_owned_pods(&self) -> bool {
        self.workloads
            .iter()
            .any(|w| w.kind != WorkloadKind::Pod && self.injects_at_admission(w.kind))
    }
}

/// How the injection reaches the pods; see `spec.injection`.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub enum Injection {
    /// Into the workload's pod template (server-side apply).
    #[default]
    Template,
    /// Into each pod at creation, by the admission webhook; the template gets
    /// only a config-hash annotation.
    Admission,
}

/// Reference to a CloudSqlInstance.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRef {
    /// Name of the CloudSqlInstance.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Selects workloads of one kind in the binding's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.name) != has(self.selector)").message("exactly one of name and selector must be set"))]
pub struct WorkloadSelector {
    /// The workload kind: Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
    /// CronJob, Pod or Service.serving.knative.dev (a Knative / Cloud Run service).
    pub kind: WorkloadKind,
    /// Name of one workload (exactly one of `name` and `selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Label selector over workloads of this kind (exactly one of `name` and `selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// The workload kinds a binding can select.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum WorkloadKind {
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
    /// apps/v1 ReplicaSet.
    ReplicaSet,
    /// batch/v1 Job.
    Job,
    /// batch/v1 CronJob.
    CronJob,
    /// v1 Pod.
    Pod,
    /// serving.knative.dev/v1 Service (Knative, or Cloud Run service YAML).
    #[serde(rename = "Service.serving.knative.dev")]
    KnativeService,
}

impl WorkloadKind {
    /// Every supported kind.
    pub const ALL: [WorkloadKind; 8] = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
        WorkloadKind::ReplicaSet,
        WorkloadKind::Job,
        WorkloadKind::CronJob,
        WorkloadKind::Pod,
        WorkloadKind::KnativeService,
    ];

    /// The name used in the API (`Service.serving.knative.dev` for Knative).
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::ReplicaSet => "ReplicaSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Pod => "Pod",
            WorkloadKind::KnativeService => "Service.serving.knative.dev",
        }
    }

    /// `apiVersion` of the kind's objects.
    pub fn api_version(self) -> &'static str {
        match self {
            WorkloadKind::Deployment
            | WorkloadKind::StatefulSet
            | WorkloadKind::DaemonSet
            | WorkloadKind::ReplicaSet => "apps/v1",
            WorkloadKind::Job | WorkloadKind::CronJob => "batch/v1",
            WorkloadKind::Pod => "v1",
            WorkloadKind::KnativeService => "serving.knative.dev/v1",
        }
    }

    /// The `kind` field of the kind's objects.
    pub fn object_kind(self) -> &'static str {
        match self {
            WorkloadKind::KnativeService => "Service",
            other => other.as_str(),
        }
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn from_object(api_version: &str, kind: &str) -> Option<WorkloadKind> {
        WorkloadKind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.object_kind() == kind)
    }

    /// Whether the pod template of this kind can be changed after creation
    /// (Jobs and Pods cannot: they need admission).
    pub fn has_mutable_template(self) -> bool {
        !matches!(self, WorkloadKind::Job | WorkloadKind::Pod)
    }
}

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the app reaches the instance.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub enum Mode {
    /// The Cloud SQL Auth Proxy runs as a sidecar.
    #[default]
    Proxy,
    /// The app uses a Cloud SQL Language Connector in-process.
    Connector,
}

/// The database and user the app connects as.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Database name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Database user (for IAM authentication, the IAM principal the database
    /// knows, e.g. `orders-app@my-project.iam`).
    #[schemars(length(min = 1, max = 255))]
    pub user: String,
    /// Use IAM database authentication (`--auto-iam-authn`); the user goes into
    /// `DB_IAM_USER` instead of `DB_USER` unless `env.user` says otherwise.
    #[serde(default)]
    pub iam_auth: bool,
}

/// Which IP of the instance to connect to.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub enum Network {
    /// The public IP.
    #[default]
    Public,
    /// The private (VPC) IP.
    Private,
    /// Private Service Connect.
    #[serde(rename = "PSC")]
    Psc,
}

/// Settings of the proxy sidecar.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.port) || self.socket == 'TCP'").message("port may only be set with socket: TCP"))]
pub struct ProxySpec {
    /// `Unix` (a socket under the shared volume `/cloudsql`, the default) or
    /// `TCP` (127.0.0.1:`port`).
    #[serde(default)]
    pub socket: Socket,
    /// TCP port the proxy listens on (TCP only; default 5432 for PostgreSQL,
    /// 3306 for MySQL, 1433 for SQL Server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Proxy image (default: the version this operator is tested with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Resources of the proxy container (default: modest requests, see README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// `Auto` (native sidecar when the API server supports it, the default),
    /// `Native` (an init container with `restartPolicy: Always`) or `Container`
    /// (a regular container).
    #[serde(default)]
    pub sidecar: SidecarMode,
}

/// The proxy's listener.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub enum Socket {
    /// A Unix socket on a shared in-memory volume at `/cloudsql`.
    #[default]
    Unix,
    /// TCP on 127.0.0.1.
    #[serde(rename = "TCP")]
    Tcp,
}

/// How the proxy runs beside the app.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub enum SidecarMode {
    /// Native when supported, else a regular container.
    #[default]
    Auto,
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+).
    Native,
    /// A regular container.
    Container,
}

/// The per-pod pool.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    /// Connections per pod the app would like (default 10).
    #[serde(default = "default_max_per_pod")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_per_pod: i32,
    /// Connections per pod below which the app cannot work (default 1).
    #[serde(default = "default_min_per_pod")]
    #[schemars(range(min = 1, max = 100000))]
    pub min_per_pod: i32,
    /// Share of this binding when the instance is overcommitted (default 1).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            max_per_pod: default_max_per_pod(),
            min_per_pod: default_min_per_pod(),
            weight: default_weight(),
        }
    }
}

fn default_max_per_pod() -> i32 {
    10
}
fn default_min_per_pod() -> i32 {
    1
}
fn default_weight() -> i32 {
    1
}

/// Names of the injected environment variables.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvNames {
    /// Instance connection name (connector mode).
    #[serde(default = "env_connection_name")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub connection_name: String,
    /// Unix socket path (proxy mode, Unix socket).
    #[serde(default = "env_unix_socket")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub unix_socket: String,
    /// Host to connect to (proxy mode, TCP).
    #[serde(default = "env_host")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub host: String,
    /// Port to connect to (proxy mode, TCP).
    #[serde(default = "env_port")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub port: String,
    /// Database name.
    #[serde(default = "env_database")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub database: String,
    /// Database user. When absent: `DB_USER`, or `DB_IAM_USER` with IAM authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub user: Option<String>,
    /// Set to `true` when the binding uses the private IP (connector mode).
    #[serde(default = "env_private_ip")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub private_ip: String,
    /// The granted per-pod pool size.
    #[serde(default = "env_pool_max")]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message(ENV_NAME_MESSAGE))]
    pub pool_max: String,
}

impl Default for EnvNames {
    fn default() -> Self {
        Self {
            connection_name: env_connection_name(),
            unix_socket: env_unix_socket(),
            host: env_host(),
            port: env_port(),
            database: env_database(),
            user: None,
            private_ip: env_private_ip(),
            pool_max: env_pool_max(),
        }
    }
}

impl EnvNames {
    /// The env name of the user, given whether IAM authentication is on.
    pub fn user_name(&self, iam_auth: bool) -> &str {
        match &self.user {
            Some(name) => name,
            None if iam_auth => "DB_IAM_USER",
            None => "DB_USER",
        }
    }
}

fn env_connection_name() -> String {
    "INSTANCE_CONNECTION_NAME".into()
}
fn env_unix_socket() -> String {
    "INSTANCE_UNIX_SOCKET".into()
}
fn env_host() -> String {
    "INSTANCE_HOST".into()
}
fn env_port() -> String {
    "DB_PORT".into()
}
fn env_database() -> String {
    "DB_NAME".into()
}
fn env_private_ip() -> String {
    "PRIVATE_IP".into()
}
fn env_pool_max() -> String {
    "DB_POOL_MAX_CONNS".into()
}

/// What the operator observed and did for a binding.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CloudSqlBindingStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The operator installation that wrote this status (`--operator-id`). A
    /// second installation that finds another identity here after its own
    /// write knows that two operators manage the object, and reports it
    /// (condition `OperatorConflict`) instead of fighting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciled_by: Option<String>,
    /// The instance as resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<BoundInstance>,
    /// The pool arithmetic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStatus>,
    /// `injected/matched` workloads, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads_summary: Option<String>,
    /// Every matched workload; bare Pods at most 20 (those not injected
    /// first): `workloadsSummary` and the conditions count them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadStatus>,
    /// `Ready`, `InstanceResolved`, `WorkloadsBound`, `BudgetFits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The instance a binding resolved to.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BoundInstance {
    /// `PROJECT:REGION:INSTANCE`.
    pub connection_name: String,
    /// Database engine and version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_version: Option<String>,
}

/// Pool arithmetic of a binding.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// `pool.maxPerPod` of the spec.
    pub requested_per_pod: i64,
    /// The per-pod pool granted by the budget.
    pub granted_per_pod: i64,
    /// Most pods of all bound workloads that can hold connections at once.
    pub max_pods: i64,
    /// `grantedPerPod * maxPods`.
    pub connections: i64,
    /// `granted/requested`, for the printer column.
    pub summary: String,
}

/// One matched workload.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// The workload kind.
    pub kind: String,
    /// The workload name.
    pub name: String,
    /// Most pods of this workload that can hold connections at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pods: Option<i64>,
    /// Whether the injection is in place.
    pub injected: bool,
    /// The config hash of what is injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Why the workload is not injected (`NeedsAdmission`, `Conflict`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

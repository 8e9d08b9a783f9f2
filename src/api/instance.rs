//! `CloudSqlInstance`: one Cloud SQL instance, declared once by a platform team.

// Several `printcolumn(...)` attributes repeat `type_ = "string"`; they are
// distinct columns, not duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// CEL pattern of a connection name: `PROJECT:REGION:INSTANCE`, where a legacy
/// project id may carry a domain prefix (`example.com:proj:us-central1:db`).
pub const CONNECTION_NAME_PATTERN: &str = "^([a-z0-9][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]:[a-z]+-[a-z]+[0-9]+:[a-z][a-z0-9-]{0,97}$";

/// A Cloud SQL instance that workloads in this cluster may bind to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "cloudsql.dev",
    version = "v1alpha1",
    kind = "CloudSqlInstance",
    shortname = "sqlinstance",
    shortname = "sqlinstances",
    category = "cloudsql",
    status = "CloudSqlInstanceStatus",
    derive = "PartialEq",
    doc = "A Cloud SQL instance that workloads in this cluster may bind to, with the connection capacity the operator shares among its bindings.",
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".spec.connectionName",
        description = "PROJECT:REGION:INSTANCE"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.databaseVersion",
        description = "Database engine and version"
    ),
    printcolumn(
        name = "Capacity",
        type_ = "integer",
        json_path = ".status.capacity.usable",
        description = "Connections usable by bound workloads (max - reserved - external)"
    ),
    printcolumn(
        name = "Allocated",
        type_ = "integer",
        json_path = ".status.allocated",
        description = "Sum over bindings of granted per-pod pool x max pods"
    ),
    printcolumn(
        name = "Bindings",
        type_ = "integer",
        json_path = ".status.bindings",
        description = "Bindings that refer to this instance"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CloudSqlInstanceSpec {
    /// The instance connection name, `PROJECT:REGION:INSTANCE` (for example
    /// `my-project:asia-northeast3:orders`; a domain-scoped project such as
    /// `example.com:proj:us-central1:db` is accepted).
    #[x_kube(validation = kube::core::Rule::new(
        "self.matches('^([a-z0-9][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]:[a-z]+-[a-z]+[0-9]+:[a-z][a-z0-9-]{0,97}$')"
    ).message("must be PROJECT:REGION:INSTANCE in lower case, for example my-project:us-central1:orders (a domain-scoped project such as example.com:my-project:us-central1:orders is allowed)"))]
    pub connection_name: String,

    /// The database engine and version, as Cloud SQL names it (`POSTGRES_16`,
    /// `MYSQL_8_0`, `SQLSERVER_2019_STANDARD`). Discovered from the Admin API
    /// when absent; needed with `capacity.tier` when discovery is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^(POSTGRES|MYSQL|SQLSERVER)_[0-9A-Z_]+$')")
        .message("must be a Cloud SQL database version such as POSTGRES_16, MYSQL_8_0 or SQLSERVER_2019_STANDARD"))]
    pub database_version: Option<String>,

    /// How many connections the instance accepts and how many of them are kept
    /// away from bound workloads.
    #[serde(default)]
    pub capacity: CapacitySpec,

    /// Where the operator learns the instance's tier, version and flags:
    /// `AdminAPI` (Cloud SQL Admin API `instances.get`, the default) or `None`
    /// (use only what this spec says).
    #[serde(default)]
    pub discovery: Discovery,

    /// Which namespaces may bind to this instance (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,
}

/// Connection capacity of an instance.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacitySpec {
    /// Overrides the instance's `max_connections`. When absent it comes from the
    /// Admin API (the `max_connections` flag, else the tier default), else from
    /// `tier` with the built-in tier table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections: Option<i32>,

    /// The machine tier (`db-custom-2-7680`, `db-g1-small`...), used with the
    /// tier table when the Admin API is off or unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^db-[a-z0-9-]+$')")
        .message("must be a Cloud SQL tier such as db-custom-2-7680 or db-g1-small"))]
    pub tier: Option<String>,

    /// Connections kept free for superusers and maintenance (default 6).
    #[serde(default = "default_reserved_connections")]
    #[schemars(range(min = 0))]
    pub reserved_connections: i32,

    /// Connections used by clients outside this cluster (default 0).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub external_connections: i32,
}

impl Default for CapacitySpec {
    fn default() -> Self {
        Self {
            max_connections: None,
            tier: None,
            reserved_connections: default_reserved_connections(),
            external_connections: 0,
        }
    }
}

fn default_reserved_connections() -> i32 {
    6
}

/// Where the operator learns about the instance.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default,
)]
pub enum Discovery {
    /// Ask the Cloud SQL Admin API (`instances.get`).
    #[default]
    #[serde(rename = "AdminAPI")]
    AdminApi,
    /// Use only the spec.
    None,
}

/// Which namespaces may bind to an instance.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Namespaces whose labels match this selector may bind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Namespaces listed by name may bind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// What the operator observed and decided about an instance.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CloudSqlInstanceStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The operator installation that wrote this status (`--operator-id`);
    /// see the binding's `status.reconciledBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciled_by: Option<String>,
    /// Database engine and version in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_version: Option<String>,
    /// Machine tier in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The resolved capacity and where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityStatus>,
    /// Sum over bindings of granted per-pod pool times max pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<i64>,
    /// Number of bindings referring to this instance.
    #[serde(default)]
    pub bindings: i32,
    /// `Ready`, `CapacityKnown`, `BudgetFits`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The resolved capacity of an instance.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapacityStatus {
    /// The instance's `max_connections`.
    pub max_connections: i64,
    /// Where `maxConnections` came from: `Spec`, `AdminAPIFlag`, `AdminAPITier` or `TierTable`.
    pub source: String,
    /// Connections left for bound workloads: max - reserved - external.
    pub usable: i64,
}

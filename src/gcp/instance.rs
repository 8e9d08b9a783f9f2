//! The parts of the Admin API's `DatabaseInstance` the operator uses.

use std::fmt;

use serde::Deserialize;

use super::{Cause, ConnectionName, GcpError};
use crate::budget::DiscoveredInstance;

/// A Cloud SQL instance as `instances.get` describes it, reduced to what the
/// operator uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseInstance {
    /// `connectionName`, `PROJECT:REGION:INSTANCE` (the name asked for when the
    /// answer leaves it out).
    pub connection_name: String,
    /// `databaseVersion`, for example `POSTGRES_16`.
    pub database_version: String,
    /// `state`.
    pub state: InstanceState,
    /// `region`, for example `us-central1`.
    pub region: String,
    /// `settings.tier`, for example `db-custom-1-3840`.
    pub tier: String,
    /// `settings.edition` (`ENTERPRISE`, `ENTERPRISE_PLUS`), when reported.
    pub edition: Option<String>,
    /// `settings.databaseFlags` as (name, value) pairs, in the API's order.
    pub flags: Vec<(String, String)>,
    /// `ipAddresses`.
    pub ip_addresses: Vec<IpAddress>,
}

impl DatabaseInstance {
    /// What capacity resolution needs: version, tier and flags.
    pub fn discovered(&self) -> DiscoveredInstance {
        DiscoveredInstance {
            database_version: self.database_version.clone(),
            tier: self.tier.clone(),
            flags: self.flags.clone(),
        }
    }

    /// Reads a success answer of `instances.get`.
    pub(crate) fn from_body(asked: &ConnectionName, body: &[u8]) -> Result<Self, GcpError> {
        let resource: InstanceResource =
            serde_json::from_slice(body).map_err(|e| GcpError::InvalidResponse {
                connection_name: asked.to_string(),
                reason: format!("not a DatabaseInstance JSON object: {e}"),
                source: Some(Cause::new(e)),
            })?;
        let InstanceResource {
            connection_name,
            database_version,
            state,
            region,
            settings,
            ip_addresses,
        } = resource;
        let SettingsResource {
            tier,
            edition,
            database_flags,
        } = settings.unwrap_or_default();
        Ok(Self {
            connection_name: connection_name.unwrap_or_else(|| asked.to_string()),
            database_version: database_version.unwrap_or_default(),
            state: InstanceState::from_api(state.as_deref().unwrap_or_default()),
            region: region.unwrap_or_else(|| asked.region.clone()),
            tier: tier.unwrap_or_default(),
            edition,
            flags: database_flags
                .into_iter()
                .map(|flag| (flag.name, flag.value))
                .collect(),
            ip_addresses: ip_addresses
                .into_iter()
                .filter_map(|ip| {
                    Some(IpAddress {
                        kind: ip.kind.unwrap_or_default(),
                        address: ip.ip_address?,
                    })
                })
                .collect(),
        })
    }
}

/// One entry of `ipAddresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpAddress {
    /// `type`: `PRIMARY` (public), `PRIVATE` or `OUTGOING`.
    pub kind: String,
    /// `ipAddress`.
    pub address: String,
}

/// `state` of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    /// `RUNNABLE`: serving.
    Runnable,
    /// `SUSPENDED`: for example for billing problems.
    Suspended,
    /// `PENDING_CREATE`: being created.
    PendingCreate,
    /// `PENDING_DELETE`: being deleted.
    PendingDelete,
    /// `MAINTENANCE`: under maintenance.
    Maintenance,
    /// `FAILED`: creation failed.
    Failed,
    /// Any other value (including an absent one, as the empty string).
    Other(String),
}

impl InstanceState {
    /// The state named by the API's `state` value.
    pub fn from_api(state: &str) -> Self {
        match state {
            "RUNNABLE" => Self::Runnable,
            "SUSPENDED" => Self::Suspended,
            "PENDING_CREATE" => Self::PendingCreate,
            "PENDING_DELETE" => Self::PendingDelete,
            "MAINTENANCE" => Self::Maintenance,
            "FAILED" => Self::Failed,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The API's name of the state.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Runnable => "RUNNABLE",
            Self::Suspended => "SUSPENDED",
            Self::PendingCreate => "PENDING_CREATE",
            Self::PendingDelete => "PENDING_DELETE",
            Self::Maintenance => "MAINTENANCE",
            Self::Failed => "FAILED",
            Self::Other(other) => other,
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// The wire shapes. Every field is optional: Google leaves out empty ones (an
// instance without flags has no `databaseFlags` at all).

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceResource {
    connection_name: Option<String>,
    database_version: Option<String>,
    state: Option<String>,
    region: Option<String>,
    settings: Option<SettingsResource>,
    #[serde(default)]
    ip_addresses: Vec<IpMappingResource>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SettingsResource {
    tier: Option<String>,
    edition: Option<String>,
    #[serde(default)]
    database_flags: Vec<DatabaseFlagResource>,
}

#[derive(Deserialize)]
struct DatabaseFlagResource {
    name: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpMappingResource {
    #[serde(rename = "type")]
    kind: Option<String>,
    ip_address: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked() -> ConnectionName {
        ConnectionName {
            project: "proj".into(),
            region: "us-central1".into(),
            instance: "orders".into(),
        }
    }

    fn read(body: serde_json::Value) -> DatabaseInstance {
        match DatabaseInstance::from_body(&asked(), body.to_string().as_bytes()) {
            Ok(instance) => instance,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn a_documented_answer_is_read() {
        let instance = read(serde_json::json!({
            "kind": "sql#instance",
            "connectionName": "proj:us-central1:orders",
            "databaseVersion": "POSTGRES_16",
            "state": "RUNNABLE",
            "region": "us-central1",
            "backendType": "SECOND_GEN",
            "settings": {
                "kind": "sql#settings",
                "tier": "db-custom-2-7680",
                "edition": "ENTERPRISE",
                "databaseFlags": [
                    {"name": "max_connections", "value": "250"},
                    {"name": "cloudsql.iam_authentication", "value": "on"}
                ]
            },
            "ipAddresses": [
                {"type": "PRIMARY", "ipAddress": "34.1.2.3"},
                {"type": "PRIVATE", "ipAddress": "10.0.0.3"}
            ]
        }));
        assert_eq!(
            instance,
            DatabaseInstance {
                connection_name: "proj:us-central1:orders".into(),
                database_version: "POSTGRES_16".into(),
                state: InstanceState::Runnable,
                region: "us-central1".into(),
                tier: "db-custom-2-7680".into(),
                edition: Some("ENTERPRISE".into()),
                flags: vec![
                    ("max_connections".into(), "250".into()),
                    ("cloudsql.iam_authentication".into(), "on".into()),
                ],
                ip_addresses: vec![
                    IpAddress {
                        kind: "PRIMARY".into(),
                        address: "34.1.2.3".into()
                    },
                    IpAddress {
                        kind: "PRIVATE".into(),
                        address: "10.0.0.3".into()
                    },
                ],
            }
        );
        assert_eq!(
            instance.discovered(),
            DiscoveredInstance {
                database_version: "POSTGRES_16".into(),
                tier: "db-custom-2-7680".into(),
                flags: instance.flags.clone(),
            }
        );
    }

    #[test]
    fn missing_fields_are_empty_not_errors() {
        let instance = read(serde_json::json!({"state": "MAINTENANCE"}));
        assert_eq!(instance.connection_name, "proj:us-central1:orders");
        assert_eq!(instance.region, "us-central1");
        assert_eq!(instance.state, InstanceState::Maintenance);
        assert!(instance.tier.is_empty());
        assert!(instance.flags.is_empty());
        assert!(instance.ip_addresses.is_empty());
    }

    #[test]
    fn unknown_states_are_kept_by_name() {
        let instance = read(serde_json::json!({"state": "REPAIRING"}));
        assert_eq!(instance.state, InstanceState::Other("REPAIRING".into()));
        assert_eq!(instance.state.to_string(), "REPAIRING");
    }

    #[test]
    fn an_answer_that_is_not_an_instance_is_an_error() {
        let error = match DatabaseInstance::from_body(&asked(), b"<html>hello</html>") {
            Err(error) => error,
            Ok(instance) => panic!("read {instance:?}"),
        };
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("--sqladmin-endpoint"), "{error}");
    }
}

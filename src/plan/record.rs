//! The record of what we injected, kept in the `cloudsql.dev/injected`
//! annotation of the template.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the operator owns in one pod template. Compact JSON in
/// [`super::INJECTED_ANNOTATION`]; every list is sorted or in injection order,
/// so equal injections give equal annotations.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Record {
    /// Our regular containers (the proxy when it is not a native sidecar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// Our init containers (native sidecars).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<String>,
    /// Our volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Our env names, by app container name (`""`: an unnamed first container).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Vec<String>>,
    /// Our volume mount paths, by app container name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_mounts: BTreeMap<String, Vec<String>>,
    /// What we added to `run.googleapis.com/cloudsql-instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_run: Option<CloudRunRecord>,
    /// Lists and maps that did not exist before we injected (so removing
    /// leaves them absent, not empty): `annotations`, `initContainers`,
    /// `volumes`, `env:<container>`, `volumeMounts:<container>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<String>,
}

/// Our part of the Cloud Run instances annotation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CloudRunRecord {
    /// Connection names we appended.
    pub added: Vec<String>,
    /// The annotation's value before (absent: there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
}

impl Record {
    /// The record in an annotation map, when there is a readable one.
    pub fn read(annotations: &BTreeMap<String, String>) -> Option<Record> {
        annotations
            .get(super::INJECTED_ANNOTATION)
            .and_then(|json| serde_json::from_str(json).ok())
    }

    /// Compact JSON for the annotation.
    pub fn to_json(&self) -> String {
        // Strings, vectors and string-keyed maps always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn was_created(&self, what: &str) -> bool {
        self.created.iter().any(|c| c == what)
    }

    pub fn mark_created(&mut self, what: String) {
        if !self.created.contains(&what) {
            self.created.push(what);
            self.created.sort();
        }
    }
}

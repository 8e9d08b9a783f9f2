//! The CRD contract: `CloudSqlInstance` (cluster-scoped) and `CloudSqlBinding`
//! (namespaced), group `cloudsql.dev`, version `v1alpha1`.
//!
//! Validation lives in the schema (OpenAPI constraints and CEL rules) so the API
//! server itself refuses an invalid object with the field path in its message;
//! nothing invalid reaches the controller. Defaults live in the schema too, where
//! the API server can apply them.

mod binding;
mod conditions;
mod instance;

pub use binding::*;
pub use conditions::*;
pub use instance::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of both kinds.
pub const GROUP: &str = "cloudsql.dev";
/// The API version of both kinds.
pub const VERSION: &str = "v1alpha1";
/// The field manager every write of the operator uses.
pub const FIELD_MANAGER: &str = "cloudsql-binder";
/// Pod-template annotation that changes exactly when what we inject changes.
pub const CONFIG_HASH_ANNOTATION: &str = "cloudsql.dev/config-hash";

/// Both CRDs, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![CloudSqlInstance::crd(), CloudSqlBinding::crd()]
}

/// Both CRDs as multi-document YAML, as `cloudsql-binder crd` prints them and
/// `crds/` stores them.
pub fn crds_yaml() -> Result<String, serde_saphyr::ser_error::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

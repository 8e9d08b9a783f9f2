//! The admission webhook: Pods are injected as they are created (Jobs, bare
//! Pods, and workloads whose bindings say `injection: Admission`), bindings are
//! validated against what the schema cannot see, and scaling changes that
//! would overcommit an instance get a warning. It serves TLS without
//! cert-manager: the operator keeps its own CA and serving certificate in a
//! Secret, rotates them, and swaps the served certificate without a restart.
//!
//! Two entry points, on purpose:
//! - [`serve`] runs on **every replica**: the HTTPS server, reading the
//!   certificate from the Secret (and following its changes) and answering
//!   from the replica's synced stores ([`Cluster`]).
//! - [`run_certificate_manager`] is **the leader's job**: it creates and
//!   renews the CA and serving certificate in the Secret, and applies the
//!   webhook configurations with the `caBundle` (server-side apply, field
//!   manager `cloudsql-binder`).
//!
//! Certificates rotate without a failed call: the Secret holds the current CA
//! (which signed the served certificate) and the *next* CA, and the `caBundle`
//! trusts both (plus the previous CA while certificates it signed may still
//! be served). At renewal (2/3 of the validity) the next CA becomes current
//! and signs the new serving certificate: the API server has trusted that CA
//! for a whole period already, so whichever certificate a replica serves
//! while the Secret propagates, the API server accepts it.
//!
//! What it needs from RBAC beyond the controllers: `get`, `list`, `watch`,
//! `create`, `update` on Secrets in its own namespace (the certificate);
//! `get`, `create`, `patch` on `mutatingwebhookconfigurations` and
//! `validatingwebhookconfigurations` (cluster-wide); for the missed-injection
//! report, `get` and `patch` on Pods (an annotation), `create` on Pods (a
//! dry-run probe of the webhook) and `patch` on Deployments, StatefulSets
//! and DaemonSets (the roll). The configurations are the operator's own
//! (field manager `cloudsql-binder`); uninstalling must delete them, or the
//! API server keeps calling a webhook that is gone.

mod bindings;
mod certificates;
mod configuration;
mod pods;
mod review;
mod scale;
mod server;
#[cfg(test)]
mod tests;
mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::Cause;

pub use certificates::{CertificateTimes, run_certificate_manager};
pub use configuration::{mutating_configuration, validating_configuration};
pub use review::{AdmissionContext, Route, review};
pub use server::{serve, serve_on};

/// Path of the Pod mutating webhook.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";
/// Path of the binding validating webhook.
pub const VALIDATE_BINDINGS_PATH: &str = "/validate-bindings";
/// Path of the overcommit warnings on HPAs, Deployments and StatefulSets.
pub const VALIDATE_SCALE_PATH: &str = "/validate-scale";

/// Default name of the Secret holding the CA and the serving certificate.
pub const DEFAULT_SECRET_NAME: &str = "cloudsql-binder-webhook-tls";
/// Default name of both webhook configurations.
pub const DEFAULT_CONFIGURATION_NAME: &str = "cloudsql-binder";
/// Default validity of the serving certificate (renewed at 2/3 of it).
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

pub use crate::plan::{ADMITTED_ANNOTATION, INJECT_LABEL};

/// The largest AdmissionReview body accepted (HTTP 400 beyond). Objects are
/// at most 1.5 MiB in etcd; a review of an update holds two of them.
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
/// The API server's timeout for our calls (at most 30 s; kept short, since a
/// Pod waits for us).
pub const TIMEOUT_SECONDS: i32 = 5;

/// Namespaces the webhook never intercepts, whatever the selector says.
pub const ALWAYS_EXCLUDED_NAMESPACES: [&str; 1] = ["kube-system"];

/// Errors of the webhook server and the certificate manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address cannot be bound.
    #[error(
        "cannot listen on {addr} (--webhook-listen): {source}; is another process using the port?"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A call to the API server failed.
    #[error("{action}: {}", crate::telemetry::KubeError(source))]
    Kube {
        /// What we were doing.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A certificate could not be created or read.
    #[error("webhook certificate: {reason}")]
    Certificate {
        /// What failed, with the underlying error's words.
        reason: String,
        /// The underlying error (rcgen, rustls, PEM), when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The options are inconsistent.
    #[error("webhook options: {reason}")]
    Options {
        /// What is wrong, and which flag to fix.
        reason: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Cause>,
    },
}

impl Error {
    /// A certificate error: `what` failed because of `source`.
    fn certificate(what: &str, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Certificate {
            reason: format!("{what}: {source}"),
            source: Some(Cause::new(source)),
        }
    }
}

/// How the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `clientConfig.url` = this URL + the webhook path (an operator running
    /// outside the cluster: tests, the demo). `https://` only.
    Url(String),
    /// `clientConfig.service` (what the Helm chart uses).
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
        /// The Service's port.
        port: i32,
    },
}

impl Endpoint {
    /// The names the serving certificate must carry for this endpoint: the
    /// URL's host, or the Service's DNS names.
    pub fn subject_alt_names(&self) -> Result<Vec<String>, Error> {
        match self {
            Endpoint::Url(url) => {
                let uri: http::Uri = url.parse().map_err(|e| Error::Options {
                    reason: format!("--webhook-url {url:?}: {e}"),
                    source: Some(Cause::new(e)),
                })?;
                if uri.scheme_str() != Some("https") {
                    return Err(Error::Options {
                        reason: format!(
                            "--webhook-url {url:?} must start with https:// (the API server calls webhooks over TLS only)"
                        ),
                        source: None,
                    });
                }
                let host = uri.host().ok_or_else(|| Error::Options {
                    reason: format!("--webhook-url {url:?} has no host"),
                    source: None,
                })?;
                Ok(vec![host.trim_matches(['[', ']']).to_owned()])
            }
            Endpoint::Service {
                namespace, name, ..
            } => Ok(vec![
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}"),
                name.clone(),
            ]),
        }
    }
}

/// Everything the webhook needs to know; shared by [`serve`] and
/// [`run_certificate_manager`].
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// Address the HTTPS server listens on.
    pub listen: SocketAddr,
    /// How the API server reaches us.
    pub endpoint: Endpoint,
    /// Name of both webhook configurations (tests use one per namespace).
    pub configuration_name: String,
    /// Namespaces intercepted (empty: all but the excluded ones). The
    /// operator's `--namespace` list.
    pub namespaces: Vec<String>,
    /// Namespaces never intercepted besides kube-system: the operator's own
    /// (its pods must start even when the webhook cannot answer).
    pub excluded_namespaces: Vec<String>,
    /// Namespace of the certificate Secret.
    pub secret_namespace: String,
    /// Name of the certificate Secret.
    pub secret_name: String,
    /// Validity of the serving certificate; renewed at 2/3 of it.
    pub cert_validity: Duration,
    /// How long the server goes on answering after shutdown is asked for,
    /// closing each connection after its answer (see [`server::serve`]).
    pub drain: Duration,
}

impl WebhookOptions {
    /// Whether pods and objects of namespace `ns` are ours to look at.
    pub fn intercepts(&self, ns: &str) -> bool {
        !ALWAYS_EXCLUDED_NAMESPACES.contains(&ns)
            && !self.excluded_namespaces.iter().any(|n| n == ns)
            && (self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == ns))
    }
}

/// Parses a duration such as `90d`, `12h`, `30m`, `20s` or `1500ms` (one
/// number and one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; use s, m, h or d (e.g. 90d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let seconds = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long"))
    };
    let duration = match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        other => Err(format!(
            "{text:?}: unknown unit {other:?}; use ms, s, m, h or d"
        )),
    }?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn durations_read_the_usual_units() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten days").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10y").is_err());
    }

    #[test]
    fn a_url_endpoint_names_its_host_and_must_be_https() {
        let url = Endpoint::Url("https://127.0.0.1:8443".into());
        assert_eq!(url.subject_alt_names().unwrap(), ["127.0.0.1"]);
        let plain = Endpoint::Url("http://127.0.0.1:8443".into());
        assert!(plain.subject_alt_names().is_err());
        let service = Endpoint::Service {
            namespace: "ops".into(),
            name: "cloudsql-binder".into(),
            port: 443,
        };
        assert!(
            service
                .subject_alt_names()
                .unwrap()
                .contains(&"cloudsql-binder.ops.svc".to_owned())
        );
    }

    #[test]
    fn kube_system_and_the_operators_namespace_are_never_intercepted() {
        let options = WebhookOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            endpoint: Endpoint::Url("https://127.0.0.1:1".into()),
            configuration_name: DEFAULT_CONFIGURATION_NAME.into(),
            namespaces: vec![],
            excluded_namespaces: vec!["ops".into()],
            secret_namespace: "ops".into(),
            secret_name: DEFAULT_SECRET_NAME.into(),
            cert_validity: DEFAULT_CERT_VALIDITY,
            drain: Duration::ZERO,
        };
        assert!(options.intercepts("shop"));
        assert!(!options.intercepts("kube-system"));
        assert!(!options.intercepts("ops"));
        let limited = WebhookOptions {
            namespaces: vec!["shop".into()],
            ..options
        };
        assert!(limited.intercepts("shop"));
        assert!(!limited.intercepts("billing"));
    }
}

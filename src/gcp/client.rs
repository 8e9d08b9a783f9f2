//! The HTTP client for `instances.get`.

use std::path::Path;
use std::time::Duration;

use google_cloud_auth::credentials::{self, CacheableResource, Credentials, service_account};
use http::Extensions;
use reqwest::{Certificate, Url};

use super::{Cause, ConnectionName, DatabaseInstance, GcpError, GoogleError};

/// Google's Cloud SQL Admin API endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://sqladmin.googleapis.com";

/// The OAuth scope the client asks for.
pub const SQLADMIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.admin";

/// How long to wait for a connection to the endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A Cloud SQL Admin API client for `instances.get`.
///
/// Cheap to clone (the HTTP connection pool and the token cache are shared).
/// Each [`get_instance`](Self::get_instance) is one request, not retried:
/// [`CapacityDiscovery`](super::CapacityDiscovery) adds retries and memory.
///
/// TLS is rustls on the process's default crypto provider (the binary installs
/// aws-lc-rs), trusting the system's roots plus any extra root CA given with
/// [`with_root_ca_pem`](Self::with_root_ca_pem).
#[derive(Clone, Debug)]
pub struct AdminApi {
    http: reqwest::Client,
    credentials: Credentials,
    endpoint: Url,
    extra_roots: Vec<Certificate>,
}

impl AdminApi {
    /// A client of `endpoint` (for example [`DEFAULT_ENDPOINT`]) using
    /// Application Default Credentials: the service-account key file named by
    /// `GOOGLE_APPLICATION_CREDENTIALS`, else gcloud's well-known file, else
    /// the metadata server (GKE Workload Identity).
    ///
    /// Must be called inside a Tokio runtime: `google-cloud-auth` refreshes
    /// tokens on a background task.
    pub fn new(endpoint: &str) -> Result<Self, GcpError> {
        require_runtime()?;
        let credentials = credentials::Builder::default()
            .with_scopes([SQLADMIN_SCOPE])
            .build()
            .map_err(|e| GcpError::CredentialsSetup {
                reason: format!("Application Default Credentials: {e}"),
                source: Some(Cause::new(e)),
            })?;
        Self::with_credentials(endpoint, credentials, Vec::new())
    }

    /// A client of `endpoint` using the service-account key file at
    /// `key_file` (the JSON `gcloud iam service-accounts keys create` writes),
    /// whatever `GOOGLE_APPLICATION_CREDENTIALS` says, trusting
    /// `extra_root_ca_pem` (PEM certificates) in addition to the system roots.
    ///
    /// Must be called inside a Tokio runtime.
    pub fn from_key_file(
        key_file: &Path,
        endpoint: &str,
        extra_root_ca_pem: Option<&[u8]>,
    ) -> Result<Self, GcpError> {
        require_runtime()?;
        let setup = |reason: String, source: Option<Cause>| GcpError::CredentialsSetup {
            reason: format!("service-account key file {}: {reason}", key_file.display()),
            source,
        };
        let text = std::fs::read_to_string(key_file)
            .map_err(|e| setup(e.to_string(), Some(Cause::new(e))))?;
        let key: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| setup(format!("not JSON: {e}"), Some(Cause::new(e))))?;
        let kind = key.get("type").and_then(serde_json::Value::as_str);
        if kind != Some("service_account") {
            return Err(setup(
                format!("`type` is {kind:?}, expected \"service_account\""),
                None,
            ));
        }
        let credentials = service_account::Builder::new(key)
            .with_access_specifier(service_account::AccessSpecifier::from_scopes([
                SQLADMIN_SCOPE,
            ]))
            .build()
            .map_err(|e| setup(e.to_string(), Some(Cause::new(e))))?;
        let extra_roots = match extra_root_ca_pem {
            Some(pem) => parse_roots(pem)?,
            None => Vec::new(),
        };
        Self::with_credentials(endpoint, credentials, extra_roots)
    }

    /// The same client, also trusting the certificates in `pem` as roots (for
    /// a private endpoint or a TLS-intercepting proxy; the CLI flag
    /// `--sqladmin-ca-file`). The system roots stay trusted.
    pub fn with_root_ca_pem(self, pem: &[u8]) -> Result<Self, GcpError> {
        let mut extra_roots = self.extra_roots;
        extra_roots.extend(parse_roots(pem)?);
        Ok(Self {
            http: http_client(&extra_roots)?,
            extra_roots,
            ..self
        })
    }

    /// The endpoint asked.
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// `instances.get` for `connection_name` (`PROJECT:REGION:INSTANCE`): one
    /// request, no retry.
    pub async fn get_instance(&self, connection_name: &str) -> Result<DatabaseInstance, GcpError> {
        let name = ConnectionName::parse(connection_name)?;
        let url = self.instance_url(&name);
        let headers = self.auth_headers().await?;
        let transport = |e: reqwest::Error| GcpError::Transport {
            connection_name: name.to_string(),
            endpoint: self.endpoint.to_string(),
            reason: error_chain(&e),
            source: Cause::new(e),
        };
        let response = self
            .http
            .get(url)
            .headers(headers)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            DatabaseInstance::from_body(&name, &body)
        } else {
            Err(GcpError::from_reply(
                &name,
                GoogleError::from_body(status.as_u16(), &body),
            ))
        }
    }

    fn with_credentials(
        endpoint: &str,
        credentials: Credentials,
        extra_roots: Vec<Certificate>,
    ) -> Result<Self, GcpError> {
        Ok(Self {
            http: http_client(&extra_roots)?,
            credentials,
            endpoint: parse_endpoint(endpoint)?,
            extra_roots,
        })
    }

    /// `{endpoint}/v1/projects/{project}/instances/{instance}`; the endpoint
    /// may carry a path prefix. A domain-scoped project (`example.com:proj`)
    /// is one path segment, as Google expects.
    fn instance_url(&self, name: &ConnectionName) -> Url {
        let mut url = self.endpoint.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend([
                "v1",
                "projects",
                &name.project,
                "instances",
                &name.instance,
            ]);
        }
        url
    }

    async fn auth_headers(&self) -> Result<http::HeaderMap, GcpError> {
        match self.credentials.headers(Extensions::new()).await {
            Ok(CacheableResource::New { data, .. }) => Ok(data),
            // Only returned when the caller passes an entity tag, which we never do.
            Ok(CacheableResource::NotModified) => Err(GcpError::Credentials {
                reason: "google-cloud-auth returned no headers".to_owned(),
                retryable: true,
                source: None,
            }),
            Err(e) => Err(GcpError::Credentials {
                reason: error_chain(&e),
                retryable: e.is_transient(),
                source: Some(Cause::new(e)),
            }),
        }
    }
}

/// `google-cloud-auth` spawns its token refresher with `tokio::spawn`, which
/// panics outside a runtime: refuse instead.
fn require_runtime() -> Result<(), GcpError> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|e| GcpError::CredentialsSetup {
            reason: "the Admin API client was created outside a Tokio runtime".to_owned(),
            source: Some(Cause::new(e)),
        })
}

fn parse_endpoint(endpoint: &str) -> Result<Url, GcpError> {
    let invalid = |reason: String| GcpError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
        source: None,
    };
    let url = Url::parse(endpoint).map_err(|e| GcpError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
        source: Some(Cause::new(e)),
    })?;
    if url.scheme() != "https" {
        return Err(invalid(format!(
            "scheme `{}`: access tokens are only sent over https",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(invalid("no host".to_owned()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("it has a query or fragment".to_owned()));
    }
    Ok(url)
}

fn parse_roots(pem: &[u8]) -> Result<Vec<Certificate>, GcpError> {
    let roots = Certificate::from_pem_bundle(pem).map_err(|e| GcpError::InvalidRootCa {
        reason: error_chain(&e),
        source: Some(Cause::new(e)),
    })?;
    if roots.is_empty() {
        return Err(GcpError::InvalidRootCa {
            reason: "no CERTIFICATE block found".to_owned(),
            source: None,
        });
    }
    Ok(roots)
}

fn http_client(extra_roots: &[Certificate]) -> Result<reqwest::Client, GcpError> {
    reqwest::Client::builder()
        .user_agent(concat!("cloudsql-binder/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .https_only(true)
        .tls_certs_merge(extra_roots.iter().cloned())
        .build()
        .map_err(|e| GcpError::HttpClient {
            reason: error_chain(&e),
            source: Cause::new(e),
        })
}

/// An error with its sources: reqwest's top-level messages ("error sending
/// request") hide the useful part (connection refused, unknown issuer).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_urls() {
        assert!(parse_endpoint(DEFAULT_ENDPOINT).is_ok());
        assert!(parse_endpoint("https://127.0.0.1:8443/prefix/").is_ok());
        for bad in [
            "http://sqladmin.googleapis.com",
            "sqladmin.googleapis.com",
            "https://sqladmin.googleapis.com/?key=x",
            "",
        ] {
            let error = match parse_endpoint(bad) {
                Err(error) => error,
                Ok(url) => panic!("{bad:?} accepted as {url}"),
            };
            assert!(error.to_string().contains("https://"), "{error}");
        }
    }

    #[test]
    fn a_pem_without_certificates_is_refused() {
        let error = match parse_roots(b"not a certificate") {
            Err(error) => error,
            Ok(roots) => panic!("accepted {} roots", roots.len()),
        };
        assert!(error.to_string().contains("PEM"), "{error}");
    }

    #[tokio::test]
    async fn instance_urls_keep_the_endpoint_prefix_and_the_domain_scoped_project() {
        let credentials = google_cloud_auth::credentials::anonymous::Builder::new().build();
        let api =
            match AdminApi::with_credentials("https://proxy.internal/sql/", credentials, vec![]) {
                Ok(api) => api,
                Err(error) => panic!("{error}"),
            };
        let url = |name: &str| match ConnectionName::parse(name) {
            Ok(name) => api.instance_url(&name).to_string(),
            Err(error) => panic!("{error}"),
        };
        assert_eq!(
            url("proj:us-central1:orders"),
            "https://proxy.internal/sql/v1/projects/proj/instances/orders"
        );
        assert_eq!(
            url("example.com:proj:us-central1:db"),
            "https://proxy.internal/sql/v1/projects/example.com:proj/instances/db"
        );
    }

    #[test]
    fn creating_a_client_outside_a_runtime_is_an_error_not_a_panic() {
        let error = match AdminApi::new(DEFAULT_ENDPOINT) {
            Err(error) => error,
            Ok(api) => panic!("built {api:?}"),
        };
        assert!(error.to_string().contains("Tokio runtime"), "{error}");
    }
}

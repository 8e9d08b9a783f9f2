//! What can go wrong asking the Admin API, and what the user should do.

use std::fmt;

pub use crate::error::Cause;

use serde::Deserialize;

/// An error answer of a Google API: the HTTP status plus the
/// `{"error": {"code", "message", "status"}}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoogleError {
    /// The HTTP status code, for example 403.
    pub http_status: u16,
    /// Google's canonical status, for example `PERMISSION_DENIED`; empty when
    /// the body was not Google's error JSON.
    pub status: String,
    /// Google's message, or the start of the body when it was not Google's
    /// error JSON.
    pub message: String,
}

/// Longest piece of a non-JSON error body kept in a message.
const MAX_BODY_EXCERPT: usize = 300;

impl GoogleError {
    /// Reads an error answer. Bodies that are not Google's error JSON (for
    /// example an HTML page from a proxy) keep their first few hundred
    /// characters as the message.
    pub(crate) fn from_body(http_status: u16, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Envelope {
            error: Body,
        }
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            message: String,
            #[serde(default)]
            status: String,
        }
        match serde_json::from_slice::<Envelope>(body) {
            Ok(Envelope { error }) => Self {
                http_status,
                status: error.status,
                message: error.message,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let excerpt: String = text.chars().take(MAX_BODY_EXCERPT).collect();
                let ellipsis = if excerpt.len() < text.len() {
                    "…"
                } else {
                    ""
                };
                Self {
                    http_status,
                    status: String::new(),
                    message: format!("{excerpt}{ellipsis}"),
                }
            }
        }
    }
}

impl fmt::Display for GoogleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.http_status)?;
        if !self.status.is_empty() {
            write!(f, " {}", self.status)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Errors of the Cloud SQL Admin API client.
///
/// Every message names the instance (when there is one), carries Google's own
/// words, and says what to do. [`is_retryable`](Self::is_retryable) tells
/// transient failures (HTTP 429, 408, 5xx, transport, transient credential
/// errors) from permanent ones (400, 401, 403, 404, bad configuration).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GcpError {
    /// The connection name is not `PROJECT:REGION:INSTANCE`.
    #[error(
        "`{connection_name}` is not a Cloud SQL connection name ({reason}); set spec.connectionName to PROJECT:REGION:INSTANCE as `gcloud sql instances describe INSTANCE --format='value(connectionName)'` prints it"
    )]
    InvalidConnectionName {
        /// The name as given.
        connection_name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The configured endpoint is not an https URL.
    #[error(
        "the Cloud SQL Admin API endpoint `{endpoint}` cannot be used ({reason}); give an https URL such as https://sqladmin.googleapis.com"
    )]
    InvalidEndpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },

    /// The extra root CA given to trust the endpoint is unusable.
    #[error(
        "the extra root CA for the Cloud SQL Admin API cannot be used ({reason}); give a PEM file with at least one CERTIFICATE block"
    )]
    InvalidRootCa {
        /// What is wrong with it.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },

    /// The credentials could not be set up (a bad key file, no Tokio runtime).
    #[error(
        "the credentials for the Cloud SQL Admin API cannot be set up: {reason}; on GKE bind the operator's Kubernetes service account to a Google service account (Workload Identity), or point GOOGLE_APPLICATION_CREDENTIALS at a service-account key file"
    )]
    CredentialsSetup {
        /// What went wrong.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },

    /// No access token could be had for a request.
    #[error(
        "no access token for the Cloud SQL Admin API: {reason}; on GKE check the Workload Identity binding of the operator's service account, elsewhere check the key in GOOGLE_APPLICATION_CREDENTIALS"
    )]
    Credentials {
        /// What went wrong, from `google-cloud-auth`.
        reason: String,
        /// Whether `google-cloud-auth` thinks trying again may help.
        retryable: bool,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },

    /// The HTTP client could not be built.
    #[error("the HTTP client for the Cloud SQL Admin API cannot be built: {reason}")]
    HttpClient {
        /// What went wrong.
        reason: String,
        /// The error underneath.
        #[source]
        source: Cause,
    },

    /// The request did not get an answer (connect, TLS, timeout, reset).
    #[error(
        "the Cloud SQL Admin API at {endpoint} did not answer instances.get on `{connection_name}`: {reason}; it is retried with backoff; check the operator's egress to that endpoint (firewall, proxy, DNS) and, for a private endpoint, its CA (--sqladmin-ca-file)"
    )]
    Transport {
        /// The instance asked about.
        connection_name: String,
        /// The endpoint asked.
        endpoint: String,
        /// What went wrong.
        reason: String,
        /// The error underneath.
        #[source]
        source: Cause,
    },

    /// HTTP 401: the credentials were not accepted.
    #[error(
        "the Cloud SQL Admin API did not accept the operator's credentials for `{connection_name}` ({reply}); on GKE check the Workload Identity binding of the operator's service account, elsewhere check the key in GOOGLE_APPLICATION_CREDENTIALS"
    )]
    Unauthenticated {
        /// The instance asked about.
        connection_name: String,
        /// Google's answer.
        reply: GoogleError,
    },

    /// HTTP 403: the caller may not read the instance, or the API is off.
    #[error(
        "the Cloud SQL Admin API refused instances.get on `{connection_name}` ({reply}); grant `cloudsql.instances.get` (for example roles/cloudsql.viewer) on project `{project}` to the operator's Google service account and make sure the Cloud SQL Admin API (sqladmin.googleapis.com) is enabled there, or set spec.capacity.maxConnections with spec.discovery: None"
    )]
    PermissionDenied {
        /// The instance asked about.
        connection_name: String,
        /// Its project, where the role must be granted.
        project: String,
        /// Google's answer.
        reply: GoogleError,
    },

    /// HTTP 404: no such instance (or project).
    #[error(
        "the Cloud SQL instance `{connection_name}` was not found ({reply}); check spec.connectionName: it must be PROJECT:REGION:INSTANCE exactly as `gcloud sql instances describe INSTANCE --project PROJECT --format='value(connectionName)'` prints it"
    )]
    NotFound {
        /// The instance asked about.
        connection_name: String,
        /// Google's answer.
        reply: GoogleError,
    },

    /// HTTP 400: the request was malformed.
    #[error(
        "the Cloud SQL Admin API rejected instances.get on `{connection_name}` as invalid ({reply}); check spec.connectionName"
    )]
    BadRequest {
        /// The instance asked about.
        connection_name: String,
        /// Google's answer.
        reply: GoogleError,
    },

    /// HTTP 429: quota exhausted.
    #[error(
        "the Cloud SQL Admin API is rate-limiting instances.get on `{connection_name}` ({reply}); it is retried with backoff; if this persists raise the project's Cloud SQL Admin API quota"
    )]
    RateLimited {
        /// The instance asked about.
        connection_name: String,
        /// Google's answer.
        reply: GoogleError,
    },

    /// HTTP 5xx or 408: Google's side failed.
    #[error(
        "the Cloud SQL Admin API failed on instances.get for `{connection_name}` ({reply}); it is retried with backoff and the last known capacity is kept meanwhile"
    )]
    Unavailable {
        /// The instance asked about.
        connection_name: String,
        /// Google's answer.
        reply: GoogleError,
    },

    /// Any other non-success status.
    #[error(
        "the Cloud SQL Admin API answered instances.get on `{connection_name}` with an unexpected {reply}; check the configured endpoint (--sqladmin-endpoint)"
    )]
    UnexpectedStatus {
        /// The instance asked about.
        connection_name: String,
        /// The answer.
        reply: GoogleError,
    },

    /// A success answer that is not a `DatabaseInstance`.
    #[error(
        "the Cloud SQL Admin API's answer for `{connection_name}` cannot be read ({reason}); check that the configured endpoint (--sqladmin-endpoint) is the Cloud SQL Admin API"
    )]
    InvalidResponse {
        /// The instance asked about.
        connection_name: String,
        /// What is wrong with the answer.
        reason: String,
        /// The error underneath, when there is one.
        #[source]
        source: Option<Cause>,
    },
}

impl GcpError {
    /// The error for a non-success answer to `instances.get`.
    pub(crate) fn from_reply(connection_name: &super::ConnectionName, reply: GoogleError) -> Self {
        let name = connection_name.to_string();
        match reply.http_status {
            400 => Self::BadRequest {
                connection_name: name,
                reply,
            },
            401 => Self::Unauthenticated {
                connection_name: name,
                reply,
            },
            403 => Self::PermissionDenied {
                connection_name: name,
                project: connection_name.project.clone(),
                reply,
            },
            404 => Self::NotFound {
                connection_name: name,
                reply,
            },
            429 => Self::RateLimited {
                connection_name: name,
                reply,
            },
            408 | 500..=599 => Self::Unavailable {
                connection_name: name,
                reply,
            },
            _ => Self::UnexpectedStatus {
                connection_name: name,
                reply,
            },
        }
    }

    /// Whether trying again later may succeed: rate limits, server errors,
    /// transport failures and transient credential errors. Permission, not
    /// found, bad request and configuration errors are permanent until
    /// someone changes something.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::RateLimited { .. } | Self::Unavailable { .. } => true,
            Self::Credentials { retryable, .. } => *retryable,
            Self::InvalidConnectionName { .. }
            | Self::InvalidEndpoint { .. }
            | Self::InvalidRootCa { .. }
            | Self::CredentialsSetup { .. }
            | Self::HttpClient { .. }
            | Self::Unauthenticated { .. }
            | Self::PermissionDenied { .. }
            | Self::NotFound { .. }
            | Self::BadRequest { .. }
            | Self::UnexpectedStatus { .. }
            | Self::InvalidResponse { .. } => false,
        }
    }

    /// The HTTP status of the Admin API's answer, when there was one.
    pub fn http_status(&self) -> Option<u16> {
        self.reply().map(|reply| reply.http_status)
    }

    /// Google's own message when the Admin API answered with an error, else
    /// what went wrong, without the advice the `Display` form adds.
    pub fn message(&self) -> &str {
        match self {
            Self::InvalidConnectionName { reason, .. } => reason,
            Self::InvalidEndpoint { reason, .. }
            | Self::InvalidRootCa { reason, .. }
            | Self::CredentialsSetup { reason, .. }
            | Self::Credentials { reason, .. }
            | Self::HttpClient { reason, .. }
            | Self::Transport { reason, .. }
            | Self::InvalidResponse { reason, .. } => reason,
            Self::Unauthenticated { reply, .. }
            | Self::PermissionDenied { reply, .. }
            | Self::NotFound { reply, .. }
            | Self::BadRequest { reply, .. }
            | Self::RateLimited { reply, .. }
            | Self::Unavailable { reply, .. }
            | Self::UnexpectedStatus { reply, .. } => &reply.message,
        }
    }

    /// A CamelCase reason for a status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidConnectionName { .. } => "InvalidConnectionName",
            Self::InvalidEndpoint { .. } | Self::InvalidRootCa { .. } | Self::HttpClient { .. } => {
                "AdminAPIMisconfigured"
            }
            Self::CredentialsSetup { .. } | Self::Credentials { .. } => "AdminAPICredentials",
            Self::Transport { .. } => "AdminAPIUnreachable",
            Self::Unauthenticated { .. } => "AdminAPIUnauthenticated",
            Self::PermissionDenied { .. } => "AdminAPIPermissionDenied",
            Self::NotFound { .. } => "InstanceNotFound",
            Self::BadRequest { .. } => "AdminAPIBadRequest",
            Self::RateLimited { .. } => "AdminAPIRateLimited",
            Self::Unavailable { .. } => "AdminAPIUnavailable",
            Self::UnexpectedStatus { .. } | Self::InvalidResponse { .. } => {
                "AdminAPIUnexpectedAnswer"
            }
        }
    }

    fn reply(&self) -> Option<&GoogleError> {
        match self {
            Self::Unauthenticated { reply, .. }
            | Self::PermissionDenied { reply, .. }
            | Self::NotFound { reply, .. }
            | Self::BadRequest { reply, .. }
            | Self::RateLimited { reply, .. }
            | Self::Unavailable { reply, .. }
            | Self::UnexpectedStatus { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcp::ConnectionName;

    fn name() -> ConnectionName {
        ConnectionName {
            project: "proj".into(),
            region: "us-central1".into(),
            instance: "orders".into(),
        }
    }

    fn google_json(code: u16, status: &str, message: &str) -> Vec<u8> {
        serde_json::json!({"error": {"code": code, "message": message, "status": status}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn google_error_json_is_read() {
        let reply = GoogleError::from_body(
            403,
            &google_json(
                403,
                "PERMISSION_DENIED",
                "The client is not authorized to make this request.",
            ),
        );
        assert_eq!(reply.status, "PERMISSION_DENIED");
        assert_eq!(
            reply.message,
            "The client is not authorized to make this request."
        );
        assert_eq!(
            reply.to_string(),
            "HTTP 403 PERMISSION_DENIED: The client is not authorized to make this request."
        );
    }

    #[test]
    fn bodies_that_are_not_google_json_are_kept_shortened() {
        let html = format!("<html>{}</html>", "x".repeat(1_000));
        let reply = GoogleError::from_body(502, html.as_bytes());
        assert_eq!(reply.status, "");
        assert!(reply.message.starts_with("<html>xxx"));
        assert!(reply.message.chars().count() <= MAX_BODY_EXCERPT + 1);
        assert!(reply.to_string().starts_with("HTTP 502: <html>"));
    }

    #[test]
    fn statuses_are_classified() {
        let cases = [
            (400, false, "AdminAPIBadRequest"),
            (401, false, "AdminAPIUnauthenticated"),
            (403, false, "AdminAPIPermissionDenied"),
            (404, false, "InstanceNotFound"),
            (408, true, "AdminAPIUnavailable"),
            (409, false, "AdminAPIUnexpectedAnswer"),
            (429, true, "AdminAPIRateLimited"),
            (500, true, "AdminAPIUnavailable"),
            (503, true, "AdminAPIUnavailable"),
        ];
        for (status, retryable, reason) in cases {
            let error = GcpError::from_reply(
                &name(),
                GoogleError::from_body(status, &google_json(status, "S", "google says")),
            );
            assert_eq!(error.is_retryable(), retryable, "{status}");
            assert_eq!(error.reason(), reason, "{status}");
            assert_eq!(error.http_status(), Some(status));
            assert_eq!(error.message(), "google says");
            assert!(error.to_string().contains("google says"), "{error}");
            assert!(
                error.to_string().contains("proj:us-central1:orders"),
                "{error}"
            );
        }
    }

    #[test]
    fn permission_denied_says_which_role_to_grant_where() {
        let error = GcpError::from_reply(
            &name(),
            GoogleError::from_body(403, &google_json(403, "PERMISSION_DENIED", "no")),
        );
        let text = error.to_string();
        assert!(text.contains("cloudsql.instances.get"), "{text}");
        assert!(text.contains("roles/cloudsql.viewer"), "{text}");
        assert!(text.contains("project `proj`"), "{text}");
    }

    #[test]
    fn not_found_says_to_check_the_connection_name() {
        let error = GcpError::from_reply(
            &name(),
            GoogleError::from_body(404, &google_json(404, "NOT_FOUND", "gone")),
        );
        assert!(error.to_string().contains("check spec.connectionName"));
    }

    #[test]
    fn transport_errors_are_retryable_and_have_no_status() {
        let error = GcpError::Transport {
            connection_name: "proj:us-central1:orders".into(),
            endpoint: "https://sqladmin.googleapis.com/".into(),
            reason: "connection refused".into(),
            source: Cause::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        assert!(error.is_retryable());
        assert_eq!(error.http_status(), None);
        assert_eq!(error.message(), "connection refused");
    }
}

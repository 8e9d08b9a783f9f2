//! A test fixture playing Google's side of the Cloud SQL Admin API.
//!
//! Google's APIs are not reachable from test machines, so each test starts its
//! own [`SqlAdminFixture`]: an HTTPS server on 127.0.0.1 (random port) that
//! answers `GET /v1/projects/{project}/instances/{instance}` with the
//! documented `DatabaseInstance` JSON, or with Google's error JSON
//! (`{"error": {"code", "message", "status", "errors"}}`) when told to fail.
//!
//! It also plays Google's authentication: it generates a fresh RSA
//! service-account key file (for `AdminApi::from_key_file`, or for
//! `GOOGLE_APPLICATION_CREDENTIALS`) and checks every request's bearer token
//! the way Google checks a self-signed JWT: RS256 signature by that key, `kid`
//! = the key's `private_key_id`, `iss` = the account, the sqlservice.admin
//! scope, not expired. A bad token gets Google's 401. `google-cloud-auth`
//! sends such self-signed JWTs directly and never calls the key's `token_uri`;
//! the key file still names one (`{endpoint}/token`, not served) so that a
//! change to token exchange fails loudly here.
//!
//! TLS: a CA and a leaf for 127.0.0.1/localhost generated in-process with
//! rcgen, served by rustls with the aws-lc-rs provider. Clients trust it
//! through [`SqlAdminFixture::ca_pem`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cloudsql_binder::gcp::{AdminApi, CapacityDiscovery, RetryPolicy, SQLADMIN_SCOPE};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_RSA_SHA256, RsaKeySize,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The service account the fixture's key file belongs to.
pub const SERVICE_ACCOUNT: &str = "cloudsql-binder@fixture-project.iam.gserviceaccount.com";

/// Google's message for an error status, as the Admin API words it.
pub fn google_message(status: u16) -> &'static str {
    match status {
        400 => "Invalid request: Invalid value for field 'instance'.",
        401 => {
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential."
        }
        403 => "The client is not authorized to make this request.",
        404 => "The Cloud SQL instance does not exist.",
        429 => {
            "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'sqladmin.googleapis.com' for consumer 'project_number:123456789'."
        }
        500 => "Internal error encountered.",
        503 => "The service is currently unavailable.",
        _ => "The fixture was told to fail.",
    }
}

/// Google's canonical status and legacy `errors[].reason` for an HTTP status.
fn google_status(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("INVALID_ARGUMENT", "invalid"),
        401 => ("UNAUTHENTICATED", "authError"),
        403 => ("PERMISSION_DENIED", "notAuthorized"),
        404 => ("NOT_FOUND", "instanceDoesNotExist"),
        429 => ("RESOURCE_EXHAUSTED", "rateLimitExceeded"),
        503 => ("UNAVAILABLE", "backendError"),
        _ => ("INTERNAL", "internalError"),
    }
}

/// Google's error answer for `status`.
fn google_error(status: u16) -> Response {
    let (canonical, reason) = google_status(status);
    let message = google_message(status);
    let body = json!({
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": canonical,
        }
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

/// A local stand-in for the Cloud SQL Admin API; stops when dropped.
pub struct SqlAdminFixture {
    endpoint: String,
    ca_pem: String,
    key_file: tempfile::NamedTempFile,
    state: Arc<Mutex<FixtureState>>,
    server: tokio::task::JoinHandle<()>,
}

struct FixtureState {
    /// `DatabaseInstance` JSON by (project, instance).
    instances: HashMap<(String, String), Value>,
    /// Statuses to answer the next requests with, one each.
    next_failures: VecDeque<u16>,
    /// A status to answer every request with, until `recover`.
    failing: Option<u16>,
    /// `instances.get` requests received, as `project/instance`.
    requests: Vec<String>,
    /// Who may call.
    token_check: TokenCheck,
}

impl SqlAdminFixture {
    /// Starts a fixture on 127.0.0.1 with a fresh CA, server certificate and
    /// service-account key. It knows no instances yet.
    pub async fn start() -> Self {
        let (ca_pem, tls) = tls_config();
        let sa_key = KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048)
            .expect("generating the service-account RSA key");
        let key_id = format!("{:016x}", rand_u64());
        let state = Arc::new(Mutex::new(FixtureState {
            instances: HashMap::new(),
            next_failures: VecDeque::new(),
            failing: None,
            requests: Vec::new(),
            token_check: TokenCheck {
                public_key: sa_key.public_key_raw().to_vec(),
                key_id: key_id.clone(),
            },
        }));

        let tcp = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let port = tcp.local_addr().expect("local address").port();
        let endpoint = format!("https://127.0.0.1:{port}");
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
        };
        let router = Router::new()
            .route(
                "/v1/projects/{project}/instances/{instance}",
                get(instances_get),
            )
            .fallback(|| async { google_error(404) })
            .with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });

        let key_file = write_key_file(&sa_key, &key_id, &endpoint);
        Self {
            endpoint,
            ca_pem,
            key_file,
            state,
            server,
        }
    }

    /// `https://127.0.0.1:PORT`, to pass as the Admin API endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The PEM of the CA that signed the fixture's certificate.
    pub fn ca_pem(&self) -> &[u8] {
        self.ca_pem.as_bytes()
    }

    /// The service-account key file the fixture accepts tokens from (usable
    /// as `GOOGLE_APPLICATION_CREDENTIALS`).
    pub fn key_file(&self) -> &Path {
        self.key_file.path()
    }

    /// A client of this fixture through the real `google-cloud-auth`
    /// service-account path, trusting the fixture's CA.
    pub fn api(&self) -> AdminApi {
        AdminApi::from_key_file(self.key_file(), self.endpoint(), Some(self.ca_pem()))
            .expect("building the Admin API client for the fixture")
    }

    /// Discovery through [`api`](Self::api), retrying quickly (3 attempts,
    /// 10 ms then 20 ms) so retry tests stay fast.
    pub fn discovery(&self) -> CapacityDiscovery {
        CapacityDiscovery::new(self.api()).with_retry(RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        })
    }

    /// Serves `connection_name` as a RUNNABLE instance of `database_version`
    /// on `tier` with these database flags (none: `databaseFlags` left out,
    /// as Google does).
    pub fn set_instance(
        &self,
        connection_name: &str,
        database_version: &str,
        tier: &str,
        flags: &[(&str, &str)],
    ) {
        let mut parts = connection_name.rsplitn(3, ':');
        let (Some(instance), Some(region), Some(project)) =
            (parts.next(), parts.next(), parts.next())
        else {
            panic!("{connection_name} is not PROJECT:REGION:INSTANCE");
        };
        let mut settings = json!({
            "kind": "sql#settings",
            "tier": tier,
            "edition": "ENTERPRISE",
            "availabilityType": "ZONAL",
            "dataDiskSizeGb": "10",
            "settingsVersion": "3",
        });
        if !flags.is_empty() {
            settings["databaseFlags"] = flags
                .iter()
                .map(|(name, value)| json!({"name": name, "value": value}))
                .collect();
        }
        let body = json!({
            "kind": "sql#instance",
            "state": "RUNNABLE",
            "databaseVersion": database_version,
            "settings": settings,
            "project": project,
            "region": region,
            "gceZone": format!("{region}-a"),
            "name": instance,
            "connectionName": connection_name,
            "backendType": "SECOND_GEN",
            "instanceType": "CLOUD_SQL_INSTANCE",
            "ipAddresses": [{"type": "PRIMARY", "ipAddress": "203.0.113.7"}],
            "selfLink": format!(
                "https://sqladmin.googleapis.com/v1/projects/{project}/instances/{instance}"
            ),
        });
        self.lock()
            .instances
            .insert((project.to_owned(), instance.to_owned()), body);
    }

    /// Answers the next `times` requests with `status` and Google's error
    /// JSON, then goes back to normal.
    pub fn fail_next(&self, status: u16, times: usize) {
        let mut state = self.lock();
        state
            .next_failures
            .extend(std::iter::repeat_n(status, times));
    }

    /// Answers every request with `status` until [`recover`](Self::recover).
    pub fn fail_always(&self, status: u16) {
        self.lock().failing = Some(status);
    }

    /// Stops failing.
    pub fn recover(&self) {
        let mut state = self.lock();
        state.failing = None;
        state.next_failures.clear();
    }

    /// How many `instances.get` requests arrived (answered or refused).
    pub fn requests(&self) -> usize {
        self.lock().requests.len()
    }

    /// The `project/instance` of every `instances.get` request, in order.
    pub fn requested(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> MutexGuard<'_, FixtureState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for SqlAdminFixture {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn instances_get(
    State(state): State<Arc<Mutex<FixtureState>>>,
    UrlPath((project, instance)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut state = state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    state.requests.push(format!("{project}/{instance}"));
    if let Err(why) = state.token_check.check(&headers) {
        eprintln!("sqladmin fixture: refusing the bearer token: {why}");
        return google_error(401);
    }
    if let Some(status) = state.next_failures.pop_front().or(state.failing) {
        return google_error(status);
    }
    match state.instances.get(&(project, instance)) {
        Some(body) => axum::Json(body.clone()).into_response(),
        None => google_error(404),
    }
}

/// Google's check of a self-signed service-account JWT.
struct TokenCheck {
    /// The service account's RSA public key (PKCS#1 DER).
    public_key: Vec<u8>,
    /// The key's `private_key_id`, expected as the JWT's `kid`.
    key_id: String,
}

impl TokenCheck {
    fn check(&self, headers: &HeaderMap) -> Result<(), String> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("no `Authorization: Bearer` header")?;
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a JWT (header.claims.signature)".into());
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| format!("bad base64url: {e}"))
        };
        let signature = decode(signature)?;
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            &self.public_key,
        )
        .verify(format!("{head}.{body}").as_bytes(), &signature)
        .map_err(|_| "the RS256 signature does not verify with the fixture's key")?;
        let head: Value = serde_json::from_slice(&decode(head)?).map_err(|e| e.to_string())?;
        let claims: Value = serde_json::from_slice(&decode(body)?).map_err(|e| e.to_string())?;
        if head["alg"] != "RS256" || head["kid"] != self.key_id.as_str() {
            return Err(format!("unexpected JWT header {head}"));
        }
        if claims["iss"] != SERVICE_ACCOUNT || claims["sub"] != SERVICE_ACCOUNT {
            return Err(format!("issued by someone else: {claims}"));
        }
        let scopes = claims["scope"].as_str().unwrap_or_default();
        if !scopes.split(' ').any(|s| s == SQLADMIN_SCOPE) {
            return Err(format!("scope {scopes:?} lacks {SQLADMIN_SCOPE}"));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        match claims["exp"].as_u64() {
            Some(exp) if exp > now => Ok(()),
            _ => Err(format!("expired or no `exp`: {claims}")),
        }
    }
}

/// A TCP listener that completes the TLS handshake before handing the
/// connection to axum. Handshakes that fail (a client that does not trust the
/// fixture) are dropped, as a real server's would be.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A fresh CA (its PEM) and a rustls server config with a leaf it signed for
/// 127.0.0.1 and localhost, on the aws-lc-rs provider.
fn tls_config() -> (String, rustls::ServerConfig) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sqladmin test fixture CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("self-signing the fixture CA");

    let leaf_key = KeyPair::generate().expect("server key");
    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server certificate parameters");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "sqladmin test fixture");
    let leaf = leaf_params
        .signed_by(&leaf_key, &*ca)
        .expect("signing the server certificate");

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), CertificateDer::clone(ca.der())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .expect("server certificate and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca.pem(), config)
}

/// Writes a service-account key file as `gcloud iam service-accounts keys
/// create` would, for `key`.
fn write_key_file(key: &KeyPair, key_id: &str, endpoint: &str) -> tempfile::NamedTempFile {
    let json = json!({
        "type": "service_account",
        "project_id": "fixture-project",
        "private_key_id": key_id,
        "private_key": key.serialize_pem(),
        "client_email": SERVICE_ACCOUNT,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": format!("{endpoint}/token"),
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    });
    let file = tempfile::Builder::new()
        .prefix("sqladmin-fixture-key-")
        .suffix(".json")
        .tempfile()
        .expect("creating the key file");
    std::fs::write(file.path(), json.to_string()).expect("writing the key file");
    file
}

/// Enough randomness for a key id.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(SystemTime::now())
}

//! [`Conflict`]: why an injection would overwrite something, and is refused.

use std::fmt;

use super::SOCKET_DIR;
use super::injection::BindingKey;

/// Something a binding would inject that the pod (or another binding on it)
/// already sets otherwise. Nothing is changed when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The binding whose injection is refused (of two bindings: the later in
    /// key order).
    pub binding: BindingKey,
    /// The app container concerned (`Some("")`: an unnamed container; `None`:
    /// the pod as a whole).
    pub container: Option<String>,
    /// What collides.
    pub kind: ConflictKind,
}

/// What an env var is set to by the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExistingEnv {
    /// A literal value.
    Value(String),
    /// `valueFrom` (a Secret, ConfigMap, field or resource reference).
    ValueFrom,
}

/// The kinds of [`Conflict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictKind {
    /// The container already sets the env var otherwise.
    UserEnv {
        /// The env name.
        name: String,
        /// The user's setting.
        existing: ExistingEnv,
        /// Our value.
        ours: String,
    },
    /// Two bindings set the same env var in the same container differently.
    BindingEnv {
        /// The env name.
        name: String,
        /// The other (earlier) binding.
        other: BindingKey,
        /// The other binding's value.
        other_value: String,
        /// Our value.
        ours: String,
    },
    /// The container already mounts a volume at `/cloudsql`.
    SocketDir {
        /// The user's volume mounted there.
        volume: String,
    },
    /// The binding's `spec.containers` names no container of the pod.
    NoSelectedContainer {
        /// `spec.containers`.
        wanted: Vec<String>,
        /// The app containers of the pod.
        present: Vec<String>,
    },
    /// The proxy's TCP port is a `containerPort` of the pod.
    UserPort {
        /// The port.
        port: u16,
    },
    /// Two bindings want their proxies on the same TCP port.
    BindingPort {
        /// The port.
        port: u16,
        /// The other (earlier) binding.
        other: BindingKey,
    },
    /// Two bindings run proxies for the same instance on the shared socket
    /// directory: both would create `/cloudsql/<connection name>`.
    SameSocket {
        /// The connection name.
        connection_name: String,
        /// The other (earlier) binding.
        other: BindingKey,
    },
    /// Proxy over TCP on a Cloud Run (Knative) template.
    TcpOnCloudRun,
    /// No free port is left for the proxy's health or admin server.
    NoFreePort,
}

fn container_label(container: &Option<String>) -> String {
    match container.as_deref() {
        Some("") => "the unnamed container".to_owned(),
        Some(name) => format!("container {name:?}"),
        None => "the pod".to_owned(),
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let binding = &self.binding;
        let container = container_label(&self.container);
        match &self.kind {
            ConflictKind::UserEnv {
                name,
                existing: ExistingEnv::Value(value),
                ours,
            } => write!(
                f,
                "{container} already sets {name}={value:?}; binding {binding} would set {ours:?}"
            ),
            ConflictKind::UserEnv {
                name,
                existing: ExistingEnv::ValueFrom,
                ours,
            } => write!(
                f,
                "{container} already sets {name} from valueFrom; binding {binding} would set {ours:?}"
            ),
            ConflictKind::BindingEnv {
                name,
                other,
                other_value,
                ours,
            } => write!(
                f,
                "{container}: binding {other} sets {name}={other_value:?}; binding {binding} would set {ours:?} (give one of them another env name in spec.env, or select other containers)"
            ),
            ConflictKind::SocketDir { volume } => write!(
                f,
                "{container} already mounts volume {volume:?} at {SOCKET_DIR}; binding {binding} needs {SOCKET_DIR} for the proxy's Unix socket (move that mount, or use spec.proxy.socket: TCP)"
            ),
            ConflictKind::NoSelectedContainer { wanted, present } => write!(
                f,
                "binding {binding} selects containers {wanted:?} (spec.containers), but the pod's containers are {present:?}"
            ),
            ConflictKind::UserPort { port } => write!(
                f,
                "{container} already uses port {port}; binding {binding} would run the proxy on 127.0.0.1:{port} (set another spec.proxy.port)"
            ),
            ConflictKind::BindingPort { port, other } => write!(
                f,
                "bindings {other} and {binding} both want their proxy on 127.0.0.1:{port}; set another spec.proxy.port on one of them"
            ),
            ConflictKind::SameSocket {
                connection_name,
                other,
            } => write!(
                f,
                "bindings {other} and {binding} both run a proxy for {connection_name} on the same socket directory {SOCKET_DIR}; bind the instance once per pod, or use spec.proxy.socket: TCP on one of them"
            ),
            ConflictKind::TcpOnCloudRun => write!(
                f,
                "binding {binding} uses spec.proxy.socket: TCP, which Cloud Run cannot provide (no sidecar; it only mounts Unix sockets under {SOCKET_DIR}); use socket: Unix or mode: Connector"
            ),
            ConflictKind::NoFreePort => write!(
                f,
                "binding {binding}: no free port is left in the pod for the proxy's health server"
            ),
        }
    }
}

impl std::error::Error for Conflict {}

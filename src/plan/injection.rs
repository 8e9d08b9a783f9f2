//! [`InjectionPlan`]: what one binding injects, independent of any pod.

use std::fmt;

use k8s_openapi::api::core::v1::ResourceRequirements;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::{
    CloudSqlBinding, CloudSqlInstance, Mode, Network, SidecarMode, Socket, WorkloadKind,
};

use super::pod::Platform;
use super::{DEFAULT_PROXY_IMAGE, SOCKET_DIR, proxy::default_proxy_resources};

/// What the API server of the target cluster supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetCapabilities {
    /// Init containers with `restartPolicy: Always` (native sidecars,
    /// Kubernetes 1.29+, GA in 1.33).
    pub native_sidecars: bool,
}

/// The per-pod pool granted to a binding: the proxy's `--max-connections` and
/// the app's `DB_POOL_MAX_CONNS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Connections per pod.
    pub per_pod: u32,
}

impl Grant {
    /// The grant a binding asks for (`spec.pool.maxPerPod`): what is injected
    /// until the budget allocates.
    pub fn requested(binding: &CloudSqlBinding) -> Grant {
        Grant {
            per_pod: u32::try_from(binding.spec.pool.max_per_pod).unwrap_or(0),
        }
    }
}

/// A binding's identity: `namespace/name`. Plans on one pod are ordered by it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BindingKey {
    /// The binding's namespace.
    pub namespace: String,
    /// The binding's name.
    pub name: String,
}

impl BindingKey {
    /// The key of a binding object; a missing namespace counts as `default`,
    /// as the API server would put it there.
    pub fn of(binding: &CloudSqlBinding) -> Result<BindingKey, PlanError> {
        let name = binding
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(PlanError::UnnamedBinding)?;
        let namespace = binding
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        Ok(BindingKey { namespace, name })
    }
}

impl fmt::Display for BindingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How the app reaches the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InjectionMode {
    /// Proxy sidecar listening on a Unix socket under `/cloudsql`.
    ProxyUnixSocket,
    /// Proxy sidecar listening on `127.0.0.1:<port>`.
    ProxyTcp,
    /// No sidecar: the app's language connector gets the configuration.
    Connector,
}

/// One injected environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvItem {
    /// Variable name.
    pub name: String,
    /// Literal value.
    pub value: String,
}

/// Where the proxy listens for the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Listener {
    /// `--unix-socket=/cloudsql`: the socket is `/cloudsql/<connection name>`.
    UnixSocket,
    /// `--port=<port>` on 127.0.0.1 (the proxy's default address).
    Tcp {
        /// The port.
        port: u16,
    },
}

/// The proxy sidecar of one binding, minus what depends on the pod (its name
/// and its health/admin ports, chosen so they collide with nothing).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxySidecar {
    /// Container image.
    pub image: String,
    /// An init container with `restartPolicy: Always` (true) or a regular
    /// container appended after the app containers (false).
    pub native: bool,
    /// Where the proxy listens.
    pub listener: Listener,
    /// `--max-connections`: the grant.
    pub max_connections: u32,
    /// `--auto-iam-authn`, `--private-ip` / `--psc`, in that order.
    pub connection_flags: Vec<String>,
    /// The instance connection name, the last argument.
    pub connection_name: String,
    /// Container resources.
    pub resources: ResourceRequirements,
}

/// The shared in-memory volume for Unix sockets, mounted at [`SOCKET_DIR`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SocketVolume {
    /// Mount path in the proxy and the app containers.
    pub mount_path: String,
}

/// Everything one binding injects into the pod templates it selects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InjectionPlan {
    binding: BindingKey,
    mode: InjectionMode,
    /// `spec.containers`: the app containers that get env (empty: all).
    containers: Vec<String>,
    env: Vec<EnvItem>,
    proxy: Option<ProxySidecar>,
    volume: Option<SocketVolume>,
    /// The connection name for `run.googleapis.com/cloudsql-instances` (proxy
    /// mode with a Unix socket; used only on Cloud Run / Knative templates).
    cloud_run_instance: Option<String>,
    grant: u32,
}

/// Why a binding cannot be turned into an injection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The binding object has no `metadata.name`.
    #[error("a CloudSqlBinding has no metadata.name; give it a name")]
    UnnamedBinding,
    /// The instance passed is not the one the binding refers to.
    #[error(
        "binding {binding} refers to CloudSqlInstance {wanted:?}, but was planned with {got:?}; pass the instance named in spec.instanceRef.name"
    )]
    WrongInstance {
        /// The binding.
        binding: BindingKey,
        /// `spec.instanceRef.name`.
        wanted: String,
        /// The instance given.
        got: String,
    },
    /// The instance has no connection name.
    #[error(
        "CloudSqlInstance {instance:?} has an empty spec.connectionName; set it to PROJECT:REGION:INSTANCE"
    )]
    NoConnectionName {
        /// The instance name.
        instance: String,
    },
    /// A pool of zero connections: `--max-connections=0` would mean unlimited.
    #[error(
        "binding {binding} was granted 0 connections per pod; the proxy would read --max-connections=0 as unlimited, so nothing is injected until the budget grants at least 1 (check spec.pool and the instance's capacity)"
    )]
    ZeroGrant {
        /// The binding.
        binding: BindingKey,
    },
    /// `spec.proxy.port` out of range.
    #[error("binding {binding}: spec.proxy.port {port} is not a TCP port (1-65535)")]
    InvalidPort {
        /// The binding.
        binding: BindingKey,
        /// The port given.
        port: i32,
    },
    /// Proxy over TCP selected for a Cloud Run / Knative service.
    #[error(
        "binding {binding} selects a Service.serving.knative.dev with spec.proxy.socket: TCP, which Cloud Run cannot provide (it runs no sidecar and mounts only Unix sockets under /cloudsql); use socket: Unix or mode: Connector"
    )]
    TcpOnCloudRun {
        /// The binding.
        binding: BindingKey,
    },
    /// Two of the binding's env names are the same.
    #[error(
        "binding {binding} uses the env name {name:?} for two different values; give them distinct names in spec.env"
    )]
    DuplicateEnvName {
        /// The binding.
        binding: BindingKey,
        /// The repeated name.
        name: String,
    },
}

impl InjectionPlan {
    /// Plans what `binding` injects, connecting to `instance`, with `grant`
    /// connections per pod, on a cluster with `caps`.
    pub fn new(
        binding: &CloudSqlBinding,
        instance: &CloudSqlInstance,
        grant: Grant,
        caps: TargetCapabilities,
    ) -> Result<InjectionPlan, PlanError> {
        let key = BindingKey::of(binding)?;
        let spec = &binding.spec;
        let instance_name = instance.metadata.name.clone().unwrap_or_default();
        if spec.instance_ref.name != instance_name {
            return Err(PlanError::WrongInstance {
                binding: key,
                wanted: spec.instance_ref.name.clone(),
                got: instance_name,
            });
        }
        let connection_name = instance.spec.connection_name.trim().to_owned();
        if connection_name.is_empty() {
            return Err(PlanError::NoConnectionName {
                instance: instance_name,
            });
        }
        if grant.per_pod == 0 {
            return Err(PlanError::ZeroGrant { binding: key });
        }
        let pool = grant.per_pod;
        let names = &spec.env;
        let iam = spec.database.iam_auth;
        let proxy_spec = spec.proxy.clone().unwrap_or_default();

        let mode = match (spec.mode, proxy_spec.socket) {
            (Mode::Connector, _) => InjectionMode::Connector,
            (Mode::Proxy, Socket::Unix) => InjectionMode::ProxyUnixSocket,
            (Mode::Proxy, Socket::Tcp) => InjectionMode::ProxyTcp,
        };

        let tcp_port = match proxy_spec.port {
            Some(port) => {
                u16::try_from(port)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or(PlanError::InvalidPort {
                        binding: key.clone(),
                        port,
                    })?
            }
            None => default_tcp_port(instance),
        };

        if mode == InjectionMode::ProxyTcp
            && spec
                .workloads
                .iter()
                .any(|w| w.kind == WorkloadKind::KnativeService)
        {
            return Err(PlanError::TcpOnCloudRun { binding: key });
        }

        let database = EnvItem {
            name: names.database.clone(),
            value: spec.database.name.clone(),
        };
        let user = EnvItem {
            name: names.user_name(iam).to_owned(),
            value: spec.database.user.clone(),
        };
        let pool_env = EnvItem {
            name: names.pool_max.clone(),
            value: pool.to_string(),
        };
        let env = match mode {
            InjectionMode::ProxyUnixSocket => vec![
                EnvItem {
                    name: names.unix_socket.clone(),
                    value: format!("{SOCKET_DIR}/{connection_name}"),
                },
                database,
                user,
                pool_env,
            ],
            InjectionMode::ProxyTcp => vec![
                EnvItem {
                    name: names.host.clone(),
                    value: "127.0.0.1".to_owned(),
                },
                EnvItem {
                    name: names.port.clone(),
                    value: tcp_port.to_string(),
                },
                database,
                user,
                pool_env,
            ],
            InjectionMode::Connector => {
                let mut env = vec![
                    EnvItem {
                        name: names.connection_name.clone(),
                        value: connection_name.clone(),
                    },
                    database,
                    user,
                ];
                if spec.network == Network::Private {
                    env.push(EnvItem {
                        name: names.private_ip.clone(),
                        value: "true".to_owned(),
                    });
                }
                env.push(pool_env);
                env
            }
        };
        for (i, item) in env.iter().enumerate() {
            if env[..i].iter().any(|earlier| earlier.name == item.name) {
                return Err(PlanError::DuplicateEnvName {
                    binding: key,
                    name: item.name.clone(),
                });
            }
        }

        let proxy = match mode {
            InjectionMode::Connector => None,
            InjectionMode::ProxyUnixSocket | InjectionMode::ProxyTcp => {
                let native = match proxy_spec.sidecar {
                    SidecarMode::Native => true,
                    SidecarMode::Container => false,
                    SidecarMode::Auto => caps.native_sidecars,
                };
                let mut connection_flags = Vec::new();
                if iam {
                    connection_flags.push("--auto-iam-authn".to_owned());
                }
                // `Network` is one value, so --private-ip and --psc (which the
                // proxy rejects together) can never both be set.
                match spec.network {
                    Network::Public => {}
                    Network::Private => connection_flags.push("--private-ip".to_owned()),
                    Network::Psc => connection_flags.push("--psc".to_owned()),
                }
                Some(ProxySidecar {
                    image: proxy_spec
                        .image
                        .clone()
                        .filter(|i| !i.trim().is_empty())
                        .unwrap_or_else(|| DEFAULT_PROXY_IMAGE.to_owned()),
                    native,
                    listener: if mode == InjectionMode::ProxyTcp {
                        Listener::Tcp { port: tcp_port }
                    } else {
                        Listener::UnixSocket
                    },
                    max_connections: pool,
                    connection_flags,
                    connection_name: connection_name.clone(),
                    resources: proxy_spec
                        .resources
                        .clone()
                        .unwrap_or_else(default_proxy_resources),
                })
            }
        };

        let unix = mode == InjectionMode::ProxyUnixSocket;
        Ok(InjectionPlan {
            binding: key,
            mode,
            containers: spec.containers.clone(),
            env,
            proxy,
            volume: unix.then(|| SocketVolume {
                mount_path: SOCKET_DIR.to_owned(),
            }),
            cloud_run_instance: unix.then_some(connection_name),
            grant: pool,
        })
    }

    /// The binding this plan is for.
    pub fn binding(&self) -> &BindingKey {
        &self.binding
    }

    /// How the app reaches the instance.
    pub fn mode(&self) -> InjectionMode {
        self.mode
    }

    /// The app containers that receive env (`spec.containers`; empty: all).
    pub fn containers(&self) -> &[String] {
        &self.containers
    }

    /// The env items, in injection order.
    pub fn env(&self) -> &[EnvItem] {
        &self.env
    }

    /// The proxy sidecar, in proxy mode.
    pub fn proxy(&self) -> Option<&ProxySidecar> {
        self.proxy.as_ref()
    }

    /// The socket volume, in proxy mode with a Unix socket.
    pub fn volume(&self) -> Option<&SocketVolume> {
        self.volume.as_ref()
    }

    /// The value merged into `run.googleapis.com/cloudsql-instances` on a
    /// Cloud Run (Knative) template.
    pub fn cloud_run_instance(&self) -> Option<&str> {
        self.cloud_run_instance.as_deref()
    }

    /// The granted per-pod pool.
    pub fn grant(&self) -> u32 {
        self.grant
    }

    /// A short hex digest of what this plan injects into a Kubernetes pod
    /// (first 10 hex digits of a SHA-256 over its canonical JSON form).
    pub fn config_hash(&self) -> String {
        short_hash(&[self.canonical_bytes(Platform::Kubernetes)])
    }

    /// The canonical serialization of what the plan injects on `platform`.
    /// On Cloud Run only the env and the instances annotation are injected,
    /// so proxy settings (image, resources, sidecar kind) are left out: a
    /// change to them must not stamp out a new revision.
    pub(crate) fn canonical_bytes(&self, platform: Platform) -> Vec<u8> {
        #[derive(Serialize)]
        struct CloudRunPart<'a> {
            binding: &'a BindingKey,
            mode: InjectionMode,
            containers: &'a [String],
            env: &'a [EnvItem],
            cloud_run_instance: Option<&'a str>,
        }
        // Serializing plain structs, strings and k8s-openapi types into JSON
        // cannot fail (every map key is a string).
        match platform {
            Platform::Kubernetes => serde_json::to_vec(self).unwrap_or_default(),
            Platform::CloudRun => serde_json::to_vec(&CloudRunPart {
                binding: &self.binding,
                mode: self.mode,
                containers: &self.containers,
                env: &self.env,
                cloud_run_instance: self.cloud_run_instance.as_deref(),
            })
            .unwrap_or_default(),
        }
    }
}

/// The default TCP port for the instance's engine: 5432 for PostgreSQL (and
/// when the engine is unknown), 3306 for MySQL, 1433 for SQL Server.
pub(crate) fn default_tcp_port(instance: &CloudSqlInstance) -> u16 {
    let version = instance
        .spec
        .database_version
        .as_deref()
        .or_else(|| {
            instance
                .status
                .as_ref()
                .and_then(|s| s.database_version.as_deref())
        })
        .unwrap_or_default();
    if version.starts_with("MYSQL") {
        3306
    } else if version.starts_with("SQLSERVER") {
        1433
    } else {
        5432
    }
}

/// First 10 hex digits of SHA-256 over the parts, each length-prefixed so
/// that different splits never hash alike.
pub(crate) fn short_hash(parts: &[Vec<u8>]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{binding, instance};

    fn caps() -> TargetCapabilities {
        TargetCapabilities {
            native_sidecars: true,
        }
    }

    #[test]
    fn unix_socket_env_points_at_the_socket_of_the_instance() {
        let plan = InjectionPlan::new(
            &binding("shop", "orders-api", ""),
            &instance(),
            Grant { per_pod: 7 },
            caps(),
        )
        .unwrap();
        let env: Vec<_> = plan
            .env()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                (
                    "INSTANCE_UNIX_SOCKET",
                    "/cloudsql/my-project:asia-northeast3:orders"
                ),
                ("DB_NAME", "orders"),
                ("DB_USER", "orders-app"),
                ("DB_POOL_MAX_CONNS", "7"),
            ]
        );
        assert_eq!(plan.mode(), InjectionMode::ProxyUnixSocket);
        assert!(plan.proxy().unwrap().native);
    }

    #[test]
    fn tcp_port_defaults_to_the_engine_port() {
        let mut inst = instance();
        inst.spec.database_version = Some("MYSQL_8_0".into());
        let b = binding("shop", "a", "mode: Proxy\nproxy: { socket: TCP }\n");
        let plan = InjectionPlan::new(&b, &inst, Grant { per_pod: 3 }, caps()).unwrap();
        assert_eq!(plan.proxy().unwrap().listener, Listener::Tcp { port: 3306 });
        assert!(
            plan.env()
                .iter()
                .any(|e| e.name == "DB_PORT" && e.value == "3306")
        );
        assert!(plan.volume().is_none());
    }

    #[test]
    fn connector_mode_injects_no_sidecar_and_says_private_ip() {
        let b = binding(
            "shop",
            "billing",
            "mode: Connector\nnetwork: Private\ndatabase: { name: orders, user: billing@p.iam, iamAuth: true }\n",
        );
        let plan = InjectionPlan::new(&b, &instance(), Grant { per_pod: 8 }, caps()).unwrap();
        assert!(plan.proxy().is_none());
        let names: Vec<_> = plan.env().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "INSTANCE_CONNECTION_NAME",
                "DB_NAME",
                "DB_IAM_USER",
                "PRIVATE_IP",
                "DB_POOL_MAX_CONNS"
            ]
        );
    }

    #[test]
    fn a_zero_grant_is_refused_because_the_proxy_reads_it_as_unlimited() {
        let err = InjectionPlan::new(
            &binding("shop", "a", ""),
            &instance(),
            Grant { per_pod: 0 },
            caps(),
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::ZeroGrant { .. }));
        assert!(err.to_string().contains("unlimited"));
    }

    #[test]
    fn proxy_over_tcp_on_cloud_run_is_refused() {
        let b = binding(
            "shop",
            "web",
            "proxy: { socket: TCP }\nworkloads: [{ kind: Service.serving.knative.dev, name: web }]\n",
        );
        let err = InjectionPlan::new(&b, &instance(), Grant { per_pod: 3 }, caps()).unwrap_err();
        assert!(matches!(err, PlanError::TcpOnCloudRun { .. }), "{err}");
    }

    #[test]
    fn a_plan_for_another_instance_is_refused() {
        let mut inst = instance();
        inst.metadata.name = Some("billing".into());
        let err = InjectionPlan::new(
            &binding("shop", "a", ""),
            &inst,
            Grant { per_pod: 3 },
            caps(),
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::WrongInstance { .. }));
    }

    #[test]
    fn the_same_env_name_twice_in_one_binding_is_refused() {
        let b = binding("shop", "a", "env: { database: X, poolMax: X }\n");
        let err = InjectionPlan::new(&b, &instance(), Grant { per_pod: 3 }, caps()).unwrap_err();
        assert!(matches!(err, PlanError::DuplicateEnvName { .. }));
    }

    #[test]
    fn the_hash_changes_with_the_grant_and_only_then() {
        let b = binding("shop", "a", "");
        let one = InjectionPlan::new(&b, &instance(), Grant { per_pod: 3 }, caps()).unwrap();
        let same = InjectionPlan::new(&b, &instance(), Grant { per_pod: 3 }, caps()).unwrap();
        let other = InjectionPlan::new(&b, &instance(), Grant { per_pod: 4 }, caps()).unwrap();
        assert_eq!(one.config_hash(), same.config_hash());
        assert_ne!(one.config_hash(), other.config_hash());
        assert_eq!(one.config_hash().len(), 10);
    }
}

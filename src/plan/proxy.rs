//! The Cloud SQL Auth Proxy container.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, HTTPGetAction, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::injection::{Listener, ProxySidecar};
use super::{PROXY_UID, SOCKET_DIR};

/// The ports of one proxy in one pod, chosen so they collide with no
/// `containerPort` of the pod and no other proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyPorts {
    /// `--http-port`: `/startup`, `/liveness`, `/readiness`.
    pub http: u16,
    /// `--admin-port` with `--quitquitquit`: only for a proxy in a regular
    /// container, which needs to be told to stop when a Job's app is done.
    pub admin: Option<u16>,
}

/// Resources of the proxy when `spec.proxy.resources` is not set (it replaces
/// these entirely when it is).
///
/// The proxy is a mostly idle TLS forwarder: it holds a certificate, refreshes
/// it hourly and copies bytes. Requests of 50m CPU and 64Mi memory schedule it
/// honestly without reserving a node's worth per pod; Google's operator
/// defaults to 1 CPU / 2Gi, a standing complaint in its issue tracker, which
/// multiplied by every replica wastes whole nodes. Memory is limited (256Mi)
/// because a leak or a burst of connections must not take the node's memory;
/// CPU is deliberately not limited: a CFS quota throttles exactly the short
/// bursts of TLS handshakes when many connections open at once (a rollout, a
/// pool refill), turning them into latency spikes and timeouts, while unused
/// CPU costs nothing.
pub fn default_proxy_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("50m".to_owned())),
            ("memory".to_owned(), Quantity("64Mi".to_owned())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("256Mi".to_owned()),
        )])),
        ..ResourceRequirements::default()
    }
}

impl ProxySidecar {
    /// The proxy's arguments, in a fixed order: listener, pool cap, health
    /// server, shutdown and logging, connection flags, admin server (regular
    /// containers only), and last the instance.
    pub fn args(&self, ports: ProxyPorts) -> Vec<String> {
        let mut args = vec![
            match self.listener {
                Listener::UnixSocket => format!("--unix-socket={SOCKET_DIR}"),
                // The proxy's default address is 127.0.0.1: not repeated.
                Listener::Tcp { port } => format!("--port={port}"),
            },
            format!("--max-connections={}", self.max_connections),
            "--health-check".to_owned(),
            // Probes come from the kubelet, through the pod IP.
            "--http-address=0.0.0.0".to_owned(),
            format!("--http-port={}", ports.http),
            "--exit-zero-on-sigterm".to_owned(),
            "--structured-logs".to_owned(),
        ];
        args.extend(self.connection_flags.iter().cloned());
        if let Some(admin) = ports.admin {
            args.push("--quitquitquit".to_owned());
            args.push(format!("--admin-port={admin}"));
        }
        args.push(self.connection_name.clone());
        args
    }

    /// The container named `name`, mounting `socket_volume` at `/cloudsql`
    /// when it listens on a Unix socket.
    ///
    /// Probes: a startup probe on `/startup` (for a native sidecar the kubelet
    /// waits for it before starting the app containers, so the app never sees
    /// a missing socket) and a liveness probe on `/liveness`. No readiness
    /// probe, on either kind of sidecar: the proxy's `/readiness` turns 503
    /// whenever `--max-connections` is reached (proxy 2.28), and a pool fully
    /// in use is a busy pod, not a broken one; taking it out of its Service
    /// then moves the load onto the others and cascades. Kubernetes does count
    /// a native sidecar's readiness towards the pod's, which is exactly why it
    /// is left to the app.
    pub fn container(
        &self,
        name: &str,
        socket_volume: Option<&str>,
        ports: ProxyPorts,
    ) -> Container {
        let http = i32::from(ports.http);
        let volume_mounts = match (self.listener, socket_volume) {
            (Listener::UnixSocket, Some(volume)) => Some(vec![VolumeMount {
                name: volume.to_owned(),
                mount_path: SOCKET_DIR.to_owned(),
                ..VolumeMount::default()
            }]),
            _ => None,
        };
        Container {
            name: name.to_owned(),
            image: Some(self.image.clone()),
            args: Some(self.args(ports)),
            restart_policy: self.native.then(|| "Always".to_owned()),
            // Up to a minute to start (certificates are fetched first); checked
            // every second so the app starts as soon as the proxy is up.
            startup_probe: Some(http_probe("/startup", http, 1, 5, 60)),
            // Restart after three failed checks 10s apart (~30s unresponsive).
            liveness_probe: Some(http_probe("/liveness", http, 10, 5, 3)),
            resources: Some(self.resources.clone()),
            // Passes Pod Security `restricted`.
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(PROXY_UID),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_owned()]),
                    ..Capabilities::default()
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts,
            ..Container::default()
        }
    }
}

fn http_probe(path: &str, port: i32, period: i32, timeout: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{binding, instance};
    use crate::plan::{Grant, InjectionPlan, TargetCapabilities};

    fn proxy(extra: &str, native: bool) -> ProxySidecar {
        let b = binding("shop", "orders-api", extra);
        InjectionPlan::new(
            &b,
            &instance(),
            Grant { per_pod: 6 },
            TargetCapabilities {
                native_sidecars: native,
            },
        )
        .unwrap()
        .proxy()
        .unwrap()
        .clone()
    }

    #[test]
    fn args_come_in_the_documented_order() {
        let p = proxy("", true);
        assert_eq!(
            p.args(ProxyPorts {
                http: 9801,
                admin: None
            }),
            [
                "--unix-socket=/cloudsql",
                "--max-connections=6",
                "--health-check",
                "--http-address=0.0.0.0",
                "--http-port=9801",
                "--exit-zero-on-sigterm",
                "--structured-logs",
                "my-project:asia-northeast3:orders",
            ]
        );
    }

    #[test]
    fn a_classic_container_with_iam_over_psc_can_be_told_to_quit() {
        let p = proxy(
            "network: PSC\nproxy: { socket: TCP, port: 6000, sidecar: Container }\ndatabase: { name: orders, user: u@p.iam, iamAuth: true }\n",
            true,
        );
        assert_eq!(
            p.args(ProxyPorts {
                http: 9801,
                admin: Some(9091)
            }),
            [
                "--port=6000",
                "--max-connections=6",
                "--health-check",
                "--http-address=0.0.0.0",
                "--http-port=9801",
                "--exit-zero-on-sigterm",
                "--structured-logs",
                "--auto-iam-authn",
                "--psc",
                "--quitquitquit",
                "--admin-port=9091",
                "my-project:asia-northeast3:orders",
            ]
        );
    }

    #[test]
    fn the_proxy_passes_pod_security_restricted() {
        let c = proxy("", true).container(
            "cloud-sql-proxy",
            Some("cloudsql"),
            ProxyPorts {
                http: 9801,
                admin: None,
            },
        );
        let sc = c.security_context.unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        assert!(c.readiness_probe.is_none());
    }

    #[test]
    fn default_resources_limit_memory_but_never_cpu() {
        let r = default_proxy_resources();
        assert!(r.limits.as_ref().unwrap().get("cpu").is_none());
        assert_eq!(r.limits.unwrap()["memory"], Quantity("256Mi".into()));
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("50m".into()));
    }

    #[test]
    fn configured_resources_replace_the_defaults_entirely() {
        let p = proxy("proxy: { resources: { requests: { cpu: 10m } } }\n", true);
        assert_eq!(p.resources.requests.as_ref().unwrap().len(), 1);
        assert!(p.resources.limits.is_none());
    }
}

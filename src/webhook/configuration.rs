//! The webhook configurations the operator applies (server-side apply, field
//! manager `cloudsql-binder`), with the `caBundle` of its own CA.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::ObjectMeta;

use super::{
    ALWAYS_EXCLUDED_NAMESPACES, Endpoint, INJECT_LABEL, MUTATE_PODS_PATH, TIMEOUT_SECONDS,
    VALIDATE_BINDINGS_PATH, VALIDATE_SCALE_PATH, WebhookOptions,
};

/// The label Kubernetes puts on every namespace, holding its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn client_config(options: &WebhookOptions, path: &str, ca_bundle: &[u8]) -> WebhookClientConfig {
    let ca_bundle = Some(ByteString(ca_bundle.to_vec()));
    match &options.endpoint {
        Endpoint::Url(url) => WebhookClientConfig {
            url: Some(format!("{}{path}", url.trim_end_matches('/'))),
            ca_bundle,
            service: None,
        },
        Endpoint::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(path.to_owned()),
                port: Some(*port),
            }),
            ca_bundle,
            url: None,
        },
    }
}

/// Namespaces the webhooks see: those the operator handles (all when none
/// is named), never kube-system nor the operator's own.
fn namespace_selector(options: &WebhookOptions) -> LabelSelector {
    let mut excluded: Vec<String> = ALWAYS_EXCLUDED_NAMESPACES
        .iter()
        .map(|s| (*s).to_owned())
        .chain(options.excluded_namespaces.iter().cloned())
        .collect();
    excluded.sort();
    excluded.dedup();
    let mut expressions = vec![LabelSelectorRequirement {
        key: NAMESPACE_NAME_LABEL.to_owned(),
        operator: "NotIn".to_owned(),
        values: Some(excluded),
    }];
    if !options.namespaces.is_empty() {
        let mut names = options.namespaces.clone();
        names.sort();
        names.dedup();
        expressions.push(LabelSelectorRequirement {
            key: NAMESPACE_NAME_LABEL.to_owned(),
            operator: "In".to_owned(),
            values: Some(names),
        });
    }
    LabelSelector {
        match_expressions: Some(expressions),
        match_labels: None,
    }
}

fn rule(operations: &[&str], group: &str, version: &str, resources: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        operations: Some(operations.iter().map(|s| (*s).to_owned()).collect()),
        api_groups: Some(vec![group.to_owned()]),
        api_versions: Some(vec![version.to_owned()]),
        resources: Some(resources.iter().map(|s| (*s).to_owned()).collect()),
        scope: Some("Namespaced".to_owned()),
    }
}

fn metadata(options: &WebhookOptions) -> ObjectMeta {
    ObjectMeta {
        name: Some(options.configuration_name.clone()),
        // Not `app.kubernetes.io/managed-by`: Helm owns that label on the
        // chart's copies of these configurations, and taking it would make
        // `helm upgrade` conflict and `helm uninstall` leave them behind.
        labels: Some(BTreeMap::from([(
            "cloudsql.dev/managed-by".to_owned(),
            "cloudsql-binder".to_owned(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The mutating configuration: Pods at creation. `failurePolicy: Ignore`
/// (a Pod is never blocked by the webhook being down; the miss is reported
/// by the controller), pods labelled `cloudsql.dev/inject: "false"` never
/// sent, called once per pod.
pub fn mutating_configuration(
    options: &WebhookOptions,
    ca_bundle: &[u8],
) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: metadata(options),
        webhooks: Some(vec![MutatingWebhook {
            name: "pods.cloudsql.dev".to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            client_config: client_config(options, MUTATE_PODS_PATH, ca_bundle),
            failure_policy: Some("Ignore".to_owned()),
            match_policy: Some("Equivalent".to_owned()),
            namespace_selector: Some(namespace_selector(options)),
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: INJECT_LABEL.to_owned(),
                    operator: "NotIn".to_owned(),
                    values: Some(vec!["false".to_owned()]),
                }]),
                match_labels: None,
            }),
            // Called once per pod. Reinvoked after later mutations, it would
            // give its env to sidecars other webhooks add, and take back what
            // the API server's own plugins added to our proxy (the service
            // account token mount), for a second call per pod.
            reinvocation_policy: Some("Never".to_owned()),
            rules: Some(vec![rule(&["CREATE"], "", "v1", &["pods"])]),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(TIMEOUT_SECONDS),
            match_conditions: None,
        }]),
    }
}

/// The validating configuration: bindings (`failurePolicy: Fail`: a
/// conflicting binding must not slip in; only creations and spec changes are
/// sent, so the controller's finalizer updates never depend on the webhook)
/// and scaling changes (warnings only, `failurePolicy: Ignore`).
pub fn validating_configuration(
    options: &WebhookOptions,
    ca_bundle: &[u8],
) -> ValidatingWebhookConfiguration {
    let webhook =
        |name: &str,
         path: &str,
         failure: &str,
         rules: Vec<RuleWithOperations>,
         match_conditions: Option<Vec<MatchCondition>>| ValidatingWebhook {
            name: name.to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            client_config: client_config(options, path, ca_bundle),
            failure_policy: Some(failure.to_owned()),
            match_policy: Some("Equivalent".to_owned()),
            namespace_selector: Some(namespace_selector(options)),
            object_selector: None,
            rules: Some(rules),
            side_effects: "None".to_owned(),
            timeout_seconds: Some(TIMEOUT_SECONDS),
            match_conditions,
        };
    ValidatingWebhookConfiguration {
        metadata: metadata(options),
        webhooks: Some(vec![
            webhook(
                "bindings.cloudsql.dev",
                VALIDATE_BINDINGS_PATH,
                // Ignore: the operator must never block a cluster. A binding
                // admitted while the webhook is down is still checked by the
                // controller, which reports `Conflict` / `NamespaceNotAllowed`.
                "Ignore",
                vec![rule(
                    &["CREATE", "UPDATE"],
                    crate::api::GROUP,
                    crate::api::VERSION,
                    &["cloudsqlbindings"],
                )],
                Some(vec![MatchCondition {
                    name: "spec-changed".to_owned(),
                    expression: "request.operation == 'CREATE' || object.spec != oldObject.spec"
                        .to_owned(),
                }]),
            ),
            webhook(
                "scale.cloudsql.dev",
                VALIDATE_SCALE_PATH,
                "Ignore",
                vec![
                    rule(
                        &["CREATE", "UPDATE"],
                        "autoscaling",
                        "v2",
                        &["horizontalpodautoscalers"],
                    ),
                    rule(
                        &["CREATE", "UPDATE"],
                        "apps",
                        "v1",
                        &["deployments", "statefulsets"],
                    ),
                    rule(
                        &["UPDATE"],
                        "apps",
                        "v1",
                        &["deployments/scale", "statefulsets/scale"],
                    ),
                ],
                None,
            ),
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{DEFAULT_CERT_VALIDITY, DEFAULT_SECRET_NAME};

    fn options(namespaces: &[&str]) -> WebhookOptions {
        WebhookOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            endpoint: Endpoint::Url("https://127.0.0.1:8443/".into()),
            configuration_name: "cloudsql-binder-test".into(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            excluded_namespaces: vec!["ops".into()],
            secret_namespace: "ops".into(),
            secret_name: DEFAULT_SECRET_NAME.into(),
            cert_validity: DEFAULT_CERT_VALIDITY,
            drain: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn pods_are_never_blocked_and_opted_out_pods_never_sent() {
        let config = mutating_configuration(&options(&[]), b"CA");
        let hook = &config.webhooks.as_ref().unwrap()[0];
        assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
        assert!(hook.timeout_seconds.unwrap() <= 5);
        assert_eq!(
            hook.client_config.url.as_deref(),
            Some("https://127.0.0.1:8443/mutate-pods")
        );
        let selector = serde_json::to_value(&hook.object_selector).unwrap();
        assert_eq!(selector["matchExpressions"][0]["key"], INJECT_LABEL);
        let ns = serde_json::to_value(&hook.namespace_selector).unwrap();
        assert_eq!(
            ns["matchExpressions"][0]["values"],
            serde_json::json!(["kube-system", "ops"])
        );
    }

    #[test]
    fn a_namespace_list_limits_every_webhook() {
        let config = validating_configuration(&options(&["shop"]), b"CA");
        for hook in config.webhooks.unwrap() {
            let ns = serde_json::to_value(&hook.namespace_selector).unwrap();
            assert_eq!(ns["matchExpressions"][1]["operator"], "In");
            assert_eq!(
                ns["matchExpressions"][1]["values"],
                serde_json::json!(["shop"])
            );
        }
    }
}

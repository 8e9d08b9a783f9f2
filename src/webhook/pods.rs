//! `/mutate-pods`: a Pod being created gets the injection of every binding
//! that selects it or one of its owners, with the current grant, as a JSON
//! patch.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use tracing::{debug, warn};

use super::review::{AdmissionContext, with_warnings};
use crate::api::WorkloadKind;
use crate::index::{Outcome, Stores};
use crate::plan::{ADMITTED_ANNOTATION, opted_out};
use crate::plan::{CONFIG_HASH_ANNOTATION, INJECTED_ANNOTATION};

/// The answer to a Pod CREATE: allowed always (a webhook that breaks pod
/// creation is worse than a pod without the proxy, which is reported), with
/// the injection as a patch and a warning per binding that could not inject.
pub(crate) fn mutate(request: &AdmissionRequest<Pod>, ctx: &AdmissionContext) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if request.operation != Operation::Create {
        return response;
    }
    let Some(pod) = &request.object else {
        return response;
    };
    let ns = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    if ns.is_empty() || !ctx.options.intercepts(&ns) || opted_out(pod.metadata.labels.as_ref()) {
        return response;
    }
    let Some(spec) = &pod.spec else {
        return response;
    };
    let mut meta = pod.metadata.clone();
    if meta.name.as_deref().is_none_or(str::is_empty) && !request.name.is_empty() {
        meta.name = Some(request.name.clone());
    }
    let owners = ctx.stores.pod_owners(&ns, &meta);
    let bindings = ctx.stores.bindings_in(&ns);
    let routes: Vec<_> = bindings
        .iter()
        .filter_map(|b| Stores::pod_route(b, &owners).map(|(owner, at)| (b, owner.kind, at)))
        .collect();
    if routes.is_empty() {
        return response;
    }
    // A pod of a Knative revision gets what its service's template gets (the
    // Cloud Run treatment); any other pod the Kubernetes one.
    let kind = if routes
        .iter()
        .any(|(_, kind, _)| *kind == WorkloadKind::KnativeService)
    {
        WorkloadKind::KnativeService
    } else {
        WorkloadKind::Pod
    };
    let desire = ctx.stores.resolve(
        &bindings,
        kind,
        |b| Stores::pod_route(b, &owners).map(|(_, at)| at),
        spec,
        meta.annotations.as_ref(),
        ctx.caps,
    );

    let mut warnings = Vec::new();
    for (key, outcome) in &desire.outcomes {
        match outcome {
            Outcome::Injected => {}
            Outcome::Conflict(message) | Outcome::PlanFailed(message) => warnings.push(format!(
                "cloudsql-binder: binding {key} is not injected into this pod: {message}"
            )),
        }
    }

    // Record which admission-routed bindings were handled, so a bound pod
    // without the record tells the controller the webhook was not called.
    // Written before the injection, so that the injection's own record of
    // what it created is the same on every pass.
    let handled: BTreeSet<&str> = routes
        .iter()
        .filter(|(b, _, at)| *at && desire.outcomes.contains_key(&crate::index::binding_key(b)))
        .filter_map(|(b, _, _)| b.metadata.name.as_deref())
        .collect();
    let mut after = pod.clone();
    let mut annotations = pod.metadata.annotations.clone();
    if !handled.is_empty() {
        annotations.get_or_insert_default().insert(
            ADMITTED_ANNOTATION.to_owned(),
            handled.into_iter().collect::<Vec<_>>().join(","),
        );
    }
    let mut new_spec = spec.clone();
    if let Err(conflicts) = desire
        .injection
        .apply_for(kind, &mut new_spec, &mut annotations)
    {
        // The trial application accepted exactly these plans: not expected.
        for conflict in conflicts {
            warnings.push(format!("cloudsql-binder: not injected: {conflict}"));
        }
        return with_warnings(response, warnings);
    }
    // A pod made from a template the controller injected already carries
    // this injection (same plans, same record of what is ours), with the
    // API server's defaults in our containers: it passes unchanged.
    let ours = |a: Option<&std::collections::BTreeMap<String, String>>| {
        [
            CONFIG_HASH_ANNOTATION,
            INJECTED_ANNOTATION,
            ADMITTED_ANNOTATION,
        ]
        .map(|key| a.and_then(|a| a.get(key)).cloned())
    };
    if !desire.injection.is_empty()
        && ours(annotations.as_ref()) == ours(pod.metadata.annotations.as_ref())
    {
        return with_warnings(response, warnings);
    }
    after.spec = Some(new_spec);
    after.metadata.annotations = annotations;

    let (Ok(before), Ok(after)) = (serde_json::to_value(pod), serde_json::to_value(&after)) else {
        return with_warnings(response, warnings);
    };
    let patch = json_patch::diff(&before, &after);
    if patch.0.is_empty() {
        return with_warnings(response, warnings);
    }
    debug!(namespace = %ns, pod = %meta.name.clone().or(meta.generate_name.clone()).unwrap_or_default(),
           operations = patch.0.len(), "injecting a pod");
    match response.clone().with_patch(patch) {
        Ok(patched) => with_warnings(patched, warnings),
        Err(err) => {
            warn!(error = %err, "cannot serialize the injection patch");
            with_warnings(response, warnings)
        }
    }
}

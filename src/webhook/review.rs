//! One AdmissionReview in, one out: the HTTP-independent heart of the
//! webhook, which the server calls with the request body and the property
//! tests call with anything at all.

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde::de::DeserializeOwned;

use super::{
    MAX_REVIEW_BYTES, MUTATE_PODS_PATH, VALIDATE_BINDINGS_PATH, VALIDATE_SCALE_PATH, WebhookOptions,
};
use crate::api::CloudSqlBinding;
use crate::error::Cause;
use crate::index::Stores;
use crate::plan::TargetCapabilities;

/// What the webhook reads to answer: the stores every replica keeps synced,
/// what the API server supports, and the options (namespaces intercepted).
#[derive(Clone)]
pub struct AdmissionContext {
    /// The synced stores.
    pub stores: Stores,
    /// What the API server supports (native sidecars).
    pub caps: TargetCapabilities,
    /// The webhook's options.
    pub options: WebhookOptions,
    /// Where answered requests are counted (none in unit tests).
    pub metrics: Option<std::sync::Arc<crate::telemetry::Metrics>>,
}

/// The webhooks served, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/mutate-pods`: inject Pods at creation.
    MutatePods,
    /// `/validate-bindings`: refuse bindings that conflict or whose namespace
    /// the instance does not allow.
    ValidateBindings,
    /// `/validate-scale`: warn when scaling would overcommit an instance.
    ValidateScale,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 3] = [
        Route::MutatePods,
        Route::ValidateBindings,
        Route::ValidateScale,
    ];

    /// The route's name in metrics: its path without the slash.
    pub fn name(self) -> &'static str {
        self.path().trim_start_matches('/')
    }

    /// The URL path of the route.
    pub fn path(self) -> &'static str {
        match self {
            Route::MutatePods => MUTATE_PODS_PATH,
            Route::ValidateBindings => VALIDATE_BINDINGS_PATH,
            Route::ValidateScale => VALIDATE_SCALE_PATH,
        }
    }
}

/// Why a request body is not an AdmissionReview we can answer (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The body is larger than [`MAX_REVIEW_BYTES`].
    #[error("the AdmissionReview is {size} bytes or more; the limit is {limit} bytes")]
    TooLarge {
        /// The size seen (at least).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not an AdmissionReview of the expected kind.
    #[error("the body is not an admission.k8s.io/v1 AdmissionReview for {route}: {reason}")]
    Malformed {
        /// The route's path.
        route: &'static str,
        /// What the parser said.
        reason: String,
        /// The parser's error.
        #[source]
        source: Cause,
    },
    /// The AdmissionReview holds no `request`.
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// What an answer did, for the `admission_requests` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed unchanged, no warning.
    Allowed,
    /// Allowed with a patch (a Pod injected).
    Patched,
    /// Allowed with warnings and no patch.
    Warned,
    /// Denied.
    Denied,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Patched => "patched",
            Outcome::Warned => "warned",
            Outcome::Denied => "denied",
        }
    }

    fn of(response: &AdmissionResponse) -> Outcome {
        if !response.allowed {
            Outcome::Denied
        } else if response.patch.is_some() {
            Outcome::Patched
        } else if response.warnings.as_ref().is_some_and(|w| !w.is_empty()) {
            Outcome::Warned
        } else {
            Outcome::Allowed
        }
    }
}

/// Answers one AdmissionReview (the request body) on `route`, returning the
/// response body. Never panics, whatever the input; a body that is not a
/// review (or too large) is an error for an HTTP 400. Webhook decisions (a
/// denied binding, say) are successful answers.
pub fn review(route: Route, body: &[u8], ctx: &AdmissionContext) -> Result<Vec<u8>, ReviewError> {
    answer(route, body, ctx).map(|(body, _)| body)
}

/// [`review`], with what the answer did.
pub fn answer(
    route: Route,
    body: &[u8],
    ctx: &AdmissionContext,
) -> Result<(Vec<u8>, Outcome), ReviewError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(ReviewError::TooLarge {
            size: body.len(),
            limit: MAX_REVIEW_BYTES,
        });
    }
    let response = match route {
        Route::MutatePods => {
            let request = request::<Pod>(route, body)?;
            super::pods::mutate(&request, ctx)
        }
        Route::ValidateBindings => {
            let request = request::<CloudSqlBinding>(route, body)?;
            super::bindings::validate(&request, ctx)
        }
        Route::ValidateScale => {
            let request = request::<DynamicObject>(route, body)?;
            super::scale::warn(&request, ctx)
        }
    };
    let outcome = Outcome::of(&response);
    // An AdmissionReview of plain strings, maps and a byte patch always
    // serializes; an empty answer would be an HTTP 500 by the server anyway.
    let body = serde_json::to_vec(&response.into_review()).map_err(|e| ReviewError::Malformed {
        route: route.path(),
        reason: e.to_string(),
        source: Cause::new(e),
    })?;
    Ok((body, outcome))
}

fn request<T>(route: Route, body: &[u8]) -> Result<AdmissionRequest<T>, ReviewError>
where
    T: kube::Resource + DeserializeOwned,
{
    let review: AdmissionReview<T> =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed {
            route: route.path(),
            reason: e.to_string(),
            source: Cause::new(e),
        })?;
    review.try_into().map_err(|_| ReviewError::NoRequest)
}

/// An allowing response with these warnings (none: no field).
pub(crate) fn with_warnings(
    mut response: AdmissionResponse,
    warnings: Vec<String>,
) -> AdmissionResponse {
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    response
}

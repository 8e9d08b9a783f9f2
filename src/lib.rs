//! cloudsql-binder: binds Kubernetes and Cloud Run workloads to Cloud SQL through
//! the Cloud SQL Auth Proxy or a language connector, and keeps every bound
//! workload's connection pools within the instance's `max_connections`.

// No unwrap() outside tests: external input must fail with a message.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod budget;
pub mod error;
pub mod gcp;
pub mod plan;
pub mod render;

/// The Kubernetes API version the crate is built against (the k8s-openapi
/// feature), which matches the control plane the tests run on.
pub const KUBERNETES_API_VERSION: &str = "1.34";
pub mod controller;
pub mod index;
pub mod leader;
pub mod telemetry;
pub mod webhook;
pub mod workload;

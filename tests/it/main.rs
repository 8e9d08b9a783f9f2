//! Integration tests against a real Kubernetes control plane (etcd,
//! kube-apiserver, kube-controller-manager built from the official Go modules).
//! Each test works in its own namespace.

mod support;

mod admission;
mod api;
mod budget;
mod chart;
mod controller;
mod convergence;
mod fixture_sqladmin;
mod foundation;
mod gcp;
mod leader;
mod render;

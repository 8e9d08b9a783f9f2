//! Leader election against the real API server: what it answers when the
//! Lease's namespace does not exist.

use std::time::Duration;

use cloudsql_binder::leader::{self, Error, LeaseConfig};

use crate::support;

#[tokio::test]
async fn a_missing_lease_namespace_fails_once_with_the_fix_instead_of_retrying() {
    let client = support::client().await;
    let config = LeaseConfig {
        namespace: "leader-no-such-namespace".into(),
        name: "cloudsql-binder".into(),
        identity: "it-leader".into(),
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        leader::run(client, config, std::future::pending(), |_ended| async {
            panic!("no replica may lead without its Lease");
        }),
    )
    .await
    .expect("run gives up at once instead of retrying");
    let error = match outcome {
        Err(error) => error,
        Ok(()) => panic!("run ended without an error"),
    };
    assert!(
        matches!(&error, Error::NamespaceMissing { namespace, .. } if namespace == "leader-no-such-namespace"),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("kubectl create namespace leader-no-such-namespace"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
}

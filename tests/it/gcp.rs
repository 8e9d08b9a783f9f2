//! The Cloud SQL Admin API client against the sqladmin test fixture (no
//! Kubernetes involved): discovery, capacity, Google's errors, retries, and
//! the last known answer surviving outages.

use std::time::Duration;

use cloudsql_binder::budget::{
    CapacityInputs, CapacityResolution, CapacitySource, DiscoveredInstance, resolve_capacity,
};
use cloudsql_binder::gcp::{AdminApi, GcpError, InstanceState, RetryPolicy};

use crate::fixture_sqladmin::{SqlAdminFixture, google_message};

const ORDERS: &str = "shop-prod:us-central1:orders";

fn resolved_max_connections(discovered: DiscoveredInstance) -> (u32, CapacitySource) {
    let inputs = CapacityInputs {
        discovered: Some(discovered),
        ..CapacityInputs::default()
    };
    match resolve_capacity(&inputs) {
        Ok(CapacityResolution::Known(capacity)) => (capacity.max_connections, capacity.source),
        other => panic!("expected a known capacity, got {other:?}"),
    }
}

fn expect_error<T: std::fmt::Debug>(result: Result<T, GcpError>) -> GcpError {
    match result {
        Err(error) => error,
        Ok(value) => panic!("expected an error, got {value:?}"),
    }
}

#[tokio::test]
async fn custom_postgres_tier_is_discovered_and_gives_100_connections() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "POSTGRES_16", "db-custom-1-3840", &[]);

    let instance = fixture
        .api()
        .get_instance(ORDERS)
        .await
        .expect("instances.get");

    assert_eq!(instance.connection_name, ORDERS);
    assert_eq!(instance.state, InstanceState::Runnable);
    assert_eq!(instance.region, "us-central1");
    assert_eq!(instance.edition.as_deref(), Some("ENTERPRISE"));
    assert_eq!(
        instance.discovered(),
        DiscoveredInstance {
            database_version: "POSTGRES_16".into(),
            tier: "db-custom-1-3840".into(),
            flags: vec![],
        }
    );
    assert_eq!(
        resolved_max_connections(instance.discovered()),
        (100, CapacitySource::AdminApiTier)
    );
    assert_eq!(fixture.requested(), ["shop-prod/orders"]);
}

#[tokio::test]
async fn max_connections_flag_wins_over_the_tier_default() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(
        ORDERS,
        "POSTGRES_16",
        "db-custom-1-3840",
        &[
            ("log_min_duration_statement", "500"),
            ("max_connections", "250"),
        ],
    );

    let discovery = fixture.discovery();
    let instance = discovery.refresh(ORDERS).await.expect("refresh");

    assert_eq!(
        resolved_max_connections(instance.discovered()),
        (250, CapacitySource::AdminApiFlag)
    );
    assert_eq!(discovery.discovered(ORDERS), Some(instance.discovered()));
}

#[tokio::test]
async fn permission_denied_is_permanent_and_carries_googles_message() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "POSTGRES_16", "db-custom-1-3840", &[]);
    fixture.fail_always(403);

    let error = expect_error(fixture.discovery().refresh(ORDERS).await);

    assert!(!error.is_retryable(), "{error}");
    assert_eq!(error.http_status(), Some(403));
    assert_eq!(error.message(), google_message(403));
    assert_eq!(error.reason(), "AdminAPIPermissionDenied");
    let text = error.to_string();
    for expected in [
        google_message(403),
        "cloudsql.instances.get",
        "roles/cloudsql.viewer",
        "project `shop-prod`",
        ORDERS,
    ] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }
    assert_eq!(fixture.requests(), 1, "a 403 must not be retried");
}

#[tokio::test]
async fn rate_limited_request_is_retried_and_succeeds() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "MYSQL_8_0", "db-g1-small", &[]);
    fixture.fail_next(429, 1);

    let instance = fixture
        .discovery()
        .refresh(ORDERS)
        .await
        .expect("refresh after one 429");

    assert_eq!(instance.database_version, "MYSQL_8_0");
    assert_eq!(
        resolved_max_connections(instance.discovered()),
        (1_000, CapacitySource::AdminApiTier)
    );
    assert_eq!(fixture.requests(), 2);
}

#[tokio::test]
async fn unknown_instance_tells_the_user_to_check_the_connection_name() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "POSTGRES_16", "db-custom-1-3840", &[]);

    let error = expect_error(
        fixture
            .discovery()
            .refresh("shop-prod:us-central1:ordres")
            .await,
    );

    assert!(!error.is_retryable(), "{error}");
    assert_eq!(error.http_status(), Some(404));
    assert_eq!(error.message(), google_message(404));
    assert_eq!(error.reason(), "InstanceNotFound");
    assert!(
        error.to_string().contains("check spec.connectionName"),
        "{error}"
    );
    assert!(
        error.to_string().contains("shop-prod:us-central1:ordres"),
        "{error}"
    );
    assert_eq!(fixture.requests(), 1, "a 404 must not be retried");
}

#[tokio::test]
async fn last_known_instance_survives_an_outage_and_fresh_answers_are_reused() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "POSTGRES_16", "db-custom-2-7680", &[]);
    let discovery = fixture.discovery();

    let first = discovery.refresh(ORDERS).await.expect("first refresh");
    assert_eq!(fixture.requests(), 1);

    // Fresh enough: no request.
    let reused = discovery
        .refresh_if_stale(ORDERS, Duration::from_secs(3_600))
        .await
        .expect("fresh answer");
    assert_eq!(reused, first);
    assert_eq!(fixture.requests(), 1);

    // Google fails: every attempt is spent, the last answer stays.
    fixture.fail_always(503);
    let error = expect_error(discovery.refresh(ORDERS).await);
    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.http_status(), Some(503));
    assert_eq!(error.message(), google_message(503));
    assert_eq!(fixture.requests(), 1 + 3, "three attempts");
    let seen = discovery.observation(ORDERS).expect("an observation");
    assert_eq!(seen.instance.as_ref(), Some(&first));
    assert_eq!(seen.last_error.as_ref(), Some(&error));
    assert_eq!(
        discovery.discovered(ORDERS).map(resolved_max_connections),
        Some((400, CapacitySource::AdminApiTier))
    );

    // After a failure the answer is not fresh any more: ask again.
    fixture.recover();
    fixture.set_instance(
        ORDERS,
        "POSTGRES_16",
        "db-custom-2-7680",
        &[("max_connections", "600")],
    );
    discovery
        .refresh_if_stale(ORDERS, Duration::from_secs(3_600))
        .await
        .expect("refresh after recovery");
    assert_eq!(fixture.requests(), 5);
    let seen = discovery.observation(ORDERS).expect("an observation");
    assert_eq!(seen.last_error, None);
    assert_eq!(
        discovery.discovered(ORDERS).map(resolved_max_connections),
        Some((600, CapacitySource::AdminApiFlag))
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_attempts_run_out() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "POSTGRES_16", "db-custom-1-3840", &[]);
    fixture.fail_next(500, 2);

    let instance = fixture
        .discovery()
        .refresh(ORDERS)
        .await
        .expect("third attempt succeeds");

    assert_eq!(instance.tier, "db-custom-1-3840");
    assert_eq!(fixture.requests(), 3);
}

#[tokio::test]
async fn domain_scoped_project_is_asked_as_one_project() {
    let fixture = SqlAdminFixture::start().await;
    let name = "example.com:shop:europe-west1:orders";
    fixture.set_instance(name, "SQLSERVER_2019_STANDARD", "db-custom-2-7680", &[]);

    let instance = fixture
        .api()
        .get_instance(name)
        .await
        .expect("instances.get");

    assert_eq!(fixture.requested(), ["example.com:shop/orders"]);
    assert_eq!(instance.connection_name, name);
    assert_eq!(
        resolved_max_connections(instance.discovered()),
        (32_767, CapacitySource::AdminApiTier)
    );
}

#[tokio::test]
async fn a_key_google_does_not_know_is_unauthenticated() {
    let google = SqlAdminFixture::start().await;
    let stranger = SqlAdminFixture::start().await;
    google.set_instance(ORDERS, "POSTGRES_16", "db-custom-1-3840", &[]);
    let api = AdminApi::from_key_file(
        stranger.key_file(),
        google.endpoint(),
        Some(google.ca_pem()),
    )
    .expect("client with the other fixture's key");

    let error = expect_error(api.get_instance(ORDERS).await);

    assert!(!error.is_retryable(), "{error}");
    assert_eq!(error.http_status(), Some(401));
    assert_eq!(error.message(), google_message(401));
    assert!(
        error.to_string().contains("GOOGLE_APPLICATION_CREDENTIALS"),
        "{error}"
    );
}

#[tokio::test]
async fn an_endpoint_whose_ca_is_not_trusted_is_unreachable_with_a_hint() {
    let fixture = SqlAdminFixture::start().await;
    fixture.set_instance(ORDERS, "POSTGRES_16", "db-custom-1-3840", &[]);
    let api = AdminApi::from_key_file(fixture.key_file(), fixture.endpoint(), None)
        .expect("client without the fixture's CA");
    let discovery =
        cloudsql_binder::gcp::CapacityDiscovery::new(api.clone()).with_retry(RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        });

    let error = expect_error(discovery.refresh(ORDERS).await);

    assert!(error.is_retryable(), "{error}");
    assert_eq!(error.http_status(), None);
    assert_eq!(error.reason(), "AdminAPIUnreachable");
    assert!(error.to_string().contains("--sqladmin-ca-file"), "{error}");
    assert_eq!(
        fixture.requests(),
        0,
        "the handshake fails before any request"
    );

    // Trusting the CA afterwards fixes it.
    let trusted = api.with_root_ca_pem(fixture.ca_pem()).expect("add the CA");
    trusted.get_instance(ORDERS).await.expect("instances.get");
    assert_eq!(fixture.requests(), 1);
}

#[tokio::test]
async fn malformed_connection_names_never_reach_the_api() {
    let fixture = SqlAdminFixture::start().await;

    let error = expect_error(fixture.discovery().refresh("orders").await);

    assert!(!error.is_retryable(), "{error}");
    assert_eq!(error.reason(), "InvalidConnectionName");
    assert_eq!(fixture.requests(), 0);
}

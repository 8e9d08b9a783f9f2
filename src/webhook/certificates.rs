//! The webhook's own CA and serving certificate (no cert-manager): created,
//! kept in a Secret, renewed at 2/3 of their validity, and trusted by the
//! webhook configurations' `caBundle`. The leader runs
//! [`run_certificate_manager`]; every replica serves what the Secret holds.
//!
//! The Secret (`kubernetes.io/tls`) holds:
//! - `tls.crt` / `tls.key`: the serving certificate, signed by the current CA;
//! - `ca-current.crt` / `ca-current.key`: the current CA;
//! - `ca-next.crt` / `ca-next.key`: the CA that signs the next serving
//!   certificate, trusted already;
//! - `ca.crt`: the `caBundle`: the previous CA (while certificates it signed
//!   may still be served), the current and the next.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::configuration::{mutating_configuration, validating_configuration};
use super::{Error, WebhookOptions};
use crate::api::FIELD_MANAGER;

const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_BUNDLE: &str = "ca.crt";
const CA_CURRENT_CRT: &str = "ca-current.crt";
const CA_CURRENT_KEY: &str = "ca-current.key";
const CA_NEXT_CRT: &str = "ca-next.crt";
const CA_NEXT_KEY: &str = "ca-next.key";

/// Annotation on the webhook configurations: a hash of what we applied, so
/// an unchanged configuration is not applied again.
const APPLIED_HASH_ANNOTATION: &str = "cloudsql.dev/applied-hash";

/// How far back certificates start, for clocks slightly behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The longest the manager sleeps between looks (it also repairs the
/// configurations and a deleted Secret).
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How long a brand-new CA is left to reach the API server before a
/// certificate it signed is served (only when an existing Secret was unusable).
const NEW_CA_SETTLE: Duration = Duration::from_secs(5);

/// When a serving certificate starts, ends and is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateTimes {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// When it is replaced: 2/3 into the validity the operator issues with.
    pub renew_at: SystemTime,
}

impl CertificateTimes {
    /// The times of a certificate valid until `not_after`, issued for
    /// `validity` (renewed with a third of it left).
    pub fn new(not_before: SystemTime, not_after: SystemTime, validity: Duration) -> Self {
        CertificateTimes {
            not_before,
            not_after,
            renew_at: not_after
                .checked_sub(validity / 3)
                .unwrap_or(not_before)
                .max(not_before),
        }
    }
}

/// A CA: its certificate and key (PEM) and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authority {
    cert_pem: String,
    key_pem: String,
    not_after: SystemTime,
}

/// Everything in the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Material {
    current: Authority,
    next: Authority,
    leaf_pem: String,
    leaf_key_pem: String,
    leaf_not_before: SystemTime,
    leaf_not_after: SystemTime,
    leaf_names: Vec<String>,
    /// PEM certificates of the caBundle.
    bundle: Vec<String>,
}

/// What the manager does with the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Nothing until `renew_at`.
    Keep { renew_at: SystemTime },
    /// No usable Secret: a fresh CA pair and certificate.
    Issue,
    /// Time to renew: the next CA becomes current and signs a new certificate.
    Rotate,
    /// The certificate names changed (another endpoint): a new certificate
    /// from the current CA.
    Reissue,
}

fn decide(
    now: SystemTime,
    material: Option<&Material>,
    names: &[String],
    validity: Duration,
) -> Decision {
    let Some(m) = material else {
        return Decision::Issue;
    };
    if m.current.not_after <= now || m.leaf_not_after <= now {
        return Decision::Issue;
    }
    let times = CertificateTimes::new(m.leaf_not_before, m.leaf_not_after, validity);
    if now >= times.renew_at {
        return Decision::Rotate;
    }
    let mut have = m.leaf_names.clone();
    let mut want = names.to_vec();
    have.sort();
    want.sort();
    if have != want {
        return Decision::Reissue;
    }
    Decision::Keep {
        renew_at: times.renew_at,
    }
}

fn offset(time: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(time)
}

fn cert_error(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::certificate(what, e)
}

/// A new CA valid from `now` for twice the serving validity: it is the next
/// CA for one period and the current one for the next.
fn new_authority(now: SystemTime, validity: Duration) -> Result<Authority, Error> {
    let key = KeyPair::generate().map_err(cert_error("generating a CA key"))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "cloudsql-binder webhook CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let not_after = now + validity * 2;
    params.not_before = offset(now - CLOCK_SKEW);
    params.not_after = offset(not_after);
    let cert = params
        .self_signed(&key)
        .map_err(cert_error("signing the CA"))?;
    Ok(Authority {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: truncate_to_seconds(not_after),
    })
}

/// X.509 times have whole seconds.
fn truncate_to_seconds(time: SystemTime) -> SystemTime {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A serving certificate for `names` signed by `ca`, valid for `validity`
/// (never beyond the CA).
fn issue_leaf(
    ca: &Authority,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<(String, String, SystemTime, SystemTime), Error> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(cert_error("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(cert_error("reading the CA certificate"))?;
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(cert_error("the certificate's names"))?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "cloudsql-binder webhook");
    params.distinguished_name = name;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let not_before = now - CLOCK_SKEW;
    let not_after = (now + validity).min(ca.not_after);
    params.not_before = offset(not_before);
    params.not_after = offset(not_after);
    let key = KeyPair::generate().map_err(cert_error("generating the serving key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(cert_error("signing the serving certificate"))?;
    Ok((
        cert.pem(),
        key.serialize_pem(),
        truncate_to_seconds(not_before),
        truncate_to_seconds(not_after),
    ))
}

/// The validity and names of the first certificate in `pem`.
fn inspect(pem: &str) -> Option<(SystemTime, SystemTime, Vec<String>)> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        u64::try_from(t.timestamp())
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    };
    let validity = cert.validity();
    let not_before = at(validity.not_before)?;
    let not_after = at(validity.not_after)?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push(dns.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Some((not_before, not_after, names))
}

fn authority_from(data: &BTreeMap<String, ByteString>, crt: &str, key: &str) -> Option<Authority> {
    let cert_pem = String::from_utf8(data.get(crt)?.0.clone()).ok()?;
    let key_pem = String::from_utf8(data.get(key)?.0.clone()).ok()?;
    let (_, not_after, _) = inspect(&cert_pem)?;
    Some(Authority {
        cert_pem,
        key_pem,
        not_after,
    })
}

/// The PEM blocks of a bundle, in order.
fn split_bundle(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .map(str::trim)
        .filter(|block| block.ends_with(END))
        .map(|block| format!("{block}\n"))
        .collect()
}

fn read(data: &BTreeMap<String, ByteString>) -> Option<Material> {
    let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
    let leaf_pem = text(TLS_CRT)?;
    let leaf_key_pem = text(TLS_KEY)?;
    let (leaf_not_before, leaf_not_after, leaf_names) = inspect(&leaf_pem)?;
    // The key must load: a Secret edited by hand is replaced, not served.
    super::tls::certified_key(leaf_pem.as_bytes(), leaf_key_pem.as_bytes()).ok()?;
    Some(Material {
        current: authority_from(data, CA_CURRENT_CRT, CA_CURRENT_KEY)?,
        next: authority_from(data, CA_NEXT_CRT, CA_NEXT_KEY)?,
        leaf_pem,
        leaf_key_pem,
        leaf_not_before,
        leaf_not_after,
        leaf_names,
        bundle: split_bundle(&text(CA_BUNDLE)?),
    })
}

fn to_data(m: &Material) -> BTreeMap<String, ByteString> {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    BTreeMap::from([
        (TLS_CRT.to_owned(), bytes(&m.leaf_pem)),
        (TLS_KEY.to_owned(), bytes(&m.leaf_key_pem)),
        (CA_BUNDLE.to_owned(), bytes(&m.bundle.concat())),
        (CA_CURRENT_CRT.to_owned(), bytes(&m.current.cert_pem)),
        (CA_CURRENT_KEY.to_owned(), bytes(&m.current.key_pem)),
        (CA_NEXT_CRT.to_owned(), bytes(&m.next.cert_pem)),
        (CA_NEXT_KEY.to_owned(), bytes(&m.next.key_pem)),
    ])
}

/// The certificates of `bundle` still valid at `now`, then `add`, without
/// repeats.
fn bundle_of(now: SystemTime, keep: &[String], add: &[&Authority]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let still_valid = keep
        .iter()
        .filter(|pem| inspect(pem).is_some_and(|(_, not_after, _)| not_after > now));
    for pem in still_valid
        .cloned()
        .chain(add.iter().map(|a| a.cert_pem.clone()))
    {
        if !out.contains(&pem) {
            out.push(pem);
        }
    }
    out
}

/// The Secret's new content for `decision`, and whether a CA not yet
/// trusted by the API server signs the served certificate (then the
/// configurations are applied first and given time to propagate).
fn next_material(
    decision: &Decision,
    old: Option<&Material>,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<(Material, bool), Error> {
    let leaf = |ca: &Authority| issue_leaf(ca, names, now, validity);
    let build = |current: Authority, next: Authority, bundle: Vec<String>| {
        let (leaf_pem, leaf_key_pem, leaf_not_before, leaf_not_after) = leaf(&current)?;
        Ok::<Material, Error>(Material {
            current,
            next,
            leaf_pem,
            leaf_key_pem,
            leaf_not_before,
            leaf_not_after,
            leaf_names: names.to_vec(),
            bundle,
        })
    };
    match (decision, old) {
        (Decision::Rotate, Some(old)) if old.next.not_after >= now + validity => {
            // The next CA has been in the bundle for a period: no wait.
            let current = old.next.clone();
            let next = new_authority(now, validity)?;
            let bundle = bundle_of(
                now,
                std::slice::from_ref(&old.current.cert_pem),
                &[&current, &next],
            );
            Ok((build(current, next, bundle)?, false))
        }
        (Decision::Reissue, Some(old)) if old.current.not_after >= now + validity / 3 => Ok((
            build(old.current.clone(), old.next.clone(), old.bundle.clone())?,
            false,
        )),
        _ => {
            let current = new_authority(now, validity)?;
            let next = new_authority(now, validity)?;
            let previous = old.map(|o| o.bundle.clone()).unwrap_or_default();
            let bundle = bundle_of(now, &previous, &[&current, &next]);
            Ok((build(current, next, bundle)?, old.is_some()))
        }
    }
}

/// Keeps the webhook's CA and serving certificate in the Secret and its
/// configurations' `caBundle` current, until `shutdown` resolves. The
/// leader's job: replicas only read the Secret. (Until leader election
/// wraps it, every replica may run it: writes are guarded by the Secret's
/// resourceVersion, so two managers never both rotate.)
pub async fn run_certificate_manager(
    client: Client,
    options: WebhookOptions,
    admission: &crate::index::AdmissionScope,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let names = options.endpoint.subject_alt_names()?;
    // While the configurations are ours to keep, pods of these namespaces
    // are expected to pass the webhook: the controller reports those that
    // did not.
    let _configured = admission.register({
        let options = options.clone();
        move |ns| options.intercepts(ns)
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let wait = match ensure(&client, &options, &names).await {
            Ok(wait) => wait,
            Err(err) => {
                warn!(error = %err, "webhook certificate manager: retrying in 5s");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// One look: issue or rotate when due, make sure the configurations trust
/// the bundle; returns how long until the next look.
async fn ensure(
    client: &Client,
    options: &WebhookOptions,
    names: &[String],
) -> Result<Duration, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.secret_namespace);
    let kube_error = |action: String| move |source| Error::Kube { action, source };
    let existing = secrets
        .get_opt(&options.secret_name)
        .await
        .map_err(kube_error(format!(
            "reading Secret {}/{}",
            options.secret_namespace, options.secret_name
        )))?;
    let material = existing
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(read);
    let now = SystemTime::now();
    let decision = decide(now, material.as_ref(), names, options.cert_validity);
    if let Decision::Keep { renew_at } = decision {
        if let Some(m) = &material {
            apply_configurations(client, options, &m.bundle.concat()).await?;
        }
        let until = renew_at.duration_since(now).unwrap_or_default();
        return Ok(until.clamp(Duration::from_millis(100), MAX_CHECK_INTERVAL));
    }
    let (new, untrusted) = next_material(
        &decision,
        material.as_ref(),
        names,
        now,
        options.cert_validity,
    )?;
    let bundle = new.bundle.concat();
    if untrusted {
        apply_configurations(client, options, &bundle).await?;
        tokio::time::sleep(NEW_CA_SETTLE).await;
    }
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(options.secret_name.clone()),
            namespace: Some(options.secret_namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "cloudsql-binder".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(to_data(&new)),
        ..Secret::default()
    };
    let params = PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    };
    let written = match &existing {
        Some(old) => {
            // Replace only what we read: another manager's newer Secret wins.
            secret.metadata.resource_version = old.metadata.resource_version.clone();
            secret.metadata.labels = old.metadata.labels.clone().or(secret.metadata.labels);
            secrets
                .replace(&options.secret_name, &params, &secret)
                .await
        }
        None => secrets.create(&params, &secret).await,
    };
    match written {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            return Ok(Duration::from_millis(100));
        }
        Err(source) => {
            return Err(Error::Kube {
                action: format!(
                    "writing Secret {}/{}",
                    options.secret_namespace, options.secret_name
                ),
                source,
            });
        }
    }
    apply_configurations(client, options, &bundle).await?;
    info!(
        decision = ?decision,
        not_after = %k8s_openapi::jiff::Timestamp::try_from(new.leaf_not_after)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        "webhook serving certificate issued"
    );
    Ok(Duration::from_millis(100))
}

fn applied_hash<T: Serialize>(object: &T) -> String {
    let bytes = serde_json::to_vec(object).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies both configurations (server-side apply, field manager
/// `cloudsql-binder`) when what is there is not what we would apply.
async fn apply_configurations(
    client: &Client,
    options: &WebhookOptions,
    bundle: &str,
) -> Result<(), Error> {
    apply_if_changed(
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        mutating_configuration(options, bundle.as_bytes()),
        |c| {
            c.webhooks
                .iter()
                .flatten()
                .map(|w| w.client_config.ca_bundle.clone())
                .collect()
        },
    )
    .await?;
    apply_if_changed(
        Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        validating_configuration(options, bundle.as_bytes()),
        |c| {
            c.webhooks
                .iter()
                .flatten()
                .map(|w| w.client_config.ca_bundle.clone())
                .collect()
        },
    )
    .await
}

async fn apply_if_changed<K>(
    api: Api<K>,
    mut desired: K,
    bundles: impl Fn(&K) -> Vec<Option<ByteString>>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let hash = applied_hash(&desired);
    let current = api.get_opt(&name).await.map_err(|source| Error::Kube {
        action: format!("reading {} {name}", K::kind(&())),
        source,
    })?;
    let unchanged = current.as_ref().is_some_and(|c| {
        c.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(APPLIED_HASH_ANNOTATION))
            == Some(&hash)
            && bundles(c) == bundles(&desired)
    });
    if unchanged {
        return Ok(());
    }
    desired
        .meta_mut()
        .annotations
        .get_or_insert_default()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash);
    let mut value = serde_json::to_value(&desired).unwrap_or_default();
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .map_err(|source| Error::Kube {
        action: format!("applying {} {name}", K::kind(&())),
        source,
    })?;
    info!(kind = %K::kind(&()), name = %name, "applied the webhook configuration");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Duration = Duration::from_secs(3_600);

    fn names() -> Vec<String> {
        vec!["127.0.0.1".to_owned()]
    }

    fn fresh(now: SystemTime) -> Material {
        next_material(&Decision::Issue, None, &names(), now, V)
            .unwrap()
            .0
    }

    #[test]
    fn a_missing_secret_gets_two_cas_and_a_certificate_of_the_current_one() {
        let now = SystemTime::now();
        let m = fresh(now);
        assert_eq!(m.bundle.len(), 2);
        assert_eq!(m.leaf_names, names());
        let (_, not_after, sans) = inspect(&m.leaf_pem).unwrap();
        assert_eq!(sans, names());
        assert!(not_after <= now + V && not_after + Duration::from_secs(2) >= now + V);
        // What we wrote reads back the same.
        assert_eq!(read(&to_data(&m)), Some(m.clone()));
        assert!(matches!(
            decide(now, Some(&m), &names(), V),
            Decision::Keep { .. }
        ));
    }

    #[test]
    fn renewal_comes_at_two_thirds_and_promotes_the_trusted_next_ca() {
        let now = SystemTime::now();
        let m = fresh(now);
        let Decision::Keep { renew_at } = decide(now, Some(&m), &names(), V) else {
            panic!("a fresh certificate is kept");
        };
        let two_thirds = now + V * 2 / 3;
        assert!(renew_at.duration_since(two_thirds).unwrap_or_default() < Duration::from_secs(2));
        assert!(two_thirds.duration_since(renew_at).unwrap_or_default() < Duration::from_secs(2));

        let later = renew_at + Duration::from_secs(1);
        assert_eq!(decide(later, Some(&m), &names(), V), Decision::Rotate);
        let (rotated, untrusted) =
            next_material(&Decision::Rotate, Some(&m), &names(), later, V).unwrap();
        assert!(!untrusted, "the new certificate's CA was trusted already");
        assert_eq!(rotated.current, m.next);
        // The old bundle trusts the CA of the new certificate...
        assert!(m.bundle.contains(&rotated.current.cert_pem));
        // ...and the new bundle still trusts the CA of the old one.
        assert!(rotated.bundle.contains(&m.current.cert_pem));
        assert!(rotated.bundle.contains(&rotated.next.cert_pem));
        assert_eq!(rotated.bundle.len(), 3);
    }

    #[test]
    fn new_names_reissue_from_the_same_ca() {
        let now = SystemTime::now();
        let m = fresh(now);
        let other = vec!["cloudsql-binder.ops.svc".to_owned()];
        assert_eq!(decide(now, Some(&m), &other, V), Decision::Reissue);
        let (reissued, untrusted) =
            next_material(&Decision::Reissue, Some(&m), &other, now, V).unwrap();
        assert!(!untrusted);
        assert_eq!(reissued.current, m.current);
        assert_eq!(reissued.bundle, m.bundle);
        assert_eq!(inspect(&reissued.leaf_pem).unwrap().2, other);
    }

    #[test]
    fn a_broken_secret_is_replaced_keeping_the_old_trust() {
        let now = SystemTime::now();
        let m = fresh(now);
        let mut data = to_data(&m);
        data.insert(TLS_KEY.to_owned(), ByteString(b"garbage".to_vec()));
        assert_eq!(read(&data), None);
        let expired = now + V * 3;
        assert_eq!(decide(expired, Some(&m), &names(), V), Decision::Issue);
        let (replaced, untrusted) =
            next_material(&Decision::Issue, Some(&m), &names(), now, V).unwrap();
        assert!(untrusted, "a fresh CA needs time to reach the API server");
        assert_eq!(replaced.bundle.len(), 4);
    }

    #[test]
    fn the_served_certificate_loads_into_rustls() {
        let m = fresh(SystemTime::now());
        assert!(
            super::super::tls::certified_key(m.leaf_pem.as_bytes(), m.leaf_key_pem.as_bytes())
                .is_ok()
        );
    }
}

//! `PROJECT:REGION:INSTANCE`, the name the Auth Proxy and the Admin API share.

use std::fmt;
use std::str::FromStr;

use super::GcpError;

/// A Cloud SQL instance connection name, `PROJECT:REGION:INSTANCE`.
///
/// A legacy domain-scoped project keeps its domain:
/// `example.com:proj:us-central1:db` is project `example.com:proj`, region
/// `us-central1`, instance `db`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionName {
    /// The project id, with its domain prefix if it has one.
    pub project: String,
    /// The region, for example `us-central1`.
    pub region: String,
    /// The instance name (without the project).
    pub instance: String,
}

impl ConnectionName {
    /// Parses `PROJECT:REGION:INSTANCE`. The parts are split from the right,
    /// so only the project may hold a colon (its domain prefix). Parts must be
    /// non-empty and free of characters that cannot appear in a Cloud SQL
    /// name (whitespace, `/`, `?`, `#`, `%`).
    pub fn parse(connection_name: &str) -> Result<Self, GcpError> {
        let invalid = |reason: &'static str| GcpError::InvalidConnectionName {
            connection_name: connection_name.to_owned(),
            reason,
        };
        if connection_name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '%'))
        {
            return Err(invalid(
                "it holds whitespace or one of / ? # %, which no Cloud SQL name has",
            ));
        }
        let mut parts = connection_name.rsplitn(3, ':');
        let (Some(instance), Some(region), Some(project)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("it has fewer than three colon-separated parts"));
        };
        if instance.is_empty() || region.is_empty() || project.is_empty() {
            return Err(invalid("one of its parts is empty"));
        }
        if let Some((domain, id)) = project.split_once(':')
            && (domain.is_empty() || id.is_empty() || id.contains(':'))
        {
            return Err(invalid(
                "the project has more than one colon; only a domain prefix (example.com:project) may add one",
            ));
        }
        Ok(Self {
            project: project.to_owned(),
            region: region.to_owned(),
            instance: instance.to_owned(),
        })
    }
}

impl FromStr for ConnectionName {
    type Err = GcpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ConnectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.project, self.region, self.instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(name: &str) -> ConnectionName {
        match ConnectionName::parse(name) {
            Ok(parsed) => parsed,
            Err(error) => panic!("{name}: {error}"),
        }
    }

    #[test]
    fn plain_connection_names_have_three_parts() {
        let name = parsed("my-project:us-central1:orders");
        assert_eq!(name.project, "my-project");
        assert_eq!(name.region, "us-central1");
        assert_eq!(name.instance, "orders");
        assert_eq!(name.to_string(), "my-project:us-central1:orders");
    }

    #[test]
    fn domain_scoped_projects_keep_their_domain() {
        let name = parsed("example.com:proj:europe-west1:db");
        assert_eq!(name.project, "example.com:proj");
        assert_eq!(name.region, "europe-west1");
        assert_eq!(name.instance, "db");
        assert_eq!(name.to_string(), "example.com:proj:europe-west1:db");
    }

    #[test]
    fn malformed_connection_names_are_refused_with_the_fix() {
        for bad in [
            "",
            "orders",
            "proj:orders",
            "proj::orders",
            ":us-central1:orders",
            "proj:us-central1:",
            "a:b:proj:us-central1:orders",
            ":proj:us-central1:orders",
            "proj:us-central1:orders?port=5432",
            "proj:us-central1:ord/ers",
            "proj:us-central1:orders ",
        ] {
            let error = match ConnectionName::parse(bad) {
                Err(error) => error,
                Ok(name) => panic!("{bad:?} parsed as {name:?}"),
            };
            assert!(!error.is_retryable(), "{error}");
            assert!(error.to_string().contains("spec.connectionName"), "{error}");
        }
    }
}

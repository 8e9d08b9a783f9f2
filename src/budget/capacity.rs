//! How many connections a Cloud SQL instance accepts, and where that number
//! came from.
//!
//! Precedence, first answer wins:
//! 1. `spec.capacity.maxConnections` (an explicit override),
//! 2. the instance's own flag (`max_connections`, or `user connections` on
//!    SQL Server) as reported by the Cloud SQL Admin API,
//! 3. the default for the tier the Admin API reports, from the built-in tier
//!    table ([`tier_default`]),
//! 4. the default for `spec.capacity.tier`, from the same table,
//! 5. unknown, with an [`UnknownCapacity`] saying why.

use std::fmt;

use serde::{Deserialize, Serialize};

/// SQL Server's connection limit when `user connections` is 0 or absent.
pub const SQLSERVER_DEFAULT_USER_CONNECTIONS: u32 = 32_767;

/// A Cloud SQL database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Engine {
    /// PostgreSQL (`POSTGRES_*`).
    Postgres,
    /// MySQL (`MYSQL_*`).
    MySql,
    /// SQL Server (`SQLSERVER_*`).
    SqlServer,
}

impl Engine {
    /// The engine of a Cloud SQL `databaseVersion` such as `POSTGRES_16`,
    /// `MYSQL_8_0` or `SQLSERVER_2019_STANDARD`; `None` for anything else.
    pub fn from_database_version(database_version: &str) -> Option<Self> {
        let family = database_version.trim().split('_').next()?;
        if family.eq_ignore_ascii_case("POSTGRES") {
            Some(Self::Postgres)
        } else if family.eq_ignore_ascii_case("MYSQL") {
            Some(Self::MySql)
        } else if family.eq_ignore_ascii_case("SQLSERVER") {
            Some(Self::SqlServer)
        } else {
            None
        }
    }

    /// The database flag that sets the connection limit on this engine.
    pub fn max_connections_flag(self) -> &'static str {
        match self {
            Self::Postgres | Self::MySql => "max_connections",
            Self::SqlServer => "user connections",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "PostgreSQL",
            Self::MySql => "MySQL",
            Self::SqlServer => "SQL Server",
        })
    }
}

/// MiB of memory of `db-f1-micro` (0.6 GiB).
const F1_MICRO_MIB: u32 = 614;
/// MiB of memory of `db-g1-small` (1.7 GiB).
const G1_SMALL_MIB: u32 = 1_741;
/// MiB of memory per vCPU of `db-n1-standard-N` (3.75 GiB).
const N1_STANDARD_MIB_PER_VCPU: u32 = 3_840;
/// MiB of memory per vCPU of `db-n1-highmem-N` (6.5 GiB).
const N1_HIGHMEM_MIB_PER_VCPU: u32 = 6_656;

/// A Cloud SQL machine tier whose memory is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// `db-f1-micro`: shared core, 0.6 GiB.
    F1Micro,
    /// `db-g1-small`: shared core, 1.7 GiB.
    G1Small,
    /// A dedicated-core tier: `db-custom-<vCPU>-<MiB>`, `db-n1-standard-N`
    /// or `db-n1-highmem-N`.
    Dedicated {
        /// Number of vCPUs.
        vcpus: u32,
        /// Memory in MiB.
        memory_mib: u32,
    },
}

impl Tier {
    /// Parses a tier name. Tiers whose memory cannot be told from the name
    /// (for example Enterprise Plus `db-perf-optimized-N-8`) give `None`.
    pub fn parse(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "db-f1-micro" => return Some(Self::F1Micro),
            "db-g1-small" => return Some(Self::G1Small),
            _ => {}
        }
        if let Some(rest) = name.strip_prefix("db-custom-") {
            let (vcpus, memory_mib) = rest.split_once('-')?;
            return Some(Self::Dedicated {
                vcpus: parse_positive(vcpus)?,
                memory_mib: parse_positive(memory_mib)?,
            });
        }
        let per_vcpu = [
            ("db-n1-standard-", N1_STANDARD_MIB_PER_VCPU),
            ("db-n1-highmem-", N1_HIGHMEM_MIB_PER_VCPU),
        ];
        per_vcpu.iter().find_map(|(prefix, mib_per_vcpu)| {
            let vcpus = parse_positive(name.strip_prefix(prefix)?)?;
            Some(Self::Dedicated {
                vcpus,
                memory_mib: vcpus.checked_mul(*mib_per_vcpu)?,
            })
        })
    }

    /// Memory of the tier in MiB.
    pub fn memory_mib(&self) -> u32 {
        match self {
            Self::F1Micro => F1_MICRO_MIB,
            Self::G1Small => G1_SMALL_MIB,
            Self::Dedicated { memory_mib, .. } => *memory_mib,
        }
    }
}

/// A decimal number of at least 1, digits only (no sign, no spaces).
fn parse_positive(digits: &str) -> Option<u32> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|n| *n > 0)
}

/// Which tiers a row of [`TIER_DEFAULTS`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TierMatch {
    /// `db-f1-micro`.
    F1Micro,
    /// `db-g1-small`.
    G1Small,
    /// Any tier with less memory than this many MiB.
    MemoryBelowMib(u32),
    /// Any tier.
    Any,
}

impl TierMatch {
    fn matches(self, tier: Tier) -> bool {
        match self {
            Self::F1Micro => tier == Tier::F1Micro,
            Self::G1Small => tier == Tier::G1Small,
            Self::MemoryBelowMib(limit) => tier.memory_mib() < limit,
            Self::Any => true,
        }
    }
}

/// One row of the default `max_connections` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TierDefault {
    engine: Engine,
    tier: TierMatch,
    max_connections: u32,
}

const fn row(engine: Engine, tier: TierMatch, max_connections: u32) -> TierDefault {
    TierDefault {
        engine,
        tier,
        max_connections,
    }
}

/// Default `max_connections` by engine and tier; the first matching row wins.
///
/// The single place these numbers live. Only the PostgreSQL `db-f1-micro` row
/// (25) is confirmed by Google's own documentation; every other row is
/// *unverified* (collected from secondary sources). Users whose instance
/// differs set `spec.capacity.maxConnections`, which wins over this table, and
/// an instance's explicit `max_connections` flag from the Admin API wins too.
const TIER_DEFAULTS: &[TierDefault] = {
    use Engine::{MySql, Postgres, SqlServer};
    use TierMatch::{Any, F1Micro, G1Small, MemoryBelowMib};
    &[
        row(MySql, F1Micro, 250),
        row(MySql, G1Small, 1_000),
        row(MySql, Any, 4_000),
        // Confirmed by Google's documentation.
        row(Postgres, F1Micro, 25),
        // Unverified from here on.
        row(Postgres, G1Small, 50),
        row(Postgres, MemoryBelowMib(3_840), 50), // < 3.75 GiB
        row(Postgres, MemoryBelowMib(6_144), 100), // < 6 GiB
        row(Postgres, MemoryBelowMib(7_680), 200), // < 7.5 GiB
        row(Postgres, MemoryBelowMib(15_360), 400), // < 15 GiB
        row(Postgres, MemoryBelowMib(30_720), 500), // < 30 GiB
        row(Postgres, MemoryBelowMib(61_440), 600), // < 60 GiB
        row(Postgres, MemoryBelowMib(122_880), 800), // < 120 GiB
        row(Postgres, Any, 1_000),
        // `user connections` = 0, the default, means 32,767.
        row(SqlServer, Any, SQLSERVER_DEFAULT_USER_CONNECTIONS),
    ]
};

/// The default `max_connections` of `engine` on the tier named `tier`, from
/// the built-in table; `None` when the tier is not recognised.
///
/// An unrecognised tier gives no default on any engine, even where the table
/// would say "any tier": a misspelt `db-f1-mikro` must not silently become
/// MySQL's 4,000.
pub fn tier_default(engine: Engine, tier: &str) -> Option<u32> {
    let tier = Tier::parse(tier)?;
    TIER_DEFAULTS
        .iter()
        .find(|row| row.engine == engine && row.tier.matches(tier))
        .map(|row| row.max_connections)
}

/// The connection limit set by a database flag: `max_connections` on
/// PostgreSQL and MySQL, `user connections` on SQL Server (where 0 means
/// 32,767). `None` when the flag is not set; an error when its value is not a
/// whole number. If the flag appears more than once the last one counts.
pub fn max_connections_from_flags(
    engine: Engine,
    flags: &[(String, String)],
) -> Option<Result<u32, CapacityError>> {
    let flag = engine.max_connections_flag();
    let (_, value) = flags
        .iter()
        .rev()
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(flag))?;
    let trimmed = value.trim();
    let parsed = if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        trimmed.parse::<u32>().ok()
    } else {
        None
    };
    Some(match parsed {
        Some(0) if engine == Engine::SqlServer => Ok(SQLSERVER_DEFAULT_USER_CONNECTIONS),
        Some(n) => Ok(n),
        None => Err(CapacityError::InvalidFlag {
            flag: flag.to_owned(),
            value: value.clone(),
        }),
    })
}

/// Errors while working out an instance's capacity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// A connection-limit flag on the instance is not a whole number.
    #[error(
        "the instance's database flag `{flag}` is {value:?}, which is not a whole number of connections; fix the flag on the Cloud SQL instance, or set spec.capacity.maxConnections to override it"
    )]
    InvalidFlag {
        /// The flag's name.
        flag: String,
        /// The flag's value as the Admin API reported it.
        value: String,
    },
}

/// Where an instance's `max_connections` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CapacitySource {
    /// `spec.capacity.maxConnections`.
    #[serde(rename = "Spec")]
    Spec,
    /// The connection-limit flag the Admin API reported.
    #[serde(rename = "AdminAPIFlag")]
    AdminApiFlag,
    /// The tier table, for the tier the Admin API reported.
    #[serde(rename = "AdminAPITier")]
    AdminApiTier,
    /// The tier table, for `spec.capacity.tier`.
    #[serde(rename = "TierTable")]
    TierTable,
}

impl CapacitySource {
    /// The name shown in status, the same as its serialized form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spec => "Spec",
            Self::AdminApiFlag => "AdminAPIFlag",
            Self::AdminApiTier => "AdminAPITier",
            Self::TierTable => "TierTable",
        }
    }
}

impl fmt::Display for CapacitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance's connection capacity and how much of it bound workloads may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// The instance's `max_connections`.
    pub max_connections: u32,
    /// Where `max_connections` came from.
    pub source: CapacitySource,
    /// Connections kept for superusers and Cloud SQL's own maintenance.
    pub reserved: u32,
    /// Connections used by clients outside the cluster.
    pub external: u32,
}

impl Capacity {
    /// Connections left for bound workloads: max - reserved - external, never
    /// below 0.
    pub fn usable(&self) -> u32 {
        self.max_connections
            .saturating_sub(self.reserved)
            .saturating_sub(self.external)
    }
}

/// What the Cloud SQL Admin API said about an instance.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiscoveredInstance {
    /// `databaseVersion`, for example `POSTGRES_16`.
    pub database_version: String,
    /// `settings.tier`, for example `db-custom-2-7680`.
    pub tier: String,
    /// `settings.databaseFlags` as (name, value) pairs.
    pub flags: Vec<(String, String)>,
}

/// Everything capacity resolution looks at.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapacityInputs {
    /// `spec.capacity.maxConnections`.
    pub spec_max_connections: Option<u32>,
    /// `spec.capacity.tier`.
    pub spec_tier: Option<String>,
    /// `spec.databaseVersion`.
    pub spec_database_version: Option<String>,
    /// The Admin API's answer, when discovery is on and succeeded.
    pub discovered: Option<DiscoveredInstance>,
    /// `spec.capacity.reservedConnections`.
    pub reserved: u32,
    /// `spec.capacity.externalConnections`.
    pub external: u32,
}

/// Why an instance's capacity is unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnknownCapacity {
    /// No override, no Admin API answer, and no tier in the spec.
    NoSource,
    /// A tier is known but not the engine, and the table needs both.
    EngineUnknown {
        /// The tier that could have been looked up.
        tier: String,
        /// The `databaseVersion` that was not recognised, if there was one.
        database_version: Option<String>,
    },
    /// The tier is not in the built-in table.
    TierNotInTable {
        /// The tier looked up.
        tier: String,
        /// The instance's engine.
        engine: Engine,
    },
}

impl UnknownCapacity {
    /// A CamelCase reason for the `CapacityKnown` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSource => "NoCapacitySource",
            Self::EngineUnknown { .. } => "EngineUnknown",
            Self::TierNotInTable { .. } => "TierNotInTable",
        }
    }
}

impl fmt::Display for UnknownCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSource => f.write_str(
                "max_connections is unknown: spec.capacity.maxConnections is not set, the Admin API gave no instance details, and spec.capacity.tier is not set; set spec.capacity.maxConnections, or spec.capacity.tier with spec.databaseVersion",
            ),
            Self::EngineUnknown {
                tier,
                database_version: Some(version),
            } => write!(
                f,
                "max_connections is unknown: tier {tier:?} needs the database engine, and databaseVersion {version:?} is not PostgreSQL, MySQL or SQL Server; set spec.capacity.maxConnections"
            ),
            Self::EngineUnknown {
                tier,
                database_version: None,
            } => write!(
                f,
                "max_connections is unknown: tier {tier:?} needs the database engine, and spec.databaseVersion is not set; set spec.databaseVersion (for example POSTGRES_16) or spec.capacity.maxConnections"
            ),
            Self::TierNotInTable { tier, engine } => write!(
                f,
                "max_connections is unknown: tier {tier:?} is not in the built-in {engine} tier table; set spec.capacity.maxConnections"
            ),
        }
    }
}

/// The outcome of capacity resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapacityResolution {
    /// The capacity and where it came from.
    Known(Capacity),
    /// No source gave an answer, and why.
    Unknown(UnknownCapacity),
}

impl CapacityResolution {
    /// The capacity, if known.
    pub fn capacity(&self) -> Option<&Capacity> {
        match self {
            Self::Known(capacity) => Some(capacity),
            Self::Unknown(_) => None,
        }
    }
}

/// Resolves an instance's capacity: spec override, then the Admin API's flag,
/// then the table default for the Admin API's tier, then the table default for
/// `spec.capacity.tier`, else unknown.
///
/// The engine comes from the Admin API's `databaseVersion` when it is
/// recognised, else from `spec.databaseVersion`. An invalid connection-limit
/// flag is an error rather than a fall-through: the instance is known to be
/// configured away from its tier default, so the default would be a guess.
pub fn resolve_capacity(inputs: &CapacityInputs) -> Result<CapacityResolution, CapacityError> {
    let CapacityInputs {
        spec_max_connections,
        spec_tier,
        spec_database_version,
        discovered,
        reserved,
        external,
    } = inputs;
    let known = |max_connections, source| {
        CapacityResolution::Known(Capacity {
            max_connections,
            source,
            reserved: *reserved,
            external: *external,
        })
    };

    if let Some(max_connections) = spec_max_connections {
        return Ok(known(*max_connections, CapacitySource::Spec));
    }

    let discovered_engine = discovered
        .as_ref()
        .and_then(|d| Engine::from_database_version(&d.database_version));
    let spec_engine = spec_database_version
        .as_deref()
        .and_then(Engine::from_database_version);
    let engine = discovered_engine.or(spec_engine);
    // The version to blame when the engine is unknown.
    let unrecognised_version = discovered
        .as_ref()
        .map(|d| d.database_version.clone())
        .filter(|v| !v.trim().is_empty())
        .or_else(|| spec_database_version.clone());

    let mut why_unknown = UnknownCapacity::NoSource;
    let mut look_up = |tier: &str| -> Option<u32> {
        if tier.trim().is_empty() {
            return None;
        }
        match engine {
            Some(engine) => {
                let found = tier_default(engine, tier);
                if found.is_none() {
                    why_unknown = UnknownCapacity::TierNotInTable {
                        tier: tier.to_owned(),
                        engine,
                    };
                }
                found
            }
            None => {
                why_unknown = UnknownCapacity::EngineUnknown {
                    tier: tier.to_owned(),
                    database_version: unrecognised_version.clone(),
                };
                None
            }
        }
    };

    if let Some(discovered) = discovered {
        if let Some(engine) = engine
            && let Some(flag) = max_connections_from_flags(engine, &discovered.flags)
        {
            return flag.map(|max| known(max, CapacitySource::AdminApiFlag));
        }
        if let Some(max) = look_up(&discovered.tier) {
            return Ok(known(max, CapacitySource::AdminApiTier));
        }
    }
    if let Some(tier) = spec_tier
        && let Some(max) = look_up(tier)
    {
        return Ok(known(max, CapacitySource::TierTable));
    }
    Ok(CapacityResolution::Unknown(why_unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn discovered(version: &str, tier: &str, pairs: &[(&str, &str)]) -> DiscoveredInstance {
        DiscoveredInstance {
            database_version: version.to_owned(),
            tier: tier.to_owned(),
            flags: flags(pairs),
        }
    }

    fn known(resolution: Result<CapacityResolution, CapacityError>) -> Capacity {
        match resolution {
            Ok(CapacityResolution::Known(capacity)) => capacity,
            other => panic!("expected a known capacity, got {other:?}"),
        }
    }

    fn unknown(resolution: Result<CapacityResolution, CapacityError>) -> UnknownCapacity {
        match resolution {
            Ok(CapacityResolution::Unknown(why)) => why,
            other => panic!("expected an unknown capacity, got {other:?}"),
        }
    }

    #[test]
    fn engines_are_read_from_database_versions() {
        assert_eq!(
            Engine::from_database_version("POSTGRES_16"),
            Some(Engine::Postgres)
        );
        assert_eq!(
            Engine::from_database_version("MYSQL_8_0"),
            Some(Engine::MySql)
        );
        assert_eq!(
            Engine::from_database_version("SQLSERVER_2019_STANDARD"),
            Some(Engine::SqlServer)
        );
        assert_eq!(Engine::from_database_version("ORACLE_19"), None);
        assert_eq!(Engine::from_database_version(""), None);
        assert_eq!(Engine::from_database_version("POSTGRESQL_16"), None);
    }

    #[test]
    fn tiers_give_their_memory() {
        assert_eq!(Tier::parse("db-f1-micro"), Some(Tier::F1Micro));
        assert_eq!(Tier::parse("db-g1-small"), Some(Tier::G1Small));
        assert_eq!(
            Tier::parse("db-custom-2-7680"),
            Some(Tier::Dedicated {
                vcpus: 2,
                memory_mib: 7_680
            })
        );
        assert_eq!(
            Tier::parse("db-n1-standard-4").map(|t| t.memory_mib()),
            Some(15_360)
        );
        assert_eq!(
            Tier::parse("db-n1-highmem-2").map(|t| t.memory_mib()),
            Some(13_312)
        );
    }

    #[test]
    fn unknown_and_malformed_tiers_are_not_parsed() {
        for name in [
            "db-perf-optimized-N-8",
            "db-custom-2",
            "db-custom-0-3840",
            "db-custom-2-+7680",
            "db-custom-x-7680",
            "db-n1-standard-0",
            "db-n1-standard-99999999",
            "db-f1-mikro",
            "",
        ] {
            assert_eq!(Tier::parse(name), None, "{name}");
        }
    }

    #[test]
    fn postgres_tier_table_rows() {
        let pg = |tier| tier_default(Engine::Postgres, tier);
        assert_eq!(pg("db-f1-micro"), Some(25));
        assert_eq!(pg("db-g1-small"), Some(50));
        assert_eq!(pg("db-custom-1-3072"), Some(50));
        assert_eq!(pg("db-custom-1-3840"), Some(100));
        assert_eq!(pg("db-custom-1-6143"), Some(100));
        assert_eq!(pg("db-custom-1-6144"), Some(200));
        assert_eq!(pg("db-custom-2-7680"), Some(400));
        assert_eq!(pg("db-custom-4-15360"), Some(500));
        assert_eq!(pg("db-custom-8-30720"), Some(600));
        assert_eq!(pg("db-custom-16-61440"), Some(800));
        assert_eq!(pg("db-custom-32-122880"), Some(1_000));
        assert_eq!(pg("db-n1-standard-1"), Some(100));
        assert_eq!(pg("db-n1-highmem-1"), Some(200));
    }

    #[test]
    fn mysql_tier_table_rows() {
        let my = |tier| tier_default(Engine::MySql, tier);
        assert_eq!(my("db-f1-micro"), Some(250));
        assert_eq!(my("db-g1-small"), Some(1_000));
        assert_eq!(my("db-custom-1-3840"), Some(4_000));
        assert_eq!(my("db-n1-highmem-16"), Some(4_000));
    }

    #[test]
    fn sql_server_defaults_to_32767_on_any_known_tier() {
        assert_eq!(
            tier_default(Engine::SqlServer, "db-custom-2-7680"),
            Some(32_767)
        );
    }

    #[test]
    fn unrecognised_tiers_have_no_default_on_any_engine() {
        for engine in [Engine::Postgres, Engine::MySql, Engine::SqlServer] {
            assert_eq!(tier_default(engine, "db-perf-optimized-N-8"), None);
        }
    }

    #[test]
    fn connection_flags_are_read_per_engine() {
        let set = flags(&[("max_connections", "250"), ("user connections", "100")]);
        assert_eq!(
            max_connections_from_flags(Engine::Postgres, &set),
            Some(Ok(250))
        );
        assert_eq!(
            max_connections_from_flags(Engine::MySql, &set),
            Some(Ok(250))
        );
        assert_eq!(
            max_connections_from_flags(Engine::SqlServer, &set),
            Some(Ok(100))
        );
        assert_eq!(
            max_connections_from_flags(Engine::Postgres, &flags(&[("work_mem", "4")])),
            None
        );
    }

    #[test]
    fn sql_server_user_connections_zero_means_32767() {
        let set = flags(&[("user connections", "0")]);
        assert_eq!(
            max_connections_from_flags(Engine::SqlServer, &set),
            Some(Ok(32_767))
        );
    }

    #[test]
    fn invalid_flag_value_is_an_error_naming_the_flag() {
        for bad in ["lots", "-5", "", "1e3", "99999999999"] {
            let set = flags(&[("max_connections", bad)]);
            let error = match max_connections_from_flags(Engine::Postgres, &set) {
                Some(Err(error)) => error,
                other => panic!("{bad:?}: expected an error, got {other:?}"),
            };
            assert!(error.to_string().contains("`max_connections`"), "{error}");
            assert!(
                error.to_string().contains("spec.capacity.maxConnections"),
                "{error}"
            );
        }
    }

    #[test]
    fn spec_override_wins_over_everything() {
        let capacity = known(resolve_capacity(&CapacityInputs {
            spec_max_connections: Some(42),
            spec_tier: Some("db-f1-micro".into()),
            spec_database_version: Some("POSTGRES_16".into()),
            discovered: Some(discovered(
                "POSTGRES_16",
                "db-custom-2-7680",
                &[("max_connections", "nope")],
            )),
            reserved: 3,
            external: 1,
        }));
        assert_eq!(
            capacity,
            Capacity {
                max_connections: 42,
                source: CapacitySource::Spec,
                reserved: 3,
                external: 1
            }
        );
    }

    #[test]
    fn admin_api_flag_wins_over_tier() {
        let capacity = known(resolve_capacity(&CapacityInputs {
            spec_tier: Some("db-f1-micro".into()),
            discovered: Some(discovered(
                "POSTGRES_16",
                "db-custom-2-7680",
                &[("max_connections", "900")],
            )),
            ..CapacityInputs::default()
        }));
        assert_eq!(capacity.max_connections, 900);
        assert_eq!(capacity.source, CapacitySource::AdminApiFlag);
    }

    #[test]
    fn admin_api_tier_wins_over_spec_tier() {
        let capacity = known(resolve_capacity(&CapacityInputs {
            spec_tier: Some("db-f1-micro".into()),
            discovered: Some(discovered("POSTGRES_16", "db-custom-2-7680", &[])),
            ..CapacityInputs::default()
        }));
        assert_eq!(capacity.max_connections, 400);
        assert_eq!(capacity.source, CapacitySource::AdminApiTier);
    }

    #[test]
    fn spec_tier_is_used_without_the_admin_api() {
        let capacity = known(resolve_capacity(&CapacityInputs {
            spec_tier: Some("db-g1-small".into()),
            spec_database_version: Some("MYSQL_8_0".into()),
            ..CapacityInputs::default()
        }));
        assert_eq!(capacity.max_connections, 1_000);
        assert_eq!(capacity.source, CapacitySource::TierTable);
    }

    #[test]
    fn spec_tier_is_used_when_the_discovered_tier_is_not_in_the_table() {
        let capacity = known(resolve_capacity(&CapacityInputs {
            spec_tier: Some("db-custom-4-15360".into()),
            discovered: Some(discovered("POSTGRES_16", "db-perf-optimized-N-4", &[])),
            ..CapacityInputs::default()
        }));
        assert_eq!(capacity.max_connections, 500);
        assert_eq!(capacity.source, CapacitySource::TierTable);
    }

    #[test]
    fn invalid_admin_api_flag_is_an_error() {
        let result = resolve_capacity(&CapacityInputs {
            spec_tier: Some("db-custom-2-7680".into()),
            spec_database_version: Some("POSTGRES_16".into()),
            discovered: Some(discovered(
                "POSTGRES_16",
                "db-custom-2-7680",
                &[("max_connections", "many")],
            )),
            ..CapacityInputs::default()
        });
        assert_eq!(
            result,
            Err(CapacityError::InvalidFlag {
                flag: "max_connections".into(),
                value: "many".into()
            })
        );
    }

    #[test]
    fn spec_tier_without_engine_is_unknown_with_a_reason() {
        let why = unknown(resolve_capacity(&CapacityInputs {
            spec_tier: Some("db-custom-2-7680".into()),
            ..CapacityInputs::default()
        }));
        assert_eq!(why.reason(), "EngineUnknown");
        assert!(why.to_string().contains("spec.databaseVersion"), "{why}");
    }

    #[test]
    fn unrecognised_engine_is_named_in_the_reason() {
        let why = unknown(resolve_capacity(&CapacityInputs {
            discovered: Some(discovered("ORACLE_19", "db-custom-2-7680", &[])),
            ..CapacityInputs::default()
        }));
        assert_eq!(
            why,
            UnknownCapacity::EngineUnknown {
                tier: "db-custom-2-7680".into(),
                database_version: Some("ORACLE_19".into())
            }
        );
    }

    #[test]
    fn tier_missing_from_the_table_is_unknown_with_a_reason() {
        let why = unknown(resolve_capacity(&CapacityInputs {
            discovered: Some(discovered("MYSQL_8_0", "db-perf-optimized-N-8", &[])),
            ..CapacityInputs::default()
        }));
        assert_eq!(why.reason(), "TierNotInTable");
        assert!(why.to_string().contains("db-perf-optimized-N-8"), "{why}");
        assert!(why.to_string().contains("MySQL"), "{why}");
    }

    #[test]
    fn nothing_to_go_on_is_unknown() {
        let why = unknown(resolve_capacity(&CapacityInputs::default()));
        assert_eq!(why, UnknownCapacity::NoSource);
    }

    #[test]
    fn usable_subtracts_reserved_and_external() {
        let capacity = Capacity {
            max_connections: 100,
            source: CapacitySource::TierTable,
            reserved: 6,
            external: 10,
        };
        assert_eq!(capacity.usable(), 84);
    }

    #[test]
    fn usable_saturates_at_zero() {
        let capacity = Capacity {
            max_connections: 25,
            source: CapacitySource::TierTable,
            reserved: 20,
            external: 10,
        };
        assert_eq!(capacity.usable(), 0);
    }

    #[test]
    fn capacity_sources_serialize_as_shown_in_status() {
        for source in [
            CapacitySource::Spec,
            CapacitySource::AdminApiFlag,
            CapacitySource::AdminApiTier,
            CapacitySource::TierTable,
        ] {
            assert_eq!(
                serde_json::to_value(source).ok(),
                Some(serde_json::Value::String(source.as_str().to_owned()))
            );
        }
    }
}

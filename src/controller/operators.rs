//! Two operator installations on one cluster (a second release, an old
//! version left behind) would both apply the same fields under the same field
//! manager and roll every workload back and forth forever. Each installation
//! writes its identity into the statuses it writes (`status.reconciledBy`);
//! one that finds another identity there *after its own write* knows that
//! somebody else is writing too. Then the installation whose identity sorts
//! first keeps the object and reports the other in condition
//! `OperatorConflict`; the other stands back (no writes) and says so in an
//! Event. An identity found without a write of ours before it is a hand-over
//! (an upgrade with a new identity, an uninstalled predecessor): taken over
//! silently.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a standing-back installation waits before it takes an object
/// over again (the other installation may have been uninstalled meanwhile;
/// if it was not, it reports the conflict again and this one stands back
/// again).
pub const HOLD_OFF: Duration = Duration::from_secs(30 * 60);

/// What this installation does with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stance {
    /// Nobody else writes it: reconcile as usual.
    Sole,
    /// Another installation writes it too; this one keeps it (its identity
    /// sorts first) and reports `other` in the object's conditions.
    Keep {
        /// The other installation.
        other: String,
        /// First seen by this reconcile (publish an Event).
        newly: bool,
    },
    /// Another installation writes it too and keeps it: write nothing.
    StandBack {
        /// The other installation.
        other: String,
        /// First seen by this reconcile (publish an Event).
        newly: bool,
    },
}

/// What this process knows of the objects it writes.
#[derive(Default)]
pub struct Operators {
    /// Objects (by uid) whose status this process has written.
    written: Mutex<HashSet<String>>,
    /// Objects another installation writes too: the other one, since when,
    /// and whether this one keeps them.
    contested: Mutex<HashMap<String, Contest>>,
}

#[derive(Clone)]
struct Contest {
    other: String,
    since: Instant,
    keep: bool,
}

impl Operators {
    /// The stance of installation `me` on the object `uid` whose status
    /// names `recorded` as its writer.
    pub fn stance(&self, me: &str, uid: Option<&str>, recorded: Option<&str>) -> Stance {
        self.stance_at(me, uid, recorded, Instant::now())
    }

    fn stance_at(
        &self,
        me: &str,
        uid: Option<&str>,
        recorded: Option<&str>,
        now: Instant,
    ) -> Stance {
        let Some(uid) = uid else {
            return Stance::Sole;
        };
        let (Ok(mut written), Ok(mut contested)) = (self.written.lock(), self.contested.lock())
        else {
            return Stance::Sole;
        };
        let known = contested.get(uid).cloned();
        // Contests are forgotten after the hold-off, with our writes: the
        // object is taken over as if new (see HOLD_OFF).
        let known = match known {
            Some(c) if now.saturating_duration_since(c.since) >= HOLD_OFF => {
                contested.remove(uid);
                written.remove(uid);
                None
            }
            other => other,
        };
        match (recorded, known) {
            // Standing back while the other one still writes it.
            (Some(r), Some(c)) if !c.keep && r == c.other => Stance::StandBack {
                other: c.other,
                newly: false,
            },
            (Some(r), Some(c)) if c.keep && (r == me || r == c.other) => Stance::Keep {
                other: c.other,
                newly: false,
            },
            (Some(r), _) if r != me && written.contains(uid) => {
                // Somebody else wrote after our write: two installations.
                let keep = me < r;
                contested.insert(
                    uid.to_owned(),
                    Contest {
                        other: r.to_owned(),
                        since: now,
                        keep,
                    },
                );
                if keep {
                    Stance::Keep {
                        other: r.to_owned(),
                        newly: true,
                    }
                } else {
                    Stance::StandBack {
                        other: r.to_owned(),
                        newly: true,
                    }
                }
            }
            _ => Stance::Sole,
        }
    }

    /// Records that this process wrote the status of object `uid`.
    pub fn wrote(&self, uid: Option<&str>) {
        if let (Some(uid), Ok(mut written)) = (uid, self.written.lock())
            && !written.contains(uid)
        {
            written.insert(uid.to_owned());
        }
    }
}

/// The message of condition `OperatorConflict` and of its Events.
pub fn conflict_message(kind: &str, me: &str, other: &str, keep: bool) -> String {
    let (keeper, backer) = if keep { (me, other) } else { (other, me) };
    format!(
        "two cloudsql-binder installations write this {kind}: {me:?} (this one) and {other:?}; \
         {keeper:?} keeps it and {backer:?} stands back; uninstall one of them, or give each its \
         own namespaces (--namespaces)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_nobody_else_writes_is_ours() {
        let ops = Operators::default();
        assert_eq!(ops.stance("a", Some("u1"), None), Stance::Sole);
        ops.wrote(Some("u1"));
        assert_eq!(ops.stance("a", Some("u1"), Some("a")), Stance::Sole);
    }

    #[test]
    fn another_identity_before_our_first_write_is_a_hand_over() {
        // An upgrade with a new identity, or a predecessor uninstalled.
        let ops = Operators::default();
        assert_eq!(ops.stance("new", Some("u1"), Some("old")), Stance::Sole);
    }

    #[test]
    fn two_writers_settle_on_the_identity_that_sorts_first() {
        let (a, b) = (Operators::default(), Operators::default());
        // Both wrote once, each over the other's write.
        a.wrote(Some("u1"));
        b.wrote(Some("u1"));
        assert_eq!(
            a.stance("a", Some("u1"), Some("b")),
            Stance::Keep {
                other: "b".into(),
                newly: true
            }
        );
        assert_eq!(
            b.stance("b", Some("u1"), Some("a")),
            Stance::StandBack {
                other: "a".into(),
                newly: true
            }
        );
        // Stable afterwards, and reported once.
        assert_eq!(
            a.stance("a", Some("u1"), Some("a")),
            Stance::Keep {
                other: "b".into(),
                newly: false
            }
        );
        assert_eq!(
            b.stance("b", Some("u1"), Some("a")),
            Stance::StandBack {
                other: "a".into(),
                newly: false
            }
        );
    }

    #[test]
    fn a_standing_back_installation_takes_over_after_the_hold_off() {
        let ops = Operators::default();
        ops.wrote(Some("u1"));
        let t0 = Instant::now();
        assert!(matches!(
            ops.stance_at("b", Some("u1"), Some("a"), t0),
            Stance::StandBack { .. }
        ));
        assert!(matches!(
            ops.stance_at("b", Some("u1"), Some("a"), t0 + HOLD_OFF / 2),
            Stance::StandBack { newly: false, .. }
        ));
        // Then taken over as if new: "a" may be gone. If it is not, it finds
        // our write over its own and the contest starts again.
        let later = t0 + HOLD_OFF;
        assert_eq!(
            ops.stance_at("b", Some("u1"), Some("a"), later),
            Stance::Sole
        );
        ops.wrote(Some("u1"));
        assert!(matches!(
            ops.stance_at("b", Some("u1"), Some("a"), later),
            Stance::StandBack { newly: true, .. }
        ));
    }

    #[test]
    fn the_message_names_both_and_the_keeper() {
        let m = conflict_message("CloudSqlBinding", "b", "a", false);
        assert!(
            m.contains("\"b\" (this one)") && m.contains("\"a\" keeps it"),
            "{m}"
        );
    }
}

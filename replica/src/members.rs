//! The replica set ("membership") as stored on every replica, and the pure
//! rules for changing it (`docs/design.md`, "Membership").
//!
//! The set stored on the replicas is authoritative, not the config file.
//! Every change carries a version one above the set it replaces. It takes
//! effect only once a majority of the old set *and* a majority of the new
//! set have persisted it, so any later majority of either set sees it (the
//! two majorities a change needs overlap every majority a later `up` can
//! reach). One change at a time keeps consecutive sets overlapping.

use serde::{Deserialize, Serialize};

pub use crate::superblock::Member;

/// A replica set and its version.
///
/// Sets order by (epoch, version): a change made by a newer host wins over
/// a half-stored change of an older one even if both carry the same
/// version number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Epoch of the host that made the change (1 for `volume create`).
    pub epoch: u64,
    /// Bumped by one on every change; 0 only before any set was stamped.
    pub version: u64,
    /// The members, in order.
    pub members: Vec<Member>,
    /// The members of the set this one replaced (empty for the first set).
    /// Until a later change replaces it, a host that fences must reach a
    /// majority of both: a half-stored change (one that never reached a
    /// majority of the old set) then cannot lead two hosts to fence
    /// disjoint majorities (`docs/design.md`, "Membership").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<Member>,
}

/// The stored form of a set's members: a JSON list, or with a previous
/// set `{"members": [...], "previous": [...]}`.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Blob {
    List(Vec<Member>),
    Joint { members: Vec<Member>, previous: Vec<Member> },
}

/// Encodes members and previous members as stored on disk and sent in
/// frames.
pub fn encode_blob(members: &[Member], previous: &[Member]) -> Vec<u8> {
    let blob = if previous.is_empty() {
        Blob::List(members.to_vec())
    } else {
        Blob::Joint { members: members.to_vec(), previous: previous.to_vec() }
    };
    serde_json::to_vec(&blob).expect("members serialise")
}

/// Decodes [`encode_blob`]'s output: (members, previous).
pub fn decode_blob(b: &[u8]) -> Result<(Vec<Member>, Vec<Member>), serde_json::Error> {
    Ok(match serde_json::from_slice(b)? {
        Blob::List(m) => (m, Vec::new()),
        Blob::Joint { members, previous } => (members, previous),
    })
}

/// The smallest majority of `n` members.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The first of `sets` (skipping empty ones) in which fewer than a
/// majority `answered`, as (answered, members, needed); `None` when each
/// has its majority. A fencing host asks it of the newest stored set and
/// the set it replaced (`docs/design.md`, "A change that did not take
/// effect").
pub fn short_of_majority<'a>(
    sets: impl IntoIterator<Item = &'a [Member]>,
    answered: impl Fn(&str) -> bool,
) -> Option<(usize, usize, usize)> {
    sets.into_iter().filter(|set| !set.is_empty()).find_map(|set| {
        let got = set.iter().filter(|m| answered(&m.name)).count();
        (got < majority(set.len())).then_some((got, set.len(), majority(set.len())))
    })
}

/// Why a replica refuses a replica set (`accept_members`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembersRefusal {
    /// The change comes from a host that is not the replica's current one.
    StaleEpoch {
        /// The session's epoch.
        asked: u64,
        /// The replica's epoch.
        mine: u64,
    },
    /// Older than the stored set, or the same (epoch, version) with other
    /// members.
    StaleMembers {
        /// The offered set's (epoch, version).
        asked: (u64, u64),
        /// The stored set's.
        mine: (u64, u64),
    },
}

/// Whether a replica at `store_epoch` holding `stored` takes `next` from
/// a host session of `session_epoch`: `Ok(true)` to persist it,
/// `Ok(false)` when it already holds it (a retried change), else why not.
/// Only the replica's current host changes the set, and only forwards.
pub fn accept_members(
    stored: &Membership,
    store_epoch: u64,
    session_epoch: u64,
    next: &Membership,
) -> Result<bool, MembersRefusal> {
    if session_epoch != store_epoch {
        return Err(MembersRefusal::StaleEpoch { asked: session_epoch, mine: store_epoch });
    }
    let mine = stored.order();
    if next.order() < mine || (next.order() == mine && next.members != stored.members) {
        return Err(MembersRefusal::StaleMembers { asked: next.order(), mine });
    }
    Ok(next.order() != mine)
}

impl Membership {
    /// The order of sets: (epoch, version).
    pub fn order(&self) -> (u64, u64) {
        (self.epoch, self.version)
    }

    /// The member called `name`.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Whether a change to `next` took effect, given the names of the
    /// members (of either set) that persisted it: a majority of each set.
    pub fn change_committed(&self, next: &Membership, persisted: &[String]) -> bool {
        let count = |s: &Membership| s.members.iter().filter(|m| persisted.contains(&m.name)).count();
        count(self) >= majority(self.members.len()) && count(next) >= majority(next.members.len())
    }

    /// Human-readable differences from `other` (this set first), for the
    /// warning `up` prints when the config file disagrees with the stored
    /// set. Empty when both name the same members with the same settings.
    pub fn differences(&self, other: &Membership) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.members {
            match other.get(&m.name) {
                None => out.push(format!("{} ({}) is a member, but the config file lacks it", m.name, m.addr)),
                Some(o) if o != m => out.push(format!(
                    "{} is stored as {} role {}{}, the config file says {} role {}{}",
                    m.name,
                    m.addr,
                    m.role,
                    if m.network_sync { " network-sync" } else { "" },
                    o.addr,
                    o.role,
                    if o.network_sync { " network-sync" } else { "" },
                )),
                Some(_) => {}
            }
        }
        for o in &other.members {
            if self.get(&o.name).is_none() {
                out.push(format!("{} ({}) is in the config file, but is not a member", o.name, o.addr));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_with_and_without_a_previous_set() {
        let a = set(1, &["a", "b"]).members;
        let b = set(1, &["a", "b", "c"]).members;
        assert_eq!(decode_blob(&encode_blob(&a, &[])).unwrap(), (a.clone(), Vec::new()));
        assert!(encode_blob(&a, &[]).starts_with(b"["), "a list without a previous set");
        assert_eq!(decode_blob(&encode_blob(&b, &a)).unwrap(), (b, a));
        assert!(decode_blob(b"{\"members\": 3}").is_err());
    }

    fn set(version: u64, names: &[&str]) -> Membership {
        let members = names
            .iter()
            .map(|n| Member {
                name: n.to_string(),
                addr: format!("{n}:1"),
                role: "near".into(),
                network_sync: false,
                fec: None,
            })
            .collect();
        Membership { epoch: 1, version, members, previous: Vec::new() }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_change_needs_a_majority_of_both_sets() {
        let old = set(1, &["a", "b", "c"]);
        let add = set(2, &["a", "b", "c", "d"]);
        assert!(!old.change_committed(&add, &names(&["a", "b"])), "2 of 4 is no majority of the new set");
        assert!(old.change_committed(&add, &names(&["a", "b", "d"])));
        let remove = set(2, &["a", "b"]);
        assert!(!old.change_committed(&remove, &names(&["a", "c"])), "1 of 2 is no majority of the new set");
        assert!(old.change_committed(&remove, &names(&["a", "b"])));
    }

    #[test]
    fn differences_name_every_replica_that_differs() {
        let stored = set(3, &["a", "b", "d"]);
        let mut config = set(0, &["a", "b", "c"]);
        config.members[1].addr = "elsewhere:2".into();
        let d = stored.differences(&config);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("b is stored as b:1"), "{d:?}");
        assert!(d[1].contains("d (d:1) is a member"), "{d:?}");
        assert!(d[2].contains("c (c:1) is in the config file"), "{d:?}");
        assert!(stored.differences(&stored).is_empty());
    }
}

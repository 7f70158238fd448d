//! Choosing how a returning replica catches up.
//!
//! In order of preference (least data moved first):
//! 1. **quick**: the host's write queue still holds every write after the
//!    replica's durable seq;
//! 2. **replay**: an up-to-date peer's log still holds them (the replica
//!    copies the records, replica to replica);
//! 3. **incremental**: an up-to-date peer copies the regions its change
//!    map says were written after the replica's durable seq; **full** is
//!    the same for an empty replica (every region ever written);
//! 4. **rollback**: a replica holding records past the common prefix from
//!    another history re-copies the regions those records touched and the
//!    regions the host's history wrote since;
//!
//! and a replica in the middle of a copy resumes it. The source is the
//! eligible peer with the lowest RTT. With no eligible peer the replica
//! stays lagging, with a [`LagReason`].

use std::fmt;

use serde::{Deserialize, Serialize};
use starblk_replica::history::Standing;
use starblk_replica::superblock::CopyKind;

/// A possible source of a recovery: another replica of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The host's index of that replica.
    pub idx: usize,
    /// Has every completed write (only such a peer is a source).
    pub up_to_date: bool,
    /// The returning replica can reach it (a peer configured at a
    /// loopback address serves only a replica on the same host).
    pub reachable: bool,
    /// Smoothed RTT from the host, µs: the proxy for "closest".
    pub rtt_us: u64,
    /// First seq its log can still serve (from its heartbeat replies);
    /// None until known, which counts as "may hold it" (a replay that
    /// then fails marks `replay_failed`).
    pub log_first: Option<u64>,
    /// A replay from this peer already failed for the same first seq.
    pub replay_failed: bool,
    /// A copy from this peer failed recently.
    pub copy_failed: bool,
}

/// What the host knows about the returning replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Returning {
    /// Its durable seq (during a copy: what it held before the copy).
    pub durable_seq: u64,
    /// How its log relates to the host's history.
    pub standing: Standing,
    /// A copy it has in progress (from its HelloOk), to be resumed.
    pub copying: Option<CopyKind>,
}

/// The host's write queue: seqs `first..=last` (empty when `first > last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    /// Oldest seq held (the next seq when empty).
    pub first: u64,
    /// Last seq assigned.
    pub last: u64,
}

/// How a replica catches up. `peer` is the host's index of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Plan {
    /// From the host's write queue.
    Quick,
    /// From the peer's log.
    Replay {
        /// Source.
        peer: usize,
    },
    /// The regions written after `since_seq`, from the peer.
    Incremental {
        /// Source.
        peer: usize,
        /// The replica's durable seq.
        since_seq: u64,
    },
    /// Every region ever written, from the peer (an empty replica).
    Full {
        /// Source.
        peer: usize,
    },
    /// The regions the replica's records past `since_seq` touched, and the
    /// regions the host's history wrote after it, from the peer.
    Rollback {
        /// Source.
        peer: usize,
        /// The last seq the replica shares with the host's history.
        since_seq: u64,
    },
}

impl Plan {
    /// The source peer, if any.
    pub fn peer(&self) -> Option<usize> {
        match *self {
            Plan::Quick => None,
            Plan::Replay { peer }
            | Plan::Incremental { peer, .. }
            | Plan::Full { peer }
            | Plan::Rollback { peer, .. } => Some(peer),
        }
    }

    /// The copy kind, for the plans that copy regions.
    pub fn copy_kind(&self) -> Option<CopyKind> {
        match self {
            Plan::Incremental { .. } => Some(CopyKind::Incremental),
            Plan::Full { .. } => Some(CopyKind::Full),
            Plan::Rollback { .. } => Some(CopyKind::Rollback),
            Plan::Quick | Plan::Replay { .. } => None,
        }
    }
}

/// Why a replica is lagging: it misses writes and nothing can bring it
/// up to date right now. The host retries at every new session; status
/// shows the Display text, and `--json` the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum LagReason {
    /// It holds records past `after` from another history, and no
    /// up-to-date peer can roll it back.
    Diverged {
        /// The last seq it shares with the host's history.
        after: u64,
    },
    /// It misses writes from `from` on, which the write queue (from
    /// `queue_first`) no longer holds, and no up-to-date peer can replay
    /// or copy them.
    OutOfWindow {
        /// Its durable seq + 1.
        from: u64,
        /// Oldest seq in the write queue.
        queue_first: u64,
    },
    /// Its copy is half done and no up-to-date peer can finish it.
    CopyStalled {
        /// What the copy was for.
        kind: CopyKindName,
    },
    /// It fell behind the write queue while connected (its link was slower
    /// than the writes); it is recovered at its next session.
    FellOutOfQueue {
        /// The seq that was evicted before it was sent.
        seq: u64,
    },
}

/// [`CopyKind`] for serde (the on-disk type stays free of serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyKindName {
    /// Incremental.
    Incremental,
    /// Full.
    Full,
    /// Rollback.
    Rollback,
}

impl From<CopyKind> for CopyKindName {
    fn from(k: CopyKind) -> CopyKindName {
        match k {
            CopyKind::Incremental => CopyKindName::Incremental,
            CopyKind::Full => CopyKindName::Full,
            CopyKind::Rollback => CopyKindName::Rollback,
        }
    }
}

impl fmt::Display for CopyKindName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyKindName::Incremental => "incremental",
            CopyKindName::Full => "full",
            CopyKindName::Rollback => "rollback",
        })
    }
}

impl fmt::Display for LagReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LagReason::Diverged { after } => write!(
                f,
                "diverged after seq {after}: it holds records past it from another history; \
                 needs a rollback from an up-to-date peer, and none is available"
            ),
            LagReason::OutOfWindow { from, queue_first } => write!(
                f,
                "missing writes {from}..{} are no longer in the write queue, and no up-to-date peer can \
                 replay or copy them",
                queue_first.saturating_sub(1).max(*from)
            ),
            LagReason::CopyStalled { kind } => {
                write!(f, "{kind} copy half done; no up-to-date peer to finish it from")
            }
            LagReason::FellOutOfQueue { seq } => write!(f, "fell out of the write queue at seq {seq}"),
        }
    }
}

/// Chooses how `r` catches up, given the write queue `q` and the other
/// replicas `peers`; or why it cannot now.
pub fn plan(r: &Returning, q: &Queue, peers: &[Peer]) -> Result<Plan, LagReason> {
    let sources = || peers.iter().filter(|p| p.up_to_date && p.reachable);
    let closest = |it: &mut dyn Iterator<Item = &Peer>| it.min_by_key(|p| (p.rtt_us, p.idx)).map(|p| p.idx);
    let copy_source = closest(&mut sources().filter(|p| !p.copy_failed));
    let d = r.durable_seq;
    if let Some(kind) = r.copying {
        // Half-copied regions make its data no state of any history:
        // only finishing the copy repairs it.
        let peer = copy_source.ok_or(LagReason::CopyStalled { kind: kind.into() })?;
        return Ok(match (r.standing, kind) {
            (Standing::Diverged { after }, _) => Plan::Rollback { peer, since_seq: after },
            (Standing::Prefix, CopyKind::Rollback) => Plan::Rollback { peer, since_seq: d },
            (Standing::Prefix, CopyKind::Full) => Plan::Full { peer },
            (Standing::Prefix, CopyKind::Incremental) => Plan::Incremental { peer, since_seq: d },
        });
    }
    match r.standing {
        Standing::Diverged { after } => {
            copy_source.map(|peer| Plan::Rollback { peer, since_seq: after }).ok_or(LagReason::Diverged { after })
        }
        Standing::Prefix if d + 1 >= q.first => Ok(Plan::Quick),
        Standing::Prefix => {
            let replay = closest(&mut sources().filter(|p| !p.replay_failed && p.log_first.is_none_or(|f| f <= d + 1)));
            match (replay, copy_source) {
                (Some(peer), _) => Ok(Plan::Replay { peer }),
                (None, Some(peer)) if d == 0 => Ok(Plan::Full { peer }),
                (None, Some(peer)) => Ok(Plan::Incremental { peer, since_seq: d }),
                (None, None) => Err(LagReason::OutOfWindow { from: d + 1, queue_first: q.first }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(idx: usize, rtt_us: u64, log_first: Option<u64>) -> Peer {
        Peer { idx, up_to_date: true, reachable: true, rtt_us, log_first, replay_failed: false, copy_failed: false }
    }

    fn prefix(d: u64) -> Returning {
        Returning { durable_seq: d, standing: Standing::Prefix, copying: None }
    }

    #[test]
    fn the_cheapest_recovery_that_works() {
        let q = Queue { first: 1000, last: 1500 };
        let peers = [peer(0, 300, Some(600)), peer(1, 100, Some(900))];
        assert_eq!(plan(&prefix(999), &q, &peers), Ok(Plan::Quick));
        assert_eq!(plan(&prefix(1500), &q, &peers), Ok(Plan::Quick));
        // Both logs hold 700: the closer peer replays.
        assert_eq!(plan(&prefix(899), &q, &peers), Ok(Plan::Replay { peer: 1 }));
        assert_eq!(plan(&prefix(650), &q, &peers), Ok(Plan::Replay { peer: 0 }));
        assert_eq!(plan(&prefix(10), &q, &peers), Ok(Plan::Incremental { peer: 1, since_seq: 10 }));
        assert_eq!(plan(&prefix(0), &q, &peers), Ok(Plan::Full { peer: 1 }));
        let diverged = Returning { durable_seq: 1200, standing: Standing::Diverged { after: 990 }, copying: None };
        assert_eq!(plan(&diverged, &q, &peers), Ok(Plan::Rollback { peer: 1, since_seq: 990 }));
        let resuming = Returning { copying: Some(CopyKind::Incremental), ..prefix(999) };
        assert_eq!(plan(&resuming, &q, &peers), Ok(Plan::Incremental { peer: 1, since_seq: 999 }));
    }

    #[test]
    fn lag_reasons_say_why() {
        let q = Queue { first: 1000, last: 1500 };
        let gone = [Peer { up_to_date: false, ..peer(0, 1, None) }];
        let e = plan(&prefix(10), &q, &gone).unwrap_err();
        assert_eq!(e, LagReason::OutOfWindow { from: 11, queue_first: 1000 });
        assert!(e.to_string().contains("missing writes 11..999"), "{e}");
        let diverged = Returning { durable_seq: 1200, standing: Standing::Diverged { after: 990 }, copying: None };
        let e = plan(&diverged, &q, &gone).unwrap_err();
        assert!(e.to_string().starts_with("diverged after seq 990"), "{e}");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"reason":"diverged","after":990}"#);
        assert_eq!(serde_json::from_str::<LagReason>(&json).unwrap(), e);
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        (any::<bool>(), any::<bool>(), 0u64..5, proptest::option::of(0u64..60), any::<bool>(), any::<bool>()).prop_map(
            |(up_to_date, reachable, rtt_us, log_first, replay_failed, copy_failed)| Peer {
                idx: 0,
                up_to_date,
                reachable,
                rtt_us,
                log_first,
                replay_failed,
                copy_failed,
            },
        )
    }

    fn arb_kind() -> impl Strategy<Value = Option<CopyKind>> {
        prop_oneof![
            Just(None),
            Just(Some(CopyKind::Incremental)),
            Just(Some(CopyKind::Full)),
            Just(Some(CopyKind::Rollback))
        ]
    }

    proptest! {
        #[test]
        fn plan_follows_the_rules(
            d in 0u64..60, diverged_after in proptest::option::of(0u64..60), copying in arb_kind(),
            first in 1u64..60, len in 0u64..20, mut peers in proptest::collection::vec(arb_peer(), 0..5),
        ) {
            for (i, p) in peers.iter_mut().enumerate() { p.idx = i; }
            let standing = match diverged_after {
                Some(after) if after < d => Standing::Diverged { after },
                _ => Standing::Prefix,
            };
            let r = Returning { durable_seq: d, standing, copying };
            let q = Queue { first, last: first + len - 1 };
            let eligible = |p: &&Peer| p.up_to_date && p.reachable;
            let copy_ok: Vec<&Peer> = peers.iter().filter(eligible).filter(|p| !p.copy_failed).collect();
            let replay_ok: Vec<&Peer> = peers.iter().filter(eligible)
                .filter(|p| !p.replay_failed && p.log_first.is_none_or(|f| f <= d + 1)).collect();
            let min_rtt = |v: &[&Peer]| v.iter().map(|p| p.rtt_us).min();
            match plan(&r, &q, &peers) {
                Ok(p) => {
                    // A source is up to date, reachable, eligible for the
                    // kind of plan, and the closest such peer.
                    if let Some(i) = p.peer() {
                        let src = &peers[i];
                        prop_assert!(src.up_to_date && src.reachable);
                        let pool = if matches!(p, Plan::Replay { .. }) { &replay_ok } else { &copy_ok };
                        prop_assert!(pool.iter().any(|x| x.idx == i));
                        prop_assert_eq!(Some(src.rtt_us), min_rtt(pool));
                    }
                    match p {
                        // Quick only for a prefix the queue covers, never mid-copy.
                        Plan::Quick => prop_assert!(copying.is_none() && standing == Standing::Prefix && d + 1 >= first),
                        // Replay only when quick cannot, and before any copy.
                        Plan::Replay { .. } => prop_assert!(copying.is_none() && standing == Standing::Prefix && d + 1 < first),
                        Plan::Incremental { since_seq, .. } => {
                            prop_assert_eq!(since_seq, d);
                            prop_assert!(standing == Standing::Prefix);
                            prop_assert!(copying.is_some() || (d > 0 && replay_ok.is_empty() && d + 1 < first));
                        }
                        Plan::Full { .. } => {
                            prop_assert!(standing == Standing::Prefix);
                            prop_assert!(copying == Some(CopyKind::Full) || (copying.is_none() && d == 0 && replay_ok.is_empty() && d + 1 < first));
                        }
                        // Rollback exactly when diverged (or resuming one).
                        Plan::Rollback { since_seq, .. } => match standing {
                            Standing::Diverged { after } => prop_assert_eq!(since_seq, after),
                            Standing::Prefix => prop_assert!(copying == Some(CopyKind::Rollback) && since_seq == d),
                        },
                    }
                    // A diverged replica is never served from the queue or a log.
                    if standing != Standing::Prefix {
                        prop_assert!(matches!(p, Plan::Rollback { .. }), "diverged but planned {:?}", p);
                    }
                }
                Err(why) => {
                    // Lagging only when no peer can serve what is needed.
                    prop_assert!(copy_ok.is_empty());
                    match why {
                        LagReason::CopyStalled { .. } => prop_assert!(copying.is_some()),
                        LagReason::Diverged { after } => prop_assert_eq!(standing, Standing::Diverged { after }),
                        LagReason::OutOfWindow { from, .. } => {
                            prop_assert!(replay_ok.is_empty() && d + 1 < first && from == d + 1);
                        }
                        LagReason::FellOutOfQueue { .. } => prop_assert!(false, "not a planning outcome"),
                    }
                    prop_assert!(!why.to_string().is_empty());
                }
            }
        }
    }
}

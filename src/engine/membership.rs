//! Online membership changes: `replica add` and `replica remove`
//! (`docs/design.md`, "Membership").
//!
//! The replica set stored in the replicas' superblocks is authoritative.
//! A change is written, as the next version, to every reachable member of
//! the old and the new set, and takes effect in the engine only once a
//! majority of each set has it (`Membership::change_committed`). One change
//! runs at a time. These calls block on the network and run on the control
//! socket's thread, never on an I/O path.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use starblk_replica::client::{self, ClientError};
use starblk_replica::members::{majority, Member, Membership};
use starblk_replica::proto::{SetMembers, Stamp};

use super::link::{self, Link, LinkState, ReplicaSpec};
use super::{Shared, Volume};
use crate::config::{FecConfig, LinkTuning, ReplicaConfig, Role};

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What `replica add` asks for.
#[derive(Debug, Clone)]
pub struct AddReplica {
    /// New member's name, unique in the set.
    pub name: String,
    /// HOST:PORT, unique in the set.
    pub addr: String,
    /// Failure-domain label (default `near`).
    pub role: Role,
    /// Whether the link uses UDP + FEC.
    pub network_sync: bool,
    /// Its FEC code (network-sync only; default layered XOR 8,3).
    pub fec: Option<FecConfig>,
    /// Add it even if Q is then no longer a strict majority of the set.
    pub force: bool,
}

/// Why a membership change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Another change is still running.
    #[error("another replica set change is in progress; retry when it ends")]
    Busy,
    /// No member has that name.
    #[error("no replica named {name} in volume {volume}")]
    Unknown { volume: String, name: String },
    /// The name or address is already a member's.
    #[error("replica {name}: {what} {value} is already used by member {by}")]
    Duplicate { name: String, what: &'static str, value: String, by: String },
    /// The new set would be smaller than the quorum, so no write could
    /// ever complete; `--force` does not override this.
    #[error("removing {name} would leave {left} replicas, fewer than the quorum Q = {quorum}; add a replica first")]
    SmallerThanQuorum { name: String, left: usize, quorum: usize },
    /// After the add Q would not be a strict majority of the set (Q <= N/2):
    /// a majority that a later host fences could then miss every replica
    /// that acknowledged a write (`docs/design.md`, "What `add` refuses").
    #[error("adding {name} to volume {volume} would make N = {members} replicas with Q = {quorum}, and Q would no longer be a strict majority (Q > N/2), the condition under which no acknowledged write is lost (use --force to add it anyway)")]
    QuorumNotMajority { volume: String, name: String, quorum: usize, members: usize },
    /// Fewer than Q up-to-date replicas would remain.
    #[error("removing {name} would leave {left} up-to-date replicas, fewer than the quorum Q = {quorum} (use --force to remove it anyway)")]
    BelowQuorum { name: String, left: usize, quorum: usize },
    /// Fewer than a majority of the new set are reachable.
    #[error("removing {name} would leave {reachable} of {members} replicas reachable, fewer than a majority ({need}) (use --force to remove it anyway)")]
    NoMajority { name: String, reachable: usize, members: usize, need: usize },
    /// The replica to add answered with another volume's identity.
    #[error("replica {name} ({addr}) belongs to volume {found}, not {expected}; give it an empty directory (`starblk replica init`)")]
    OtherVolume { name: String, addr: String, found: String, expected: String },
    /// The replica to add has another geometry.
    #[error("replica {name} ({addr}) holds {found_size} bytes with {found_bs}-byte blocks; volume {volume} has {size} bytes with {bs}-byte blocks")]
    Geometry { name: String, addr: String, volume: String, found_size: u64, found_bs: u32, size: u64, bs: u32 },
    /// A replica call failed.
    #[error("replica {name} ({addr}): {source}")]
    Replica { name: String, addr: String, source: ClientError },
    /// The new set did not reach a majority of the old and of the new set.
    #[error("replica set version {version} reached only {persisted:?}; a majority of the old and of the new set is needed, so it did not take effect{rollback}. Failures: {detail}")]
    NotCommitted { version: u64, persisted: Vec<String>, detail: String, rollback: Rollback },
    /// The link table is full until the host restarts.
    #[error("this host has run {max} replica links since it started; restart it (`starblk down`, `starblk up`) before adding more")]
    TableFull { max: usize },
}

/// What happened to replicas that stored a change that did not commit.
#[derive(Debug)]
pub enum Rollback {
    /// Nobody stored it.
    Nothing,
    /// Those that stored it were given the old set back as `version`.
    RolledBack { version: u64 },
    /// Putting the old set back failed too: `up` will take whichever
    /// version a majority holds.
    Failed { detail: String },
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rollback::Nothing => Ok(()),
            Rollback::RolledBack { version } => write!(f, " (the old set was restored as version {version})"),
            Rollback::Failed { detail } => write!(f, " (restoring the old set failed too: {detail})"),
        }
    }
}

/// The stored set and the lock that keeps changes one at a time.
pub(crate) struct Members {
    /// The set in effect.
    pub current: Mutex<Membership>,
    /// Held while a change runs.
    changing: Mutex<()>,
}

impl Members {
    pub fn new(m: Membership) -> Members {
        Members { current: Mutex::new(m), changing: Mutex::new(()) }
    }

    fn current(&self) -> Membership {
        self.current.lock().expect("members lock poisoned").clone()
    }
}

/// The stored form of a configured replica.
pub fn member_of(r: &ReplicaConfig) -> Member {
    Member {
        name: r.name.clone(),
        addr: r.addr.clone(),
        role: r.role.to_string(),
        network_sync: r.network_sync,
        fec: r.fec.map(|f| f.to_string()),
    }
}

/// The replica config a stored member stands for. Link tuning and
/// `encrypt`, which the set does not store, come from `like` (the config
/// file's entry of the same name), else the defaults (`encrypt`: the
/// volume's).
pub fn replica_config_of(m: &Member, like: Option<&ReplicaConfig>, encrypt: bool) -> Result<ReplicaConfig, String> {
    let role: Role = m.role.parse().map_err(|e| format!("stored member {}: {e}", m.name))?;
    let fec = match &m.fec {
        Some(f) => Some(f.parse::<FecConfig>().map_err(|e| format!("stored member {}: {e}", m.name))?),
        None => None,
    };
    let link = like.filter(|c| c.network_sync == m.network_sync).map_or(LinkTuning::default(), |c| c.link);
    let encrypt = like.map_or(encrypt, |c| c.encrypt);
    Ok(ReplicaConfig {
        name: m.name.clone(),
        addr: m.addr.clone(),
        role,
        network_sync: m.network_sync,
        fec,
        link,
        encrypt,
    })
}

impl Volume {
    /// The replica set in effect.
    pub fn members(&self) -> Membership {
        self.shared.members.current()
    }

    /// `replica add`: stamps the new replica if it is empty, stores the new
    /// set on a majority of the old and the new set, then starts its link.
    /// It joins `recovering` (a full copy) and counts toward Q once caught
    /// up. Returns the new set's version.
    pub fn add_replica(&self, req: AddReplica) -> Result<u64, MembershipError> {
        let s = &self.shared;
        let _one = s.members.changing.try_lock().map_err(|_| MembershipError::Busy)?;
        let old = s.members.current();
        check_new_member(&old, &req)?;
        check_quorum_majority(&s.cfg.name, &req, s.cfg.quorum, old.members.len() + 1)?;
        if s.links.len() >= super::MAX_REPLICAS {
            return Err(MembershipError::TableFull { max: super::MAX_REPLICAS });
        }
        let cfg = ReplicaConfig {
            name: req.name.clone(),
            addr: req.addr.clone(),
            role: req.role,
            network_sync: req.network_sync,
            fec: req.fec,
            link: LinkTuning::default(),
            encrypt: s.cfg.encrypt,
        };
        let member = member_of(&cfg);
        let mut next = Membership {
            epoch: s.cfg.epoch,
            version: old.version + 1,
            members: old.members.clone(),
            previous: old.members.clone(),
        };
        next.members.push(member);
        self.prepare_new_replica(&req, &next)?;
        persist(s, &old, &next, false)?;
        let spec = ReplicaSpec {
            name: cfg.name.clone(),
            addr: cfg.addr.clone(),
            role: cfg.role,
            initial_durable_seq: 0,
            netsync: cfg.network_sync.then(|| super::startup::netsync_config(&cfg, s.cfg.keys.is_some())),
            encrypt: cfg.encrypt,
            wire_gate: cfg.link.ack_on_wire,
            max_exposure: cfg.link.max_exposure,
        };
        s.add_link(spec);
        *s.members.current.lock().expect("members lock poisoned") = next.clone();
        tracing::info!(volume = %s.cfg.name, replica = %req.name, addr = %req.addr, version = next.version, "replica added");
        Ok(next.version)
    }

    /// Checks the replica to add and stamps it with the volume identity if
    /// it is empty. A replica of this volume (one removed earlier) is taken
    /// as it is: recovery brings it back.
    fn prepare_new_replica(&self, req: &AddReplica, next: &Membership) -> Result<(), MembershipError> {
        let cfg = &self.shared.cfg;
        let fail = |source| MembershipError::Replica { name: req.name.clone(), addr: req.addr.clone(), source };
        let creds = self.shared.creds(cfg.encrypt);
        let hello = client::probe_with(&req.addr, CALL_TIMEOUT, creds.as_ref()).map_err(fail)?.hello;
        if hello.volume != [0; 16] && hello.volume != cfg.volume {
            return Err(MembershipError::OtherVolume {
                name: req.name.clone(),
                addr: req.addr.clone(),
                found: client::uuid_string(&hello.volume),
                expected: client::uuid_string(&cfg.volume),
            });
        }
        let bs_differs = hello.volume != [0; 16] && hello.block_size != cfg.block_size;
        if hello.size_bytes != cfg.size_bytes || bs_differs {
            return Err(MembershipError::Geometry {
                name: req.name.clone(),
                addr: req.addr.clone(),
                volume: cfg.name.clone(),
                found_size: hello.size_bytes,
                found_bs: hello.block_size,
                size: cfg.size_bytes,
                bs: cfg.block_size,
            });
        }
        if hello.volume == [0; 16] {
            let st = Stamp {
                volume: cfg.volume,
                size_bytes: cfg.size_bytes,
                block_size: cfg.block_size,
                epoch: cfg.epoch,
                members: Membership {
                    epoch: cfg.epoch,
                    version: 0,
                    members: next.members.clone(),
                    previous: Vec::new(),
                },
            };
            client::stamp_with(&req.addr, &st, CALL_TIMEOUT, creds.as_ref()).map_err(fail)?;
        }
        Ok(())
    }

    /// `replica remove`: refuses to leave fewer than Q up-to-date replicas
    /// or fewer than a majority of the new set reachable, unless `force`;
    /// never leaves fewer members than Q. Stores the new set, then stops
    /// the link. Returns the new set's version.
    pub fn remove_replica(&self, name: &str, force: bool) -> Result<u64, MembershipError> {
        let s = &self.shared;
        let _one = s.members.changing.try_lock().map_err(|_| MembershipError::Busy)?;
        let old = s.members.current();
        if old.get(name).is_none() {
            return Err(MembershipError::Unknown { volume: s.cfg.name.clone(), name: name.to_string() });
        }
        let next = Membership {
            epoch: s.cfg.epoch,
            version: old.version + 1,
            members: old.members.iter().filter(|m| m.name != name).cloned().collect(),
            previous: old.members.clone(),
        };
        check_removal(s, name, &next, force)?;
        persist(s, &old, &next, force)?;
        s.remove_link(name);
        *s.members.current.lock().expect("members lock poisoned") = next.clone();
        tracing::info!(volume = %s.cfg.name, replica = %name, version = next.version, force, "replica removed");
        Ok(next.version)
    }
}

/// Name and address must be new. Addresses are compared in the normalised
/// form the config file's duplicate check uses, so that two spellings of
/// one replica's address are caught; a stored address that does not parse
/// (it cannot come from a checked config or request) is compared as text.
fn check_new_member(old: &Membership, req: &AddReplica) -> Result<(), MembershipError> {
    let norm = |a: &str| crate::config::check_addr(a).unwrap_or_else(|_| a.to_ascii_lowercase());
    for m in &old.members {
        let dup = if m.name == req.name {
            Some(("name", req.name.clone()))
        } else if norm(&m.addr) == norm(&req.addr) {
            Some(("address", req.addr.clone()))
        } else {
            None
        };
        if let Some((what, value)) = dup {
            return Err(MembershipError::Duplicate { name: req.name.clone(), what, value, by: m.name.clone() });
        }
    }
    Ok(())
}

/// Q must stay a strict majority of the `members` the set has after the
/// add, unless `req.force`.
fn check_quorum_majority(volume: &str, req: &AddReplica, quorum: usize, members: usize) -> Result<(), MembershipError> {
    if req.force || quorum > members / 2 {
        return Ok(());
    }
    Err(MembershipError::QuorumNotMajority { volume: volume.to_string(), name: req.name.clone(), quorum, members })
}

/// The refusals of `replica remove` (docs/semantics.md §10).
fn check_removal(s: &Shared, name: &str, next: &Membership, force: bool) -> Result<(), MembershipError> {
    let quorum = s.cfg.quorum;
    let left = next.members.len();
    if left < quorum {
        return Err(MembershipError::SmallerThanQuorum { name: name.to_string(), left, quorum });
    }
    if force {
        return Ok(());
    }
    let g = s.lock();
    let states: Vec<(String, LinkState)> =
        s.links.iter().zip(&g.links).map(|(l, c)| (l.spec.name.clone(), c.state)).collect();
    drop(g);
    let in_next = |n: &String| next.get(n).is_some();
    let up_to_date = states.iter().filter(|(n, st)| in_next(n) && *st == LinkState::UpToDate).count();
    if up_to_date < quorum {
        return Err(MembershipError::BelowQuorum { name: name.to_string(), left: up_to_date, quorum });
    }
    let reachable = states.iter().filter(|(n, st)| in_next(n) && st.is_connected()).count();
    let need = majority(left);
    if reachable < need {
        return Err(MembershipError::NoMajority { name: name.to_string(), reachable, members: left, need });
    }
    Ok(())
}

/// Stores `next` on every reachable member of `old` and `next`. Succeeds
/// once a majority of each set has it. With `force` (the operator's
/// override after losing replicas for good) one member of the new set is
/// enough; a later `up` that reaches only members without it would take
/// the older set, so `docs/operations.md` says to bring the set back to
/// full strength first. Otherwise it gives those that stored it the old
/// set back.
fn persist(s: &Shared, old: &Membership, next: &Membership, force: bool) -> Result<(), MembershipError> {
    let (persisted, detail) = store_everywhere(s, old, next);
    let committed =
        old.change_committed(next, &persisted) || (force && next.members.iter().any(|m| persisted.contains(&m.name)));
    if committed {
        return Ok(());
    }
    let rollback = if persisted.is_empty() {
        Rollback::Nothing
    } else {
        let back = Membership {
            epoch: next.epoch,
            version: next.version + 1,
            members: old.members.clone(),
            previous: next.members.clone(),
        };
        let (restored, why) = store_everywhere(s, next, &back);
        if restored.len() == persisted.len() || old.change_committed(&back, &restored) {
            *s.members.current.lock().expect("members lock poisoned") = back.clone();
            Rollback::RolledBack { version: back.version }
        } else {
            Rollback::Failed { detail: why }
        }
    };
    Err(MembershipError::NotCommitted { version: next.version, persisted, detail, rollback })
}

/// Sends `next` to every member of `a` and `b` in parallel; returns the
/// names that stored it and a description of the failures.
fn store_everywhere(s: &Shared, a: &Membership, next: &Membership) -> (Vec<String>, String) {
    let mut targets: Vec<&Member> = a.members.iter().collect();
    targets.extend(next.members.iter().filter(|m| a.get(&m.name).is_none()));
    let req = SetMembers { epoch: s.cfg.epoch, members: next.clone() };
    let volume = s.cfg.volume;
    let creds = s.creds(s.cfg.encrypt);
    let results: Vec<(String, Result<u64, ClientError>)> = thread::scope(|sc| {
        let hs: Vec<_> = targets
            .iter()
            .map(|m| {
                let (req, creds) = (&req, creds.as_ref());
                sc.spawn(move || (m.name.clone(), client::set_members(&m.addr, volume, req, CALL_TIMEOUT, creds)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("membership thread panicked")).collect()
    });
    let persisted = results.iter().filter(|(_, r)| r.is_ok()).map(|(n, _)| n.clone()).collect();
    let detail: Vec<String> =
        results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}"))).collect();
    (persisted, detail.join("; "))
}

impl Shared {
    /// What this host's sessions authenticate with (None: no key file).
    fn creds(&self, encrypt: bool) -> Option<starblk_replica::auth::Credentials> {
        self.cfg.keys.as_ref().map(|k| k.creds(encrypt))
    }

    /// Appends a link for a new member and starts its manager.
    fn add_link(self: &Arc<Self>, spec: ReplicaSpec) {
        let mut g = self.lock();
        let idx = g.links.len();
        let mut core = link::LinkCore::new(0);
        core.netsync = spec.netsync.is_some() && spec.wire_gate;
        core.far = super::exposure::FarGate::for_spec(&spec);
        let l = Arc::new(Link::new(idx, spec));
        self.links.push(l.clone()).expect("checked that the table has room");
        g.links.push(core);
        drop(g);
        link::spawn_manager(self.clone(), l);
    }

    /// Stops a member's link for good; it shows as `removed`.
    fn remove_link(&self, name: &str) {
        let mut g = self.lock();
        let Some(l) = self.links.iter().find(|l| l.spec.name == name && !l.removed.load(Ordering::Acquire)) else {
            return;
        };
        l.removed.store(true, Ordering::Release);
        g.links[l.idx].set_state(LinkState::Removed, "removed from the replica set".into());
        g.links[l.idx].copy = None;
        self.advance(&mut g);
        drop(g);
        l.cut("removed from the replica set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(force: bool) -> AddReplica {
        AddReplica {
            name: "r9".into(),
            addr: "127.0.0.1:7709".into(),
            role: Role::Near,
            network_sync: false,
            fec: None,
            force,
        }
    }

    #[test]
    fn add_keeps_q_a_strict_majority_unless_forced() {
        // (Q, N after the add, allowed)
        let cases =
            [(2, 3, true), (2, 4, false), (3, 4, true), (3, 5, true), (3, 6, false), (1, 2, false), (1, 1, true)];
        for (quorum, members, allowed) in cases {
            let got = check_quorum_majority("vol0", &req(false), quorum, members);
            assert_eq!(got.is_ok(), allowed, "Q = {quorum}, N = {members}: {got:?}");
            assert!(check_quorum_majority("vol0", &req(true), quorum, members).is_ok(), "forced, Q = {quorum}");
        }
        let e = check_quorum_majority("vol0", &req(false), 2, 4).unwrap_err();
        assert!(
            matches!(&e, MembershipError::QuorumNotMajority { volume, name, quorum: 2, members: 4 } if volume == "vol0" && name == "r9"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("volume vol0") && text.contains("N = 4") && text.contains("Q = 2"), "{text}");
        assert!(text.contains("--force"), "{text}");
    }

    fn set_with(addr: &str) -> Membership {
        let m = Member { name: "r0".into(), addr: addr.into(), role: "near".into(), network_sync: false, fec: None };
        Membership { epoch: 1, version: 1, members: vec![m], previous: Vec::new() }
    }

    #[test]
    fn a_differently_spelled_address_of_a_member_is_a_duplicate() {
        let spellings = [
            ("127.0.0.1:7701", "127.0.0.1:07701"),
            ("Replica-A.example:7701", "replica-a.example.:7701"),
            ("[2001:db8::1]:7701", "[2001:0DB8:0:0::1]:7701"),
            ("127.0.0.1:7701", "[::ffff:127.0.0.1]:7701"),
        ];
        for (stored, asked) in spellings {
            let req = AddReplica { addr: asked.into(), ..req(false) };
            let e = check_new_member(&set_with(stored), &req).unwrap_err();
            assert!(
                matches!(&e, MembershipError::Duplicate { what: "address", value, by, .. } if value == asked && by == "r0"),
                "{stored} vs {asked}: {e:?}"
            );
        }
        let other = AddReplica { addr: "127.0.0.1:7702".into(), ..req(false) };
        check_new_member(&set_with("127.0.0.1:7701"), &other).expect("another port is another address");
    }
}

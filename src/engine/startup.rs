//! Startup: learn the volume from its replicas and fence older HEs.
//!
//! `up` and `takeover` raise the epoch on a majority of replicas before
//! writing. From then on those replicas refuse frames from any older
//! epoch. The new history starts at the highest *position* (epoch of the
//! last durable record, then seq) among the fenced majority: that is the
//! branch point (`docs/design.md`, "History").

use std::thread;
use std::time::Duration;

use starblk_replica::client::{self, ClientError, LogEntry};
use starblk_replica::history::{self, Standing};
use starblk_replica::members::{Member, Membership};
use starblk_replica::proto::{self, HelloOk, Stamp, Uuid};

use super::membership::{member_of, replica_config_of};

use std::sync::Arc;

use starblk_replica::auth::Credentials;

use super::keys::VolumeKeys;
use super::{EngineConfig, ReplicaSpec};
use crate::config::Config;

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a volume could not be started or created.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Too few replicas answered to form a majority.
    #[error("only {reachable} of {total} replicas are reachable; a majority ({need}) is needed to fence older hosts. Unreachable: {detail}")]
    NoMajority { reachable: usize, total: usize, need: usize, detail: String },
    /// A replica has no volume identity yet.
    #[error("replica {name} ({addr}) is not part of a volume yet; run `starblk volume create --config FILE` first")]
    Unstamped { name: String, addr: String },
    /// Another host raised the epoch at the same time: at most one wins.
    #[error("epoch {epoch} could not be raised on a majority ({fenced} of {total}, {need} needed): another host is starting or running ({detail}); retry, or stop the other host")]
    Contended { epoch: u64, fenced: usize, total: usize, need: usize, detail: String },
    /// Replicas disagree on the volume identity.
    #[error("replica {name} ({addr}) belongs to volume {found}, but the others hold {expected}")]
    VolumeMismatch { name: String, addr: String, found: String, expected: String },
    /// The replica's geometry disagrees with the config.
    #[error("replica {name} ({addr}) holds a {found_size}-byte volume with {found_bs}-byte blocks; the config says {size} bytes with {bs}-byte blocks")]
    Geometry { name: String, addr: String, found_size: u64, found_bs: u32, size: u64, bs: u32 },
    /// `volume create` found a replica that already belongs to a volume.
    #[error("replica {name} ({addr}) already belongs to volume {volume}; refusing to re-create it")]
    AlreadyStamped { name: String, addr: String, volume: String },
    /// A replica call failed.
    #[error("replica {name}: {source}")]
    Replica { name: String, source: ClientError },
    /// The replica set stored on the replicas cannot be served.
    #[error("the replica set stored on the replicas (version {version}) {why}")]
    StoredSet { version: u64, why: String },
    /// The volume's key file was refused.
    #[error(transparent)]
    KeyFile(#[from] starblk_replica::auth::KeyFileError),
}

/// The volume's keys, if it has a key file.
pub fn volume_keys(cfg: &Config) -> Result<Option<Arc<VolumeKeys>>, StartupError> {
    Ok(cfg.volume.key_file.as_deref().map(VolumeKeys::load).transpose()?.map(Arc::new))
}

/// The outcome of fencing.
#[derive(Debug, Clone)]
pub struct Fenced {
    /// Engine settings, with epoch and branch point.
    pub engine: EngineConfig,
    /// Every configured replica with its durable seq (0 if unreachable).
    pub replicas: Vec<ReplicaSpec>,
    /// Writes up to the branch point that some fenced replicas miss, read
    /// from the most advanced replica's log: they seed the write queue so
    /// those replicas catch up by quick recovery.
    pub seed: Vec<LogEntry>,
}

/// What startup's sessions with replica `r` authenticate with.
fn creds(keys: Option<&Arc<VolumeKeys>>, r: &crate::config::ReplicaConfig) -> Option<Credentials> {
    keys.map(|k| k.creds(r.encrypt))
}

fn probe_all(cfg: &Config, keys: Option<&Arc<VolumeKeys>>) -> Vec<Result<HelloOk, ClientError>> {
    thread::scope(|s| {
        let hs: Vec<_> = cfg
            .replicas
            .iter()
            .map(|r| {
                let c = creds(keys, r);
                s.spawn(move || client::probe_with(&r.addr, PROBE_TIMEOUT, c.as_ref()).map(|sess| sess.hello))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("probe thread panicked")).collect()
    })
}

/// Probes every replica, raises the epoch on a majority, and returns the
/// settings the engine starts from.
pub fn fence(cfg: &Config) -> Result<Fenced, StartupError> {
    let (cfg, members) = stored_set(cfg)?;
    let cfg = &cfg;
    let n = cfg.replicas.len();
    let keys = volume_keys(cfg)?;
    // The members of the set this one replaced are fenced too: a majority
    // of both (docs/design.md, "Membership"). They come after the members
    // in `wide` and are never served.
    let wide = &with_previous(cfg, &members)?;
    let probes = probe_all(wide, keys.as_ref());
    let volume = agree_on_volume(wide, &probes)?;
    count_majority(wide, &probes, &members)?;
    let epoch = history::next_epoch(probes.iter().flatten().map(|h| h.epoch));
    let mut raised: Vec<Result<HelloOk, ClientError>> = thread::scope(|s| {
        let hs: Vec<_> = wide
            .replicas
            .iter()
            .zip(&probes)
            .map(|(r, p)| {
                let c = creds(keys.as_ref(), r);
                s.spawn(move || match p {
                    Ok(_) => raise_epoch(&r.addr, epoch, c.as_ref()),
                    Err(e) => Err(clone_err(e)),
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("fence thread panicked")).collect()
    });
    if let Some((fenced, total, need)) = short_of_joint_majority(wide, &raised, &members) {
        let detail = describe_errors(wide, &raised);
        return Err(StartupError::Contended { epoch, fenced, total, need, detail });
    }
    let fenced = raised[..n].iter().flatten().count();
    let extra = raised.split_off(n);
    // The leader: the highest position among the fenced majority. Its log
    // holds every acknowledged write (docs/design.md, "Why the branch
    // point keeps every acknowledged write").
    let positions: Vec<history::Position> =
        raised.iter().map(|r| r.as_ref().map_or(history::Position::default(), |h| h.position())).collect();
    let fenced_positions: Vec<history::Position> = raised.iter().flatten().map(|h| h.position()).collect();
    let top = history::choose_leader(&fenced_positions).expect("a majority was fenced");
    let leader = raised.iter().position(|r| r.as_ref().is_ok_and(|h| h.position() == fenced_positions[top]));
    let leader = leader.expect("the top position belongs to a fenced replica");
    let leader_hello = raised[leader].as_ref().expect("leader was fenced");
    if let Some((i, h)) = extra
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().ok().map(|h| (i, h)))
        .filter(|(_, h)| h.position() > leader_hello.position())
    {
        let why = format!(
            "lists {} as removed, but it holds position {} beyond every member's ({}); add it back (`replica add`) so that it recovers the others, or wipe it",
            wide.replicas[n + i].name,
            h.position(),
            leader_hello.position()
        );
        return Err(StartupError::StoredSet { version: members.version, why });
    }
    let start_seq = leader_hello.durable_seq;
    let host_history = leader_hello.history.branch(epoch, start_seq);
    tracing::info!(volume = %cfg.volume.name, epoch, start_seq, leader = %cfg.replicas[leader].name, position = %positions[leader], fenced, "fenced older hosts; branch point recorded");
    let engine = EngineConfig {
        name: cfg.volume.name.clone(),
        volume,
        size_bytes: cfg.volume.size_bytes,
        block_size: cfg.volume.block_size,
        quorum: cfg.volume.quorum,
        write_queue_bytes: cfg.volume.write_queue_bytes,
        on_quorum_loss: cfg.volume.on_quorum_loss,
        epoch,
        start_seq,
        history: host_history.clone(),
        recovery_rate_bytes_per_s: cfg.volume.recovery_rate_bytes_per_s,
        members,
        encrypt: cfg.volume.encrypt,
        keys: keys.clone(),
        recovery_rate_auto: cfg.volume.recovery_rate_auto,
        local_reads: cfg.volume.local_reads,
    };
    // Fenced replicas whose logs are a prefix of the new history catch up
    // from it; the others hold another history's tail and stay out.
    let durables: Vec<Option<u64>> = raised
        .iter()
        .zip(&cfg.replicas)
        .map(|(r, spec)| {
            let h = r.as_ref().ok()?;
            match history::standing(&host_history, start_seq, &h.history, h.durable_seq) {
                Standing::Prefix => Some(h.durable_seq),
                diverged => {
                    tracing::warn!(replica = %spec.name, position = %h.position(), "{diverged}; it stays lagging until rolled back");
                    None
                }
            }
        })
        .collect();
    let replicas: Vec<ReplicaSpec> = cfg
        .replicas
        .iter()
        .zip(&durables)
        .map(|(r, d)| ReplicaSpec {
            name: r.name.clone(),
            addr: r.addr.clone(),
            role: r.role,
            initial_durable_seq: d.unwrap_or(0),
            netsync: r.network_sync.then(|| netsync_config(r, cfg.volume.key_file.is_some())),
            // `ack = "local"` acks without waiting for the wire:
            // "local-sync + FEC", only for the rolling-disaster contrast.
            wire_gate: r.link.ack_on_wire,
            max_exposure: r.link.max_exposure,
            encrypt: r.encrypt,
        })
        .collect();
    let seed = seed_from_leader(cfg, &engine, &durables);
    Ok(Fenced { engine, replicas, seed })
}

/// The network-sync link settings of a replica: its FEC scheme (default
/// layered XOR 8,3), pacing (a fixed rate, or the measured delivery rate),
/// window and MTU over the link's defaults.
/// `keyed`: the link carries a MAC trailer on every datagram (sized in).
pub fn netsync_config(r: &crate::config::ReplicaConfig, keyed: bool) -> starblk_netsync::LinkConfig {
    use crate::config::FecScheme as S;
    let code = match &r.fec {
        Some(f) => match f.scheme {
            S::LayeredXor => starblk_netsync::FecScheme::layered_xor(f.r as usize, f.c as usize),
            S::ReedSolomon => starblk_netsync::FecScheme::reed_solomon(f.r as usize, f.c as usize),
        },
        None => starblk_netsync::FecScheme::layered_xor(8, 3),
    };
    // Config validation holds r and c to what each scheme takes, so this
    // never drops FEC from a link silently.
    let fec = Some(code.expect("config checked the FEC code's r and c"));
    let payload_bytes = starblk_netsync::payload_bytes_for_mtu_keyed(r.link.mtu_bytes as usize, fec.as_ref(), keyed);
    let (auto_rate, rate_bits_per_s) = match r.link.rate {
        crate::config::LinkRate::Auto => (true, 0),
        crate::config::LinkRate::Fixed(bits) => (false, bits),
    };
    starblk_netsync::LinkConfig {
        fec,
        payload_bytes,
        rate_bits_per_s,
        auto_rate,
        window_bytes: r.link.window_bytes,
        ..Default::default()
    }
}

/// Most rounds of following stored sets to addresses not probed yet.
const STORED_SET_ROUNDS_MAX: usize = 4;

/// The replica set stored on the replicas, which is authoritative over the
/// config file (`docs/design.md`, "Membership"): probes the configured
/// replicas and every member the newest set they store names, and takes
/// the newest set found. Returns the config with that set's replicas (and
/// warns, naming each difference, when the file disagrees) and the set.
/// Replicas stamped before sets had versions fall back to the file.
fn stored_set(cfg: &Config) -> Result<(Config, Membership), StartupError> {
    let keys = volume_keys(cfg)?;
    let c = keys.map(|k| k.creds(cfg.volume.encrypt));
    let from_file = Membership {
        epoch: 0,
        version: 0,
        members: cfg.replicas.iter().map(member_of).collect(),
        previous: Vec::new(),
    };
    let mut probed: Vec<String> = Vec::new();
    let mut newest: Option<Membership> = None;
    let mut to_probe: Vec<String> = cfg.replicas.iter().map(|r| r.addr.clone()).collect();
    for _ in 0..STORED_SET_ROUNDS_MAX {
        let found: Vec<Option<Membership>> = thread::scope(|s| {
            let hs: Vec<_> = to_probe
                .iter()
                .map(|a| {
                    let c = c.as_ref();
                    s.spawn(move || client::probe_with(a, PROBE_TIMEOUT, c).ok().map(|sess| sess.hello.members))
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("probe thread panicked")).collect()
        });
        probed.append(&mut to_probe);
        for m in found.into_iter().flatten().filter(|m| m.version > 0) {
            if newest.as_ref().is_none_or(|n| m.order() > n.order()) {
                newest = Some(m);
            }
        }
        let Some(n) = &newest else { break };
        to_probe = n.members.iter().map(|m| m.addr.clone()).filter(|a| !probed.contains(a)).collect();
        if to_probe.is_empty() {
            break;
        }
    }
    let Some(stored) = newest else { return Ok((cfg.clone(), from_file)) };
    let diffs = stored.differences(&from_file);
    if diffs.is_empty() {
        return Ok((cfg.clone(), stored));
    }
    for d in &diffs {
        tracing::warn!(volume = %cfg.volume.name, version = stored.version, "the config file disagrees with the replica set stored on the replicas, which wins: {d}");
    }
    let bad = |why: String| StartupError::StoredSet { version: stored.version, why };
    if stored.members.len() < cfg.volume.quorum {
        return Err(bad(format!("has {} members, fewer than quorum = {}", stored.members.len(), cfg.volume.quorum)));
    }
    let mut effective = cfg.clone();
    effective.replicas = stored
        .members
        .iter()
        .map(|m| replica_config_of(m, cfg.replicas.iter().find(|r| r.name == m.name), cfg.volume.encrypt))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    Ok((effective, stored))
}

/// Reads the writes (lowest fenced durable seq, branch point] from the
/// replica that has them all. Returns nothing if every fenced replica is
/// at the branch point, or if the range no longer fits in its log or in
/// the write queue (those replicas then stay lagging until full recovery).
fn seed_from_leader(cfg: &Config, engine: &EngineConfig, durables: &[Option<u64>]) -> Vec<LogEntry> {
    let start = engine.start_seq;
    let low = durables.iter().flatten().copied().min().unwrap_or(start);
    let Some(leader) = durables.iter().position(|d| *d == Some(start)) else { return Vec::new() };
    if low >= start {
        return Vec::new();
    }
    let addr = &cfg.replicas[leader].addr;
    let hello = proto::Hello { volume: engine.volume, epoch: engine.epoch, flags: 0 };
    let c = creds(engine.keys.as_ref(), &cfg.replicas[leader]);
    let res = client::connect_with(addr, hello, PROBE_TIMEOUT, c.as_ref())
        .and_then(|mut s| s.read_log(low + 1, start, engine.write_queue_bytes / 2));
    match res {
        Ok((entries, next)) if next == start + 1 && entries.first().is_some_and(|e| e.0.seq == low + 1) => {
            tracing::info!(from = low + 1, to = start, leader = %cfg.replicas[leader].name, "seeding the write queue for replicas behind the branch point");
            entries
        }
        Ok((_, next)) => {
            tracing::warn!(
                from = low + 1,
                to = start,
                got_to = next,
                "write queue cannot hold the whole range; replicas behind it stay lagging"
            );
            Vec::new()
        }
        Err(e) => {
            tracing::warn!("could not read the leader's log to seed the write queue: {e}");
            Vec::new()
        }
    }
}

/// Raises the epoch on one replica and returns its state after the fence.
fn raise_epoch(addr: &str, epoch: u64, creds: Option<&Credentials>) -> Result<HelloOk, ClientError> {
    client::probe_with(addr, PROBE_TIMEOUT, creds)?.set_epoch(epoch)
}

/// "name: error" for each replica that failed.
fn describe_errors<T>(cfg: &Config, results: &[Result<T, ClientError>]) -> String {
    let d: Vec<String> = cfg
        .replicas
        .iter()
        .zip(results)
        .filter_map(|(r, p)| p.as_ref().err().map(|e| format!("{}: {e}", r.name)))
        .collect();
    d.join("; ")
}

/// Checks that the probes reached a majority of the set and, while it
/// records one, of the set it replaced (`wide` holds both).
fn count_majority(
    wide: &Config,
    probes: &[Result<HelloOk, ClientError>],
    members: &Membership,
) -> Result<(), StartupError> {
    let Some((reachable, total, need)) = short_of_joint_majority(wide, probes, members) else { return Ok(()) };
    let detail = describe_errors(wide, probes);
    Err(StartupError::NoMajority { reachable, total, need, detail })
}

/// (answered, members, needed) of the first of the members and the
/// previous set that fewer than a majority answered, if any.
fn short_of_joint_majority(
    wide: &Config,
    results: &[Result<HelloOk, ClientError>],
    members: &Membership,
) -> Option<(usize, usize, usize)> {
    let ok = |name: &str| wide.replicas.iter().zip(results).any(|(r, p)| r.name == name && p.is_ok());
    starblk_replica::members::short_of_majority([&members.members[..], &members.previous[..]], ok)
}

/// The config with the members of the previous set that are not members
/// any more appended (their settings from the file, else the defaults).
fn with_previous(cfg: &Config, members: &Membership) -> Result<Config, StartupError> {
    let mut wide = cfg.clone();
    for m in members.previous.iter().filter(|m| members.get(&m.name).is_none()) {
        let r = replica_config_of(m, None, cfg.volume.encrypt)
            .map_err(|why| StartupError::StoredSet { version: members.version, why })?;
        wide.replicas.push(r);
    }
    Ok(wide)
}

fn agree_on_volume(cfg: &Config, probes: &[Result<HelloOk, ClientError>]) -> Result<Uuid, StartupError> {
    let mut volume: Option<(Uuid, usize)> = None;
    for (i, (r, p)) in cfg.replicas.iter().zip(probes).enumerate() {
        let Ok(h) = p else { continue };
        if h.volume == [0; 16] {
            return Err(StartupError::Unstamped { name: r.name.clone(), addr: r.addr.clone() });
        }
        if h.size_bytes != cfg.volume.size_bytes || h.block_size != cfg.volume.block_size {
            return Err(StartupError::Geometry {
                name: r.name.clone(),
                addr: r.addr.clone(),
                found_size: h.size_bytes,
                found_bs: h.block_size,
                size: cfg.volume.size_bytes,
                bs: cfg.volume.block_size,
            });
        }
        match volume {
            None => volume = Some((h.volume, i)),
            Some((v, _)) if v != h.volume => {
                return Err(StartupError::VolumeMismatch {
                    name: r.name.clone(),
                    addr: r.addr.clone(),
                    found: client::uuid_string(&h.volume),
                    expected: client::uuid_string(&v),
                })
            }
            _ => {}
        }
    }
    Ok(volume.map(|(v, _)| v).unwrap_or([0; 16]))
}

/// `volume create`: stamps a new UUID, the geometry, epoch 1 and the
/// replica set on every replica. Every replica must be reachable and empty.
pub fn create_volume(cfg: &Config) -> Result<Uuid, StartupError> {
    let keys = volume_keys(cfg)?;
    let probes = probe_all(cfg, keys.as_ref());
    for (r, p) in cfg.replicas.iter().zip(&probes) {
        let h = p.as_ref().map_err(|e| StartupError::Replica { name: r.name.clone(), source: clone_err(e) })?;
        if h.volume != [0; 16] {
            let volume = client::uuid_string(&h.volume);
            return Err(StartupError::AlreadyStamped { name: r.name.clone(), addr: r.addr.clone(), volume });
        }
    }
    let volume: Uuid = rand::random();
    let members: Vec<Member> = cfg.replicas.iter().map(member_of).collect();
    let st = Stamp {
        volume,
        size_bytes: cfg.volume.size_bytes,
        block_size: cfg.volume.block_size,
        epoch: 1,
        members: Membership { epoch: 1, version: 1, members, previous: Vec::new() },
    };
    for r in &cfg.replicas {
        client::stamp_with(&r.addr, &st, PROBE_TIMEOUT, creds(keys.as_ref(), r).as_ref())
            .map_err(|source| StartupError::Replica { name: r.name.clone(), source })?;
    }
    Ok(volume)
}

fn clone_err(e: &ClientError) -> ClientError {
    ClientError::Io { addr: String::new(), source: std::io::Error::other(e.to_string()) }
}

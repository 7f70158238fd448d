//! The simulated network: sessions are ordered streams (like TCP), so a
//! frame never overtakes an earlier one on the same session; frames on
//! different sessions reorder freely. Loss is a broken session, never a
//! silent gap inside one. Partitions cut host-replica pairs until they heal.

use crate::model::{Sid, Time};

/// One session's transport state.
#[derive(Debug, Clone)]
pub struct Session {
    /// The host end.
    pub host: usize,
    /// The replica end.
    pub replica: usize,
    /// Frames toward the replica still flow.
    pub to_replica: bool,
    /// Frames toward the host still flow.
    pub to_host: bool,
    /// Arrival time of the last frame scheduled in each direction
    /// (0: toward the host, 1: toward the replica), for FIFO order.
    last: [Time; 2],
}

/// A cut between a host (or every host) and some replicas.
#[derive(Debug, Clone)]
pub struct Partition {
    /// To find it again when it heals.
    pub id: u64,
    /// The host cut off; None cuts these replicas from every host.
    pub host: Option<usize>,
    /// The replicas cut off.
    pub replicas: Vec<usize>,
}

/// Sessions and partitions.
#[derive(Debug, Default)]
pub struct Net {
    /// Indexed by session id.
    pub sessions: Vec<Session>,
    /// Active partitions.
    pub partitions: Vec<Partition>,
    next_partition: u64,
}

impl Net {
    /// The next session id a node may open.
    pub fn next_sid(&self) -> Sid {
        self.sessions.len() as Sid
    }

    /// Records session `sid` opened by `host` to `replica`.
    pub fn open(&mut self, sid: Sid, host: usize, replica: usize) {
        debug_assert_eq!(sid, self.next_sid(), "sessions are numbered in order");
        self.sessions.push(Session { host, replica, to_replica: true, to_host: true, last: [0; 2] });
    }

    /// Whether `host` and `replica` are cut off from each other.
    pub fn is_cut(&self, host: usize, replica: usize) -> bool {
        self.partitions.iter().any(|p| p.host.is_none_or(|h| h == host) && p.replicas.contains(&replica))
    }

    /// When a frame sent now with `delay` arrives, keeping FIFO order.
    pub fn arrival(&mut self, sid: Sid, to_replica: bool, now: Time, delay: Time) -> Time {
        let s = &mut self.sessions[sid as usize];
        let dir = to_replica as usize;
        let at = (now + delay).max(s.last[dir] + 1);
        s.last[dir] = at;
        at
    }

    /// When the end of the stream toward one side arrives there: after
    /// every frame already on its way.
    pub fn end_arrival(&self, sid: Sid, to_replica: bool, now: Time) -> Time {
        self.sessions[sid as usize].last[to_replica as usize].max(now) + 1
    }

    /// Whether frames in this direction still flow.
    pub fn flows(&self, sid: Sid, to_replica: bool) -> bool {
        self.sessions.get(sid as usize).is_some_and(|s| if to_replica { s.to_replica } else { s.to_host })
    }

    /// Open sessions (either direction flowing).
    pub fn open_sessions(&self) -> Vec<Sid> {
        (0..self.sessions.len() as Sid).filter(|&s| self.flows(s, true) || self.flows(s, false)).collect()
    }

    /// Adds a partition; returns its id.
    pub fn partition(&mut self, host: Option<usize>, replicas: Vec<usize>) -> u64 {
        let id = self.next_partition;
        self.next_partition += 1;
        self.partitions.push(Partition { id, host, replicas });
        id
    }

    /// Whether replicas `a` and `b` are cut off from each other: a
    /// partition of replicas from every host isolates them from the
    /// replicas outside it too.
    pub fn peers_cut(&self, a: usize, b: usize) -> bool {
        self.partitions.iter().any(|p| p.host.is_none() && (p.replicas.contains(&a) != p.replicas.contains(&b)))
    }

    /// Heals partition `id`.
    pub fn heal(&mut self, id: u64) {
        self.partitions.retain(|p| p.id != id);
    }
}

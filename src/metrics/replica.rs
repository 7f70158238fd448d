//! A replica server's metrics (`replica serve --metrics ADDR`): its store
//! (durable seq, epoch, log use, group commits) and its server (sessions,
//! refused frames, dropped network-sync datagrams, recovery copies and
//! replays). Counters are read with
//! relaxed loads; the log usage takes the store's append lock briefly, as
//! an append does.

use std::sync::atomic::Ordering;

use starblk_replica::server::Server;

use super::{labels, Exposition, Value};

/// The replica's `/metrics` page.
pub fn render(server: &Server) -> String {
    let store = server.store();
    let sb = store.superblock();
    let (log_used, log_size) = store.log_usage();
    let none = || labels(&[]);
    let one = |v: Value| [(none(), v)];
    let load = |c: &std::sync::atomic::AtomicU64| Value::Int(c.load(Ordering::Relaxed));
    let mut x = Exposition::new();
    let info = labels(&[
        ("volume_uuid", &starblk_replica::client::uuid_string(&sb.volume)),
        ("dir", &store.dir().display().to_string()),
    ]);
    x.gauge(
        "starblk_store_info",
        "Constant 1, labelled with the volume UUID stamped on the replica and its directory.",
        [(info, 1u64)],
    );
    x.gauge(
        "starblk_store_durable_seq",
        "Highest seq with every write up to it on stable storage.",
        one(store.durable_seq().into()),
    );
    x.gauge("starblk_store_epoch", "Fencing epoch; sessions of older epochs are refused.", one(store.epoch().into()));
    x.gauge(
        "starblk_store_checkpoint_seq",
        "Seq up to which the data file is synced and the log released.",
        one(sb.checkpoint_seq.into()),
    );
    x.gauge("starblk_store_size_bytes", "Size of the volume the replica holds.", one(sb.size_bytes.into()));
    x.gauge(
        "starblk_store_log_used_bytes",
        "Log bytes holding records not yet released by a checkpoint.",
        one(log_used.into()),
    );
    x.gauge("starblk_store_log_size_bytes", "Size of the log.", one(log_size.into()));
    x.gauge(
        "starblk_store_failed",
        "1 once a disk error stopped the store, else 0.",
        one(store.failure().is_some().into()),
    );
    x.counter(
        "starblk_store_commits_total",
        "Group commits: each is one log write and one fdatasync.",
        one(load(&store.commits)),
    );
    x.counter(
        "starblk_store_commit_seconds_total",
        "Time group commits spent writing and syncing the log (divide by commits for the mean).",
        one(Value::Float(store.commit_us.load(Ordering::Relaxed) as f64 / 1e6)),
    );
    x.counter(
        "starblk_store_writes_total",
        "Writes committed (data, discard and write-zeroes records).",
        one(load(&store.writes)),
    );
    x.counter(
        "starblk_store_written_bytes_total",
        "Data bytes of the writes committed.",
        one(load(&store.write_bytes)),
    );
    let copy = sb.copy.as_ref();
    x.gauge(
        "starblk_store_copying",
        "1 while a recovery copy into this replica runs, else 0.",
        one(copy.is_some().into()),
    );
    x.gauge(
        "starblk_store_copy_done_bytes",
        "Bytes the running recovery copy has copied, as last saved (about every 1 %).",
        copy.map(|c| (none(), c.done_bytes)),
    );
    x.gauge(
        "starblk_store_copy_size_bytes",
        "Bytes the running recovery copy copies in all (an estimate from above).",
        copy.map(|c| (none(), c.total_bytes)),
    );
    server_families(&mut x, server);
    x.finish()
}

fn server_families(x: &mut Exposition, server: &Server) {
    let one = |v: Value| [(labels(&[]), v)];
    let (served, received) = server.copy_bytes();
    x.gauge(
        "starblk_server_sessions_open",
        "Sessions open now (TCP and network-sync).",
        one(server.sessions_open().into()),
    );
    x.counter("starblk_server_sessions_total", "Sessions accepted.", one(server.sessions_total().into()));
    x.counter(
        "starblk_server_refusals_total",
        "Frames and requests the server refused, by reason (each also answered with an Error frame or status).",
        server.rejections.snapshot().into_iter().map(|(reason, n)| (labels(&[("reason", reason)]), n)),
    );
    x.counter(
        "starblk_server_netsync_rejected_datagrams_total",
        "Network-sync datagrams this replica dropped, by reason (its listener's and every link's since start).",
        server.netsync_rejected().by_reason().into_iter().map(|(reason, n)| (labels(&[("reason", reason)]), n)),
    );
    x.gauge(
        "starblk_server_replaying",
        "1 while a replay recovery into this replica runs, else 0.",
        one(server.replaying().into()),
    );
    x.counter("starblk_server_copy_served_bytes_total", "Region bytes sent to recovering peers.", one(served.into()));
    x.counter(
        "starblk_server_copy_received_bytes_total",
        "Region bytes received by this replica's own copies.",
        one(received.into()),
    );
}

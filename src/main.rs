//! The `starblk` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use starblk::bench::{Bench, BenchCompleter, BenchOptions, Pattern};
use starblk::config::Config;
use starblk::control::{self, ControlRequest};
use starblk::engine::{startup, Completer, IoResult, Volume};
use starblk::frontend::{EngineBackend, Slots};
use starblk::nbd::ListenAddr;
use starblk::size::parse_size;

#[derive(Parser)]
#[command(name = "starblk", version, about = "A replicated block device (StarFish + network-sync)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Which running volume a command talks to: its config file, its name
/// (default control socket) or the control socket itself.
#[derive(clap::Args, Debug)]
struct VolumeRef {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    volume: Option<String>,
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replica server commands and online membership changes.
    Replica {
        #[command(subcommand)]
        cmd: ReplicaCmd,
    },
    /// Volume commands.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Serve the volume (fences older hosts first).
    Up(UpArgs),
    /// A standby HE takes the volume over (fences the old one).
    Takeover(UpArgs),
    /// Show volume and replica state.
    Status {
        #[command(flatten)]
        at: VolumeRef,
        #[arg(long)]
        json: bool,
        /// Redraw every second, with a progress bar per recovering
        /// replica, until no replica is recovering.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Set the recovery rate limit of a running volume (e.g. `200Mbit`;
    /// `0` or `unlimited` lifts it; `auto` lets a controller choose it).
    /// Applies to replays and copies already running too.
    RecoveryRate {
        #[command(flatten)]
        at: VolumeRef,
        /// The new limit: a rate such as 200Mbit or 1Gbit, 0 / unlimited, or auto.
        rate: String,
    },
    /// Move every replica session to the next key of the volume's key
    /// file (docs/operations.md, "Keys and rotation").
    Rekey {
        #[command(flatten)]
        at: VolumeRef,
    },
    /// Flush, stop serving, remove the device.
    Down {
        #[command(flatten)]
        at: VolumeRef,
    },
    /// Benchmark the engine in process.
    Bench {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum)]
        pattern: Pattern,
        #[arg(long, value_parser = parse_size_arg)]
        bs: u64,
        #[arg(long)]
        qd: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        json: bool,
        /// Bytes of the volume to touch (default: min(size, 1GiB)).
        #[arg(long, value_parser = parse_size_arg)]
        span: Option<u64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Issue at most this many requests per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Print `ack OFFSET ID` on stdout for every completed write.
        #[arg(long)]
        ack_log: bool,
        /// Write each timed request's completion time and latency (µs) to
        /// this file.
        #[arg(long)]
        latency_log: Option<PathBuf>,
    },
    /// Availability of a replica layout (StarFish Eq. 1 / Eq. 2).
    Plan {
        #[arg(long)]
        replicas: usize,
        #[arg(long)]
        quorum: usize,
        #[arg(long)]
        availability: String,
        #[arg(long)]
        he_availability: Option<String>,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// Create an empty replica directory.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        /// Size of the replica's log (default 1 GiB); init writes it out in
        /// full, so commits never wait for block allocation
        #[arg(long, value_parser = parse_size_arg)]
        log_size: Option<u64>,
        /// Granularity of the change map that incremental recovery copies
        /// by: a power of two from 4KiB to 64KiB (default 64KiB).
        #[arg(long, value_parser = parse_size_arg)]
        region_size: Option<u64>,
    },
    /// Serve a replica directory on TCP (and UDP for network-sync).
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        listen: String,
        /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Require every session to authenticate with a key from this file
        /// (mode 0600, owned by this user; one key per line, 64 hex digits).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Add a replica to a running volume (it joins by a full copy).
    Add {
        #[arg(long)]
        volume: String,
        /// The running daemon's control socket (default /run/starblk/VOLUME.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        addr: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        network_sync: bool,
        #[arg(long)]
        fec: Option<String>,
        /// Add it even if the quorum is then no longer a strict majority
        /// of the replica set (Q <= N/2).
        #[arg(long)]
        force: bool,
    },
    /// Remove a replica from a running volume.
    Remove {
        #[arg(long)]
        volume: String,
        /// The running daemon's control socket (default /run/starblk/VOLUME.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Stamp volume UUID, size and epoch 1 on every replica.
    Create {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Frontend {
    Ublk,
    Nbd,
    None,
}

impl Frontend {
    fn name(self) -> &'static str {
        match self {
            Frontend::Ublk => "ublk",
            Frontend::Nbd => "nbd",
            Frontend::None => "none",
        }
    }
}

/// What `up` serves the volume through, from the flags.
enum Serve {
    /// The engine alone (`--frontend none`).
    Engine,
    /// A ublk device.
    Ublk(starblk_ublk::DeviceSpec),
    /// An NBD server at this address.
    Nbd(ListenAddr),
}

#[derive(clap::Args)]
struct UpArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long, value_enum, default_value = "ublk")]
    frontend: Frontend,
    #[arg(long)]
    foreground: bool,
    /// Where the NBD frontend listens: unix:PATH or HOST:PORT (default
    /// unix:NAME.nbd.sock next to the control socket).
    #[arg(long)]
    nbd_listen: Option<String>,
    /// Control socket path (default /run/starblk/NAME.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Requests in flight per ublk queue.
    #[arg(long, default_value_t = 128)]
    queue_depth: u16,
    /// Largest single I/O the kernel sends (at most 1MiB).
    #[arg(long, value_parser = parse_size_arg, default_value = "512k")]
    max_io: u64,
    /// Discard granularity (default: the volume's block size).
    #[arg(long, value_parser = parse_size_arg)]
    discard_granularity: Option<u64>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A usage or configuration error: exit code 2.
#[derive(Debug)]
struct UsageError(String);
impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let verbose = matches!(cli.cmd, Cmd::Up(_) | Cmd::Takeover(_) | Cmd::Replica { cmd: ReplicaCmd::Serve { .. } });
    init_tracing(if verbose { "info" } else { "warn" });
    abort_on_panic();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("starblk: error: {e:#}");
            ExitCode::from(if e.downcast_ref::<UsageError>().is_some() { 2 } else { 1 })
        }
    }
}

/// Fail fast on bugs: a panic in any thread ends the process once the
/// default hook has printed it, so no thread carries on past a poisoned
/// lock or a peer thread that died. systemd restarts the service; a
/// restarted `up` reattaches to the same ublk device (user recovery), and
/// a restarted replica replays its log.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        std::process::abort();
    }));
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STARBLK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: daemon and replica logs go to files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).map_err(|e| usage(e.to_string()))
}

/// Loads a config for a command that moves data (`volume create`, `up`,
/// `takeover`, `bench`). A `key_file` that cannot be used (missing,
/// unsafe mode or owner, bad lines) is a configuration error (exit 2),
/// found before any replica is contacted.
fn load_config_for_io(path: &Path) -> Result<Config> {
    let cfg = load_config(path)?;
    if let Some(k) = &cfg.volume.key_file {
        starblk_replica::auth::KeyRing::load(k)
            .map_err(|e| usage(format!("{}: [volume] key_file: {e}", path.display())))?;
    }
    Ok(cfg)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Replica { cmd } => replica_cmd(cmd),
        Cmd::Volume { cmd: VolumeCmd::Create { config } } => {
            let cfg = load_config_for_io(&config)?;
            let uuid = startup::create_volume(&cfg)?;
            println!(
                "created volume {} ({}) on {} replicas",
                cfg.volume.name,
                starblk_replica::client::uuid_string(&uuid),
                cfg.replicas.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up(args) => up(args, false),
        Cmd::Takeover(args) => up(args, true),
        Cmd::Status { at, json, watch } => status(socket_path(at)?, json, watch),
        Cmd::Down { at } => down(at),
        Cmd::Rekey { at } => rekey(socket_path(at)?),
        Cmd::RecoveryRate { at, rate } => recovery_rate(socket_path(at)?, &rate),
        Cmd::Bench { config, pattern, bs, qd, seconds, verify, json, span, seed, rate, ack_log, latency_log } => {
            let extra = BenchExtra { json, span, seed, rate, ack_log, latency_log };
            bench(&config, pattern, bs, qd, seconds, verify, extra)
        }
        Cmd::Plan { replicas, quorum, availability, he_availability, read_only, json } => {
            let a =
                starblk::plan::parse_availability("--availability", &availability).map_err(|e| usage(e.to_string()))?;
            let he = he_availability
                .map(|s| starblk::plan::parse_availability("--he-availability", &s))
                .transpose()
                .map_err(|e| usage(e.to_string()))?;
            let r = starblk::plan::plan(replicas, quorum, a, he, read_only).map_err(|e| usage(e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{r}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn replica_cmd(cmd: ReplicaCmd) -> Result<ExitCode> {
    match cmd {
        ReplicaCmd::Init { dir, size, log_size, region_size } => {
            let log = log_size.unwrap_or(starblk_replica::store::DEFAULT_LOG_BYTES);
            let region = region_size.unwrap_or(1 << starblk_replica::changes::REGION_SHIFT_DEFAULT);
            if !region.is_power_of_two() || !(4096..=65536).contains(&region) {
                return Err(usage(format!(
                    "--region-size {region}: expected a power of two from 4KiB to 64KiB (default 64KiB)"
                )));
            }
            starblk_replica::store::init_with_regions(&dir, size, log, region.trailing_zeros())
                .map_err(|e| usage(e.to_string()))?;
            println!(
                "initialised replica in {} ({} bytes, log {} bytes, change map regions {} bytes)",
                dir.display(),
                size,
                log,
                region
            );
            Ok(ExitCode::SUCCESS)
        }
        ReplicaCmd::Serve { dir, listen, metrics, key_file } => {
            use starblk_replica::{server::ServeError, store::StoreError};
            // Bound first, so a bad or taken address fails before the store opens.
            let metrics = metrics
                .map(|m| {
                    let addr = starblk::config::parse_listen(&m).map_err(|e| usage(format!("--metrics {m:?}: {e}")))?;
                    Ok::<_, anyhow::Error>(starblk::metrics::http::bind(addr)?)
                })
                .transpose()?;
            let opts = starblk_replica::server::ServeOptions { key_file };
            let h = starblk_replica::server::spawn_with(&dir, &listen, &opts).map_err(|e| match e {
                // A bad STARBLK_FAULT (tests) is a usage error, like a bad flag.
                ServeError::Store(e @ StoreError::FaultSpec(_)) => usage(e.to_string()),
                ServeError::KeyFile(e) => usage(format!("--key-file: {e}")),
                e => anyhow::Error::new(e).context(format!("serving replica {} on {listen}", dir.display())),
            })?;
            if let Some(l) = metrics {
                let server = h.server.clone();
                starblk::metrics::http::serve(l, Arc::new(move || starblk::metrics::replica::render(&server)))?;
            }
            println!("listening on {}", h.addr);
            starblk::notify::ready_or_warn(&format!("serving replica {} on {}", dir.display(), h.addr));
            h.wait();
            Ok(ExitCode::SUCCESS)
        }
        ReplicaCmd::Add { volume, socket, name, addr, role, network_sync, fec, force } => {
            let path = socket.unwrap_or_else(|| default_socket(&volume));
            let req = ControlRequest::ReplicaAdd { name: name.clone(), addr, role, network_sync, fec, force };
            let v = control::call(&path, &req, Duration::from_secs(30))?;
            println!(
                "replica {name} added to volume {volume} (replica set version {}); it recovers by a full copy",
                v["version"]
            );
            Ok(ExitCode::SUCCESS)
        }
        ReplicaCmd::Remove { volume, socket, name, force } => {
            let path = socket.unwrap_or_else(|| default_socket(&volume));
            let v = control::call(
                &path,
                &ControlRequest::ReplicaRemove { name: name.clone(), force },
                Duration::from_secs(30),
            )?;
            println!("replica {name} removed from volume {volume} (replica set version {})", v["version"]);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn default_socket(volume: &str) -> PathBuf {
    Path::new(starblk::config::SOCKET_DIR).join(format!("{volume}.sock"))
}

fn socket_path(VolumeRef { config, volume, socket }: VolumeRef) -> Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(c) = config {
        return Ok(load_config(&c)?.socket_path());
    }
    match volume {
        Some(v) => Ok(default_socket(&v)),
        None => Err(usage("name the volume: give --volume NAME, --config FILE or --socket PATH")),
    }
}

/// `rekey`: every replica session moves to the key file's next key.
fn rekey(path: PathBuf) -> Result<ExitCode> {
    let v = control::call(&path, &ControlRequest::Rekey, Duration::from_secs(600))?;
    let r: starblk::engine::RekeyReport = serde_json::from_value(v["rekey"].clone())?;
    println!("rekeyed from key {} to key {}", r.old_key, r.new_key);
    println!("  re-established: {}", list_or_none(&r.moved));
    if !r.not_connected.is_empty() {
        println!("  not connected (their next session uses the new key): {}", r.not_connected.join(", "));
    }
    if !r.not_back.is_empty() {
        println!("  not up to date again yet (they reconnect with the new key): {}", r.not_back.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn status(path: PathBuf, json: bool, watch: bool) -> Result<ExitCode> {
    let v = control::call(&path, &ControlRequest::Status, Duration::from_secs(10))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v["status"])?);
        return Ok(ExitCode::SUCCESS);
    }
    let st: starblk::engine::status::VolumeStatus = serde_json::from_value(v["status"].clone())?;
    if let Some(dev) = v["device"].as_str() {
        println!("device {dev}");
    }
    print!("{st}");
    if watch {
        watch_recoveries(&path)?;
    } else if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        for (name, r) in recoveries(&st) {
            let bar = recovery_bar(&name, &r, indicatif::ProgressDrawTarget::stdout());
            bar.abandon();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The replicas with a recovery copy to show.
fn recoveries(st: &starblk::engine::status::VolumeStatus) -> Vec<(String, starblk::engine::status::RecoveryStatus)> {
    st.replicas.iter().filter_map(|r| r.recovery.clone().map(|c| (r.name.clone(), c))).collect()
}

/// A progress bar for one replica's copy: bytes done of total, %, rate, ETA.
fn recovery_bar(
    name: &str,
    r: &starblk::engine::status::RecoveryStatus,
    target: indicatif::ProgressDrawTarget,
) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(r.progress.total_bytes.max(1)), target);
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {msg}")
            .expect("static template")
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(name.to_string());
    update_bar(&bar, r);
    bar
}

fn update_bar(bar: &indicatif::ProgressBar, r: &starblk::engine::status::RecoveryStatus) {
    let p = &r.progress;
    bar.set_length(p.total_bytes.max(1));
    bar.set_position(if p.fraction >= 1.0 { p.total_bytes.max(1) } else { p.done_bytes.min(p.total_bytes) });
    let eta = p.eta_s.map_or(String::new(), |s| format!(", ETA {s} s"));
    bar.set_message(format!(
        "{} from {} at {}{eta}",
        r.kind,
        r.peer,
        starblk::size::format_rate(p.rate_bytes_per_s * 8)
    ));
}

/// `status --watch`: one bar per recovering replica, redrawn every second
/// until none is recovering.
fn watch_recoveries(path: &Path) -> Result<()> {
    let multi = indicatif::MultiProgress::new();
    let mut bars: std::collections::HashMap<String, indicatif::ProgressBar> = Default::default();
    loop {
        let v = control::call(path, &ControlRequest::Status, Duration::from_secs(10))?;
        let st: starblk::engine::status::VolumeStatus = serde_json::from_value(v["status"].clone())?;
        let now = recoveries(&st);
        for (name, r) in &now {
            let bar = bars
                .entry(name.clone())
                .or_insert_with(|| multi.add(recovery_bar(name, r, indicatif::ProgressDrawTarget::hidden())));
            update_bar(bar, r);
        }
        let recovering = st.replicas.iter().any(|r| r.state == starblk::engine::LinkState::Recovering);
        if !recovering {
            for bar in bars.values() {
                bar.finish();
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `recovery-rate`: changes the replay recovery rate limit online.
fn recovery_rate(path: PathBuf, rate: &str) -> Result<ExitCode> {
    let auto = rate.trim() == "auto";
    let bits = match rate.trim() {
        "0" | "unlimited" | "auto" => 0,
        r => starblk::size::parse_rate(r).map_err(|e| usage(format!("recovery rate {r:?}: {e}, or auto")))?,
    };
    let req = ControlRequest::RecoveryRate { bytes_per_s: bits.div_ceil(8), auto };
    let v = control::call(&path, &req, Duration::from_secs(10))?;
    let show = |bytes_per_s: u64| match bytes_per_s {
        0 => "unlimited".to_string(),
        b => starblk::size::format_rate(b * 8),
    };
    let old = v["previous_bytes_per_s"].as_u64().unwrap_or(0);
    let new = if auto { "auto".to_string() } else { show(bits.div_ceil(8)) };
    println!("recovery rate {new} (was {})", show(old));
    Ok(ExitCode::SUCCESS)
}

/// `down`: asks the daemon to flush and stop. If no daemon answers (it was
/// killed), deletes the device it left for user recovery, if any.
fn down(at: VolumeRef) -> Result<ExitCode> {
    let name = match (&at.volume, &at.config) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(c)) => Some(load_config(c)?.volume.name),
        _ => None,
    };
    let path = socket_path(at)?;
    match control::call(&path, &ControlRequest::Down, Duration::from_secs(60)) {
        Ok(_) => {
            wait_gone(&path, Duration::from_secs(60))?;
            println!("volume down");
        }
        Err(control::ControlError::Connect { .. }) if name.is_some() => {
            let run_dir = path.parent().unwrap_or(Path::new(starblk::config::SOCKET_DIR));
            let name = name.expect("checked");
            match starblk_ublk::down(run_dir, &name) {
                Ok(Some(id)) => println!("no daemon was running; deleted /dev/ublkb{id} of volume {name}"),
                Ok(None) => bail!("no daemon serves volume {name} and it has no device (socket {})", path.display()),
                Err(e) => bail!("no daemon serves volume {name}; deleting its device failed: {e}"),
            }
            let _ = std::fs::remove_file(&path);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}

fn wait_gone(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if path.exists() {
        bail!("daemon did not exit within {timeout:?} ({} still exists)", path.display());
    }
    Ok(())
}

/// Completer for a volume with no frontend attached.
struct NoFrontend;
impl Completer for NoFrontend {
    fn complete(&self, _token: u64, _result: IoResult<'_>) {}
}

fn up(args: UpArgs, takeover: bool) -> Result<ExitCode> {
    let mut cfg = load_config_for_io(&args.config)?;
    if let Some(s) = &args.socket {
        cfg.volume.control_socket = Some(s.clone());
    }
    let serve = frontend(&cfg, &args)?;
    // Fencing would cut a live local daemon off its replicas: refuse first.
    // `takeover` is the deliberate way to fence another HE.
    let sock = cfg.socket_path();
    if !takeover && control::call(&sock, &ControlRequest::Status, Duration::from_secs(2)).is_ok() {
        bail!("volume {} is already served by a running daemon (control socket {}); use `starblk down` first, or `starblk takeover` on a standby host", cfg.volume.name, sock.display());
    }
    if !args.foreground {
        return daemonize(&cfg, &args, &serve);
    }
    // Before any thread exists, so every thread inherits the mask and only
    // the signal thread sees SIGTERM/SIGINT (they mean `down`).
    let signals = starblk_ublk::StopSignals::block();
    // Bound before fencing, so a taken port fails before replicas are touched.
    let metrics = cfg.volume.metrics_listen.map(starblk::metrics::http::bind).transpose()?;
    let fenced = startup::fence(&cfg)?;
    let device: control::Device = Default::default();
    let (down_tx, down_rx) = mpsc::channel();
    // SIGTERM/SIGINT act like `starblk down`.
    let sig_tx = down_tx.clone();
    signals.on_signal(move |sig| {
        tracing::info!(signal = sig, "signal: shutting down");
        let _ = sig_tx.send(());
    });
    match serve {
        Serve::Engine => {
            let vol = Volume::start_fenced(fenced, Arc::new(NoFrontend));
            serve_metrics(metrics, &vol)?;
            wait_quorum(&vol);
            control::serve(&sock, vol.clone(), device, down_tx)
                .with_context(|| format!("control socket {}", sock.display()))?;
            println!("volume {} up (frontend none), control socket {}", cfg.volume.name, sock.display());
            starblk::notify::ready_or_warn(&format!("volume {} up (frontend none)", cfg.volume.name));
            let _ = down_rx.recv();
            finish(&vol, &sock);
        }
        Serve::Ublk(spec) => up_ublk(&cfg, (fenced, metrics), spec, device, down_tx, down_rx)?,
        Serve::Nbd(listen) => up_nbd(&cfg, (fenced, metrics), &listen, device, down_tx, down_rx)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves the HE's Prometheus metrics on `listener` (`metrics_listen`).
fn serve_metrics(listener: Option<std::net::TcpListener>, vol: &Volume) -> Result<()> {
    let Some(l) = listener else { return Ok(()) };
    let vol = vol.clone();
    let render = move || starblk::metrics::volume::render(&vol.status(), &vol.latency());
    starblk::metrics::http::serve(l, Arc::new(render)).context("metrics")?;
    Ok(())
}

/// Waits for Q up-to-date replicas (10 s), then briefly (3 s) for every
/// other replica to connect, so a network-sync link still saying hello
/// gates the first writes too. Neither wait is fatal.
fn wait_quorum(vol: &Volume) {
    if !vol.wait_quorum(Duration::from_secs(10)) {
        tracing::warn!("quorum not reached within 10 s; I/O waits until it is");
        return;
    }
    let missing = vol.wait_connected(Duration::from_secs(3));
    if !missing.is_empty() {
        tracing::warn!(replicas = ?missing, "not connected after 3 s; serving without them, they catch up when they connect");
    }
}

/// Waits for every connected replica to catch up, then removes the socket.
fn finish(vol: &Volume, sock: &Path) {
    if !vol.shutdown(Duration::from_secs(30)) {
        tracing::warn!("some connected replicas did not reach the last seq before shutdown");
    }
    let _ = std::fs::remove_file(sock);
}

/// The frontend and its settings from the flags.
fn frontend(cfg: &Config, args: &UpArgs) -> Result<Serve> {
    if args.nbd_listen.is_some() && args.frontend != Frontend::Nbd {
        return Err(usage(format!("--nbd-listen is for --frontend nbd, not --frontend {}", args.frontend.name())));
    }
    Ok(match args.frontend {
        Frontend::None => Serve::Engine,
        Frontend::Ublk => Serve::Ublk(ublk_spec(cfg, args)?),
        Frontend::Nbd => Serve::Nbd(match &args.nbd_listen {
            Some(l) => absolute(ListenAddr::parse(l).map_err(|e| usage(e.to_string()))?)?,
            None => ListenAddr::default_for(&cfg.socket_path(), &cfg.volume.name),
        }),
    })
}

/// Makes a relative Unix socket path absolute, so the printed URI works
/// from any directory.
fn absolute(listen: ListenAddr) -> Result<ListenAddr> {
    Ok(match listen {
        ListenAddr::Unix(p) if p.is_relative() => {
            ListenAddr::Unix(std::env::current_dir().context("reading the current directory")?.join(p))
        }
        other => other,
    })
}

/// The ublk device settings from the flags.
fn ublk_spec(cfg: &Config, args: &UpArgs) -> Result<starblk_ublk::DeviceSpec> {
    let bs = cfg.volume.block_size;
    let run_dir = cfg.socket_path().parent().unwrap_or(Path::new(starblk::config::SOCKET_DIR)).to_path_buf();
    let options = starblk_ublk::UblkOptions {
        nr_queues: args.queues,
        queue_depth: args.queue_depth,
        max_io_bytes: args.max_io.min(starblk_replica::proto::MAX_IO_BYTES as u64) as u32,
        logical_block_size: bs,
        physical_block_size: bs,
        discard_granularity: args.discard_granularity.map(|g| g as u32).unwrap_or(bs),
        dev_id: None,
        // Every write completes only once durable on Q replicas
        // (docs/semantics.md §1 and §4): the device is write-through.
        volatile_cache: false,
        run_dir,
    };
    let spec = starblk_ublk::DeviceSpec { volume: cfg.volume.name.clone(), size: cfg.volume.size_bytes, options };
    spec.validate().map_err(|e| usage(e.to_string()))?;
    let in_flight = args.queues as u64 * args.queue_depth as u64 * spec.options.max_io_bytes as u64;
    if in_flight > cfg.volume.write_queue_bytes {
        tracing::warn!(
            in_flight,
            write_queue = cfg.volume.write_queue_bytes,
            "write_queue is smaller than queues x depth x max I/O: queue threads may wait for space"
        );
    }
    Ok(spec)
}

fn up_ublk(
    cfg: &Config,
    (fenced, metrics): (startup::Fenced, Option<std::net::TcpListener>),
    spec: starblk_ublk::DeviceSpec,
    device: control::Device,
    down_tx: mpsc::Sender<()>,
    down_rx: mpsc::Receiver<()>,
) -> Result<()> {
    let o = &spec.options;
    let slots = Slots::new(o.nr_queues as usize, o.queue_depth as usize, spec.size);
    let vol = Volume::start_fenced(fenced, slots.clone());
    serve_metrics(metrics, &vol)?;
    wait_quorum(&vol);
    let sock = cfg.socket_path();
    control::serve(&sock, vol.clone(), device.clone(), down_tx)
        .with_context(|| format!("control socket {}", sock.display()))?;
    let (stop_tx, stop_rx) = mpsc::channel::<starblk_ublk::StopHandle>();
    let v2 = vol.clone();
    std::thread::spawn(move || {
        let _ = down_rx.recv();
        if !v2.drain(Duration::from_secs(30)) {
            tracing::warn!("writes still pending after 30 s; stopping the device anyway");
        }
        if let Ok(stop) = stop_rx.recv() {
            if let Err(e) = stop.stop() {
                tracing::error!("stopping the device: {e}");
            }
        }
    });
    let backend = Arc::new(EngineBackend { volume: vol.clone(), slots });
    let name = cfg.volume.name.clone();
    let exit = starblk_ublk::serve(&spec, starblk_ublk::StartMode::Auto, backend, move |live| {
        let path = live.block_device.display().to_string();
        let how = if live.recovered { "reattached" } else { "created" };
        println!("{path}");
        tracing::info!(volume = %name, device = %path, "{how} device; serving");
        *device.lock().expect(starblk::POISONED) = Some(path.clone());
        let _ = stop_tx.send(live.stop);
        starblk::notify::ready_or_warn(&format!("volume {name} serving on {path}"));
    })
    .map_err(|e| anyhow::anyhow!("ublk device for volume {}: {e}", cfg.volume.name))?;
    tracing::info!(?exit, "device no longer served");
    finish(&vol, &sock);
    Ok(())
}

/// Serves the volume over NBD until `down` (or SIGTERM): prints the NBD
/// URI once the server listens, and on `down` ends the connections after
/// their requests in flight, then flushes like the other frontends.
fn up_nbd(
    cfg: &Config,
    (fenced, metrics): (startup::Fenced, Option<std::net::TcpListener>),
    listen: &ListenAddr,
    device: control::Device,
    down_tx: mpsc::Sender<()>,
    down_rx: mpsc::Receiver<()>,
) -> Result<()> {
    let name = &cfg.volume.name;
    let router = starblk::nbd::Router::new();
    let vol = Volume::start_fenced(fenced, router.clone());
    serve_metrics(metrics, &vol)?;
    wait_quorum(&vol);
    let mut server = starblk::nbd::Server::start(listen, vol.clone(), router)
        .with_context(|| format!("NBD frontend of volume {name}"))?;
    let uri = server.uri().to_string();
    *device.lock().expect(starblk::POISONED) = Some(uri.clone());
    let sock = cfg.socket_path();
    control::serve(&sock, vol.clone(), device, down_tx)
        .with_context(|| format!("control socket {}", sock.display()))?;
    println!("{uri}");
    tracing::info!(volume = %name, %uri, "serving over NBD");
    starblk::notify::ready_or_warn(&format!("volume {name} serving on {uri}"));
    let _ = down_rx.recv();
    if !server.stop(Duration::from_secs(30)) {
        tracing::warn!("NBD connections still open after 30 s; closing anyway");
    }
    if !vol.drain(Duration::from_secs(30)) {
        tracing::warn!("writes still pending after 30 s");
    }
    finish(&vol, &sock);
    Ok(())
}

/// Re-runs `up` in the foreground as a detached child logging to a file,
/// and returns once its control socket answers (and, for ublk and NBD,
/// once the device or NBD server is live). Prints the device path or NBD
/// URI.
fn daemonize(cfg: &Config, args: &UpArgs, serve: &Serve) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let sock = cfg.socket_path();
    let dir = sock.parent().unwrap_or(Path::new("/tmp")).to_path_buf();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join(format!("{}.log", cfg.volume.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["up", "--foreground", "--socket"]).arg(&sock).arg("--config").arg(&args.config);
    cmd.args(["--frontend", args.frontend.name()]);
    if let Serve::Nbd(listen) = serve {
        cmd.arg("--nbd-listen").arg(listen.to_string());
    }
    cmd.args(["--queues", &args.queues.to_string(), "--queue-depth", &args.queue_depth.to_string()]);
    cmd.args(["--max-io", &args.max_io.to_string()]);
    if let Some(g) = args.discard_granularity {
        cmd.args(["--discard-granularity", &g.to_string()]);
    }
    // Under systemd (Type=notify) this process reports readiness for the
    // daemon, naming it the service's main process.
    cmd.env_remove(starblk::notify::NOTIFY_SOCKET);
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let mut child = cmd.spawn().context("starting the daemon")?;
    std::fs::write(dir.join(format!("{}.pid", cfg.volume.name)), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("daemon exited ({st}) before it was ready; log {}:\n{tail}", log_path.display());
        }
        if let Ok(v) = control::call(&sock, &ControlRequest::Status, Duration::from_secs(2)) {
            match v["device"].as_str() {
                Some(dev) => {
                    println!("{dev}");
                    daemon_ready(child.id(), dev);
                    return Ok(ExitCode::SUCCESS);
                }
                None if args.frontend == Frontend::None => {
                    daemon_ready(child.id(), "frontend none");
                    println!(
                        "volume {} up (frontend none), pid {}, socket {}",
                        cfg.volume.name,
                        child.id(),
                        sock.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                None => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("daemon did not become ready within 60 s; see {}", log_path.display())
}

/// Tells a service manager that the daemon `pid` is ready and is the
/// service's main process (this one exits next).
fn daemon_ready(pid: u32, what: &str) {
    if let Err(e) = starblk::notify::send(&format!("READY=1\nMAINPID={pid}\nSTATUS=serving {what}\n")) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// Less common bench flags.
struct BenchExtra {
    json: bool,
    span: Option<u64>,
    seed: u64,
    rate: Option<f64>,
    ack_log: bool,
    latency_log: Option<PathBuf>,
}

fn bench(
    config: &Path,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    seconds: f64,
    verify: bool,
    x: BenchExtra,
) -> Result<ExitCode> {
    let BenchExtra { json, span, seed, rate, ack_log, latency_log } = x;
    if rate.is_some_and(|r| !(r > 0.0 && r <= 1e7)) {
        return Err(usage("--rate: must be between 0 and 10000000 requests per second"));
    }
    let cfg = load_config_for_io(config)?;
    let block = cfg.volume.block_size as u64;
    if bs == 0 || !bs.is_multiple_of(block) || bs > starblk_replica::proto::MAX_IO_BYTES as u64 {
        return Err(usage(format!("--bs {bs}: must be a multiple of the block size ({block}) up to 1MiB")));
    }
    if qd == 0 || qd > 4096 {
        return Err(usage(format!("--qd {qd}: must be between 1 and 4096")));
    }
    if !(seconds > 0.0 && seconds <= 86400.0) {
        return Err(usage(format!("--seconds {seconds}: must be between 0 and 86400")));
    }
    let span = span.unwrap_or(cfg.volume.size_bytes.min(1 << 30)).min(cfg.volume.size_bytes) / bs * bs;
    if span < bs * qd as u64 {
        return Err(usage(format!("--span {span}: must hold at least qd × bs bytes")));
    }
    let fenced = startup::fence(&cfg)?;
    let (completer, rx) = BenchCompleter::new(qd, bs as u32);
    let vol = Volume::start_fenced(fenced, completer.clone());
    if !vol.wait_quorum(Duration::from_secs(10)) {
        bail!("quorum of {} up-to-date replicas not reached within 10 s", cfg.volume.quorum);
    }
    let missing = vol.wait_connected(Duration::from_secs(10));
    if !missing.is_empty() {
        eprintln!("warning: replicas {missing:?} not connected after 10 s; the bench runs without them");
    }
    // A config that names its control socket gets `status` during the
    // bench (`down` is not served: the bench ends by itself).
    let (down_tx, _down_rx) = std::sync::mpsc::channel();
    let sock = cfg.volume.control_socket.as_ref().filter(|sock| {
        control::serve(sock, vol.clone(), control::Device::default(), down_tx)
            .map_err(|e| eprintln!("warning: control socket {}: {e}; status is not served", sock.display()))
            .is_ok()
    });
    let opts = BenchOptions {
        pattern,
        bs: bs as u32,
        qd,
        seconds,
        verify,
        span_bytes: span,
        seed,
        rate_iops: rate,
        ack_log,
        latency_log,
    };
    let report = Bench::new(&vol, completer, rx, opts).run();
    vol.shutdown(Duration::from_secs(30));
    if let Some(sock) = sock {
        let _ = std::fs::remove_file(sock);
    }
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(if report.verify_errors == 0 && report.io_errors == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

//! `starblk-wanem`: run a UDP relay, a TCP relay, or both on one address.
//!
//! Prints `wanem: seed=N`, the bound addresses and the control address on
//! stdout at start, then runs until killed. Usage errors exit with code 2.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use starblk_wanem::{
    mbit_to_bits, ControlServer, Controlled, GilbertElliott, JitterDist, LinkParams, RelayHandle, RelayPair, TcpParams,
    TcpRelayConfig, TcpRelayHandle, UdpRelayConfig, DEFAULT_QUEUE_BYTES, DEFAULT_REORDER_DELAY_MS,
};

#[derive(Parser)]
#[command(
    name = "starblk-wanem",
    version,
    about = "WAN emulator: UDP and TCP relays with delay, loss and a cut switch"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Relay UDP datagrams through an emulated link.
    Udp(UdpArgs),
    /// Relay TCP connections with delay, rate and cut.
    Tcp(TcpArgs),
    /// UDP and TCP relays on the same address (a replica stand-in).
    Both(UdpArgs),
}

#[derive(Args)]
struct Common {
    /// Address to listen on (HOST:PORT; port 0 picks one).
    #[arg(long, value_parser = parse_addr)]
    listen: SocketAddr,
    /// Address to relay to.
    #[arg(long, value_parser = parse_addr)]
    upstream: SocketAddr,
    /// One-way delay in milliseconds, each direction.
    #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
    delay_ms: f64,
    /// Link rate in Mbit/s, each direction; 0 = unlimited.
    #[arg(long, default_value_t = 0.0, value_parser = parse_mbit)]
    rate_mbit: f64,
    /// Control address: HOST:PORT for TCP, or a Unix socket path.
    #[arg(long)]
    control: Option<String>,
}

#[derive(Args)]
struct TcpArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct UdpArgs {
    #[command(flatten)]
    common: Common,
    /// Jitter in milliseconds (uniform half-width or normal sigma).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
    jitter_ms: f64,
    /// Jitter distribution: uniform or normal.
    #[arg(long, default_value = "uniform", value_parser = parse_jitter_dist)]
    jitter_dist: JitterDist,
    /// Serialisation queue bound in bytes (tail drop beyond).
    #[arg(long, default_value_t = DEFAULT_QUEUE_BYTES)]
    queue_bytes: u64,
    /// Independent loss probability.
    #[arg(long, default_value_t = 0.0, value_parser = parse_prob)]
    loss: f64,
    /// Gilbert-Elliott burst loss: p_good_to_bad,p_bad_to_good,loss_in_good,loss_in_bad.
    #[arg(long, value_parser = parse_ge)]
    ge: Option<GilbertElliott>,
    /// Duplication probability.
    #[arg(long, default_value_t = 0.0, value_parser = parse_prob)]
    dup: f64,
    /// Reordering probability (a picked packet gets --reorder-delay-ms extra).
    #[arg(long, default_value_t = 0.0, value_parser = parse_prob)]
    reorder: f64,
    /// Extra delay of a reordered packet, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_REORDER_DELAY_MS, value_parser = parse_ms)]
    reorder_delay_ms: f64,
    /// RNG seed; random if not given (printed either way).
    #[arg(long)]
    seed: Option<u64>,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let mut addrs = s.to_socket_addrs().map_err(|e| format!("expected HOST:PORT ({e})"))?;
    addrs.next().ok_or_else(|| format!("{s} resolves to no address"))
}

fn parse_f64(s: &str, ok: impl Fn(f64) -> bool, expected: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if ok(v) => Ok(v),
        _ => Err(format!("expected {expected}")),
    }
}

fn parse_prob(s: &str) -> Result<f64, String> {
    parse_f64(s, |v| (0.0..=1.0).contains(&v), "a probability between 0 and 1")
}

fn parse_ms(s: &str) -> Result<f64, String> {
    parse_f64(s, |v| v.is_finite() && (0.0..=3_600_000.0).contains(&v), "milliseconds between 0 and 3600000")
}

fn parse_mbit(s: &str) -> Result<f64, String> {
    let v = parse_f64(s, |v| v.is_finite() && v >= 0.0, "a rate in Mbit/s, 0 for unlimited")?;
    mbit_to_bits("rate-mbit", v).map(|_| v).map_err(|e| e.to_string())
}

fn parse_ge(s: &str) -> Result<GilbertElliott, String> {
    s.parse().map_err(|e: starblk_wanem::Error| e.to_string())
}

fn parse_jitter_dist(s: &str) -> Result<JitterDist, String> {
    s.parse().map_err(|e: starblk_wanem::Error| e.to_string())
}

impl UdpArgs {
    fn link_params(&self) -> LinkParams {
        LinkParams {
            delay_ms: self.common.delay_ms,
            jitter_ms: self.jitter_ms,
            jitter_dist: self.jitter_dist,
            rate_bits_per_s: (self.common.rate_mbit * 1e6).round() as u64,
            queue_bytes: self.queue_bytes,
            loss_prob: self.loss,
            gilbert_elliott: self.ge,
            dup_prob: self.dup,
            reorder_prob: self.reorder,
            reorder_delay_ms: self.reorder_delay_ms,
        }
    }

    fn start(&self, listen: SocketAddr) -> starblk_wanem::Result<RelayHandle> {
        let mut cfg = UdpRelayConfig::new(listen, self.common.upstream).symmetric(self.link_params());
        cfg.seed = self.seed;
        let relay = cfg.start()?;
        say(&format!("seed={}", relay.seed()));
        say(&format!("udp listen={} upstream={}", relay.local_addr(), self.common.upstream));
        Ok(relay)
    }
}

fn start_tcp(common: &Common, listen: SocketAddr) -> starblk_wanem::Result<TcpRelayHandle> {
    let mut cfg = TcpRelayConfig::new(listen, common.upstream);
    cfg.params = TcpParams { delay_ms: common.delay_ms, rate_bits_per_s: (common.rate_mbit * 1e6).round() as u64 };
    let relay = cfg.start()?;
    say(&format!("tcp listen={} upstream={}", relay.local_addr(), common.upstream));
    Ok(relay)
}

/// One line on stdout, flushed, for scripts that wait for it.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "wanem: {line}");
    let _ = out.flush();
}

fn run(mode: &Mode) -> starblk_wanem::Result<()> {
    let (target, common): (Arc<dyn Controlled>, &Common) = match mode {
        Mode::Udp(a) => (Arc::new(a.start(a.common.listen)?), &a.common),
        Mode::Tcp(a) => (Arc::new(start_tcp(&a.common, a.common.listen)?), &a.common),
        Mode::Both(a) => {
            // TCP first, so a port-0 listen picks a port; UDP then takes the same one.
            let tcp = start_tcp(&a.common, a.common.listen)?;
            let udp = a.start(tcp.local_addr())?;
            (Arc::new(RelayPair { udp, tcp }), &a.common)
        }
    };
    let _control = match &common.control {
        Some(addr) => {
            let server = ControlServer::start(addr, target.clone())?;
            say(&format!("control={}", server.addr()));
            Some(server)
        }
        None => None,
    };
    say("ready");
    loop {
        std::thread::park(); // runs until killed
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    // clap exits with 2 on usage errors and 0 for --help.
    let cli = Cli::parse();
    if let Mode::Udp(a) | Mode::Both(a) = &cli.mode {
        if let Err(e) = a.link_params().validate() {
            eprintln!("starblk-wanem: {e}");
            return ExitCode::from(2);
        }
    }
    match run(&cli.mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starblk-wanem: {e}");
            ExitCode::from(1)
        }
    }
}

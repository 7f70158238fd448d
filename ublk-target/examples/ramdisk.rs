//! A RAM (or file) disk served through starblk-ublk; the VM tests use it.
//!
//! ```text
//! ramdisk add --size 64M [--volume NAME] [--file PATH] [--recover ID | --create]
//!             [--id N] [--queues N] [--depth N] [--workers N] [--run-dir DIR]
//! ramdisk del ID
//! ramdisk down --volume NAME [--run-dir DIR]
//! ramdisk state ID
//! ```
//! `add` stays in the foreground and prints `/dev/ublkbN` on stdout once the
//! device is live; SIGTERM/SIGINT stop and delete the device. Without `--recover`/`--create` it behaves like
//! `starblk up`: reattach to the volume's device if its daemon died, refuse
//! if it is still served, create one otherwise. `--file` keeps the data in a
//! file so it survives a daemon crash (needed to test user recovery).

use starblk_ublk::{
    delete_device, device_status, down, serve, DeviceSpec, MemBackend, ServeExit, StartMode, UblkOptions,
};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage:
  ramdisk add --size SIZE [--volume NAME] [--file PATH] [--recover ID | --create]
              [--id N] [--queues N] [--depth N] [--workers N] [--run-dir DIR]
  ramdisk del ID
  ramdisk down --volume NAME [--run-dir DIR]
  ramdisk state ID";

fn main() -> ExitCode {
    init_logging();
    // A panic in any thread must end the daemon: a half-dead process would
    // keep the device LIVE but unserved. Once it is gone the device is
    // QUIESCED and a new daemon can recover it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("add") => cmd_add(&args[1..]),
        Some("del") => cmd_del(&args[1..]),
        Some("down") => cmd_down(&args[1..]),
        Some("state") => cmd_state(&args[1..]),
        _ => Err(usage("expected a command")),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("ramdisk: {m}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("ramdisk: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    // libublk logs every control handle it opens at info; keep its warnings.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libublk=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb"))
        .with_writer(std::io::stderr)
        .init();
}

enum Failure {
    Usage(String),
    Run(starblk_ublk::Error),
}

impl From<starblk_ublk::Error> for Failure {
    fn from(e: starblk_ublk::Error) -> Self {
        Failure::Run(e)
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

/// Parsed `add` arguments.
struct AddArgs {
    spec: DeviceSpec,
    mode: StartMode,
    file: Option<PathBuf>,
    workers: usize,
}

fn cmd_add(args: &[String]) -> Result<(), Failure> {
    let a = parse_add(args)?;
    // Before any thread exists (backend workers, queues), so all inherit the
    // mask and SIGTERM/SIGINT reach only the waiter thread started in on_live.
    let signals = starblk_ublk::StopSignals::block();
    let backend = match &a.file {
        Some(path) => MemBackend::file(path, a.spec.size, a.workers)?,
        None => MemBackend::ram(a.spec.size, a.workers)?,
    };
    let exit = serve(&a.spec, a.mode, Arc::new(backend), move |live| {
        // The one line scripts wait for.
        println!("{}", live.block_device.display());
        let _ = std::io::stdout().flush();
        // SIGTERM/SIGINT stop the device cleanly through the StopHandle
        // (the in-process path `starblk down` takes).
        let stop = live.stop;
        signals.on_signal(move |sig| {
            tracing::info!(signal = sig, "stopping the device");
            if let Err(e) = stop.stop() {
                tracing::error!(error = %e, "stop failed");
            }
        });
    })?;
    match exit {
        ServeExit::Stopped => tracing::info!("device stopped"),
        ServeExit::Vanished => tracing::info!("device removed from outside; exiting"),
    }
    Ok(())
}

fn parse_add(args: &[String]) -> Result<AddArgs, Failure> {
    let mut spec = DeviceSpec {
        volume: "ramdisk".into(),
        size: 0,
        options: UblkOptions { run_dir: PathBuf::from("/run/starblk-ramdisk"), ..UblkOptions::default() },
    };
    let mut mode = StartMode::Auto;
    let (mut file, mut workers) = (None, 2);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| usage(format!("{flag} needs a value")));
        match flag.as_str() {
            "--size" => spec.size = parse_size(val()?)?,
            "--volume" => spec.volume = val()?.clone(),
            "--file" => file = Some(PathBuf::from(val()?)),
            "--recover" => mode = StartMode::Recover(parse_num(flag, val()?)?),
            "--create" => mode = StartMode::Create,
            "--id" => spec.options.dev_id = Some(parse_num(flag, val()?)?),
            "--queues" => spec.options.nr_queues = parse_num(flag, val()?)?,
            "--depth" => spec.options.queue_depth = parse_num(flag, val()?)?,
            "--workers" => workers = parse_num(flag, val()?)?,
            "--run-dir" => spec.options.run_dir = PathBuf::from(val()?),
            other => return Err(usage(format!("unknown option {other}"))),
        }
    }
    if spec.size == 0 {
        return Err(usage("--size is required, e.g. --size 64M"));
    }
    Ok(AddArgs { spec, mode, file, workers })
}

fn cmd_del(args: &[String]) -> Result<(), Failure> {
    let [id] = args else {
        return Err(usage("del takes one device id"));
    };
    delete_device(parse_num("ID", id)?)?;
    Ok(())
}

fn cmd_down(args: &[String]) -> Result<(), Failure> {
    let (mut volume, mut run_dir) = (None, PathBuf::from("/run/starblk-ramdisk"));
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let val = it.next().ok_or_else(|| usage(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--volume" => volume = Some(val.clone()),
            "--run-dir" => run_dir = PathBuf::from(val),
            other => return Err(usage(format!("unknown option {other}"))),
        }
    }
    let volume = volume.ok_or_else(|| usage("down needs --volume"))?;
    match down(&run_dir, &volume)? {
        Some(id) => println!("deleted /dev/ublkb{id}"),
        None => println!("volume {volume} has no device"),
    }
    Ok(())
}

/// Prints one `key=value` line, easy to grep from shell tests.
fn cmd_state(args: &[String]) -> Result<(), Failure> {
    let [id] = args else {
        return Err(usage("state takes one device id"));
    };
    let id = parse_num("ID", id)?;
    match device_status(id)? {
        None => println!("state=ABSENT"),
        Some(s) => println!(
            "state={} pid={} daemon_alive={} flags={:#x} volume={}",
            s.state,
            s.pid,
            s.daemon_alive,
            s.flags,
            s.volume.as_deref().unwrap_or("-")
        ),
    }
    Ok(())
}

fn parse_num<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, Failure> {
    s.parse().map_err(|_| usage(format!("{what}: expected a number, got {s:?}")))
}

/// `512`, `4k`, `64M`, `64MiB`, `1G`: binary multiples.
fn parse_size(s: &str) -> Result<u64, Failure> {
    let bad = || usage(format!("size {s:?}: expected e.g. 4096, 4k, 64M, 1GiB"));
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

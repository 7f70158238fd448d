//! Device setup: create, recover, serve, stop and delete /dev/ublkbN.
//!
//! Devices are created with user recovery (docs/semantics.md §11): when the daemon
//! dies, the kernel keeps /dev/ublkbN and holds its I/O (QUIESCED) until a
//! new daemon reattaches with [`StartMode::Recover`] or [`StartMode::Auto`].

use crate::backend::BlockBackend;
use crate::error::{Error, Result};
use crate::queue::run_queue;
use crate::record::{self, DeviceRecord};
use crate::request::Geometry;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Name libublk stores as the target type.
const TARGET_NAME: &str = "starblk";
/// libublk's limit on one I/O buffer.
const MAX_IO_BYTES_LIMIT: u32 = 32 << 20;
/// Largest DISCARD / WRITE_ZEROES the kernel may send in one request.
const MAX_DISCARD_BYTES: u32 = 1 << 30;

/// Queue and geometry settings of a device. `Default` gives sensible values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// Hardware queues, one serving thread each.
    pub nr_queues: u16,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Largest READ/WRITE in bytes (a multiple of the page size).
    pub max_io_bytes: u32,
    /// Logical block size the kernel sees (512..=4096, a power of two).
    pub logical_block_size: u32,
    /// Physical block size (a power of two, >= logical).
    pub physical_block_size: u32,
    /// Discard granularity in bytes; 0 disables DISCARD and WRITE_ZEROES.
    pub discard_granularity: u32,
    /// Ask for this device id (N of /dev/ublkbN); `None` lets the driver pick.
    pub dev_id: Option<u32>,
    /// Whether the device has a volatile write cache: the kernel then
    /// sends FLUSH and FUA. A backend that completes every write only once
    /// it is durable is write-through and sets false: the kernel sends no
    /// FLUSH and no FUA, and a filesystem's fsync costs no extra requests.
    pub volatile_cache: bool,
    /// Where the per-volume record lives.
    pub run_dir: PathBuf,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            nr_queues: 1,
            queue_depth: 128,
            max_io_bytes: 512 << 10,
            logical_block_size: 4096,
            physical_block_size: 4096,
            discard_granularity: 4096,
            dev_id: None,
            volatile_cache: true,
            run_dir: PathBuf::from("/run/starblk"),
        }
    }
}

/// The device to serve: which volume, how big, with which settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Volume name; recorded so a restarted daemon finds its device.
    pub volume: String,
    /// Size in bytes, a multiple of the logical block size.
    pub size: u64,
    /// Queue and geometry settings.
    pub options: UblkOptions,
}

impl DeviceSpec {
    /// Checks every setting; the error names the setting and what was expected.
    pub fn validate(&self) -> Result<()> {
        record::check_volume_name(&self.volume)?;
        let o = &self.options;
        let lbs = o.logical_block_size;
        let bad = |m: String| Err(Error::InvalidOption(m));
        if !(512..=4096).contains(&lbs) || !lbs.is_power_of_two() {
            return bad(format!("logical_block_size {lbs}: expected 512, 1024, 2048 or 4096"));
        }
        let pbs = o.physical_block_size;
        if pbs < lbs || !pbs.is_power_of_two() || pbs > 1 << 16 {
            return bad(format!("physical_block_size {pbs}: expected a power of two from {lbs} to 65536"));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(lbs)) {
            return bad(format!("size {}: expected a non-zero multiple of {lbs}", self.size));
        }
        let page = page_size();
        let mio = o.max_io_bytes;
        if mio < lbs.max(page) || !mio.is_multiple_of(page) || mio > MAX_IO_BYTES_LIMIT {
            return bad(format!("max_io_bytes {mio}: expected a multiple of {page} up to {MAX_IO_BYTES_LIMIT}"));
        }
        let qd = u32::from(o.queue_depth);
        if qd == 0 || qd > sys::UBLK_MAX_QUEUE_DEPTH {
            return bad(format!("queue_depth {qd}: expected 1..={}", sys::UBLK_MAX_QUEUE_DEPTH));
        }
        let nq = u32::from(o.nr_queues);
        if nq == 0 || nq > sys::UBLK_MAX_NR_QUEUES {
            return bad(format!("nr_queues {nq}: expected 1..={}", sys::UBLK_MAX_NR_QUEUES));
        }
        let dg = o.discard_granularity;
        if dg != 0 && (dg < lbs || !dg.is_power_of_two()) {
            return bad(format!("discard_granularity {dg}: expected 0 or a power of two >= {lbs}"));
        }
        Ok(())
    }

    fn geometry(&self, max_io_bytes: u32) -> Geometry {
        Geometry { size: self.size, logical_block_size: self.options.logical_block_size, max_io_bytes }
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// How [`serve`] gets its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Always add a new device (at `options.dev_id` if set).
    Create,
    /// Reattach to this existing device, whose daemon died (user recovery).
    Recover(u32),
    /// What `starblk up` does: reattach to the volume's recorded device if
    /// its daemon died, refuse if it is still served, create one otherwise.
    Auto,
}

/// The driver's view of a device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Added but not started, or stopped.
    Dead,
    /// Served.
    Live,
    /// Its daemon is gone; I/O is held until a new daemon recovers it.
    Quiesced,
    /// Its daemon is gone and I/O fails (recovery with FAIL_IO).
    FailIo,
    /// A state this code does not know.
    Unknown(u16),
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Dead => f.write_str("DEAD"),
            DeviceState::Live => f.write_str("LIVE"),
            DeviceState::Quiesced => f.write_str("QUIESCED"),
            DeviceState::FailIo => f.write_str("FAIL_IO"),
            DeviceState::Unknown(n) => write!(f, "UNKNOWN({n})"),
        }
    }
}

impl From<u16> for DeviceState {
    fn from(s: u16) -> Self {
        match u32::from(s) {
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Unknown(s),
        }
    }
}

/// What the driver reports about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Device id.
    pub dev_id: u32,
    /// Driver state.
    pub state: DeviceState,
    /// Pid of the daemon that started (or last recovered) it.
    pub pid: i32,
    /// Whether that daemon is still running.
    pub daemon_alive: bool,
    /// `UBLK_F_*` flags the device was created with.
    pub flags: u64,
    /// Volume the device serves, when its libublk JSON says so.
    pub volume: Option<String>,
}

impl DeviceStatus {
    /// Whether the device was created with user recovery.
    pub fn has_user_recovery(&self) -> bool {
        self.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0
    }
}

/// Handed to the `on_live` callback of [`serve`] once the device serves I/O.
#[derive(Debug, Clone)]
pub struct LiveDevice {
    /// N of /dev/ublkbN.
    pub dev_id: u32,
    /// `/dev/ublkbN`.
    pub block_device: PathBuf,
    /// True when this daemon reattached to a device after a crash.
    pub recovered: bool,
    /// Stops serving and deletes the device (what `down` does).
    pub stop: StopHandle,
}

/// Stops a device served by [`serve`] in this process; cloneable and
/// usable from any thread (signal handler thread, control socket, ...).
#[derive(Debug, Clone)]
pub struct StopHandle {
    dev_id: u32,
    /// One of RUNNING, STOP_REQUESTED, START_FAILED.
    state: Arc<AtomicU8>,
}

const RUNNING: u8 = 0;
const STOP_REQUESTED: u8 = 1;
const START_FAILED: u8 = 2;

impl StopHandle {
    fn new(dev_id: u32) -> StopHandle {
        let state = Arc::new(AtomicU8::new(RUNNING));
        StopHandle { dev_id, state }
    }

    /// Stops the device: the kernel fails new I/O, the queues end, and
    /// [`serve`] deletes the device and returns [`ServeExit::Stopped`].
    /// Flush the backend before calling this.
    pub fn stop(&self) -> Result<()> {
        self.kill(STOP_REQUESTED)
    }

    fn kill(&self, why: u8) -> Result<()> {
        self.state.store(why, Ordering::SeqCst);
        let ctrl = UblkCtrl::new_simple(self.dev_id as i32)?;
        // STOP_DEV (kill_dev) is the deadlock-free way to end a device from
        // inside its own daemon; DEL_DEV follows once the queues are gone.
        check(ctrl.kill_dev())?;
        Ok(())
    }
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeExit {
    /// [`StopHandle::stop`] was called; the device is deleted.
    Stopped,
    /// The queues ended without a stop from this process: the device was
    /// deleted from outside (`down`, `ramdisk del`) or stopped by the kernel.
    Vanished,
}

/// Turns libublk's "Ok(negative errno)" results into errors.
fn check(r: std::result::Result<i32, libublk::UblkError>) -> Result<i32> {
    match r? {
        n if n < 0 => Err(Error::Ublk(libublk::UblkError::OtherError(n))),
        n => Ok(n),
    }
}

/// Fails with [`Error::NoDriver`] unless the ublk driver is loaded; returns
/// its `UBLK_F_*` feature bits (0 when it cannot report them).
pub fn driver_features() -> Result<u64> {
    if !Path::new("/dev/ublk-control").exists() {
        return Err(Error::NoDriver);
    }
    Ok(UblkCtrl::get_features().unwrap_or(0))
}

/// Whether a ublk device with this id exists, without opening it.
fn device_exists(dev_id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists()
}

/// The driver's view of device `dev_id`; `Ok(None)` if there is no such device.
pub fn device_status(dev_id: u32) -> Result<Option<DeviceStatus>> {
    driver_features()?;
    if !device_exists(dev_id) {
        return Ok(None);
    }
    let ctrl = UblkCtrl::new_simple(dev_id as i32)?;
    let info = ctrl.dev_info();
    let volume = ctrl.get_target_data_from_json().and_then(|v| v["volume"].as_str().map(str::to_owned));
    Ok(Some(DeviceStatus {
        dev_id,
        state: DeviceState::from(info.state),
        pid: info.ublksrv_pid,
        daemon_alive: pid_alive(info.ublksrv_pid),
        flags: info.flags,
        volume,
    }))
}

/// Whether `pid` is a running process (a zombie does not count: a killed
/// daemon whose parent has not reaped it yet no longer serves anything).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may contain spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

/// Deletes device `dev_id` (stop + remove). The daemon serving it, if any,
/// sees its queues end. Errors if the device does not exist.
pub fn delete_device(dev_id: u32) -> Result<()> {
    driver_features()?;
    if !device_exists(dev_id) {
        return Err(Error::NoSuchDevice { dev_id });
    }
    let ctrl = UblkCtrl::new_simple(dev_id as i32)?;
    check(ctrl.del_dev())?;
    tracing::info!(dev_id, "deleted /dev/ublkb{dev_id}");
    Ok(())
}

/// `down` for a volume from outside its daemon: deletes the recorded device
/// and the record. Returns the id that was deleted, `None` if there was none.
pub fn down(run_dir: &Path, volume: &str) -> Result<Option<u32>> {
    let Some(rec) = record::read_record(run_dir, volume)? else {
        return Ok(None);
    };
    let deleted = match delete_device(rec.dev_id) {
        Ok(()) => Some(rec.dev_id),
        Err(Error::NoSuchDevice { .. }) => None,
        Err(e) => return Err(e),
    };
    record::remove_record(run_dir, volume)?;
    Ok(deleted)
}

/// The decision [`serve`] acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Create(Option<u32>),
    Recover(u32),
}

fn plan(spec: &DeviceSpec, mode: StartMode) -> Result<Plan> {
    match mode {
        StartMode::Create => plan_create(spec.options.dev_id),
        StartMode::Recover(id) => {
            let st = device_status(id)?.ok_or(Error::NoSuchDevice { dev_id: id })?;
            check_recoverable(&st, &spec.volume)?;
            Ok(Plan::Recover(id))
        }
        StartMode::Auto => plan_auto(spec),
    }
}

fn plan_create(dev_id: Option<u32>) -> Result<Plan> {
    if let Some(id) = dev_id {
        if let Some(st) = device_status(id)? {
            let state = format!("{} (already exists; delete it or recover it)", st.state);
            return Err(Error::NotRecoverable { dev_id: id, state });
        }
    }
    Ok(Plan::Create(dev_id))
}

fn plan_auto(spec: &DeviceSpec) -> Result<Plan> {
    let run_dir = &spec.options.run_dir;
    let Some(rec) = record::read_record(run_dir, &spec.volume)? else {
        return plan_create(spec.options.dev_id);
    };
    let Some(st) = device_status(rec.dev_id)? else {
        tracing::info!(dev_id = rec.dev_id, "recorded device is gone; creating a new one");
        return plan_create(Some(rec.dev_id));
    };
    if st.volume.as_deref().is_some_and(|v| v != spec.volume) {
        tracing::warn!(dev_id = rec.dev_id, "stale record: device now serves another volume");
        return plan_create(spec.options.dev_id);
    }
    if st.state == DeviceState::Dead && !st.daemon_alive {
        // Stopped and never to serve again: clear it and reuse its number.
        delete_device(rec.dev_id)?;
        return plan_create(Some(rec.dev_id));
    }
    check_recoverable(&st, &spec.volume)?;
    Ok(Plan::Recover(rec.dev_id))
}

/// Refuses to reattach to a device that is still served, cannot be
/// recovered, or belongs to another volume.
fn check_recoverable(st: &DeviceStatus, volume: &str) -> Result<()> {
    let dev_id = st.dev_id;
    if st.daemon_alive && st.pid != std::process::id() as i32 {
        let volume = st.volume.clone().unwrap_or_else(|| volume.to_owned());
        return Err(Error::DeviceBusy { dev_id, volume, pid: st.pid });
    }
    if !st.has_user_recovery() {
        let state = format!("{}, created without user recovery", st.state);
        return Err(Error::NotRecoverable { dev_id, state });
    }
    // LIVE with a dead daemon is the moment between kill -9 and the driver
    // quiescing the device; START_USER_RECOVERY waits that out.
    if !matches!(st.state, DeviceState::Quiesced | DeviceState::Live) {
        let state = st.state.to_string();
        return Err(Error::NotRecoverable { dev_id, state });
    }
    match &st.volume {
        Some(v) if v != volume => {
            Err(Error::Mismatch { dev_id, reason: format!("it serves volume {v:?}, not {volume:?}") })
        }
        _ => Ok(()),
    }
}

/// Serves `backend` as a ublk device until the device is stopped or
/// deleted. Blocks; runs one thread per queue. `on_live` is called once,
/// on this thread, as soon as /dev/ublkbN serves I/O.
pub fn serve<B, F>(spec: &DeviceSpec, mode: StartMode, backend: Arc<B>, on_live: F) -> Result<ServeExit>
where
    B: BlockBackend + ?Sized,
    F: FnOnce(LiveDevice) + Send + 'static,
{
    spec.validate()?;
    let features = driver_features()?;
    let plan = plan(spec, mode)?;
    tracing::info!(volume = %spec.volume, ?plan, features = format_args!("{features:#x}"), "starting ublk device");
    let ctrl = match plan {
        Plan::Create(id) => create_ctrl(spec, id, features)?,
        Plan::Recover(id) => recover_ctrl(spec, id)?,
    };
    let recovered = matches!(plan, Plan::Recover(_));
    run(spec, ctrl, recovered, backend, on_live)
}

/// Adds a new device with user recovery, and reissue where the kernel has it.
fn create_ctrl(spec: &DeviceSpec, id: Option<u32>, features: u64) -> Result<UblkCtrl> {
    let mut flags = u64::from(sys::UBLK_F_USER_RECOVERY);
    if features & u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE) != 0 {
        flags |= u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    }
    let o = &spec.options;
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id.map_or(-1, |i| i as i32))
        .nr_queues(o.nr_queues)
        .depth(o.queue_depth)
        .io_buf_bytes(o.max_io_bytes)
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()?;
    let dev_id = ctrl.dev_info().dev_id;
    tracing::info!(dev_id, flags = format_args!("{flags:#x}"), "added ublk device");
    save_record(spec, dev_id)?;
    Ok(ctrl)
}

/// Reattaches to a quiesced device: START_USER_RECOVERY, then a control
/// handle in recovery mode whose start ends the recovery.
fn recover_ctrl(spec: &DeviceSpec, dev_id: u32) -> Result<UblkCtrl> {
    let probe = UblkCtrl::new_simple(dev_id as i32)?;
    check_geometry(&probe, spec)?;
    // Equal to the options after check_geometry, but take the device's own
    // values: libublk sizes its per-queue tables from the builder.
    let info = probe.dev_info();
    // Waits (up to 30 s inside libublk) while the old daemon is still exiting.
    check(probe.start_user_recover())?;
    drop(probe);
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(dev_id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()?;
    save_record(spec, dev_id)?;
    tracing::info!(dev_id, queues = info.nr_hw_queues, depth = info.queue_depth, "recovering ublk device");
    Ok(ctrl)
}

/// The device keeps the geometry it was created with; serving another
/// volume size under it would corrupt the file system on top. Queues,
/// depth and buffer size must match too: a backend sizes its tables from
/// the spec and relies on `queue_id() < nr_queues`, `tag() < queue_depth`
/// and requests of at most `max_io_bytes`.
fn check_geometry(ctrl: &UblkCtrl, spec: &DeviceSpec) -> Result<()> {
    let mut p = sys::ublk_params::default();
    check(ctrl.get_params(&mut p))?;
    let info = ctrl.dev_info();
    let o = &spec.options;
    let have = Shape {
        size: p.basic.dev_sectors << 9,
        lbs: 1u32 << p.basic.logical_bs_shift,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        max_io: info.max_io_buf_bytes,
    };
    let want = Shape {
        size: spec.size,
        lbs: o.logical_block_size,
        queues: o.nr_queues,
        depth: o.queue_depth,
        max_io: o.max_io_bytes,
    };
    if have == want {
        return Ok(());
    }
    let reason = format!("device has {have}, this run asks for {want}; restart with the settings it was created with");
    Err(Error::Mismatch { dev_id: info.dev_id, reason })
}

/// What must not change across a recovery.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    size: u64,
    lbs: u32,
    queues: u16,
    depth: u16,
    max_io: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes in {}-byte blocks, {} queue(s) x depth {}, max I/O {} bytes",
            self.size, self.lbs, self.queues, self.depth, self.max_io
        )
    }
}

fn save_record(spec: &DeviceSpec, dev_id: u32) -> Result<()> {
    let rec = DeviceRecord {
        volume: spec.volume.clone(),
        dev_id,
        size: spec.size,
        logical_block_size: spec.options.logical_block_size,
        pid: std::process::id() as i32,
    };
    record::write_record(&spec.options.run_dir, &rec)
}

/// The block-layer parameters the driver gets for a new device.
fn params(spec: &DeviceSpec, max_io_bytes: u32) -> sys::ublk_params {
    let o = &spec.options;
    let shift = |n: u32| n.trailing_zeros() as u8;
    let mut p = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            // A volatile cache plus FUA makes the kernel send FLUSH and FUA;
            // without one the kernel strips both (write-through).
            attrs: if o.volatile_cache { sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA } else { 0 },
            logical_bs_shift: shift(o.logical_block_size),
            physical_bs_shift: shift(o.physical_block_size),
            io_opt_shift: shift(o.physical_block_size),
            io_min_shift: shift(o.physical_block_size),
            max_sectors: max_io_bytes >> 9,
            dev_sectors: spec.size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if o.discard_granularity > 0 {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_granularity: o.discard_granularity,
            max_discard_sectors: MAX_DISCARD_BYTES >> 9,
            max_write_zeroes_sectors: MAX_DISCARD_BYTES >> 9,
            max_discard_segments: 1,
            ..Default::default()
        };
    }
    p
}

/// Runs the device with libublk's `run_target`; deletes it afterwards if
/// this process asked it to stop.
fn run<B, F>(spec: &DeviceSpec, ctrl: UblkCtrl, recovered: bool, backend: Arc<B>, on_live: F) -> Result<ServeExit>
where
    B: BlockBackend + ?Sized,
    F: FnOnce(LiveDevice) + Send + 'static,
{
    let stop = StopHandle::new(ctrl.dev_info().dev_id);
    let tgt_init = |dev: &mut UblkDev| init_target(dev, spec);
    let geo = spec.geometry(ctrl.dev_info().max_io_buf_bytes);
    let q_fn = move |qid: u16, dev: &UblkDev| run_queue(qid, dev, &*backend, geo);
    let live = live_callback(stop.clone(), recovered, on_live);
    let res = ctrl.run_target(tgt_init, q_fn, live);
    finish(spec, &ctrl, &stop, res)
}

fn init_target(dev: &mut UblkDev, spec: &DeviceSpec) -> std::result::Result<(), libublk::UblkError> {
    let max_io = dev.dev_info.max_io_buf_bytes;
    dev.tgt.dev_size = spec.size;
    dev.tgt.params = params(spec, max_io);
    // Room for the doorbell POLL_ADD next to one SQE/CQE per tag.
    dev.tgt.sq_depth = dev.dev_info.queue_depth.saturating_add(2);
    dev.tgt.cq_depth = dev.dev_info.queue_depth.saturating_add(2);
    // Lands in libublk's JSON as target_data: names the volume on the device.
    dev.set_target_json(serde_json::json!({ "volume": spec.volume, "size": spec.size }));
    Ok(())
}

/// libublk calls this after START_DEV (or END_USER_RECOVERY) returned; it
/// confirms the device is LIVE before telling the caller.
fn live_callback<F>(stop: StopHandle, recovered: bool, on_live: F) -> impl FnOnce(&UblkCtrl) + Send + Sync + 'static
where
    F: FnOnce(LiveDevice) + Send + 'static,
{
    // run_target wants Sync; the Mutex makes the FnOnce shareable.
    let on_live = std::sync::Mutex::new(Some(on_live));
    move |ctrl: &UblkCtrl| {
        let dev_id = stop.dev_id;
        let live = ctrl.read_dev_info().is_ok() && DeviceState::from(ctrl.dev_info().state) == DeviceState::Live;
        if !live {
            tracing::error!(dev_id, "device did not come up LIVE; stopping it");
            if let Err(e) = stop.kill(START_FAILED) {
                tracing::error!(dev_id, error = %e, "cannot stop the device");
            }
            return;
        }
        tracing::info!(dev_id, recovered, "/dev/ublkb{dev_id} is live");
        let f = on_live.lock().expect(crate::POISONED).take();
        if let Some(f) = f {
            f(LiveDevice { dev_id, block_device: PathBuf::from(format!("/dev/ublkb{dev_id}")), recovered, stop });
        }
    }
}

/// After the queues ended: delete the device if we stopped it, and keep
/// the run-directory record in step with what exists.
fn finish(
    spec: &DeviceSpec,
    ctrl: &UblkCtrl,
    stop: &StopHandle,
    res: std::result::Result<i32, libublk::UblkError>,
) -> Result<ServeExit> {
    let dev_id = stop.dev_id;
    res?;
    let why = stop.state.load(Ordering::SeqCst);
    let stopped = why != RUNNING;
    if stopped {
        match check(ctrl.del_dev()) {
            Ok(_) => tracing::info!(dev_id, "device deleted"),
            Err(e) => tracing::warn!(dev_id, error = %e, "deleting the stopped device failed"),
        }
    } else {
        // Not ours to delete: leave a quiesced or stopped device to `Auto`.
        ctrl.disown();
    }
    if !device_exists(dev_id) {
        record::remove_record(&spec.options.run_dir, &spec.volume)?;
    }
    if why == START_FAILED {
        return Err(Error::NotLive { dev_id });
    }
    Ok(if stopped { ServeExit::Stopped } else { ServeExit::Vanished })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeviceSpec {
        DeviceSpec { volume: "vol0".into(), size: 64 << 20, options: UblkOptions::default() }
    }

    #[test]
    fn default_spec_is_valid() {
        spec().validate().unwrap();
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        type Mutation = fn(&mut DeviceSpec);
        let cases: Vec<(Mutation, &str)> = vec![
            (|s| s.options.logical_block_size = 3000, "logical_block_size"),
            (|s| s.options.physical_block_size = 512, "physical_block_size"),
            (|s| s.size = 4095, "size"),
            (|s| s.size = 0, "size"),
            (|s| s.options.max_io_bytes = 1000, "max_io_bytes"),
            (|s| s.options.max_io_bytes = 64 << 20, "max_io_bytes"),
            (|s| s.options.queue_depth = 0, "queue_depth"),
            (|s| s.options.nr_queues = 0, "nr_queues"),
            (|s| s.options.discard_granularity = 512, "discard_granularity"),
            (|s| s.volume = "../x".into(), "volume"),
        ];
        for (mutate, name) in cases {
            let mut s = spec();
            mutate(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e} should name {name}");
        }
    }

    #[test]
    fn params_enable_flush_fua_and_discard() {
        let p = params(&spec(), 512 << 10);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
        assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(p.types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
        let mut write_through = spec();
        write_through.options.volatile_cache = false;
        assert_eq!(params(&write_through, 4096).basic.attrs & (sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA), 0);
        let mut no_discard = spec();
        no_discard.options.discard_granularity = 0;
        assert_eq!(params(&no_discard, 4096).types & sys::UBLK_PARAM_TYPE_DISCARD, 0);
    }

    #[test]
    fn device_states_decode() {
        assert_eq!(DeviceState::from(sys::UBLK_S_DEV_QUIESCED as u16), DeviceState::Quiesced);
        assert_eq!(DeviceState::from(sys::UBLK_S_DEV_LIVE as u16).to_string(), "LIVE");
        assert_eq!(DeviceState::from(77), DeviceState::Unknown(77));
    }

    fn status(state: DeviceState, alive: bool, volume: Option<&str>) -> DeviceStatus {
        DeviceStatus {
            dev_id: 4,
            state,
            pid: 1,
            daemon_alive: alive,
            flags: u64::from(sys::UBLK_F_USER_RECOVERY),
            volume: volume.map(str::to_owned),
        }
    }

    #[test]
    fn recovery_is_refused_when_unsafe() {
        let busy = check_recoverable(&status(DeviceState::Live, true, None), "vol0");
        assert!(matches!(busy, Err(Error::DeviceBusy { dev_id: 4, .. })));
        let dead = check_recoverable(&status(DeviceState::Dead, false, None), "vol0");
        assert!(matches!(dead, Err(Error::NotRecoverable { .. })));
        let other = check_recoverable(&status(DeviceState::Quiesced, false, Some("x")), "vol0");
        assert!(matches!(other, Err(Error::Mismatch { .. })));
        let mut no_rec = status(DeviceState::Quiesced, false, None);
        no_rec.flags = 0;
        assert!(check_recoverable(&no_rec, "vol0").is_err());
        check_recoverable(&status(DeviceState::Quiesced, false, Some("vol0")), "vol0").unwrap();
        check_recoverable(&status(DeviceState::Live, false, None), "vol0").unwrap();
    }

    #[test]
    fn pid_liveness() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-5));
        assert!(!pid_alive(i32::MAX));
    }

    #[test]
    fn no_driver_is_a_clear_error_here() {
        if Path::new("/dev/ublk-control").exists() {
            return; // this host has ublk; nothing to check
        }
        assert!(matches!(driver_features(), Err(Error::NoDriver)));
        let r = serve(&spec(), StartMode::Auto, Arc::new(crate::MemBackend::ram(4096, 0).unwrap()), |_| {});
        assert!(matches!(r, Err(Error::NoDriver)));
    }
}

# Shared helpers for guest scenarios (sourced: `. /tests/lib.sh`).
#
# A scenario is one POSIX sh file tests/vm/NN-name.sh run by the guest's
# /init (busybox sh) with exit codes 0 pass, 1 fail, 4 skip. Binaries from
# VM_BINS (ramdisk, starblk, ...) and the tools are on PATH. /data is a
# tmpfs for replica data and backing files; /mnt is for mount points;
# lo is up. Every helper that starts something registers it for cleanup.
#
# Do not run daemons in a private mount namespace (unshare -m): if a ublk
# daemon ends up the last task of a namespace that still mounts its own
# device, it deadlocks on exit (libublk-rs#50). /init holds the root one.

set -u

# Busybox sh runs its own applets before anything on PATH, so the real
# tools vm-test copied in (dd, blkdiscard, cmp, ...) would be shadowed by
# busybox's smaller versions. A function per such tool wins over applets.
_applets=" $(busybox --list | tr '\n' ' ') "
for _t in /usr/local/bin/* /usr/sbin/*; do
    _n=${_t##*/}
    case $_applets in *" $_n "*) eval "$_n() { $_t \"\$@\"; }" ;; esac
done
unset _t _n _applets

# Full path of a tool vm-test shipped, so background jobs are the tool
# itself and not a subshell running a wrapper function.
tool_path() {
    for _d in /usr/local/bin /usr/sbin; do
        [ -x "$_d/$1" ] && { echo "$_d/$1"; return; }
    done
    echo "$1"
}

VM_PIDS=""
VM_MOUNTS=""
VM_CLEANUP=""

log() { echo "[$(date +%H:%M:%S)] $*"; }

# Fails the scenario with a message and recent kernel messages. Writes to
# stderr so it is seen even inside $(...); there, add `|| exit 1`:
#   DEV=$(wait_for_line log '^/dev/ublkb' 30) || exit 1
fail() {
    {
        echo "FAIL: $*"
        echo "--- dmesg (tail) ---"
        dmesg | tail -n 25
    } >&2
    exit 1
}

# Skips the scenario; the host prints SKIP loudly. Never use for failures.
skip() {
    echo "SKIP: $*"
    exit 4
}

# Skips unless every named command is on PATH.
need_cmd() {
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || skip "$c is not in this VM (add it to VM_BINS or VM_TOOLS)"
    done
}

# Loads a kernel module and its dependencies (table made by vm-test).
load_module() {
    line=$(grep "^$1:" /etc/vm-modules) || fail "module $1 was not packed (add it to VM_MODULES)"
    for ko in ${line#*:}; do
        out=$(insmod "/lib/modules/$(uname -r)/$ko" 2>&1) || case "$out" in
            *"File exists"* | *"exists"*) ;;
            *) fail "insmod $ko: $out" ;;
        esac
    done
}

# Like load_module, but SKIPs (saying why) when this kernel has no such
# module: vm-test packs optional modules (nbd) only when the kernel has them.
need_module() {
    [ -d "/sys/module/$1" ] && return 0
    grep -q "^$1:" /etc/vm-modules || skip "kernel $(uname -r) has no $1 module (not built in, not in modules.dep)"
    load_module "$1"
}

# Runs a command in the background with output to FILE; registers its pid.
# Sets LAST_PID.
start_bg() {
    out=$1 cmd=$(tool_path "$2")
    shift 2
    "$cmd" "$@" >"$out" 2>&1 &
    LAST_PID=$!
    VM_PIDS="$VM_PIDS $LAST_PID"
}

# Prints the first line of FILE matching the extended REGEX, waiting up to
# TIMEOUT seconds (default 30). Fails if PID (optional) exits first.
wait_for_line() {
    file=$1 re=$2 t=${3:-30} pid=${4:-}
    end=$(($(date +%s) + t))
    while [ "$(date +%s)" -lt "$end" ]; do
        line=$(grep -m1 -E "$re" "$file" 2>/dev/null) && { echo "$line"; return 0; }
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "--- $file ---" >&2
            cat "$file" >&2
            fail "process $pid exited before printing /$re/"
        fi
        usleep 100000
    done
    echo "--- $file ---" >&2
    cat "$file" >&2
    fail "timed out after ${t}s waiting for /$re/ in $file"
}

# Waits until PATH exists as a block device (default 30 s).
wait_for_dev() {
    t=${2:-30}
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ "$i" -gt $((t * 10)) ] && fail "$1 did not appear within ${t}s"
        usleep 100000
    done
}

# Whether PID is running (a zombie counts as exited).
running() {
    [ -e "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]
}

# Waits until PID has exited (default 30 s); returns its exit status when
# it is our child.
wait_exit() {
    pid=$1 t=${2:-30}
    i=0
    while running "$pid"; do
        i=$((i + 1))
        [ "$i" -gt $((t * 10)) ] && fail "pid $pid still running after ${t}s"
        usleep 100000
    done
    wait "$pid" 2>/dev/null
}

# Mounts DEV at DIR (created) and registers it for cleanup.
mount_dev() {
    mkdir -p "$2"
    mount "$1" "$2" || fail "mount $1 $2"
    VM_MOUNTS="$2 $VM_MOUNTS"
}

umount_dev() {
    umount "$1" || fail "umount $1"
    VM_MOUNTS=$(echo " $VM_MOUNTS " | sed "s# $1 # #")
}

# Writes N files of SIZE_KB random KiB into DIR and their sha256 sums to
# DIR.sha256 (outside the file system, for verify_files).
write_files() {
    dir=$1 n=$2 kb=${3:-64}
    mkdir -p "$dir"
    i=0
    while [ "$i" -lt "$n" ]; do
        dd if=/dev/urandom of="$dir/f$i" bs=1024 count="$kb" 2>/dev/null || fail "writing $dir/f$i"
        i=$((i + 1))
    done
    (cd "$dir" && sha256sum f*) >"/tmp/$(basename "$dir").sha256" || fail "checksumming $dir"
}

# Verifies the sums written by write_files.
verify_files() {
    dir=$1
    (cd "$dir" && sha256sum -c "/tmp/$(basename "$dir").sha256" >/dev/null) || fail "checksums differ in $dir"
}

# Byte-compares two files or devices.
compare_files() {
    cmp "$1" "$2" || fail "$1 and $2 differ"
}

# Runs fio with crc32c verification on DEV. Extra fio options may follow
# (e.g. --size=64M --numjobs=4). Output goes to /tmp/fio-<tag>.log; fails
# unless fio exits 0 with err=0. Set FIO_BG=1 to run it in the background
# (then call fio_check LAST_PID LOG).
FIO_BASE="--ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=32 --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting"
run_fio_verify() {
    dev=$1
    shift
    tag=$(basename "$dev")
    out=/tmp/fio-$tag.log
    # shellcheck disable=SC2086
    if [ "${FIO_BG:-0}" = 1 ]; then
        start_bg "$out" fio --name="verify-$tag" --filename="$dev" $FIO_BASE "$@"
        return 0
    fi
    fio --name="verify-$tag" --filename="$dev" $FIO_BASE "$@" >"$out" 2>&1
    fio_check $? "$out"
}

# Checks a finished fio run: exit status RC and log LOG.
fio_check() {
    rc=$1 out=$2
    if [ "$rc" -ne 0 ] || ! grep -q 'err= 0' "$out"; then
        cat "$out"
        fail "fio failed (exit $rc)"
    fi
    grep -E 'IOPS=|err=' "$out" | head -n 4
}

# Registers a command for cleanup, run before mounts and pids are dropped
# (e.g. `on_cleanup "ramdisk del 0"`).
on_cleanup() {
    VM_CLEANUP="$1
$VM_CLEANUP"
}

# Unmounts registered mounts, runs registered commands, kills registered
# processes. Installed as the EXIT trap; scenarios may call it early.
cleanup() {
    for m in $VM_MOUNTS; do umount -l "$m" 2>/dev/null; done
    echo "$VM_CLEANUP" | while read -r c; do
        [ -n "$c" ] && timeout 30 sh -c "$c" >/dev/null 2>&1
    done
    for p in $VM_PIDS; do kill -9 "$p" 2>/dev/null; done
    VM_MOUNTS="" VM_PIDS="" VM_CLEANUP=""
}
trap cleanup EXIT

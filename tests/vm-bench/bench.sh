#!/bin/sh
# Benchmark, not a test (run by scripts/bench-vm through scripts/vm-test).
# One guest, the same jobs against every system, one system at a time
# (set up, run every job, tear down, so only one system's data is in RAM):
#   drbd  DRBD 8.4 protocol C, 2 nodes: resources r0 (127.0.0.1) and r1
#         (127.0.0.2) in this guest, each on a loop device over a file on
#         /data (tmpfs); the jobs run on /dev/drbd0 (r0, primary).
#   sb1   starblk N=1, Q=1 (replica "local")
#   sb2   starblk N=2, Q=2 (local, near)
#   sb3   starblk N=3, Q=2 (local, near, far)
#   loop  rublk's loop target on a file of the same size (no replication)
#   nbd   starblk N=1, Q=1 over its NBD frontend (kernel nbd-client)
#   sb1b, sb2b, sb3b  sb1, sb2, sb3 with starblk-old, the binary that
#         `scripts/bench-vm --compare` ships: an A/B in one boot
# Every starblk replica keeps its data on /data (tmpfs), like DRBD's and
# rublk's backing files, so the numbers compare CPU cost per I/O.
# Jobs (fio io_uring, direct=1, time based):
#   w4k-qd32   4 KiB randwrite QD32      w4k-qd1    4 KiB randwrite QD1
#   w128k-qd16 128 KiB seq write QD16    r4k-qd32   4 KiB randread QD32
#   sqlite     ext4 on the device, sqlite3 with PRAGMA synchronous=FULL,
#              SQLITE_ROWS inserts, one transaction each (tx/s)
#   postmark   ext4 on the device, PostMark (500 files, 2000 transactions)
#              then sync: transactions per second of the whole run (timed
#              here, PostMark's own clock has whole seconds)
# Prints machine-readable lines:
#   BENCH_INFO  key value...
#   BENCH_RUN   system job round value rc err ios lat_mean_us p50_us busy_ticks total_ticks daemon_ticks
#               (value: IOPS for fio jobs, tx/s for sqlite)
#   BENCH_SKIP  system reason...      (the system could not be set up here)
#   BENCH_FAIL  system job-or-setup reason...
# Exit 0 when every selected system ran or skipped with a reason, 1 otherwise.
. /tests/lib.sh

RUNTIME=6 ROUNDS=1 SIZE_MB=256 QUEUES=1 DEPTH=128 SQLITE_ROWS=400 PERF=0 SYSCALLS=0
SYSTEMS="drbd sb2 sb3 sb1 loop nbd"
JOBS="w4k-qd32 w4k-qd1 w128k-qd16 r4k-qd32 sqlite postmark"
# Written by scripts/bench-vm.
[ -f /tests/bench-params.sh ] && . /tests/bench-params.sh

need_cmd fio
trap - EXIT

info() { echo "BENCH_INFO $*"; }
info kernel "$(uname -r)"
info date "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
info cpus "$(grep -c '^processor' /proc/cpuinfo)"
info mem_kb "$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
info starblk "$(starblk --version 2>&1 | head -n1)"
command -v starblk-old >/dev/null && info starblk_old "$(starblk-old --version 2>&1 | head -n1)"
info rublk "$(rublk --version 2>&1 | head -n1)"
info fio "$(fio --version 2>&1 | head -n1)"
info sqlite3 "$(command -v sqlite3 >/dev/null && sqlite3 --version 2>&1 | cut -d' ' -f1 || echo 'not shipped')"
info source "${SOURCE:-unknown}"
info params "runtime=${RUNTIME}s rounds=$ROUNDS size=${SIZE_MB}MiB queues=$QUEUES depth=$DEPTH sqlite_rows=$SQLITE_ROWS"
info systems "$SYSTEMS"
info jobs "$JOBS"
info clk_tck "$(getconf CLK_TCK 2>/dev/null || echo 100)"

# Set by each system's setup: the device and the pids whose CPU is the
# system's userspace cost (empty for DRBD, which lives in the kernel).
DEV="" DAEMONS=""

# --- starblk --------------------------------------------------------------------

# sb_setup TAG N Q PORTBASE [FRONTEND]: N replicas on /data/TAG, a volume
# with quorum Q, `starblk up` in the foreground (ublk, or nbd over a Unix
# socket attached as /dev/nbd0). $SB is the binary (starblk unless an A/B
# system says starblk-old).
SB=starblk
sb_setup() {
    tag=$1 n=$2 q=$3 port=$4 frontend=${5:-ublk}
    d=/data/$tag
    mkdir -p "$d"
    load_module ublk_drv
    cat >"$d/vol.toml" <<TOML
[volume]
name = "$tag"
size = "${SIZE_MB}M"
quorum = $q
write_queue = "128MiB"
control_socket = "$d/vol.sock"
TOML
    i=1
    for role in local near far; do
        [ "$i" -gt "$n" ] && break
        $SB replica init --dir "$d/r$i" --size "${SIZE_MB}M" --log-size 64M >/dev/null || fail "$tag: replica init r$i"
        start_bg "$d/r$i.log" $SB replica serve --dir "$d/r$i" --listen "127.0.0.1:$((port + i))"
        DAEMONS="$DAEMONS $LAST_PID"
        wait_for_line "$d/r$i.log" '^listening' 20 "$LAST_PID" >/dev/null || exit 1
        printf '\n[[replica]]\nname = "%s"\naddr = "127.0.0.1:%s"\nrole = "%s"\n' "$role" $((port + i)) "$role" >>"$d/vol.toml"
        i=$((i + 1))
    done
    $SB volume create --config "$d/vol.toml" >/dev/null || fail "$tag: volume create"
    if [ "$frontend" = nbd ]; then
        need_cmd nbd-client
        need_module nbd
        start_bg "$d/up.log" $SB up --config "$d/vol.toml" --foreground --frontend nbd --nbd-listen "unix:$d/nbd.sock"
        DAEMONS="$DAEMONS $LAST_PID"
        wait_for_line "$d/up.log" '^nbd\+unix://' 60 "$LAST_PID" >/dev/null || exit 1
        on_cleanup "$SB down --config $d/vol.toml"
        nbd-client -unix "$d/nbd.sock" /dev/nbd0 -name "$tag" -block-size 4096 -connections "$QUEUES" >/dev/null ||
            fail "$tag: nbd-client"
        on_cleanup "nbd-client -d /dev/nbd0"
        i=0
        while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
            i=$((i + 1))
            [ "$i" -gt 300 ] && fail "$tag: /dev/nbd0 has no size 30 s after nbd-client"
            usleep 100000
        done
        DEV=/dev/nbd0
    else
        start_bg "$d/up.log" $SB up --config "$d/vol.toml" --foreground --queues "$QUEUES" --queue-depth "$DEPTH"
        DAEMONS="$DAEMONS $LAST_PID"
        DEV=$(wait_for_line "$d/up.log" '^/dev/ublkb[0-9]+$' 60 "$LAST_PID") || exit 1
        wait_for_dev "$DEV"
        on_cleanup "$SB down --config $d/vol.toml"
    fi
}

# --- rublk loop -------------------------------------------------------------------

loop_setup() {
    need_cmd rublk
    load_module ublk_drv
    dd if=/dev/zero of=/data/loop.img bs=1M count=0 seek="$SIZE_MB" 2>/dev/null || fail "creating /data/loop.img"
    n=0
    while [ -e "/sys/class/ublk-char/ublkc$n" ] || [ -e "/dev/ublkb$n" ]; do n=$((n + 1)); done
    start_bg /tmp/rublk.log rublk add loop -n "$n" -f /data/loop.img -q "$QUEUES" -d "$DEPTH" --foreground
    DAEMONS=$LAST_PID
    i=0
    while [ ! -b "/dev/ublkb$n" ]; do
        running "$LAST_PID" || { cat /tmp/rublk.log; fail "rublk exited before /dev/ublkb$n appeared"; }
        i=$((i + 1))
        [ "$i" -gt 600 ] && { cat /tmp/rublk.log; fail "/dev/ublkb$n did not appear within 60s"; }
        usleep 100000
    done
    DEV=/dev/ublkb$n
    on_cleanup "rublk del -n $n"
}

# --- DRBD 8.4 protocol C, two nodes in this guest ----------------------------------
# The recipe of docs/benchmarks.md: drbdsetup-84 speaks to the kernel's 8.4
# module (drbdsetup 9 does not); DRBD refuses to connect a resource to its
# own address, so the peers sit on 127.0.0.1 and 127.0.0.2.

drbd_setup() {
    for c in drbdsetup-84 drbdmeta losetup; do
        command -v "$c" >/dev/null 2>&1 || skip "drbd: $c is not in this VM (drbd-utils not shipped)"
    done
    for m in loop drbd; do
        [ -d "/sys/module/$m" ] || grep -q "^$m:" /etc/vm-modules || skip "drbd: kernel $(uname -r) has no $m module"
    done
    load_module loop
    load_module drbd
    S=$(tool_path drbdsetup-84)
    info drbd_version "$(sed -n 1p /proc/drbd)"
    ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true
    # drbdmeta takes a lock file there.
    mkdir -p /var/lock
    for i in 0 1; do
        dd if=/dev/zero of="/data/d$i.img" bs=1M count=0 seek="$SIZE_MB" 2>/dev/null || fail "drbd: creating /data/d$i.img"
        l=$(losetup -f --show "/data/d$i.img") || fail "drbd: losetup /data/d$i.img"
        on_cleanup "losetup -d $l"
        eval "L$i=$l"
        drbdmeta --force "$i" v08 "$l" internal create-md >/tmp/drbdmeta-$i.log 2>&1 ||
            { cat /tmp/drbdmeta-$i.log; fail "drbd: drbdmeta create-md on $l"; }
    done
    # Registered before the commands that need it, run (LIFO) before losetup -d.
    on_cleanup "$S down r1"
    on_cleanup "$S down r0"
    {
        $S new-resource r0 && $S new-minor r0 0 0 && $S attach 0 "$L0" "$L0" internal &&
            $S new-resource r1 && $S new-minor r1 1 0 && $S attach 1 "$L1" "$L1" internal &&
            $S connect r0 ipv4:127.0.0.1:7000 ipv4:127.0.0.2:7000 --protocol=C &&
            $S connect r1 ipv4:127.0.0.2:7000 ipv4:127.0.0.1:7000 --protocol=C
    } >/tmp/drbd.log 2>&1 || { cat /tmp/drbd.log; fail "drbd: drbdsetup-84 setup"; }
    i=0
    while ! grep -q 'cs:Connected' /proc/drbd; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && { cat /proc/drbd; fail "drbd: r0/r1 not connected after 30 s"; }
        usleep 100000
    done
    { $S new-current-uuid 0 --clear-bitmap && $S primary 0; } >>/tmp/drbd.log 2>&1 ||
        { cat /tmp/drbd.log; fail "drbd: new-current-uuid/primary"; }
    i=0
    while ! grep -q 'ro:Primary/Secondary ds:UpToDate/UpToDate' /proc/drbd; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && { cat /proc/drbd; fail "drbd: not UpToDate/UpToDate after 30 s"; }
        usleep 100000
    done
    sed 's/^/  drbd: /' /proc/drbd
    grep -q ' C r' /proc/drbd || { cat /proc/drbd; fail "drbd: not protocol C"; }
    DEV=/dev/drbd0
    wait_for_dev "$DEV"
    DAEMONS=""
}

# --- measurement ----------------------------------------------------------------

# utime+stime of the system's daemons (all their threads), in ticks.
daemon_ticks() {
    t=0
    for p in $DAEMONS; do
        [ -r "/proc/$p/stat" ] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$t"
}
# thread_ticks: one line per thread of the system's daemons:
# "pid/tid comm utime stime switches" (ticks; context switches, voluntary
# and not, from the thread's status: each voluntary one is a sleep that a
# wake-up ended).
thread_ticks() {
    for p in $DAEMONS; do
        for t in /proc/$p/task/*; do
            [ -r "$t/stat" ] || continue
            c=$(cat "$t/comm" 2>/dev/null) || continue
            cs=$(awk '/ctxt_switches/ {n += $2} END {print n + 0}' "$t/status" 2>/dev/null)
            sed 's/.*) //' "$t/stat" | awk -v id="$p/${t##*/}" -v c="$c" -v cs="${cs:-0}" '{print id, c, $12, $13, cs}'
        done
    done
}

# syscalls_start SYS JOB: with SYSCALLS=1, counts the system calls of
# every daemon thread while the job runs (perf stat on the syscall
# tracepoint: counted, not sampled, so it is exact under TCG too).
syscalls_start() {
    SC_PID="" SC_FILE=/tmp/syscalls-$1-$2
    rm -f "$SC_FILE"
    [ "$SYSCALLS" = 1 ] && [ -n "$DAEMONS" ] || return 0
    command -v perf >/dev/null || { log "SYSCALLS: perf is not in this VM"; return 0; }
    echo -1 >/proc/sys/kernel/perf_event_paranoid 2>/dev/null
    perf stat --per-thread -x, -e raw_syscalls:sys_enter -p "$(echo $DAEMONS | tr ' ' ,)" -o "$SC_FILE" \
        >/tmp/perf-stat.log 2>&1 &
    SC_PID=$!
    # perf attaches to every thread before counting; give it a moment.
    usleep 300000
}

# syscalls_stop: ends the count syscalls_start began.
syscalls_stop() {
    [ -n "${SC_PID:-}" ] || return 0
    kill -INT "$SC_PID" 2>/dev/null
    wait "$SC_PID" 2>/dev/null
    [ -s "$SC_FILE" ] || sed 's/^/SYSCALLS (no count): /' /tmp/perf-stat.log
}

# thread_report SYS JOB IOS BEFORE AFTER: THREADS lines, the daemons' CPU
# per I/O by thread (user and system, in us), from two thread_ticks
# snapshots; threads under 1 % of the daemons' time are left out. Shows
# where the daemon CPU per I/O goes where perf cannot sample (TCG).
thread_report() {
    [ "$3" -gt 0 ] || return 0
    sc=${SC_FILE:-/dev/null}
    [ -s "$sc" ] || sc=/dev/null
    awk -v s="$1" -v j="$2" -v n="$3" -v hz="$(getconf CLK_TCK 2>/dev/null || echo 100)" '
        # perf stat --per-thread -x, lines: "comm-tid,count,,event,...".
        FILENAME == ARGV[1] { if ($0 ~ /^#/ || $0 == "") next
            split($0, f, ","); t = f[1]; sub(/.*-/, "", t); if (f[2] ~ /^[0-9]+$/) nsc[t] = f[2]; next }
        FILENAME == ARGV[2] { u0[$1] = $3; s0[$1] = $4; c0[$1] = $5; next }
        { du = $3 - u0[$1]; ds = $4 - s0[$1]; if (du + ds <= 0) next
          id[++k] = $1; c[k] = $2; u[k] = du; sy[k] = ds; cs[k] = $5 - c0[$1]; tot += du + ds }
        END { for (i = 1; i <= k; i++) if ((u[i] + sy[i]) * 100 >= tot) {
                tid = id[i]; sub(/.*\//, "", tid)
                sc = (tid in nsc) ? sprintf("  syscalls %5.2f/IO", nsc[tid] / n) : ""
                printf "THREADS %s %s %-12s %-14s user %7.0f us/IO  sys %7.0f us/IO  switches %5.2f/IO%s\n", s, j, id[i], c[i],
                    u[i] * 1e6 / hz / n, sy[i] * 1e6 / hz / n, cs[i] / n, sc } }' "$sc" "$4" "$5"
}

# Busy and total ticks of the whole guest ("busy total").
sys_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }

# perf_start SYS JOB: with PERF=1, samples the whole guest (cpu-clock: TCG
# has no PMU) for 4 s starting 1 s into the job, in the background.
perf_start() {
    PERF_PID=""
    [ "$PERF" = 1 ] || return 0
    command -v perf >/dev/null || { log "PERF: perf is not in this VM"; return 0; }
    echo 0 >/proc/sys/kernel/kptr_restrict 2>/dev/null
    echo -1 >/proc/sys/kernel/perf_event_paranoid 2>/dev/null
    (sleep 1 && exec perf record -q -e cpu-clock -F 499 -a -o "/tmp/perf-$1-$2.data" -- sleep 4) >/tmp/perf.log 2>&1 &
    PERF_PID=$!
}

# perf_report SYS JOB: prints the profile perf_start took, one PERF line
# per row: share of samples, command, object, symbol.
perf_report() {
    [ -n "${PERF_PID:-}" ] || return 0
    wait "$PERF_PID"
    f=/tmp/perf-$1-$2.data
    [ -s "$f" ] || { sed "s/^/PERF $1 $2 (no profile): /" /tmp/perf.log; return 0; }
    perf report -i "$f" --stdio --sort comm,dso,sym --percent-limit 0.7 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n 45 | sed "s/^/PERF $1 $2 /"
    perf report -i "$f" --stdio --sort comm --percent-limit 1 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n 12 | sed "s/^/PERF $1 $2 by-comm /"
    # Per process: the HE and each replica run the same binary, so `comm`
    # alone cannot tell their unnamed threads apart (pids: BENCH_INFO device).
    perf report -i "$f" --stdio --sort pid --percent-limit 1 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -n 8 | sed "s/^/PERF $1 $2 by-pid /"
    rm -f "$f"
}

# fio_args JOB: the fio options of a job.
fio_args() {
    case "$1" in
    w4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    w4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    w128k-qd16) echo "--rw=write --bs=128k --iodepth=16" ;;
    r4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
    *) return 1 ;;
    esac
}

# run_fio SYS JOB ROUND: one fio run on $DEV; prints BENCH_RUN.
run_fio() {
    sys=$1 job=$2 round=$3
    args=$(fio_args "$job") || fail "unknown job $job"
    size=$(blockdev --getsize64 "$DEV")
    out=/tmp/fio-$sys-$job-$round.log
    log "run $round: $sys $job on $DEV (${RUNTIME}s)"
    b_d=$(daemon_ticks)
    thread_ticks >/tmp/threads-before
    set -- $(sys_ticks)
    b_busy=$1 b_total=$2
    # shellcheck disable=SC2086
    perf_start "$sys" "$job"
    syscalls_start "$sys" "$job"
    fio --name=bench --filename="$DEV" --ioengine=io_uring --direct=1 $args --numjobs=1 \
        --runtime="$RUNTIME" --time_based --size="$size" --output-format=normal,terse >"$out" 2>&1
    frc=$?
    syscalls_stop
    perf_report "$sys" "$job"
    set -- $(sys_ticks)
    busy=$(($1 - b_busy)) total=$(($2 - b_total)) dt=$(($(daemon_ticks) - b_d))
    terse=$(grep '^3;' "$out" | tail -n1)
    thread_ticks >/tmp/threads-after
    ios=$(echo "$terse" | awk -F';' -v j="$job" '{ n = (j ~ /^r/) ? $6 : $47; print int(n / ((j ~ /128k/) ? 128 : 4)) }')
    thread_report "$sys" "$job" "${ios:-0}" /tmp/threads-before /tmp/threads-after
    if [ -z "$terse" ]; then
        cat "$out"
        echo "BENCH_RUN $sys $job $round 0 $frc noterse 0 0 0 $busy $total $dt"
        return 1
    fi
    # Terse v3: read iops 8, read clat percentiles 18-37, read lat mean 40;
    # write kb 47, iops 49, clat percentiles 59-78, lat mean 81.
    echo "$terse" | awk -F';' -v s="$sys" -v j="$job" -v r="$round" -v rc="$frc" \
        -v b="$busy" -v t="$total" -v d="$dt" '{
        rd = (j ~ /^r/)
        iops = rd ? $8 : $49; ios = rd ? $6 : $47; lat = rd ? $40 : $81
        lo = rd ? 18 : 59; p50 = 0
        for (i = lo; i < lo + 20; i++) if ($i ~ /^50\.0*%=/) { p50 = $i; sub(/.*=/, "", p50) }
        bs = (j ~ /128k/) ? 128 : 4
        printf "BENCH_RUN %s %s %s %s %s %s %d %d %d %s %s %s\n", s, j, r, iops, rc, $5, int(ios / bs), lat, p50, b, t, d }'
    grep -E 'IOPS=|clat percentiles|50.00th' "$out" | head -n 3 | sed "s/^/  $sys $job#$round: /"
    [ "$frc" -eq 0 ] || { cat "$out"; return 1; }
}

# fs_job_begin JOB TOOL WHAT: for $sys's run $round of JOB, checks that
# TOOL is in the VM, makes ext4 on $DEV and mounts it at $mnt.
fs_job_begin() {
    command -v "$2" >/dev/null 2>&1 || { echo "BENCH_FAIL $sys $1 $2 is not in this VM"; return 1; }
    log "run $round: $sys $1 ($3) on $DEV"
    mkfs.ext4 -q -F -E nodiscard "$DEV" >/tmp/mkfs.log 2>&1 || { cat /tmp/mkfs.log; echo "BENCH_FAIL $sys $1 mkfs.ext4"; return 1; }
    mnt=/mnt/bench-$sys
    mount_dev "$DEV" "$mnt"
}

# fs_job_clock: takes the start time and CPU ticks of a job (t0, b_*).
fs_job_clock() {
    b_d=$(daemon_ticks)
    thread_ticks >/tmp/threads-before
    set -- $(sys_ticks)
    b_busy=$1 b_total=$2
    t0=$(cut -d' ' -f1 /proc/uptime)
}

# fs_job_end: the end time (t1) and the busy, total and daemon ticks since
# fs_job_clock; unmounts $mnt.
fs_job_end() {
    t1=$(cut -d' ' -f1 /proc/uptime)
    set -- $(sys_ticks)
    busy=$(($1 - b_busy)) total=$(($2 - b_total)) dt=$(($(daemon_ticks) - b_d))
    umount_dev "$mnt"
}

# run_sqlite SYS ROUND: ext4 on $DEV, SQLITE_ROWS inserts, one transaction
# each, with synchronous=FULL; prints BENCH_RUN with tx/s.
run_sqlite() {
    sys=$1 round=$2
    fs_job_begin sqlite sqlite3 "$SQLITE_ROWS transactions" || return 1
    sql=/tmp/sqlite-$sys.sql
    {
        echo "PRAGMA synchronous=FULL;"
        echo "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);"
        awk -v n="$SQLITE_ROWS" 'BEGIN {for (i = 0; i < n; i++) print "INSERT INTO t (v) VALUES (randomblob(100));"}'
        echo "SELECT count(*) FROM t;"
    } >"$sql"
    fs_job_clock
    rows=$(sqlite3 "$mnt/bench.db" <"$sql" 2>/tmp/sqlite.err)
    src=$?
    fs_job_end
    if [ "$src" -ne 0 ] || [ "$rows" != "$SQLITE_ROWS" ]; then
        cat /tmp/sqlite.err
        echo "BENCH_RUN $sys sqlite $round 0 $src rows=$rows 0 0 0 $busy $total $dt"
        return 1
    fi
    awk -v s="$sys" -v r="$round" -v n="$SQLITE_ROWS" -v t0="$t0" -v t1="$t1" -v b="$busy" -v t="$total" -v d="$dt" 'BEGIN {
        el = t1 - t0; if (el <= 0) el = 0.01
        printf "BENCH_RUN %s sqlite %s %.1f 0 0 %d %d 0 %s %s %s\n", s, r, n / el, n, 1e6 * el / n, b, t, d }'
}

# run_postmark SYS ROUND: ext4 on $DEV, PostMark, sync; prints BENCH_RUN
# with transactions per second over the whole run including the sync.
PM_FILES=500 PM_TX=2000
run_postmark() {
    sys=$1 round=$2
    fs_job_begin postmark postmark "$PM_FILES files, $PM_TX transactions" || return 1
    fs_job_clock
    printf 'set location %s\nset number %s\nset transactions %s\nrun\nquit\n' "$mnt" "$PM_FILES" "$PM_TX" |
        postmark >/tmp/postmark.log 2>&1
    prc=$?
    sync
    fs_job_end
    if [ "$prc" -ne 0 ] || ! grep -q 'seconds of transactions' /tmp/postmark.log; then
        cat /tmp/postmark.log
        echo "BENCH_RUN $sys postmark $round 0 $prc noreport 0 0 0 $busy $total $dt"
        return 1
    fi
    awk -v s="$sys" -v r="$round" -v n="$PM_TX" -v t0="$t0" -v t1="$t1" -v b="$busy" -v t="$total" -v d="$dt" 'BEGIN {
        el = t1 - t0; if (el <= 0) el = 0.01
        printf "BENCH_RUN %s postmark %s %.1f 0 0 %d %d 0 %s %s %s\n", s, r, n / el, n, 1e6 * el / n, b, t, d }'
}

# bench_system SYS ROUND: set up, run every job, tear down (by the caller's
# EXIT trap). Runs in a subshell: exit 4 (skip) or 1 (fail) ends only it.
bench_system() {
    sys=$1 round=$2
    case "$sys" in
    drbd) drbd_setup ;;
    sb1) sb_setup sb1 1 1 7710 ;;
    sb2) sb_setup sb2 2 2 7720 ;;
    sb3) sb_setup sb3 3 2 7730 ;;
    loop) loop_setup ;;
    nbd) sb_setup nbd 1 1 7740 nbd ;;
    sb1b) SB=starblk-old; sb_setup sb1b 1 1 7750 ;;
    sb2b) SB=starblk-old; sb_setup sb2b 2 2 7760 ;;
    sb3b) SB=starblk-old; sb_setup sb3b 3 2 7770 ;;
    *) fail "unknown system $sys" ;;
    esac
    info device "$sys $DEV size=$(blockdev --getsize64 "$DEV") daemons=${DAEMONS:-none}"
    rc=0
    for job in $JOBS; do
        if [ "$job" = sqlite ]; then
            run_sqlite "$sys" "$round" || rc=1
        elif [ "$job" = postmark ]; then
            run_postmark "$sys" "$round" || rc=1
        else
            run_fio "$sys" "$job" "$round" || rc=1
        fi
    done
    return $rc
}

ok=0
round=1
while [ "$round" -le "$ROUNDS" ]; do
    for sys in $SYSTEMS; do
        (
            trap cleanup EXIT
            bench_system "$sys" "$round"
        ) >/tmp/sys.out 2>&1
        rc=$?
        cat /tmp/sys.out
        case "$rc" in
        0) ;;
        4) echo "BENCH_SKIP $sys $(grep '^SKIP:' /tmp/sys.out | tail -n1 | sed 's/^SKIP: //')" ;;
        *)
            echo "BENCH_FAIL $sys setup-or-run exit $rc"
            ok=1
            ;;
        esac
        rm -rf /data/* 2>/dev/null
    done
    round=$((round + 1))
done
exit $ok

#!/bin/sh
# Benchmark, not a test (run by scripts/bench-vm through scripts/vm-test).
# One guest, the same fio job (4 KiB randwrite, QD32, O_DIRECT, io_uring)
# against starblk (one local replica, quorum 1) and rublk's loop target on
# a backing file of the same size, both on /data (tmpfs), alternating
# starblk, rublk, starblk, rublk, ... Both ublk devices use the same
# number of queues and queue depth.
# With NBD=1 each round also runs, against a second volume set up the same
# way but served with `starblk up --frontend nbd` on a Unix socket and
# attached by the kernel's nbd-client as /dev/nbd0 (one connection per
# ublk queue): the QD32 job on it ("nbd"), then the QD1 job on both
# starblk frontends ("starblk-qd1", "nbd-qd1").
# Prints machine-readable lines:
#   BENCH_INFO  key value...
#   BENCH_RUN   target round iops fio_rc fio_err ios runtime_ms lat_mean_us p50_us
#   BENCH_CPU   target round who ticks       (CLK_TCK ticks during the run)
#   BENCH_THR   target round tid process/comm ticks
#   BENCH_TOP   a `top -b -n1` line taken mid-run
#   BENCH_LOAD  target round before|after <loadavg>
# Exit 0 when every run produced a number, 1 when the bench could not run.
. /tests/lib.sh

RUNTIME=20 ROUNDS=2 SIZE_MB=256 QUEUES=1 DEPTH=128 IODEPTH=32 NBD=0
# Written by scripts/bench-vm.
[ -f /tests/bench-params.sh ] && . /tests/bench-params.sh

need_cmd starblk rublk fio
load_module ublk_drv

info() { echo "BENCH_INFO $*"; }
info kernel "$(uname -r)"
info cpus "$(grep -c '^processor' /proc/cpuinfo)"
info mem_kb "$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
info rublk "$(rublk --version 2>&1 | head -n1)"
info starblk "$(starblk --version 2>&1 | head -n1)"
info fio "$(fio --version 2>&1 | head -n1)"
info source "${SOURCE:-unknown}"
info params "runtime=${RUNTIME}s rounds=$ROUNDS size=${SIZE_MB}MiB queues=$QUEUES depth=$DEPTH iodepth=$IODEPTH nbd=$NBD"
info clk_tck "$(getconf CLK_TCK 2>/dev/null || echo 100)"

# --- starblk: one local replica, quorum 1 ---------------------------------
SB=/data/sb
mkdir -p $SB
starblk replica init --dir $SB/r1 --size "${SIZE_MB}M" --log-size 64M >/dev/null || fail "replica init"
start_bg $SB/r1.log starblk replica serve --dir $SB/r1 --listen 127.0.0.1:7701
REP=$LAST_PID
wait_for_line $SB/r1.log '^listening' 20 "$REP" >/dev/null || exit 1
cat >$SB/vol.toml <<TOML
[volume]
name = "bench"
size = "${SIZE_MB}M"
quorum = 1
write_queue = "128MiB"
control_socket = "$SB/bench.sock"

[[replica]]
name = "local"
addr = "127.0.0.1:7701"
role = "local"
TOML
starblk volume create --config $SB/vol.toml >/dev/null || fail "volume create"
start_bg $SB/up.log starblk up --config $SB/vol.toml --foreground --queues "$QUEUES" --queue-depth "$DEPTH"
HE=$LAST_PID
SDEV=$(wait_for_line $SB/up.log '^/dev/ublkb[0-9]+$' 60 "$HE") || exit 1
wait_for_dev "$SDEV"
on_cleanup "starblk down --config $SB/vol.toml"
info starblk_dev "$SDEV pids up=$HE replica=$REP"

# --- rublk loop on a sparse file of the same size --------------------------
dd if=/dev/zero of=/data/loop.img bs=1M count=0 seek="$SIZE_MB" 2>/dev/null || fail "creating /data/loop.img"
N=0
while [ -e "/sys/class/ublk-char/ublkc$N" ] || [ -e "/dev/ublkb$N" ]; do N=$((N + 1)); done
start_bg /tmp/rublk.log rublk add loop -n "$N" -f /data/loop.img -q "$QUEUES" -d "$DEPTH" --foreground
RUBLK=$LAST_PID
i=0
while [ ! -b "/dev/ublkb$N" ]; do
    running "$RUBLK" || { cat /tmp/rublk.log; fail "rublk exited before /dev/ublkb$N appeared"; }
    i=$((i + 1))
    [ "$i" -gt 600 ] && { cat /tmp/rublk.log; fail "/dev/ublkb$N did not appear within 60s"; }
    usleep 100000
done
RDEV=/dev/ublkb$N
on_cleanup "rublk del -n $N"
info rublk_dev "$RDEV pid=$RUBLK"

# --- starblk over NBD: the same volume setup, a second volume ---------------
NHE=0 NREP=0 NDEV=""
if [ "$NBD" = 1 ]; then
    need_cmd nbd-client
    need_module nbd
    NB=/data/nb
    mkdir -p $NB
    starblk replica init --dir $NB/r1 --size "${SIZE_MB}M" --log-size 64M >/dev/null || fail "replica init (nbd)"
    start_bg $NB/r1.log starblk replica serve --dir $NB/r1 --listen 127.0.0.1:7711
    NREP=$LAST_PID
    wait_for_line $NB/r1.log '^listening' 20 "$NREP" >/dev/null || exit 1
    sed -e 's/"bench"/"benchnbd"/' -e "s#$SB/bench.sock#$NB/benchnbd.sock#" -e 's/127.0.0.1:7701/127.0.0.1:7711/' \
        $SB/vol.toml >$NB/vol.toml
    starblk volume create --config $NB/vol.toml >/dev/null || fail "volume create (nbd)"
    start_bg $NB/up.log starblk up --config $NB/vol.toml --foreground --frontend nbd --nbd-listen unix:$NB/nbd.sock
    NHE=$LAST_PID
    wait_for_line $NB/up.log '^nbd\+unix://' 60 "$NHE" >/dev/null || exit 1
    on_cleanup "starblk down --config $NB/vol.toml"
    NDEV=/dev/nbd0
    nbd-client -unix $NB/nbd.sock $NDEV -name benchnbd -block-size 4096 -connections "$QUEUES" >/dev/null ||
        fail "nbd-client"
    on_cleanup "nbd-client -d $NDEV"
    i=0
    while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && fail "$NDEV has no size 30 s after nbd-client"
        usleep 100000
    done
    info nbd_dev "$NDEV pids up=$NHE replica=$NREP connections=$QUEUES"
fi

# Device parameters as the kernel sees them.
for d in "$SDEV" "$RDEV" $NDEV; do
    b=${d#/dev/}
    q=/sys/block/$b/queue
    info queue "$b size=$(blockdev --getsize64 "$d") hw_queues=$(ls /sys/block/$b/mq 2>/dev/null | wc -l)" \
        "nr_requests=$(cat $q/nr_requests) max_sectors_kb=$(cat $q/max_sectors_kb)" \
        "lbs=$(cat $q/logical_block_size) pbs=$(cat $q/physical_block_size)" \
        "rotational=$(cat $q/rotational) scheduler=$(tr -d '\n' <$q/scheduler)" \
        "write_cache=$(cat $q/write_cache 2>/dev/null) fua=$(cat $q/fua 2>/dev/null)"
done

# --- measurement helpers ------------------------------------------------------

# utime+stime of a process (all its threads, live and exited), in ticks.
ticks() { [ -r "/proc/$1/stat" ] && sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}' || echo 0; }
# Busy and total ticks of the whole guest ("busy total").
sys_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }
# "tid LABEL/comm ticks" per thread of PID.
thread_ticks() {
    for s in /proc/"$2"/task/*/stat; do
        [ -r "$s" ] || continue
        t=${s%/stat}
        echo "${t##*/} $1/$(tr ' ' '_' <"$t/comm") $(sed 's/.*) //' "$s" | awk '{print $12 + $13}')"
    done
}
all_threads() {
    thread_ticks starblk-up "$HE"
    thread_ticks starblk-replica "$REP"
    thread_ticks rublk "$RUBLK"
    if [ "$NBD" = 1 ]; then
        thread_ticks nbd-up "$NHE"
        thread_ticks nbd-replica "$NREP"
    fi
}
# Raw /proc/stat cpu fields (user nice system idle iowait irq softirq steal).
stat_fields() { awk '/^cpu / {print $2, $3, $4, $5, $6, $7, $8, $9}' /proc/stat; }

# run_one NAME DEV ROUND [IODEPTH]
run_one() {
    name=$1 dev=$2 round=$3 qd=${4:-$IODEPTH}
    size=$(blockdev --getsize64 "$dev")
    out=/tmp/fio-$name-$round.log
    log "run $round: $name on $dev (QD$qd, ${RUNTIME}s)"
    echo "BENCH_LOAD $name $round before $(cat /proc/loadavg)"
    b_starblk_up=$(ticks "$HE") b_starblk_replica=$(ticks "$REP") b_rublk=$(ticks "$RUBLK")
    b_nbd_up=$(ticks "$NHE") b_nbd_replica=$(ticks "$NREP")
    all_threads >/tmp/thr-before
    stat_before=$(stat_fields)
    set -- $(sys_ticks)
    b_busy=$1 b_total=$2
    fio --name=bench --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --iodepth="$qd" --numjobs=1 --runtime="$RUNTIME" --time_based --size="$size" \
        --output-format=normal,terse >"$out" 2>&1 &
    fpid=$!
    sleep $((RUNTIME / 2 + 1))
    top -b -n1 2>/dev/null | head -n 14 | sed "s/^/BENCH_TOP $name $round | /"
    wait "$fpid"
    frc=$?
    set -- $(sys_ticks)
    a_busy=$1 a_total=$2
    echo "BENCH_LOAD $name $round after $(cat /proc/loadavg)"
    echo "BENCH_CPU $name $round guest-busy $((a_busy - b_busy))"
    echo "BENCH_CPU $name $round guest-total $((a_total - b_total))"
    echo "BENCH_CPU $name $round starblk-up $(($(ticks "$HE") - b_starblk_up))"
    echo "BENCH_CPU $name $round starblk-replica $(($(ticks "$REP") - b_starblk_replica))"
    echo "BENCH_CPU $name $round rublk $(($(ticks "$RUBLK") - b_rublk))"
    echo "BENCH_CPU $name $round nbd-up $(($(ticks "$NHE") - b_nbd_up))"
    echo "BENCH_CPU $name $round nbd-replica $(($(ticks "$NREP") - b_nbd_replica))"
    echo "$stat_before $(stat_fields)" | awk -v n="$name" -v r="$round" '{
        printf "BENCH_STAT %s %s user=%d nice=%d system=%d idle=%d iowait=%d irq=%d softirq=%d steal=%d\n",
            n, r, $9 - $1, $10 - $2, $11 - $3, $12 - $4, $13 - $5, $14 - $6, $15 - $7, $16 - $8 }'
    all_threads | while read -r tid comm t; do
        b=$(awk -v id="$tid" '$1 == id {print $3}' /tmp/thr-before)
        d=$((t - ${b:-0}))
        [ "$d" -gt 0 ] && echo "BENCH_THR $name $round $tid $comm $d"
    done
    terse=$(grep '^3;' "$out" | tail -n1)
    if [ -z "$terse" ]; then
        cat "$out"
        echo "BENCH_RUN $name $round 0 $frc noterse 0 0 0 0"
        return 1
    fi
    # Fields 59-78 are the write completion-latency percentiles (usec).
    echo "$terse" | awk -F';' -v n="$name" -v r="$round" -v rc="$frc" '{
        p50 = 0
        for (i = 59; i <= 78; i++) if ($i ~ /^50\.0*%=/) { p50 = $i; sub(/.*=/, "", p50) }
        printf "BENCH_RUN %s %s %s %s %s %s %s %d %d\n", n, r, $49, rc, $5, int($47 / 4), $50, $81, p50 }'
    grep -E 'IOPS=|lat \(usec\)|clat percentiles|99.00th|cpu  ' "$out" | sed "s/^/  $name#$round: /"
    [ "$frc" -eq 0 ] || { cat "$out"; return 1; }
}

ok=0
round=1
while [ "$round" -le "$ROUNDS" ]; do
    run_one starblk "$SDEV" "$round" || ok=1
    run_one rublk "$RDEV" "$round" || ok=1
    if [ "$NBD" = 1 ]; then
        run_one nbd "$NDEV" "$round" || ok=1
        run_one starblk-qd1 "$SDEV" "$round" 1 || ok=1
        run_one nbd-qd1 "$NDEV" "$round" 1 || ok=1
    fi
    round=$((round + 1))
done

# Replica-side state after the runs (write queue, log), if status says so.
starblk status --config $SB/vol.toml 2>&1 | sed 's/^/  status: /' | head -n 20
[ "$NBD" = 1 ] && starblk status --config $NB/vol.toml 2>&1 | sed 's/^/  status (nbd): /' | head -n 20
log "stopping devices"
cleanup
exit $ok

#!/bin/sh
# The ublk frontend on a real kernel, with the ramdisk example
# (starblk-ublk + MemBackend, completions from worker threads):
#   A. WRITE_ZEROES/DISCARD, ext4 mkfs/mount/write/fsck/verify, fstrim,
#      a second daemon for a live device refuses, bad requests fail cleanly,
#      `ramdisk down` removes the device and ends the daemon;
#   B. user recovery: kill -9 the daemon twice during fio --verify, restart
#      it (explicit --recover ID, then automatic); fio ends with err=0;
#      SIGTERM makes the daemon delete its own device.
. /tests/lib.sh

need_cmd ramdisk mkfs.ext4 e2fsck fio blkdiscard dd cmp
load_module ublk_drv
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing after loading ublk_drv"

# Starts `ramdisk add ARGS...` logging to FILE; sets DAEMON and DEV.
start_ramdisk() {
    file=$1
    shift
    start_bg "$file" ramdisk add "$@"
    DAEMON=$LAST_PID
    DEV=$(wait_for_line "$file" '^/dev/ublkb[0-9]+$' 60 "$DAEMON") || exit 1
    wait_for_dev "$DEV"
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# ---------------------------------------------------------------- part A
SIZE_MB=128
start_ramdisk /tmp/rd0.log --size ${SIZE_MB}M --volume rd0
ID=${DEV#/dev/ublkb}
on_cleanup "ramdisk del $ID"
log "rd0 live at $DEV: $(ramdisk state "$ID")"
ramdisk state "$ID" | grep -q 'state=LIVE' || fail "device not reported LIVE"

log "write zeroes and discard"
dd if=/dev/urandom of="$DEV" bs=1M count=2 oflag=direct 2>/dev/null || fail "dd write"
blkdiscard -z -o 0 -l 1048576 "$DEV" || fail "blkdiscard --zeroout"
cmp -n 1048576 "$DEV" /dev/zero || fail "zeroed range does not read back as zeroes"
blkdiscard -o 1048576 -l 1048576 "$DEV" || fail "blkdiscard"

log "ext4: mkfs, write, fsck, verify"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mount_dev "$DEV" /mnt/rd0
write_files /mnt/rd0/files 64 256
sync
fstrim /mnt/rd0 || fail "fstrim"
umount_dev /mnt/rd0
e2fsck -fn "$DEV" || fail "e2fsck reported problems"
mount_dev "$DEV" /mnt/rd0
verify_files /mnt/rd0/files
umount_dev /mnt/rd0

log "a second daemon for the live volume must refuse"
if ramdisk add --size ${SIZE_MB}M --volume rd0 >/tmp/rd0-dup.log 2>&1; then
    fail "second daemon attached to a live device"
fi
grep -q "is live, served by pid $DAEMON" /tmp/rd0-dup.log || { cat /tmp/rd0-dup.log; fail "no clear 'is live' message"; }

log "bad requests fail cleanly"
blocks=$((SIZE_MB * 256))
if dd if=/dev/zero of="$DEV" bs=4096 seek=$blocks count=1 oflag=direct 2>/dev/null; then
    fail "write past the end succeeded"
fi
if blkdiscard -o $((SIZE_MB * 1048576 + 4096)) -l 4096 "$DEV" 2>/dev/null; then
    fail "discard past the end succeeded"
fi
running "$DAEMON" || fail "daemon died on bad requests"

log "down from outside the daemon (record + DEL_DEV)"
[ -f /run/starblk-ramdisk/rd0.ublk.json ] || fail "no run-directory record for rd0"
ramdisk down --volume rd0 || fail "ramdisk down"
wait_exit "$DAEMON" 30 || fail "daemon exited with status $? after down"
[ -b "$DEV" ] && fail "$DEV still exists after down"
[ -f /run/starblk-ramdisk/rd0.ublk.json ] && fail "record for rd0 left behind"

# ---------------------------------------------------------------- part B
# File-backed, so the data outlives the daemon like a real backend's would.
IMG=/data/rd1.img
# Two queues, depth 64: a restart must use the same settings.
RD1="--size 256M --volume rd1 --file $IMG --queues 2 --depth 64"
# shellcheck disable=SC2086
start_ramdisk /tmp/rd1.log $RD1
ID=${DEV#/dev/ublkb}
on_cleanup "ramdisk del $ID"
log "rd1 live at $DEV"

FIO_BG=1 run_fio_verify "$DEV" --size=128M --bs=8k --numjobs=1
FIO=$LAST_PID
FIO_LOG=/tmp/fio-$(basename "$DEV").log

# Kills the daemon while fio runs and reattaches a new one with ARGS.
crash_and_recover() {
    sleep 2
    running "$FIO" || { log "fio already finished; no crash this round"; return 0; }
    t0=$(uptime_s)
    kill -9 "$DAEMON"
    wait_exit "$DAEMON" 30
    state=""
    for _ in $(seq 50); do
        state=$(ramdisk state "$ID")
        case "$state" in *QUIESCED*) break ;; esac
        usleep 100000
    done
    log "after kill -9: $state"
    case "$state" in *QUIESCED* | *LIVE*) ;; *) fail "device not held after the crash: $state" ;; esac
    [ -b "$DEV" ] || fail "$DEV vanished after the crash"
    if [ "$1" = --recover ]; then
        # A restart with other queue settings must be refused, not served.
        if ramdisk add --size 256M --volume rd1 --file $IMG --recover "$ID" >/tmp/rd1-bad.log 2>&1; then
            fail "recovery with different queue settings was accepted"
        fi
        grep -q "does not match" /tmp/rd1-bad.log || { cat /tmp/rd1-bad.log; fail "no clear mismatch message"; }
    fi
    # shellcheck disable=SC2086
    start_ramdisk "/tmp/rd1-$1.log" $RD1 "$@"
    [ "$DEV" = "/dev/ublkb$ID" ] || fail "recovered as $DEV, expected /dev/ublkb$ID"
    t1=$(uptime_s)
    log "recovered $DEV ($*): I/O paused $(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')s"
    grep -q "recovered=true" "/tmp/rd1-$1.log" || fail "new daemon did not report a recovery"
}

crash_and_recover --recover "$ID"
crash_and_recover --workers 1 # automatic: the record names the device
wait "$FIO"
fio_check $? "$FIO_LOG"

log "SIGTERM: the daemon stops and deletes its own device"
kill -TERM "$DAEMON"
wait_exit "$DAEMON" 30 || fail "daemon exited with status $? after SIGTERM"
grep -q "device stopped" /tmp/rd1-*workers*.log || fail "daemon did not report a clean stop"
[ -b "$DEV" ] && fail "$DEV still exists after SIGTERM"
[ -e "/sys/class/ublk-char/ublkc$ID" ] && fail "ublkc$ID still exists after SIGTERM"
log "ok"

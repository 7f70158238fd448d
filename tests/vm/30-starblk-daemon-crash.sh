#!/bin/sh
# kill -9 the starblk daemon during fio --verify, then `starblk up` again:
# the device stays, I/O pauses (measured), fio ends with err=0.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk fio
load_module ublk_drv
sb_replicas 256M
sb_up
FIRST=$DEV
FIO_BG=1 run_fio_verify "$DEV" --size=96M --numjobs=2 --offset_increment=100M
FIO=$LAST_PID
sleep 3
running "$FIO" || fail "fio finished before the crash"
t0=$(cut -d' ' -f1 /proc/uptime)
kill -9 "$HE"
wait_exit "$HE" 30 || true
[ -b "$FIRST" ] || fail "$FIRST vanished after the daemon crash"
sb_up
t1=$(cut -d' ' -f1 /proc/uptime)
[ "$DEV" = "$FIRST" ] || fail "reattached as $DEV, expected $FIRST"
log "daemon restarted on $DEV: I/O paused $(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}') s"
wait_exit "$FIO" 280
fio_check $? /tmp/fio-$(basename "$DEV").log
sb_down
sb_compare
log "daemon crash: device kept, fio err=0, replicas identical"

#!/bin/sh
# fio randrw with crc32c verification (4 jobs, QD32) on starblk; kill -9
# one replica during the run: fio ends with err=0, and the replica, once
# restarted, returns to up-to-date.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk fio
load_module ublk_drv
sb_replicas 256M
sb_up
log "fio on $DEV; killing replica near mid-run"
FIO_BG=1 run_fio_verify "$DEV" --rw=randrw --size=32M --numjobs=4 --offset_increment=48M
FIO=$LAST_PID
sleep 3
running "$FIO" || fail "fio finished before the replica kill"
kill -9 "$R2"
sb_wait_state near failed 20
log "near: $(sb_state near) while fio runs"
sleep 2
sb_serve 2
wait_exit "$FIO" 280
fio_check $? /tmp/fio-$(basename "$DEV").log
sb_wait_state near up-to-date 60
starblk status --config $SB_CONF
sb_down
sb_compare
log "replica kill under load: fio err=0, near back to up-to-date, replicas identical"

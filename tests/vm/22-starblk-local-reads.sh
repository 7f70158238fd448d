#!/bin/sh
# Local reads on the real kernel (docs/design.md, "Local reads"): twice,
# fio randrw with crc32c verification on /dev/ublkbN while the `local`
# replica, whose data file the daemon reads directly, is killed -9 and
# restarted. Both fio runs end with err=0, status shows reads served from
# the local data file, and the replicas end byte-identical.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk fio
load_module ublk_drv
sb_replicas 256M
sb_up
for round in 1 2; do
    log "round $round: fio on $DEV; killing the local replica mid-run"
    FIO_BG=1 run_fio_verify "$DEV" --rw=randrw --size=32M --numjobs=4 --offset_increment=48M --loops=4
    FIO=$LAST_PID
    sleep 2
    running "$FIO" || fail "fio finished before the local replica was killed (round $round)"
    kill -9 "$R1"
    sb_wait_state local failed 20
    sleep 1
    sb_serve 1
    wait_exit "$FIO" 280
    fio_check $? /tmp/fio-$(basename "$DEV").log
    sb_wait_state local up-to-date 120
done
starblk status --config $SB_CONF
local_reads=$(starblk status --config $SB_CONF --json | tr -d ' \n' | sed 's/},{/}\n{/g' | grep '"name":"local"' | sed 's/.*"reads_local":\([0-9]*\).*/\1/')
log "reads served from the local data file: $local_reads"
[ "${local_reads:-0}" -gt 0 ] || fail "no read was served from the local data file"
sb_down
sb_compare
log "local reads under fio verify, local replica killed in each of 2 runs: err=0, replicas identical"

#!/bin/sh
# Replay recovery on the real kernel: with a 4 MiB write queue, the far
# replica is killed (kill -9) and fio writes 48 MiB with crc32c
# verification while it is down, far more than the queue holds. When it
# returns it must copy the missing writes from a peer's log (replica to
# replica), catch up, and end byte-identical to the others; fio sees no
# error throughout.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk fio
load_module ublk_drv
sb_replicas 256M
sed -i 's/^write_queue = .*/write_queue = "4MiB"/' $SB_CONF
sb_up
sb_wait_state far up-to-date 30
kill -9 "$R3"
sb_wait_state far failed 20
log "far down; fio writes 48 MiB on $DEV"
run_fio_verify "$DEV" --rw=randwrite --size=48M --numjobs=1
sb_serve 3
sb_wait_state far up-to-date 120
grep -q "replay recovery done" $SB_DIR/r3.log || {
    cat $SB_DIR/r3.log
    fail "far caught up without a replay: the write queue should not have covered 48 MiB"
}
log "far: $(grep 'replay recovery done' $SB_DIR/r3.log | tail -n 1 | sed 's/.*INFO //')"
starblk status --config $SB_CONF
sb_down
sb_compare
log "replay recovery: far copied the writes it missed from a peer's log; replicas identical"

#!/bin/sh
# I/O past the end of a starblk device fails cleanly, the daemon lives on,
# and a second `up` for a live device refuses with a clear message.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk dd blkdiscard
load_module ublk_drv
sb_replicas 64M
sb_up
blocks=$((64 * 256))
if dd if=/dev/zero of="$DEV" bs=4096 seek=$blocks count=1 oflag=direct 2>/dev/null; then
    fail "write past the end succeeded"
fi
if dd if="$DEV" of=/dev/null bs=4096 skip=$((blocks + 10)) count=1 iflag=direct 2>/dev/null | grep -q .; then
    fail "read past the end returned data"
fi
if blkdiscard -o $((64 * 1048576 + 4096)) -l 4096 "$DEV" 2>/dev/null; then
    fail "discard past the end succeeded"
fi
blkdiscard -o 4096 -l 1048576 "$DEV" || fail "a valid discard failed"
dd if=/dev/urandom of=/tmp/blk bs=4096 count=16 2>/dev/null
dd if=/tmp/blk of="$DEV" bs=4096 seek=100 count=16 oflag=direct 2>/dev/null || fail "valid write failed"
dd if="$DEV" of=/tmp/back bs=4096 skip=100 count=16 iflag=direct 2>/dev/null || fail "valid read failed"
compare_files /tmp/blk /tmp/back
running "$HE" || fail "daemon died on bad requests"
if starblk up --config $SB_CONF --foreground >/tmp/dup.log 2>&1; then
    fail "a second daemon started for a live volume"
fi
cat /tmp/dup.log
sb_down
log "bad requests refused; daemon alive; duplicate up refused"

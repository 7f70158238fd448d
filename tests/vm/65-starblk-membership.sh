#!/bin/sh
# Membership changes under load on the real kernel: ext4 on /dev/ublkbN
# with fio --verify passes running back to back while (1) a new replica is
# added (full copy), (2) an original one is removed, and (3) another is
# killed -9 and restarted. Every fio pass ends with err=0, e2fsck is clean,
# and the final members' data files are byte-identical.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk fio mkfs.ext4 e2fsck cmp
load_module ublk_drv
sb_replicas 256M
# The replica to add: empty, on its own port.
starblk replica init --dir $SB_DIR/r4 --size 256M --log-size 64M >/dev/null || fail "replica init r4"
sb_serve 4
sb_up
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mount_dev "$DEV" /mnt/m
mkdir -p /mnt/m/fio

# fio verify passes until /tmp/stop-fio exists; any failed pass stops the
# loop with its log and exit status 1.
cat >/tmp/fio-loop.sh <<SH
#!/bin/sh
n=0
while [ ! -e /tmp/stop-fio ]; do
    fio --name=m\$n --directory=/mnt/m/fio $FIO_BASE --rw=randrw --size=12M --numjobs=4 >/tmp/fio-m.log 2>&1
    rc=\$?
    if [ \$rc -ne 0 ] || ! grep -q 'err= 0' /tmp/fio-m.log; then
        cat /tmp/fio-m.log
        echo "fio pass \$n failed (exit \$rc)"
        exit 1
    fi
    n=\$((n + 1))
    echo "fio pass \$n ok"
done
SH
chmod +x /tmp/fio-loop.sh
start_bg /tmp/fio-loop.out /tmp/fio-loop.sh
FIO=$LAST_PID
wait_for_line /tmp/fio-loop.out 'pass 1 ok' 120 "$FIO" >/dev/null

log "adding replica spare (127.0.0.1:7704) under fio"
# N = 4 with Q = 2: Q is no longer a strict majority, so only --force adds.
starblk replica add --volume vol0 --socket $SB_SOCK --name spare --addr 127.0.0.1:7704 --role near 2>/tmp/add.err \
    && fail "an add that leaves Q <= N/2 succeeded without --force"
grep -q "Q would no longer be a strict majority" /tmp/add.err || { cat /tmp/add.err; fail "unforced add: wrong refusal"; }
starblk replica add --volume vol0 --socket $SB_SOCK --name spare --addr 127.0.0.1:7704 --role near --force || fail "replica add"
sb_wait_state spare up-to-date 180
running "$FIO" || { cat /tmp/fio-loop.out; fail "fio loop stopped during the add"; }
log "spare up to date; removing the original replica local"
starblk replica remove --volume vol0 --socket $SB_SOCK --name local || fail "replica remove"
[ "$(sb_state local)" = removed ] || fail "local is $(sb_state local), not removed"
# A refused change exits non-zero and changes nothing.
starblk replica remove --volume vol0 --socket $SB_SOCK --name nosuch 2>/dev/null && fail "removing an unknown replica succeeded"
log "killing replica near under fio"
kill -9 "$R2"
sb_wait_state near failed 20
sleep 2
sb_serve 2
sb_wait_state near up-to-date 180
running "$FIO" || { cat /tmp/fio-loop.out; fail "fio loop stopped during the kill"; }
touch /tmp/stop-fio
wait_exit "$FIO" 240
rc=$?
cat /tmp/fio-loop.out
[ "$rc" -eq 0 ] || fail "a fio verify pass failed"
starblk status --config $SB_CONF
umount_dev /mnt/m
e2fsck -fn "$DEV" || fail "e2fsck reported problems"
sb_down
compare_files $SB_DIR/r2/data $SB_DIR/r3/data
compare_files $SB_DIR/r2/data $SB_DIR/r4/data
log "add, remove and kill under fio --verify on ext4: every pass err=0, fsck clean, members near, far, spare identical"

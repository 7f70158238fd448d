#!/bin/sh
# The NBD frontend under the kernel's own NBD client: three replicas, Q=2,
# `starblk up --frontend nbd`, nbd-client attaching /dev/nbd0.
# 1. over TCP: ext4, 100 files with sha256 sums, unmount, e2fsck -fn clean,
#    disconnect, down;
# 2. up again over a Unix socket, nbd-client with two connections: e2fsck
#    -fn clean, the sums match, then fio with crc32c verify on the raw
#    device (several requests in flight on both connections), disconnect,
#    down; the three replicas are byte-identical.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk nbd-client mkfs.ext4 e2fsck sha256sum cmp fio
need_module nbd
[ -b /dev/nbd0 ] || fail "nbd loaded but /dev/nbd0 is missing"
NBD=/dev/nbd0
sb_replicas 256M

log "phase 1: NBD over TCP"
sb_up_nbd 127.0.0.1:10809
[ "$NBD_URI" = "nbd://127.0.0.1:10809" ] || fail "up printed '$NBD_URI', not nbd://127.0.0.1:10809"
nbd_attach $NBD 127.0.0.1 10809
[ "$(blockdev --getsize64 $NBD)" = $((256 * 1024 * 1024)) ] || fail "$NBD is $(blockdev --getsize64 $NBD) bytes, not 256 MiB"
[ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] || fail "logical block size $(cat /sys/block/nbd0/queue/logical_block_size), not 4096"
# The kernel ignores the export's 1 MiB maximum: requests up to this size
# reach the server, which splits them.
log "max_sectors_kb $(cat /sys/block/nbd0/queue/max_sectors_kb) (hw $(cat /sys/block/nbd0/queue/max_hw_sectors_kb))"
starblk status --config $SB_CONF | head -n 3
mkfs.ext4 -q -F $NBD || fail "mkfs.ext4 on $NBD"
mount_dev $NBD /mnt/nbd
write_files /mnt/nbd/files 100 64
sync
verify_files /mnt/nbd/files
umount_dev /mnt/nbd
e2fsck -fn $NBD >/dev/null || fail "e2fsck -fn reported problems (over TCP)"
nbd_detach $NBD
sb_down_nbd
log "phase 1: ext4 written over TCP, fsck clean"

log "phase 2: NBD over a Unix socket, two connections"
sb_up_nbd unix:/run/vol0.nbd.sock
[ "$NBD_URI" = "nbd+unix:///?socket=/run/vol0.nbd.sock" ] || fail "up printed '$NBD_URI'"
nbd_attach $NBD -unix /run/vol0.nbd.sock -connections 2
e2fsck -fn $NBD >/dev/null || fail "e2fsck -fn reported problems (over the Unix socket)"
mount_dev $NBD /mnt/nbd
verify_files /mnt/nbd/files
umount_dev /mnt/nbd
log "100 sums match after down and up over another transport"
run_fio_verify $NBD --size=16M --iodepth=16
nbd_detach $NBD
! dmesg | grep -E 'nbd0: Other side returned error|I/O error, dev nbd0' || fail "the kernel saw NBD errors"
sb_down_nbd
sb_compare
log "nbd: ext4 + fsck + sums + fio verify through nbd-client; replicas byte-identical"

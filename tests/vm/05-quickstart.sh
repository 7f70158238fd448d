#!/bin/sh
# The README's main job, in the guest: three replicas (local, near, far),
# a Q=2 volume, /dev/ublkbN, ext4, files written and verified, status.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk mkfs.ext4 sha256sum
load_module ublk_drv
log "starting three replicas (local, near, far) on loopback"
sb_replicas 256M
sb_up
log "volume vol0 is live at $DEV"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mount_dev "$DEV" /mnt/vol0
write_files /mnt/vol0/files 20 64
sync
log "wrote 20 files; contents:"
ls -l /mnt/vol0/files | head -n 5
df -h /mnt/vol0 | tail -n 1
verify_files /mnt/vol0/files
starblk status --config $SB_CONF
umount_dev /mnt/vol0
sb_down
sb_compare
log "quickstart done: ext4 on a 3-way replicated starblk volume; replicas byte-identical"

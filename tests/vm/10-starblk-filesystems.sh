#!/bin/sh
# ext4, xfs and btrfs on a starblk volume (3 replicas, Q=2): mkfs, 200 files
# with sha256 sums, fsck clean, remount and verify, down, replicas identical.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk mkfs.ext4 e2fsck mkfs.xfs xfs_repair mkfs.btrfs btrfs sha256sum cmp
load_module ublk_drv
load_module xfs
load_module btrfs
sb_replicas 320M

for fs in ext4 xfs btrfs; do
    sb_up
    log "$fs on $DEV"
    case $fs in
        ext4) mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4" ;;
        xfs) mkfs.xfs -q -f "$DEV" || fail "mkfs.xfs" ;;
        btrfs) mkfs.btrfs -q -f "$DEV" >/dev/null || fail "mkfs.btrfs" ;;
    esac
    mount_dev "$DEV" /mnt/$fs
    write_files /mnt/$fs/files 200 16
    sync
    umount_dev /mnt/$fs
    case $fs in
        ext4) e2fsck -fn "$DEV" || fail "e2fsck reported problems" ;;
        xfs) xfs_repair -n "$DEV" || fail "xfs_repair -n reported problems" ;;
        btrfs) btrfs check "$DEV" || fail "btrfs check reported problems" ;;
    esac
    mount_dev "$DEV" /mnt/$fs
    verify_files /mnt/$fs/files
    umount_dev /mnt/$fs
    sb_down
    sb_compare
    log "$fs: fsck clean, 200 sums verified, replicas identical"
done

#!/bin/sh
# The README's main job, in the guest (scripts/quickstart falls back to it
# when the host kernel has no ublk): tests/vm/quickstart-job.sh, the same
# script scripts/quickstart runs natively. Three replicas (local, near,
# far), a Q=2 volume as /dev/ublkbN, the far replica over network-sync with
# FEC behind starblk-wanem (20 ms one way, 0.5 % loss), ext4, files
# written and verified, status with the link line, down, replicas
# byte-identical.
. /tests/lib.sh

need_cmd starblk starblk-wanem mkfs.ext4 e2fsck sha256sum cmp
load_module ublk_drv
CMP=$(tool_path cmp) sh /tests/quickstart-job.sh /data/quickstart || fail "the quickstart job failed"

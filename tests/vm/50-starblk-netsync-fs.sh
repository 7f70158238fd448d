#!/bin/sh
# Network-sync end to end on the real kernel: the recommended setup (N=3,
# Q=2) with the far replica on a network-sync link (UDP + Reed-Solomon
# (8,3), paced at 50 Mbit/s) behind Linux netem (20 ms each way, 1 %
# random loss on that replica's traffic only). ext4 on /dev/ublkbN, files
# written, synced and verified; status must show the far link working
# (datagrams lost and rebuilt or resent); after `down` the far replica is
# byte-identical to the others.
. /tests/lib.sh
. /tests/starblk.sh

need_cmd starblk mkfs.ext4 e2fsck sha256sum cmp tc
load_module ublk_drv
load_module sch_prio
load_module sch_netem
load_module cls_u32

FAR_PORT=7703
sb_replicas 256M 'network_sync = true
fec = { scheme = "reed-solomon", r = 8, c = 3 }
rate = "50Mbit"'

# netem on the far replica's traffic only (both directions), UDP and TCP.
tc qdisc add dev lo root handle 1: prio bands 5 || fail "tc prio root"
for b in 4 5; do
    tc qdisc add dev lo parent 1:$b handle ${b}0: netem limit 10000 delay 20ms loss random 1% ||
        fail "tc netem on band $b"
done
tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport $FAR_PORT 0xffff flowid 1:4 || fail "tc filter"
tc filter add dev lo parent 1: protocol ip prio 2 u32 match ip sport $FAR_PORT 0xffff flowid 1:5 || fail "tc filter"

sb_up
sb_wait_state far up-to-date 30
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mount_dev "$DEV" /mnt/ns
write_files /mnt/ns/files 100 64
sync
verify_files /mnt/ns/files
umount_dev /mnt/ns
e2fsck -fn "$DEV" >/dev/null || fail "e2fsck reported problems"

status=$(starblk status --config $SB_CONF --json | tr -d ' \n')
far=$(echo "$status" | sed 's/},{"name"/}\n{"name"/g' | grep '"name":"far"')
num() { echo "$far" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" | head -n1; }
mode=$(echo "$far" | sed -n 's/.*"network_sync":"\([a-z-]*\)".*/\1/p')
sent=$(num data_packets) repaired=$(num repaired) retx=$(num retransmitted)
log "far link: mode $mode, $sent data datagrams, $repaired rebuilt by FEC, $retx resent"
tc -s qdisc show dev lo | grep -A1 netem | grep -E "Sent|dropped" | head -n 4
case "$mode" in tx-timestamp | sendmsg-returned) ;; *) fail "far link mode '$mode' is not network-sync" ;; esac
[ "${sent:-0}" -gt 1000 ] || fail "far link sent only ${sent:-0} data datagrams"
[ $((${repaired:-0} + ${retx:-0})) -gt 0 ] || fail "1% loss but nothing rebuilt or resent: netem not in the path?"
sb_down
tc qdisc del dev lo root
sb_compare
log "network-sync: ext4 verified through 1% loss; far replica byte-identical"

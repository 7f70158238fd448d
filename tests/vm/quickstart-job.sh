#!/bin/sh
# The quickstart's main job, one script for both places it runs: natively
# (scripts/quickstart on a host whose kernel has ublk, as root) and in the
# VM (tests/vm/05-quickstart.sh, where scripts/quickstart falls back to).
#
# Three replicas (local, near, far) on loopback and a Q=2 volume served as
# /dev/ublkbN. The far replica is reached over network-sync (UDP +
# Reed-Solomon (8,3) FEC) through starblk-wanem, the project's WAN
# emulator: 20 ms one way and 0.5 % random loss on every datagram in each
# direction. ext4 on the device, files written and verified, `status` with
# the far link's line (repaired, resent, wire latency), down, and the three
# replicas byte-identical. Exits 0 when all of that held, 1 otherwise.
#
# usage: quickstart-job.sh WORKDIR [PORT_BASE]
#   WORKDIR    replica data, config, logs; the mount point is WORKDIR/mnt
#   PORT_BASE  replicas listen on PORT_BASE+1..3, the emulated far link on
#              PORT_BASE+13 (default 7700)
# Needs on PATH: starblk, starblk-wanem, mkfs.ext4, e2fsck, sha256sum, cmp.
# CMP names the cmp to use (the VM passes diffutils' over busybox's slow
# applet, which busybox sh would otherwise run).
set -eu
CMP=${CMP:-cmp}

WORK=${1:?usage: quickstart-job.sh WORKDIR [PORT_BASE]}
BASE=${2:-7700}
MNT=$WORK/mnt
CONF=$WORK/vol0.toml
DELAY_MS=20
LOSS=0.005
FILES=20
FILE_KB=256

T0=$(date +%s)
say() { echo "quickstart [$(($(date +%s) - T0))s]: $*"; }
die() {
    echo "quickstart: FAILED: $*" >&2
    for f in "$WORK/vol0.log" "$WORK/far.log" "$WORK/wanem.log"; do
        [ -s "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

PIDS=""
MOUNTED=0
UP=0
cleanup() {
    [ "$MOUNTED" = 1 ] && umount "$MNT" 2>/dev/null
    [ "$UP" = 1 ] && starblk down --config "$CONF" >/dev/null 2>&1
    for p in $PIDS; do kill "$p" 2>/dev/null; done
    return 0
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# wait_line FILE REGEX SECONDS PID: waits until FILE has a line matching
# REGEX; fails if PID exits first or time runs out.
# (sh has no locals: its counter is _w, not the callers' i.)
wait_line() {
    _w=0
    until grep -qE "$2" "$1" 2>/dev/null; do
        kill -0 "$4" 2>/dev/null || { cat "$1" >&2; die "pid $4 exited before printing /$2/"; }
        _w=$((_w + 1))
        [ "$_w" -le $(($3 * 5)) ] || { cat "$1" >&2; die "no /$2/ in $1 after $3 s"; }
        sleep 0.2
    done
}

# far_json: the far replica's object from `status --json`, on one line.
far_json() {
    starblk status --config "$CONF" --json | tr -d ' \n' | sed 's/},{"name"/}\n{"name"/g' | grep '"name":"far"'
}
num() { echo "$1" | sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" | head -n1; }

rm -rf "$WORK"
mkdir -p "$WORK" "$MNT"
say "three replicas (local, near, far) on loopback, data in $WORK"
i=1
for role in local near far; do
    starblk replica init --dir "$WORK/$role" --size 256M --log-size 64M >/dev/null
    starblk replica serve --dir "$WORK/$role" --listen "127.0.0.1:$((BASE + i))" >"$WORK/$role.log" 2>&1 &
    PIDS="$PIDS $!"
    wait_line "$WORK/$role.log" '^listening' 20 $!
    i=$((i + 1))
done

FAR=127.0.0.1:$((BASE + 13))
say "far link: starblk-wanem $FAR -> 127.0.0.1:$((BASE + 3)), ${DELAY_MS} ms one way, loss $LOSS each way"
starblk-wanem both --listen "$FAR" --upstream "127.0.0.1:$((BASE + 3))" \
    --delay-ms "$DELAY_MS" --loss "$LOSS" --seed 1 >"$WORK/wanem.log" 2>&1 &
WANEM=$!
PIDS="$PIDS $WANEM"
wait_line "$WORK/wanem.log" '^wanem: ready' 20 "$WANEM"

cat >"$CONF" <<TOML
[volume]
name = "vol0"
size = "256M"
quorum = 2
write_queue = "128MiB"
control_socket = "$WORK/vol0.sock"

[[replica]]
name = "local"
addr = "127.0.0.1:$((BASE + 1))"
role = "local"

[[replica]]
name = "near"
addr = "127.0.0.1:$((BASE + 2))"
role = "near"

# Through the WAN emulator: UDP + Reed-Solomon (8,3) repair packets.
[[replica]]
name = "far"
addr = "$FAR"
role = "far"
network_sync = true
fec = { scheme = "reed-solomon", r = 8, c = 3 }
rate = "20Mbit"
TOML
say "config $CONF:"
sed 's/^/    /' "$CONF"
starblk volume create --config "$CONF"
DEV=$(starblk up --config "$CONF") || die "starblk up (log: $WORK/vol0.log)"
UP=1
[ -b "$DEV" ] || die "starblk up printed '$DEV', not a block device"
say "volume vol0 is live at $DEV"

i=0
until far_json | grep -q '"state":"up-to-date"'; do
    i=$((i + 1))
    [ "$i" -le 150 ] || { starblk status --config "$CONF"; die "far replica not up to date after 30 s"; }
    sleep 0.2
done

mkfs.ext4 -q -F "$DEV"
mount "$DEV" "$MNT"
MOUNTED=1
say "ext4 mounted at $MNT; writing $FILES files of $FILE_KB KiB"
mkdir -p "$MNT/files"
i=0
while [ "$i" -lt "$FILES" ]; do
    dd if=/dev/urandom of="$MNT/files/f$i" bs=1024 count="$FILE_KB" 2>/dev/null
    i=$((i + 1))
done
(cd "$MNT/files" && sha256sum f*) >"$WORK/files.sha256"
sync
(cd "$MNT/files" && sha256sum -c "$WORK/files.sha256" >/dev/null) || die "checksums differ"
say "$FILES files written, synced and verified"
df -h "$MNT" | tail -n 1

say "starblk status:"
starblk status --config "$CONF" | tee "$WORK/status.txt"
grep -q 'link: sent .* repaired .* retransmitted .* wire p50' "$WORK/status.txt" ||
    die "status shows no network-sync link line for the far replica"
far=$(far_json)
sent=$(num "$far" data_packets) repaired=$(num "$far" repaired) resent=$(num "$far" retransmitted)
mode=$(echo "$far" | sed -n 's/.*"network_sync":"\([a-z-]*\)".*/\1/p')
case "$mode" in tx-timestamp | sendmsg-returned) ;; *) die "far link mode '$mode' is not network-sync" ;; esac
[ "${sent:-0}" -gt 1000 ] || die "far link sent only ${sent:-0} data datagrams"
# 0.5 % of thousands of datagrams: losing none would mean the emulator is
# not in the path.
[ $((${repaired:-0} + ${resent:-0})) -gt 0 ] || die "0.5% loss but nothing repaired or resent"
say "far link ($mode): $sent data datagrams, $repaired rebuilt by FEC, $resent resent"

umount "$MNT"
MOUNTED=0
e2fsck -fn "$DEV" >/dev/null 2>&1 || die "e2fsck -fn $DEV reported problems"
say "unmounted, e2fsck -fn clean; starblk down (waits until the far replica has every write)"
starblk down --config "$CONF"
UP=0
"$CMP" "$WORK/local/data" "$WORK/near/data" || die "local and near replicas differ"
"$CMP" "$WORK/local/data" "$WORK/far/data" || die "local and far replicas differ"
say "done: ext4 on a 3-way replicated volume, far replica over network-sync behind a 20 ms, 0.5% loss link;"
say "      fsck clean, replicas byte-identical"

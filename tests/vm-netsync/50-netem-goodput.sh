#!/bin/sh
# Benchmark, not a test (run by scripts/bench-netsync-vm through
# scripts/vm-test). Goodput under loss: network-sync (far replica over
# UDP + layered XOR (8,3), Q=1) against the TCP replica link (far replica
# over TCP, Q=2) through the SAME emulator: Linux netem on lo.
#
# Only the far replica's traffic is shaped: a prio root qdisc on lo sends
# packets to the far port (dport) to band 1:4 and packets from it (sport)
# to band 1:5; each band is a netem qdisc with DELAY_MS one way, RATE_MBIT
# (counting IP bytes: packet overhead -14 removes lo's Ethernet header, as
# the network-sync pacer counts IP+UDP+payload) and random loss p, the
# same in both directions. The local replica's traffic stays in the
# default bands (no shaping). lo gets MTU 1500 and gso_max_segs 1 so TCP
# sends MSS-sized packets and netem drops single segments, not 64 KiB
# GSO super-packets.
#
# Every bench gets fresh replicas and a fresh volume, and fresh qdiscs
# (so the tc counters are per bench). Prints machine-readable lines:
#   NETEM_INFO  key value...
#   NETEM_RUN   mode rate_mbit loss_pct mb_s bench_rc busy_pct elapsed_s
#   NETEM_TC    mode rate_mbit loss_pct dir sent_pkts sent_bytes dropped
#   NETEM_JSON  {...}   one per (rate, loss) with both modes
# Exit 0 when every bench produced a number, 1 otherwise, 4 (skip) when
# tc, ip or the qdiscs are missing.
. /tests/lib.sh

RATES="20" LOSSES="0 0.1 0.5 1" MODES="netsync tcp" SECS=15 DELAY_MS=50 LIMIT=10000
# Written by scripts/bench-netsync-vm.
[ -f /tests/netem-params.sh ] && . /tests/netem-params.sh

LOCAL_PORT=7701 FAR_PORT=7702
W=/data/nb
RESULTS=/tmp/netem-results

need_cmd starblk tc ip
for m in sch_prio sch_netem cls_u32; do load_module $m; done

info() { echo "NETEM_INFO $*"; }
info kernel "$(uname -r)"
info cpus "$(grep -c '^processor' /proc/cpuinfo)"
info starblk "$(starblk --version 2>&1 | head -n1)"
info tc "$(tc -V 2>&1 | head -n1)"
info source "${SOURCE:-unknown}"
info params "rates=$RATES losses=$LOSSES modes=$MODES seconds=$SECS delay_ms=$DELAY_MS limit=$LIMIT"

# --- lo as a 1500-byte link without GSO super-packets -----------------------
ip link set dev lo mtu 1500 || fail "ip link set lo mtu 1500"
ip link set dev lo gso_max_segs 1 || fail "ip link set lo gso_max_segs 1"
info lo "$(ip -d link show dev lo | tr -s ' \n' ' ' | grep -oE ' mtu [0-9]+|gso_max_size [0-9]+|gso_max_segs [0-9]+' | tr '\n' ' ')"

# shape LOSS_PCT RATE: netem on the far replica's traffic, both directions.
shape() {
    tc qdisc del dev lo root 2>/dev/null
    tc qdisc add dev lo root handle 1: prio bands 5 || fail "tc prio root"
    lossarg=""
    [ "$1" = 0 ] || lossarg="loss random $1%"
    for b in 4 5; do
        # shellcheck disable=SC2086
        tc qdisc add dev lo parent 1:$b handle ${b}0: netem limit "$LIMIT" delay "${DELAY_MS}ms" \
            rate "${2}mbit" -14 $lossarg || fail "tc netem on band $b"
    done
    tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport $FAR_PORT 0xffff flowid 1:4 ||
        fail "tc filter dport"
    tc filter add dev lo parent 1: protocol ip prio 2 u32 match ip sport $FAR_PORT 0xffff flowid 1:5 ||
        fail "tc filter sport"
}

# NETEM_TC lines for the two netem qdiscs: dir sent_pkts sent_bytes dropped.
tc_counters() {
    tc -s qdisc show dev lo | awk -v pre="$1" '
        $1 == "qdisc" {h = ($2 == "netem") ? $3 : ""}
        $1 == "Sent" && h != "" {d = $7; sub(/,/, "", d)
            printf "NETEM_TC %s %s %s %s %s\n", pre, (h == "40:" ? "to-far" : "from-far"), $4, $2, d; h = ""}'
}

# Busy and total ticks of the whole guest ("busy total").
sys_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }


# run_one MODE RATE LOSS: fresh replicas and volume, one bench; prints
# NETEM_RUN and NETEM_TC lines and appends "mode rate loss mb_s" to RESULTS.
run_one() {
    mode=$1 rate=$2 loss=$3
    rm -rf $W/r && mkdir -p $W/r
    shape "$loss" "$rate"
    for n in local far; do
        starblk replica init --dir $W/r/$n --size 512MiB --log-size 64M >/dev/null || fail "replica init $n"
    done
    start_bg $W/r/local.log starblk replica serve --dir $W/r/local --listen 127.0.0.1:$LOCAL_PORT
    lp=$LAST_PID
    start_bg $W/r/far.log starblk replica serve --dir $W/r/far --listen 127.0.0.1:$FAR_PORT
    fp=$LAST_PID
    wait_for_line $W/r/local.log '^listening' 20 "$lp" >/dev/null || exit 1
    wait_for_line $W/r/far.log '^listening' 20 "$fp" >/dev/null || exit 1
    far_extra="" quorum=2
    if [ "$mode" = netsync ]; then
        quorum=1
        far_extra='network_sync = true
fec = { scheme = "layered-xor", r = 8, c = 3 }'
        far_extra="$far_extra
rate = \"${rate}Mbit\""
    fi
    cat >$W/r/vol.toml <<TOML
[volume]
name = "nb"
size = "512MiB"
quorum = $quorum
write_queue = "128MiB"
control_socket = "$W/r/nb.sock"

[[replica]]
name = "local"
addr = "127.0.0.1:$LOCAL_PORT"
role = "local"

[[replica]]
name = "far"
addr = "127.0.0.1:$FAR_PORT"
role = "far"
$far_extra
TOML
    starblk volume create --config $W/r/vol.toml >/dev/null || fail "volume create ($mode)"
    log "bench $mode: ${rate} Mbit/s, ${DELAY_MS} ms, loss ${loss}%, ${SECS}s"
    set -- $(sys_ticks)
    b_busy=$1 b_total=$2 t0=$(date +%s)
    timeout -s KILL $((SECS + 120)) starblk bench --config $W/r/vol.toml \
        --pattern write --bs 64k --qd 16 --seconds "$SECS" --json >$W/r/bench.json 2>$W/r/bench.err
    brc=$?
    el=$(($(date +%s) - t0))
    set -- $(sys_ticks)
    busy=$(awk -v b=$(($1 - b_busy)) -v t=$(($2 - b_total)) 'BEGIN {printf "%.0f", t ? 100 * b / t : 0}')
    mbs=$(sed -n 's/.*"mb_s":\([0-9.eE+-]*\).*/\1/p' $W/r/bench.json | head -n1)
    [ "$brc" = 0 ] && [ -n "$mbs" ] || {
        echo "bench $mode failed (exit $brc):"
        sed 's/^/  bench: /' $W/r/bench.json $W/r/bench.err | tail -n 20
        mbs=""
    }
    echo "NETEM_RUN $mode $rate $loss ${mbs:-none} $brc $busy $el"
    tc_counters "$mode $rate $loss"
    grep -o '"latency":{[^}]*}' $W/r/bench.json | sed "s/^/  $mode: /"
    kill -9 "$lp" "$fp" 2>/dev/null
    wait "$lp" "$fp" 2>/dev/null
    echo "$mode $rate $loss ${mbs:-none}" >>$RESULTS
}

: >$RESULTS
ok=0
for rate in $RATES; do
    for loss in $LOSSES; do
        for mode in $MODES; do
            run_one "$mode" "$rate" "$loss"
            grep -q "^$mode $rate $loss none$" $RESULTS && ok=1
        done
    done
done
tc qdisc del dev lo root 2>/dev/null

# One JSON row and one table row per (rate, loss).
val() { awk -v m="$1" -v r="$2" -v l="$3" '$1 == m && $2 == r && $3 == l {print $4}' $RESULTS | tail -n1; }
echo
echo "goodput, 64 KiB sequential writes QD16, ${DELAY_MS} ms one way, netem on lo, ${SECS}s per bench"
printf '%8s %6s %14s %10s %8s %11s\n' "rate" "loss" "netsync MB/s" "TCP MB/s" "ratio" "target MB/s"
for rate in $RATES; do
    for loss in $LOSSES; do
        ns=$(val netsync "$rate" "$loss") tcp=$(val tcp "$rate" "$loss")
        awk -v r="$rate" -v l="$loss" -v ns="${ns:-}" -v tcp="${tcp:-}" -v d="$DELAY_MS" -v s="$SECS" 'BEGIN {
            t = 0.9 * 8 / 11 * r / 8
            nsj = (ns == "" || ns == "none") ? "null" : ns
            tj = (tcp == "" || tcp == "none") ? "null" : tcp
            rj = (nsj != "null" && tj != "null" && tj + 0 > 0) ? sprintf("%.3f", ns / tcp) : "null"
            printf "NETEM_JSON {\"rate_mbit\":%s,\"loss_pct\":%s,\"delay_ms\":%s,\"seconds\":%s,\"netsync_mb_s\":%s,\"tcp_mb_s\":%s,\"ratio\":%s,\"target_mb_s\":%.3f}\n",
                r, l, d, s, nsj, tj, rj, t
            printf "%5s Mb %5s%% %14s %10s %8s %11.2f\n", r, l, (nsj == "null" ? "-" : sprintf("%.2f", ns)),
                (tj == "null" ? "-" : sprintf("%.2f", tcp)), (rj == "null" ? "-" : rj), t
        }'
    done
done
exit $ok

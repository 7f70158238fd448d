# Helpers for starblk guest scenarios (sourced after lib.sh).
# Three replicas (local, near, far) on loopback with data on /data (tmpfs).

SB_DIR=/data/sb
SB_CONF=$SB_DIR/vol.toml
SB_SOCK=$SB_DIR/vol0.sock

# sb_replicas SIZE [FAR_EXTRA]: init and serve three replicas, write the
# config (FAR_EXTRA: more keys for the far replica's table, e.g. its
# network-sync settings), create the volume. Sets R1..R3 (pids).
sb_replicas() {
    size=$1 far_extra=${2:-}
    mkdir -p $SB_DIR
    i=1
    for role in local near far; do
        starblk replica init --dir $SB_DIR/r$i --size "$size" --log-size 64M >/dev/null || fail "replica init r$i"
        sb_serve $i
        i=$((i + 1))
    done
    cat >$SB_CONF <<TOML
[volume]
name = "vol0"
size = "$size"
quorum = 2
write_queue = "128MiB"
control_socket = "$SB_SOCK"

[[replica]]
name = "local"
addr = "127.0.0.1:7701"
role = "local"

[[replica]]
name = "near"
addr = "127.0.0.1:7702"
role = "near"

[[replica]]
name = "far"
addr = "127.0.0.1:7703"
role = "far"
$far_extra
TOML
    starblk volume create --config $SB_CONF || fail "volume create"
}

# sb_serve I: (re)starts replica I; sets R<I> to its pid.
sb_serve() {
    start_bg "$SB_DIR/r$1.log" starblk replica serve --dir "$SB_DIR/r$1" --listen "127.0.0.1:770$1"
    eval "R$1=$LAST_PID"
    wait_for_line "$SB_DIR/r$1.log" '^listening' 20 "$LAST_PID" >/dev/null || exit 1
}

# sb_up: starts the daemon in the foreground (background job); sets HE
# and DEV.
SB_UPS=0
sb_up() {
    SB_UPS=$((SB_UPS + 1))
    HE_LOG=$SB_DIR/he-$SB_UPS.log
    start_bg "$HE_LOG" starblk up --config $SB_CONF --foreground
    HE=$LAST_PID
    DEV=$(wait_for_line "$HE_LOG" '^/dev/ublkb[0-9]+$' 60 "$HE") || exit 1
    wait_for_dev "$DEV"
}

# sb_down: `starblk down`, waits for the daemon to exit.
sb_down() {
    starblk down --config $SB_CONF || fail "starblk down"
    wait_exit "$HE" 60 || true
    [ -b "$DEV" ] && fail "$DEV still exists after down"
    return 0
}

# sb_state NAME: the replica's state from `status --json`.
sb_state() {
    starblk status --config $SB_CONF --json | tr -d ' \n' | sed 's/},{/}\n{/g' | grep "\"name\":\"$1\"" | sed 's/.*"state":"\([a-z-]*\)".*/\1/'
}

# sb_wait_state NAME STATE [TIMEOUT]
sb_wait_state() {
    t=${3:-60}
    i=0
    while [ "$(sb_state "$1")" != "$2" ]; do
        i=$((i + 1))
        [ "$i" -gt $((t * 10)) ] && { starblk status --config $SB_CONF; fail "$1 not $2 after ${t}s"; }
        usleep 100000
    done
}

# sb_compare: the three replicas' data files are byte-identical.
sb_compare() {
    compare_files $SB_DIR/r1/data $SB_DIR/r2/data
    compare_files $SB_DIR/r1/data $SB_DIR/r3/data
}

# sb_up_nbd LISTEN: starts the daemon with `--frontend nbd --nbd-listen
# LISTEN` (background job); sets HE and NBD_URI (what `up` printed).
sb_up_nbd() {
    SB_UPS=$((SB_UPS + 1))
    HE_LOG=$SB_DIR/he-$SB_UPS.log
    start_bg "$HE_LOG" starblk up --config $SB_CONF --foreground --frontend nbd --nbd-listen "$1"
    HE=$LAST_PID
    NBD_URI=$(wait_for_line "$HE_LOG" '^nbd(\+unix)?://' 60 "$HE") || exit 1
}

# sb_down_nbd: `starblk down` of an NBD daemon, waits for it to exit.
sb_down_nbd() {
    starblk down --config $SB_CONF || fail "starblk down"
    wait_exit "$HE" 60 || true
    return 0
}

# nbd_attach DEV ARGS...: `nbd-client ARGS... DEV` with the volume's name
# and block size, then waits until the kernel shows the volume's size.
nbd_attach() {
    dev=$1
    shift
    nbd-client "$@" "$dev" -name vol0 -block-size 4096 || fail "nbd-client $* $dev"
    on_cleanup "nbd-client -d $dev"
    b=${dev#/dev/}
    i=0
    while [ "$(cat /sys/block/$b/size 2>/dev/null || echo 0)" = 0 ]; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && fail "$dev has no size 30 s after nbd-client connected"
        usleep 100000
    done
}

# nbd_detach DEV: `nbd-client -d DEV`, waits until the kernel lets it go.
nbd_detach() {
    nbd-client -d "$1" || fail "nbd-client -d $1"
    b=${1#/dev/}
    i=0
    while [ -e "/sys/block/$b/pid" ] || [ "$(cat /sys/block/$b/size)" != 0 ]; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && fail "$1 still connected 30 s after nbd-client -d"
        usleep 100000
    done
}

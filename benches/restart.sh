#!/usr/bin/env bash
# Restart-to-ready of `vigil serve` (docs/performance.md, "Restart to ready"): the median of RUNS starts for each
# case, as the node logs it ("ready ms=", from the start of `serve` to the moment /ready answers 200) and as a
# client sees it (from spawning the process to the first 200 from /ready, polled every 2 ms).
#
#   benches/restart.sh [RUNS] [EVENTS]        # defaults: 11 runs, 100 000 events for the "small" cases
#   VIGIL_BIN=path/to/vigil benches/restart.sh # another build (an older commit, to compare)
#
# Cases: a first start on an empty data directory; a restart of that empty directory; a restart after EVENTS
# events and a clean stop (SIGTERM checkpoints: nothing to replay); a restart after EVENTS events and `kill -9`
# before any checkpoint (every event replayed from the journal).
set -euo pipefail
runs=${1:-11}
events=${2:-100000}
cd "$(dirname "$0")/.."
bin=${VIGIL_BIN:-target/release/vigil}
[ -x "$bin" ] || cargo build --release --locked -p vigil-node
work=$(mktemp -d)
trap 'pkill -f "vigil serve --data $work" 2>/dev/null || true; rm -rf "$work"' EXIT
http=127.0.0.1:18480
ingest=127.0.0.1:18478

now_us() { echo $(($(date +%s%N) / 1000)); }

# Starts the node on $work/data, waits for /ready, prints "node_ms client_ms", leaves it running.
start() {
  local log=$work/log t0 t1
  t0=$(now_us)
  ("$bin" serve --data "$work/data" --http $http --ingest $ingest >"$log" 2>&1 &)
  until curl -sf "http://$http/ready" >/dev/null 2>&1; do sleep 0.002; done
  t1=$(now_us)
  local node
  node=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o ' ready ms=[0-9]*' | grep -o '[0-9]*$')
  echo "$node $(((t1 - t0) / 1000))"
}

stop() { # signal
  pkill -"$1" -f "vigil serve --data $work/data" || true
  while pgrep -f "vigil serve --data $work/data" >/dev/null; do sleep 0.01; done
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

report() { # name, file of "node client" lines
  printf '%-44s node %4s ms   client %4s ms   (%d runs)\n' "$1" \
    "$(cut -d' ' -f1 "$2" | median)" "$(cut -d' ' -f2 "$2" | median)" "$(wc -l <"$2")"
}

: >"$work/first"; : >"$work/empty"; : >"$work/clean"; : >"$work/killed"
for _ in $(seq "$runs"); do
  rm -rf "$work/data"
  start >>"$work/first"; stop TERM
  start >>"$work/empty"; stop TERM
done
rm -rf "$work/data"
start >/dev/null
"$bin" load --ingest $ingest --http $http --events "$events" --accounts 1000 >/dev/null
stop TERM
for _ in $(seq "$runs"); do
  start >>"$work/clean"; stop TERM
done
for _ in $(seq "$runs"); do
  rm -rf "$work/data"
  start >/dev/null
  # A checkpoint interval longer than the run: the kill leaves every event to replay.
  "$bin" load --ingest $ingest --http $http --events "$events" --accounts 1000 >/dev/null
  stop KILL
  start >>"$work/killed"; stop TERM
done
report "first start, empty data directory" "$work/first"
report "restart, empty data directory" "$work/empty"
report "restart after $events events, clean stop" "$work/clean"
report "restart after $events events, kill -9" "$work/killed"

#!/usr/bin/env python3
"""Cluster mode's figures, side by side in one run (docs/performance.md, "Cluster mode"):

1. the single node's durable TCP ingest of a stream (`vigil load --file`), as the baseline;
2. the same stream end to end through a 3-server JetStream cluster (R3, file storage, sync_interval: always):
   `vigil publish` with one node per partition consuming at the same time, from the publisher's start until every
   node has released the last offset;
3. catching up: two fresh nodes (one per partition) reading the whole stored stream;
4. takeover: a partition with an active and a standby replica while events are published at a steady rate;
   the active is killed with SIGKILL; the figure is the time from the kill until the standby has applied every event
   published before the kill (it serves reads and publishes triggers throughout: replicas are peers).

Usage: examples/cluster/measure.py [--events N] [--accounts N] [--partitions P] [--node-shards S]
Needs target/release/vigil (cargo build --release; or $VIGIL_BIN) and a NATS server 2.10+ ($VIGIL_NATS_SERVER or PATH).
$VIGIL_NODE_ARGS adds options to every cluster node's `vigil serve` (e.g. "--checkpoint-events 100000000").
Loopback only. Prints one line per figure.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# $VIGIL_BIN runs another build (an A/B of two commits).
VIGIL = os.environ.get("VIGIL_BIN") or os.path.join(ROOT, "target", "release", "vigil")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
            return json.load(r)
    except Exception:
        return None


def cpu_seconds(pid):
    """User + system CPU seconds a live process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait(cond, secs, what):
    deadline = time.monotonic() + secs
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.005)


class Cluster:
    def __init__(self, nats, work):
        self.procs = []
        cports = [free_port() for _ in range(3)]
        self.ports = [free_port() for _ in range(3)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cports)
        for i in range(3):
            conf = os.path.join(work, f"s{i}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"server_name: s{i}\nlisten: 127.0.0.1:{self.ports[i]}\n"
                    f'jetstream {{ store_dir: "{work}/nats-{i}", sync_interval: always }}\n'
                    f"cluster {{ name: vigil, listen: 127.0.0.1:{cports[i]}, routes: [{routes}] }}\n"
                )
            self.procs.append(subprocess.Popen([nats, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.urls = ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


SHARDS = "2"


def node(work, name, urls, partition, http):
    log = open(os.path.join(work, f"{name}.log"), "w")
    return subprocess.Popen(
        [VIGIL, "serve", "--data", os.path.join(work, name), "--ingest", "127.0.0.1:0", "--http", f"127.0.0.1:{http}",
         "--source", urls, "--partition", partition, "--adl-refresh-ms", "0", "--shards", SHARDS] + os.environ.get("VIGIL_NODE_ARGS", "").split(),
        stdout=subprocess.DEVNULL, stderr=log)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--rate", type=int, default=50_000, help="events/s published during the takeover")
    ap.add_argument("--node-shards", type=int, default=2, help="shards of each cluster node")
    args = ap.parse_args()
    global SHARDS
    SHARDS = str(args.node_shards)
    nats = os.environ.get("VIGIL_NATS_SERVER") or shutil.which("nats-server")
    if not nats or not os.path.exists(VIGIL):
        sys.exit("needs target/release/vigil and nats-server ($VIGIL_NATS_SERVER or PATH)")
    work = tempfile.mkdtemp(prefix="vigil-measure-")
    events = os.path.join(work, "events.jsonl")
    subprocess.run([VIGIL, "gen", "--accounts", str(args.accounts), "--events", str(args.events), "-o", events],
                   check=True)
    with open(events) as f:
        lines = [l for l in f if l.strip()]
    last = len(lines)
    print(f"stream: {last} events ({args.accounts} accounts), {args.partitions} partitions of {SHARDS} shard(s); "
          f"work dir {work}")

    # 1. The single node's durable TCP ingest, the baseline.
    http = free_port()
    single = subprocess.Popen(
        [VIGIL, "serve", "--data", os.path.join(work, "single"), "--ingest", "127.0.0.1:0", "--http",
         f"127.0.0.1:{http}", "--adl-refresh-ms", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ingest = single.stdout.readline().strip().removeprefix("listening on ")
    out = subprocess.run([VIGIL, "load", "--ingest", ingest, "--http", f"127.0.0.1:{http}", "--file", events],
                         capture_output=True, text=True, check=True).stdout
    single.send_signal(signal.SIGTERM)
    single.wait()
    print("single node, durable TCP ingest: " + next(l for l in out.splitlines() if l.startswith("ingest:")))

    # 2. End to end through the cluster, one node per partition consuming while the publisher runs.
    cluster = Cluster(nats, work)
    try:
        # The stream exists before the nodes start (an empty input creates it).
        subprocess.run([VIGIL, "publish", os.devnull, "--nats", cluster.urls, "--partitions", str(args.partitions),
                        "--replicas", "3"], capture_output=True, check=True)
        ports = [free_port() for _ in range(args.partitions)]
        nodes = [node(work, f"p{p}", cluster.urls, f"{p}/{args.partitions}", ports[p]) for p in range(args.partitions)]
        wait(lambda: all(status(p) for p in ports), 120, "the nodes")
        procs = {"servers": cluster.procs, "nodes": nodes}
        before = {k: sum(cpu_seconds(p.pid) for p in v) for k, v in procs.items()}
        before["publisher"] = children_cpu()
        started = time.monotonic()
        pub = subprocess.run([VIGIL, "publish", events, "--nats", cluster.urls, "--partitions", str(args.partitions),
                              "--replicas", "3"], capture_output=True, text=True, check=True).stdout.strip()
        published = time.monotonic()
        wait(lambda: all((status(p) or {}).get("released") == last for p in ports), 600, "the nodes to catch up")
        done = time.monotonic()
        used = {k: sum(cpu_seconds(p.pid) for p in v) - before[k] for k, v in procs.items()}
        used["publisher"] = children_cpu() - before["publisher"]
        print(f"cluster publish alone: {pub}")
        print(f"cluster end to end (publish + {args.partitions} partitions applied): {last} events in "
              f"{done - started:.2f} s = {last / (done - started):.0f} events/s (publisher done at "
              f"{published - started:.2f} s)")
        print(f"CPU seconds in that run: 3 servers {used['servers']:.2f}, {args.partitions} nodes {used['nodes']:.2f}, "
              f"publisher {used['publisher']:.2f}; total {sum(used.values()):.2f} on {os.cpu_count()} cores in "
              f"{done - started:.2f} s")
        for n in nodes:
            n.kill()
            n.wait()

        # 3. Catching up on the stored stream.
        ports = [free_port() for _ in range(args.partitions)]
        started = time.monotonic()
        nodes = [node(work, f"q{p}", cluster.urls, f"{p}/{args.partitions}", ports[p]) for p in range(args.partitions)]
        wait(lambda: all((status(p) or {}).get("released") == last for p in ports), 600, "the fresh nodes")
        done = time.monotonic()
        print(f"catch-up of {args.partitions} fresh nodes (start to last offset): {done - started:.2f} s = "
              f"{last / (done - started):.0f} events/s")
        for n in nodes[1:]:
            n.kill()
            n.wait()

        # 4. Takeover: partition 0's active (q0, current) and a standby (r0, caught up), events at a steady rate.
        standby_port = free_port()
        standby = node(work, "r0", cluster.urls, f"0/{args.partitions}", standby_port)
        wait(lambda: (status(standby_port) or {}).get("released") == last, 600, "the standby")
        active = nodes[0]
        tail = lines[: min(len(lines), args.rate * 6)]  # the same events again, at offsets after `last`
        pub = subprocess.Popen([VIGIL, "publish", "-", "--nats", cluster.urls, "--partitions", str(args.partitions),
                                "--replicas", "3", "--window-events", "500"], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        # The publisher numbers its input after what the stream holds: feed the whole stream first (skipped).
        fed = {"offset": last}

        def feed():
            pub.stdin.writelines(lines)
            pub.stdin.flush()
            begun = time.monotonic()
            for i, l in enumerate(tail):
                pub.stdin.write(l)
                if i % 500 == 499:
                    pub.stdin.flush()
                    fed["offset"] = last + i + 1
                    ahead = begun + (i + 1) / args.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            pub.stdin.close()

        feeder = threading.Thread(target=feed)
        feeder.start()
        wait(lambda: fed["offset"] > last + args.rate * 2, 60, "two seconds of steady publishing")
        killed_at = time.monotonic()
        active.kill()
        target = fed["offset"]
        wait(lambda: (status(standby_port) or {}).get("consumed", 0) >= target, 60, "the standby")
        caught = time.monotonic()
        lag = (status(standby_port) or {}).get("lag_messages")
        feeder.join()
        pub.wait()
        standby.kill()
        print(f"takeover: active of partition 0 killed at offset ~{target} while publishing {args.rate} events/s; the "
              f"standby had applied every event fed before the kill {1000 * (caught - killed_at):.0f} ms later "
              f"(it answered reads and published triggers throughout; lag then {lag} messages)")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

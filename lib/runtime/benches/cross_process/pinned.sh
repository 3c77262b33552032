#!/usr/bin/env bash
# The TCP unary round trip with every process pinned to one CPU, split into
# kernel and user time per process (docs/performance.md, "Pinned to one
# vCPU"). Pinned, a round trip never waits for a halted vCPU: its time is
# the CPU time of the two processes in it, so the table says how much of the
# plane's round trip is kernel work that an epoll design cannot avoid and
# how much is user space.
#
# Needs `perf` (Debian: linux-perf) and root (or perf_event_paranoid <= 0),
# and a built bench: cargo bench -p switchyard-runtime --bench cross_process --no-run
#
# Usage: lib/runtime/benches/cross_process/pinned.sh [bench binary]
set -euo pipefail

bin=${1:-$(ls -t target/release/deps/cross_process-* 2>/dev/null | grep -v '\.d$' | head -1 || true)}
if [[ -z "$bin" || ! -x "$bin" ]]; then
    echo "no bench binary: build it with 'cargo bench -p switchyard-runtime --bench cross_process --no-run'" >&2
    exit 2
fi
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Samples per second: few enough not to slow the round trips down.
rate=4000

taskset -c 0 "$bin" --bench tcp >"$work/bench.txt" 2>&1 &
caller=$!
worker=""
for _ in $(seq 1 3000); do
    worker=$(pgrep -f "^$bin worker" || true)
    [[ -n "$worker" ]] && break
    sleep 0.01
done
[[ -n "$worker" ]] || { echo "the worker process did not start" >&2; exit 1; }
floor=$(pgrep -f "^$bin floor" || true)
# The unary pass starts once the caller has found the worker and warmed up.
sleep 0.4
perf record -q -F "$rate" -e cpu-clock -C 0 -o "$work/perf.data" -- sleep 0.5 >/dev/null 2>&1
wait "$caller"
grep -E '^\| tcp \| unary' "$work/bench.txt"
echo
perf script -i "$work/perf.data" -F comm,pid,ip,dso >"$work/samples.txt" 2>/dev/null
python3 - "$work/samples.txt" "$work/bench.txt" "$caller" "$worker" "$floor" <<'PY'
import collections, re, sys

samples, bench, caller, worker, floor = sys.argv[1:6]
kernel, user = collections.Counter(), collections.Counter()

def party(comm, pid):
    if pid == worker:
        return "plane worker"
    if pid == caller:
        # The plane's caller runs on the runtime's threads; the floor's
        # blocking client on the main thread.
        return "plane caller" if comm.startswith("tokio-rt") else "floor client"
    if pid == floor:
        return "floor server"
    return None

for line in open(samples):
    fields = line.split()
    if len(fields) >= 3 and (who := party(fields[0], fields[1])):
        (kernel if "[kernel.kallsyms]" in line else user)[who] += 1

# Pinned, the CPU never idles in a round trip: its time is the CPU time of
# the two processes, which the samples share out.
p50 = re.search(r"\| tcp \| unary p50 µs \| [^|]+\| ([\d.]+) \| ([\d.]+) \|", open(bench).read())
if not p50:
    sys.exit("no unary p50 in the bench's output")
round_trip = {"floor": float(p50.group(1)), "plane": float(p50.group(2))}
sides = {"plane": ("plane caller", "plane worker"), "floor": ("floor client", "floor server")}
if min(kernel[p] + user[p] for ps in sides.values() for p in ps) < 100:
    sys.exit(f"the window missed the unary pass (samples: {dict(kernel + user)}); run again")

print("| process | samples | kernel µs | user µs | per round trip µs |")
print("|---|---:|---:|---:|---:|")
totals = {}
for side, parties in sides.items():
    n = sum(kernel[p] + user[p] for p in parties)
    us = round_trip[side] / n
    for p in parties:
        print(f"| {p} | {kernel[p] + user[p]} | {kernel[p] * us:.1f} | {user[p] * us:.1f} | {(kernel[p] + user[p]) * us:.1f} |")
    totals[side] = (sum(kernel[p] for p in parties) * us, sum(user[p] for p in parties) * us)
    print(f"| {side}, both sides | {n} | {totals[side][0]:.1f} | {totals[side][1]:.1f} | {round_trip[side]:.1f} |")
floor_us = round_trip["floor"]
print()
print(f"plane / floor: {round_trip['plane'] / floor_us:.2f}x; the plane's kernel time alone "
      f"{totals['plane'][0] / floor_us:.2f}x the floor's round trip")
PY

#!/usr/bin/env bash
# Before/after measurement of the batcher's scheduling and admission by time (README, "Scheduling").
# Starts `snipserve serve` on loopback twice -- fifo without a time bound (before), edf with
# SNIPSERVE_MAX_QUEUE_WAIT_S (after) -- and runs loadtest/scheduling.py against each: capacity (closed loop,
# measured once, before), then open-loop Poisson at 0.3/0.5/0.7/0.9 of it and a 3x overload, same schedule.
# Usage: scripts/scheduling_measure.sh [OUT_DIR] [BOUND_S] [SECONDS_PER_RUN]
set -euo pipefail
out=${1:-docs/measurements}
bound=${2:-8}
secs=${3:-20}
port=8793
py=${PYTHON:-.venv/bin/python}
mix=${MIX:-640x480:4,1920x1080:1}

serve() {  # $1 = schedule, $2 = bound or empty, $3 = more VAR=value settings
  # before: no time bound, no brownout, no headroom (the service as it was); after: the shipped defaults + the bound
  env SNIPSERVE_SCHEDULE="$1" ${2:+SNIPSERVE_MAX_QUEUE_WAIT_S=$2} ${3:-} SNIPSERVE_MAX_IN_FLIGHT=1000 \
    SNIPSERVE_PORT=$port "$py" -m service.cli serve --host 127.0.0.1 --port $port > "$out/scheduling_$1.log" 2>&1 &
  echo $!
}
wait_ready() {
  for _ in $(seq 1 120); do curl -sf "127.0.0.1:$port/readyz" > /dev/null && return 0; sleep 1; done
  echo "server did not become ready" >&2; return 1
}

mkdir -p "$out"
pid=$(serve fifo "" "SNIPSERVE_BROWNOUT_WAIT_S=0 SNIPSERVE_ADMISSION_HEADROOM=0")
wait_ready
"$py" -m loadtest.scheduling --url "http://127.0.0.1:$port" --mix "$mix" --seconds "$secs" \
  --label "before: fifo, no time bound" --json "$out/scheduling_before.json"
kill "$pid"; wait "$pid" 2>/dev/null || true
cap=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['capacity_images_per_s'])" "$out/scheduling_before.json")
pid=$(serve edf "$bound")
wait_ready
"$py" -m loadtest.scheduling --url "http://127.0.0.1:$port" --mix "$mix" --seconds "$secs" --capacity "$cap" \
  --label "after: edf, SNIPSERVE_MAX_QUEUE_WAIT_S=$bound" --json "$out/scheduling_after.json"
kill "$pid"; wait "$pid" 2>/dev/null || true
echo "wrote $out/scheduling_before.json $out/scheduling_after.json"

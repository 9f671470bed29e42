#!/usr/bin/env bash
# The measurements behind the README load section, end to end, on loopback:
#   capacity (closed loop), latency at open-loop rates relative to it, the SLO rate sweep,
#   overload with tight admission limits, and the RSS soak (5,000 requests).
#
# Usage: benchmarks/load_suite.sh [MODEL] [OUT_DIR]
#   MODEL    ONNX model (default models/snipserve_default.onnx; its directory becomes SNIPSERVE_MODELS_DIR)
#   OUT_DIR  where JSON/CSV/PNG go (default runs/load)
# Env: PORT (8790), IMAGES (data/val/images), MAX_IMAGES (50), DURATION (40), WARMUP (10), SLO_MS (10000),
#      SOAK_REQUESTS (5000), SKIP_SOAK (0), PY (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=$(realpath "${1:-models/snipserve_default.onnx}")
OUT=${2:-runs/load}
PORT=${PORT:-8790}
IMAGES=${IMAGES:-data/val/images}
MAX_IMAGES=${MAX_IMAGES:-50}
DURATION=${DURATION:-40}
WARMUP=${WARMUP:-10}
SLO_MS=${SLO_MS:-10000}
SOAK_REQUESTS=${SOAK_REQUESTS:-5000}
PY=${PY:-.venv/bin/python}
URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT"
SERVER_PID=""

start_server() {  # extra env assignments as arguments
    env SNIPSERVE_MODELS_DIR="$(dirname "$MODEL")" SNIPSERVE_MODEL_PATH="$MODEL" SNIPSERVE_PORT="$PORT" "$@" \
        "$PY" -m service.cli serve >"$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        if curl -fs "$URL/readyz" >/dev/null 2>&1; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
        sleep 0.2
    done
    echo "server did not become ready" >&2
    exit 1
}

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

load() { "$PY" -m loadtest "$@" --url "$URL" --images "$IMAGES" --max-images "$MAX_IMAGES"; }

echo "== capacity: closed loop, 4 workers"
start_server
load run --mode closed --concurrency 4 --duration "$DURATION" --warmup "$WARMUP" --json "$OUT/closed.json"
CAP=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['runs'][0]['achieved_rps'])" "$OUT/closed.json")
echo "capacity: $CAP images/s"

echo "== open loop (Poisson) at 0.5x, 0.8x, 1.0x, 1.3x capacity"
for f in 0.5 0.8 1.0 1.3; do
    rate=$("$PY" -c "print(round($CAP * $f, 3))")
    load run --rate "$rate" --arrival poisson --duration "$DURATION" --warmup "$WARMUP" --seed "${f/./}" \
        --json "$OUT/open_$f.json"
done
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from loadtest.report import Summary, plot_latency_vs_throughput, write_csv, write_json
out = Path(sys.argv[1])
runs = [Summary.model_validate(json.loads((out / f"open_{f}.json").read_text())["runs"][0]) for f in ("0.5", "0.8", "1.0", "1.3")]
write_json(runs, out / "open.json")
write_csv(runs, out / "open.csv")
plot_latency_vs_throughput(runs, out / "open.png")
EOF

echo "== sweep: highest rate with p99 <= $SLO_MS ms"
start_rate=$("$PY" -c "print(round($CAP * 0.4, 3))")
load sweep --slo-ms "$SLO_MS" --start "$start_rate" --factor 1.4 --refine 1 --duration "$DURATION" \
    --warmup "$WARMUP" --json "$OUT/sweep.json" --csv "$OUT/sweep.csv" --plot "$OUT/sweep.png"
stop_server

echo "== overload: 2x capacity against tight admission (queue 600 chips, deadline 10 s)"
start_server SNIPSERVE_QUEUE_CAPACITY=600 SNIPSERVE_REQUEST_TIMEOUT_S=10
rate=$("$PY" -c "print(round($CAP * 2, 3))")
load run --rate "$rate" --arrival poisson --duration "$DURATION" --warmup "$WARMUP" --timeout 30 --json "$OUT/overload.json"
curl -fs "$URL/metrics" | grep -E '^snipserve_rejections_total' >"$OUT/overload_rejections.txt" || true
curl -fs "$URL/readyz"
echo
stop_server

if [ "${SKIP_SOAK:-0}" = "1" ]; then echo "done (soak skipped): $OUT"; exit 0; fi
echo "== soak: $SOAK_REQUESTS requests, 320x240 and 640x480 images, RSS sampled"
start_server
"$PY" -m loadtest soak --url "$URL" --pid "$SERVER_PID" --requests "$SOAK_REQUESTS" --concurrency 4 \
    --mix 320x240:3,640x480:1 --json "$OUT/soak.json" >/dev/null
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('rss_trace_mb'); print(d)" "$OUT/soak.json"
stop_server
echo "done: $OUT"

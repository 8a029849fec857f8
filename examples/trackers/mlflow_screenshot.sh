#!/usr/bin/env bash
# The MLflow UI of one multi-stage run, as a PNG: trains examples/trackers/tracked.yaml (unless
# RUN_DIR already holds it), serves its store with `mlflow ui` on 127.0.0.1 and has headless
# Chromium take the run's page once it has drawn its charts (screenshot.py). Usage (from the repository root):
#   examples/trackers/mlflow_screenshot.sh OUT.png [RUN_DIR] [TAB]
# TAB: the run page's tab, model-metrics (the default: the charts) or overview (params, tags).
set -euo pipefail
out=$1
run=${2:-runs/tracked}
tab=${3:-model-metrics}
port=${PORT:-5077}
bin=.venv/bin
[ -f "$run/mlflow.db" ] && grep -q plan_end "$run/events.jsonl" || $bin/stagewise train examples/trackers/tracked.yaml --out "$run"
store="sqlite:///$(realpath "$run")/mlflow.db"
read -r experiment run_id < <($bin/python - "$store" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
print(run.info.experiment_id, run.info.run_id)
PY
)
setsid $bin/mlflow ui --backend-store-uri "$store" --host 127.0.0.1 --port "$port" --workers 1 >/dev/null 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true' EXIT INT TERM  # the server and the workers it started
for _ in $(seq 300); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
url="http://127.0.0.1:$port/#/experiments/$experiment/runs/$run_id/$tab"
if [ "$tab" = model-metrics ]; then  # the loss charts, the whole plan's first
  $bin/python examples/trackers/screenshot.py "$url" "$out" --search loss --scroll-to train
else
  $bin/python examples/trackers/screenshot.py "$url" "$out"
fi

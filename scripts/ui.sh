#!/usr/bin/env bash
# Starts the Prefect server, the MLflow UI, the gateway (with its dashboard) and a worker, all on loopback;
# prints their URLs and stops all of them on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLMHOST_PROJECT_DIR="$PWD"
HOME_DIR=${LLMHOST_HOME:-$PWD/.llmhost}
mkdir -p "$HOME_DIR/runs"
PREFECT_PORT=${PREFECT_PORT:-4200}; MLFLOW_PORT=${MLFLOW_PORT:-5000}; GATEWAY_PORT=${LLMHOST_GATEWAY_PORT:-8000}
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api" PREFECT_SERVER_ANALYTICS_ENABLED=false
pids=()
cleanup() { echo "stopping..."; for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT INT TERM
setsid .venv/bin/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" --analytics-off >"$HOME_DIR/runs/prefect.log" 2>&1 & pids+=($!)
setsid .venv/bin/mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$HOME_DIR/mlflow.db" --artifacts-destination "$HOME_DIR/mlartifacts" \
  >"$HOME_DIR/runs/mlflow.log" 2>&1 & pids+=($!)
if ! curl -sf "http://127.0.0.1:$GATEWAY_PORT/health" >/dev/null; then
  setsid .venv/bin/llmhost gateway --port "$GATEWAY_PORT" >"$HOME_DIR/runs/gateway-ui.log" 2>&1 & pids+=($!)
fi
for i in $(seq 1 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 1; done
.venv/bin/prefect work-pool create llmhost --type process >/dev/null 2>&1 || true
.venv/bin/prefect --no-prompt deploy --all >"$HOME_DIR/runs/prefect-deploy.log" 2>&1 || echo "prefect deploy failed: see $HOME_DIR/runs/prefect-deploy.log"
setsid .venv/bin/prefect worker start --pool llmhost >"$HOME_DIR/runs/worker.log" 2>&1 & pids+=($!)
echo "Prefect UI:  http://127.0.0.1:$PREFECT_PORT"
echo "MLflow UI:   http://127.0.0.1:$MLFLOW_PORT"
echo "Gateway:     http://127.0.0.1:$GATEWAY_PORT/v1   dashboard: http://127.0.0.1:$GATEWAY_PORT/ui"
echo "Ctrl-C stops them all."
wait

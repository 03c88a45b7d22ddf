# syntax=docker/dockerfile:1
# GPU image of drpo-trainer: the official vLLM image (CUDA, PyTorch, vLLM built together) plus
# this package and its extras. Build and run (docs/launch.md has the full command):
#
#   docker build -t drpo-trainer:0.1.0 .
#   docker run --rm --gpus all --ipc=host drpo-trainer:0.1.0 drpo-train --config configs/qwen3_4b_base_drpo.yaml
#
# Versions: vLLM 0.33.0 pins torch 2.14.0 and transformers >=5.16.1,<5.21.0; drpo-trainer's
# vLLM engine is tested against vllm >=0.33,<0.34 (pyproject.toml extra "vllm"). The image's
# own torch, vllm and transformers are held fixed while the package installs (constraints),
# so pip cannot swap in a CPU torch or a transformers that vLLM does not support.
# This image has not been built or run in this project (no GPU and no registry access).
ARG VLLM_VERSION=0.33.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# A C++ toolchain for DeepSpeed's just-in-time ops (cpu_adam, used by ZeRO-Offload) and ninja
# to drive it; pdsh and ssh for the `deepspeed` multi-node launcher.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential python3-dev ninja-build pdsh openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/drpo-trainer

# Dependencies first (cached layer): only the packaging metadata is needed to resolve them.
COPY pyproject.toml README.md ./
COPY drpo_trainer ./drpo_trainer
RUN { python3 -m pip freeze | grep -iE '^(torch|vllm|transformers)==' || true; } > /tmp/constraints.txt \
    && cat /tmp/constraints.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/constraints.txt \
        "deepspeed==0.19.8" ".[vllm,dev]" \
    && python3 -c "import drpo_trainer, deepspeed, vllm, torch; print('drpo-trainer', drpo_trainer.__file__, 'vllm', vllm.__version__, 'torch', torch.__version__)"

# Configs, launch scripts, small bundled data and the tests (the GPU tests run here:
# python -m pytest tests/gpu -m gpu -q); mount large data, caches and runs instead.
COPY configs ./configs
COPY launch ./launch
COPY data ./data
COPY tests ./tests

# DeepSpeed compiles its ops on first use: keep them (and model downloads) on mountable paths.
ENV TORCH_EXTENSIONS_DIR=/workspace/cache/torch_extensions \
    HF_HOME=/workspace/cache/huggingface \
    PYTHONUNBUFFERED=1

# The base image starts the vLLM server; this image runs whatever command is given.
ENTRYPOINT []
CMD ["drpo-train", "--help"]

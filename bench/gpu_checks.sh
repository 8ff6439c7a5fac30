#!/usr/bin/env bash
# The GPU checks of issue 18 as one prepared script, for a session that is lent a device:
# the cuda tests compiled (not interpreted), the FFN kernels for every format, and decode on
# the TinyLlama shape eager vs graph, dense vs sparse, against transformers.  Results go to
# $OUT (the device tool's folder) or bench/results/.  Never run yet: no GPU has been lent.
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
name=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
python -m pytest -q tests/backends/test_backends.py tests/backends/test_cuda_quant.py \
    tests/models/test_static_step.py 2>&1 | tee "$out/gpu_tests_$name.txt"
python bench/gpu_ffn.py --out "$out/gpu_ffn_$name.json" > /dev/null
edgesparse bench decode --synthetic tinyllama-1.1b --backend cuda --dtype bf16 --graph --json \
    > "$out/gpu_decode_tinyllama_$name.json"

#!/usr/bin/env bash
# The built wheel, installed non-editable into a fresh venv, answers a scripted chat with the
# embedded model (package data, C sources and the chat template must all be in the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
rm -rf .venv-wheel dist-wheel
python3 -m venv .venv-wheel
.venv-wheel/bin/pip install -q torch==2.13.0
.venv-wheel/bin/pip wheel -q --no-deps -w dist-wheel .
.venv-wheel/bin/pip install -q dist-wheel/edgesparse-*.whl
cd /tmp   # away from the source tree: only the installed wheel can answer
out=$(printf 'Tell me about the city\n/stats\n/quit\n' | "$root/.venv-wheel/bin/edgesparse" chat tiny --max-new-tokens 8)
echo "$out"
echo "$out" | grep -q "tokens/s" || { echo "wheel check: no answer from chat" >&2; exit 1; }
"$root/.venv-wheel/bin/python" -c "import edgesparse, sys; sys.exit('source tree imported' if '$root/edgesparse' in edgesparse.__file__ else 0)"
# The native kernels build from the wheel's C sources, and a q4_0 decode runs its layers natively.
"$root/.venv-wheel/bin/python" - <<'PY'
import edgesparse
from edgesparse.backends.cpu import layer_step, native
assert native.lib() is not None, native.status()
calls, real, real_all = [], layer_step.run, layer_step.run_all
layer_step.run = lambda *a: calls.append(1) or real(*a)
layer_step.run_all = lambda stack, *a: calls.extend([1] * len(stack.plans)) or real_all(stack, *a)
llm = edgesparse.load("tiny", backend="cpu", weights="q4_0")
assert llm.generate("The history of the city", max_new_tokens=4).token_ids
assert calls, "wheel check: the native decoder layers did not run"
print(f"wheel check: q4_0 decode, {len(calls)} layers through the native step")
PY
# GGUF after the README's first command alone (core dependencies only): a bare question to the
# SmolLM2 instruct GGUF is answered through its chat template.
if [ -f "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    ans=$("$root/.venv-wheel/bin/edgesparse" generate "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
          --prompt "What is the capital of France?" --max-new-tokens 16 --json)
    echo "$ans"
    "$root/.venv-wheel/bin/python" -c "import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r['text'].strip() and r['chat_template'] else 'wheel check: no answer from the GGUF')" "$ans"
fi
echo "wheel check: ok"

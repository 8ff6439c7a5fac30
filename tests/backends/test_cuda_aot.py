"""Every Triton kernel of the cuda backend compiles, ahead of time and with no GPU, for Jetson
Orin (sm_87) and H100/H200 (sm_90), for every weight format, dtype and launch configuration
its launcher uses, and none spills registers.  The interpreter the other cuda tests run under
compiles nothing, so this is the only check of what ptxas makes of the kernels."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from edgesparse.backends.cuda import aot, kernels, row_kernels  # noqa: E402


def _compile(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # conftest sets it
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "edgesparse.backends.cuda.aot", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def report():
    r = _compile("--jobs", "2")
    assert r.returncode in (0, 1), r.stderr[-2000:]
    return json.loads(r.stdout)


def _jit_names(module):
    return {n for n, f in vars(module).items()
            if type(f).__name__ in ("JITFunction", "InterpretedFunction") and f.fn.__module__ == module.__name__}


def test_every_kernel_compiles_for_sm87_and_sm90_without_spilling(report):
    rows = report["kernels"]
    failed = [r for r in rows if "error" in r]
    spilled = [r for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    assert not failed, failed[:3]
    assert not spilled, spilled[:3]
    assert report["summary"]["ok"] and report["targets"] == ["sm_87", "sm_90"]
    assert {r["arch"] for r in rows} == {"sm_87", "sm_90a"}
    assert all(0 < r["registers"] <= 255 and r["cubin_bytes"] > 0 for r in rows)


def test_the_report_covers_every_kernel_format_and_batch(report):
    rows = report["kernels"]
    launched = (_jit_names(kernels) | _jit_names(row_kernels)) - aot.DEVICE_FUNCTIONS
    assert {r["kernel"] for r in rows} == launched    # a new kernel must be added to aot.variants
    gate = [r for r in rows if r["kernel"] == "_gate_up_act_kernel"]
    assert {r["weights"] for r in gate} == {"q8_0", "q4_0", "q4_1", "fp32", "bf16", "fp16"}
    assert {r["B_PAD"] for r in gate} == {1, 2, 4, 8}
    # the configurations compiled are the ones the launchers pass
    for r in gate:
        cfg = row_kernels.launch_config("gate_up_act", r["B_PAD"])
        assert (r["BLOCK_N"], r["BLOCK_D"], r["num_warps"]) == (cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["num_warps"])
    reglu = [r for r in rows if r["kernel"] == "_reglu_gate_up_kernel"]
    assert {r["weights"] for r in reglu} == {"fp32", "bf16", "fp16"}
    assert all(r["BLOCK_D"] == kernels.GATE_UP["BLOCK_D"] for r in reglu)


def test_a_spilling_configuration_is_caught():
    """The launch configuration used before this check (BLOCK_N 32 x BLOCK_D 64 at batch 8)
    spills on sm_87: the check sees spills, it does not just report zeros."""
    code = ("from edgesparse.backends.cuda import aot\n"
            "v = [v for v in aot.variants() if v.kernel == '_gate_up_act_kernel' and v.weights == 'q4_1'"
            " and dict(v.constexprs)['B_PAD'] == 8 and dict(v.constexprs)['ACT'] == 1][0]\n"
            "c = dict(v.constexprs, BLOCK_N=32, BLOCK_D=64)\n"
            "w = aot.Variant(v.kernel, v.weights, tuple((a, t) for a, t in v.signature), tuple(c.items()), 4)\n"
            "import json; print(json.dumps(aot.compile_variant(w, 'sm_87')))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in row and row["spill_stores"] > 0 and row["registers"] == 255


def test_a_compile_error_is_reported_per_variant():
    v = aot.variants()[0]
    bad = aot.Variant(v.kernel, v.weights, tuple((a, "*fp32" if a == "B" else t) for a, t in v.signature),
                      v.constexprs)   # an int argument typed as a pointer
    env = {k: x for k, x in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, pickle, sys\nfrom edgesparse.backends.cuda import aot\n"
            f"v = pickle.loads({__import__('pickle').dumps(bad)!r})\n"
            "print(json.dumps(aot.compile_variant(v, 'sm_87')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["error"] and "registers" not in row


def test_the_command_refuses_the_interpreter():
    r = subprocess.run([sys.executable, "-m", "edgesparse.backends.cuda.aot"], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert r.returncode == 2 and "TRITON_INTERPRET" in r.stderr and "Traceback" not in r.stderr

"""Ahead-of-time compilation of every Triton kernel of the cuda backend, with no GPU present.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) never compiles: it misses
type errors, unsupported ops and register pressure.  Here each kernel is compiled, for each
weight format and dtype it serves and each launch configuration its launcher uses
(``row_kernels.launch_config``, ``kernels.SCORE|GATE_UP|DOWN``: the same dicts, so the two
cannot drift apart), to PTX and cubin for a named GPU (``GPUTarget``; Jetson Orin is sm_87,
H100/H200 sm_90).  Resource use comes from Triton's bundled ``ptxas -v`` run on the PTX:
registers per thread, spill stores/loads, and Triton's own shared-memory figure.

Compiled without runtime specialisation: at run time Triton also specialises on pointer and
integer divisibility by 16, which can move register counts a little either way.

    python -m edgesparse.backends.cuda.aot [--targets sm_87 sm_90] [--jobs 2]   # JSON lines"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels, row_kernels
from .row_kernels import FLOAT, FORMAT_ID, MAX_BATCH, launch_config

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_87": GPUTarget("cuda", 87, 32),
           "sm_90": GPUTarget("cuda", 90, 32)}
DEFAULT_TARGETS = ("sm_87", "sm_90")   # Jetson Orin, H100/H200
FLOAT_TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}   # float weights: the model dtype
# (weight format name, FMT constexpr, pointer type of the weight tensor)
# @triton.jit functions that are called from kernels, never launched: compiled inside them
DEVICE_FUNCTIONS = {"_weights"}
WEIGHTS = [(name, FORMAT_ID[name], "*u8") for name in FORMAT_ID] + \
          [(name, FLOAT, "*" + t) for name, t in FLOAT_TYPES.items()]


@dataclass(frozen=True)
class Variant:
    kernel: str            # the kernel function's name
    weights: str           # weight format or dtype served
    signature: tuple       # ((arg, type), ...) in argument order
    constexprs: tuple      # ((name, value), ...)
    num_warps: int = 4
    note: dict = field(default_factory=dict, compare=False, hash=False)

    def fn(self):
        return getattr(kernels, self.kernel, None) or getattr(row_kernels, self.kernel)


def _sig(args: str, types: dict, consts: dict) -> tuple:
    """Argument types in order: pointers and ints from ``types``, constexprs marked as such."""
    return tuple((a, "constexpr" if a in consts else types.get(a, "i32")) for a in args.split())


def variants() -> list[Variant]:
    """Every (kernel, weights, launch configuration) the launchers can run."""
    out = []
    for b_pad in (1 << i for i in range(MAX_BATCH.bit_length())):   # 1, 2, 4, 8
        for wname, fmt, wptr in WEIGHTS:
            cfg = launch_config("gate_up_act", b_pad)
            for has_up, act in ((False, 0), (True, 0), (True, 1)):   # bare dots, ReGLU, SwiGLU
                consts = {"FMT": fmt, "HAS_UP": has_up, "ACT": act, "B_PAD": b_pad,
                          "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}
                types = {"x_ptr": "*fp32", "gate_ptr": wptr, "up_ptr": wptr, "idx_ptr": "*i64", "h_ptr": "*fp32"}
                sig = _sig("x_ptr gate_ptr up_ptr idx_ptr h_ptr B D N ROWB FMT HAS_UP ACT B_PAD BLOCK_N BLOCK_D",
                           types, consts)
                out.append(Variant("_gate_up_act_kernel", wname, sig, tuple(consts.items()), cfg["num_warps"]))
            cfg = launch_config("rows_matvec", b_pad)
            consts = {"FMT": fmt, "B_PAD": b_pad, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}
            types = {"c_ptr": "*fp32", "w_ptr": wptr, "idx_ptr": "*i64", "out_ptr": "*fp32"}
            sig = _sig("c_ptr w_ptr idx_ptr out_ptr B N D ROWB FMT B_PAD BLOCK_N BLOCK_D", types, consts)
            out.append(Variant("_rows_matvec_kernel", wname, sig, tuple(consts.items()), cfg["num_warps"]))
    for wname, t in FLOAT_TYPES.items():   # the single-token ReGLU FFN serves float weights
        w = "*" + t
        sig = _sig("t_ptr b_ptr bias_ptr out_idx_ptr count_ptr R F BLOCK_R BLOCK_F",
                   {"t_ptr": "*fp32", "b_ptr": w, "bias_ptr": w, "out_idx_ptr": "*i32", "count_ptr": "*i32"},
                   kernels.SCORE)
        out.append(Variant("_score_compact_kernel", wname, sig, tuple(kernels.SCORE.items())))
        sig = _sig("x_ptr gate_ptr up_ptr idx_ptr count_ptr h_ptr active_ptr D BLOCK_N BLOCK_D",
                   {"x_ptr": "*fp32", "gate_ptr": w, "up_ptr": w, "idx_ptr": "*i32", "count_ptr": "*i32",
                    "h_ptr": "*fp32", "active_ptr": "*i32"}, kernels.GATE_UP)
        out.append(Variant("_reglu_gate_up_kernel", wname, sig, tuple(kernels.GATE_UP.items())))
        sig = _sig("c_ptr w_ptr idx_ptr count_ptr out_ptr D BLOCK_N BLOCK_D",
                   {"c_ptr": "*fp32", "w_ptr": w, "idx_ptr": "*i32", "count_ptr": "*i32", "out_ptr": "*fp32"},
                   kernels.DOWN)
        out.append(Variant("_rows_matvec_count_kernel", wname, sig, tuple(kernels.DOWN.items())))
    return out


def _ptxas(capability: int) -> str:
    """The ptxas Triton itself assembles with for this capability (a newer one from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def resources(ptx: str, arch: str, capability: int) -> dict:
    """Registers and spill bytes of one PTX module, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(capability), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    return {"registers": int(regs.group(1)),
            "spill_stores": int(spill.group(1)) if spill else 0, "spill_loads": int(spill.group(2)) if spill else 0}


def compile_variant(v: Variant, target: str) -> dict:
    """Compile one variant for one target; the row of the report (``error`` set on failure)."""
    row = {"kernel": v.kernel, "weights": v.weights, "target": target, "num_warps": v.num_warps,
           **{k: (int(x) if isinstance(x, bool) else x) for k, x in v.constexprs}}
    try:
        k = triton.compile(ASTSource(v.fn(), signature=dict(v.signature), constexprs=dict(v.constexprs)),
                           target=TARGETS[target], options={"num_warps": v.num_warps})
        arch = re.search(r"\.target\s+(\S+)", k.asm["ptx"]).group(1)   # sm_90a for capability 90
        row.update(arch=arch, cubin_bytes=len(k.asm["cubin"]), shared_bytes=k.metadata.shared,
                   **resources(k.asm["ptx"], arch, TARGETS[target].arch))
    except Exception as e:   # a compile error is a finding, reported per variant
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return row


def _compile_star(args):
    return compile_variant(*args)


def report(targets=DEFAULT_TARGETS, jobs: int | None = None) -> list[dict]:
    """Compile every variant for every target (``jobs`` processes; each compile is ~1 s of CPU)."""
    work = [(v, t) for t in targets for v in variants()]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_variant(v, t) for v, t in work]
    with cf.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_star, work, chunksize=4))


def summary(rows: list[dict]) -> dict:
    bad = [r for r in rows if "error" in r or r.get("spill_stores") or r.get("spill_loads")]
    return {"variants": len(rows), "failed": sum("error" in r for r in rows),
            "spilling": sum(bool(r.get("spill_stores") or r.get("spill_loads")) for r in rows),
            "max_registers": max((r.get("registers", 0) for r in rows), default=0), "ok": not bad}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgesparse.backends.cuda.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), choices=sorted(TARGETS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # under the interpreter @triton.jit gives functions that cannot be compiled
        print("error: unset TRITON_INTERPRET to compile the kernels", file=sys.stderr)
        return 2
    rows = report(a.targets, a.jobs)
    doc = {"triton": triton.__version__, "targets": a.targets, "summary": summary(rows), "kernels": rows}
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)
    return 0 if doc["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

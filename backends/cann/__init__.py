"""The cann backend: Ascend NPUs through torch_npu.

The operations are the cpu backend's torch ops (``index_select``, ``matmul``/``addmm``,
``topk``, ``nonzero``), all of which exist on the ``npu`` device, so the same code is
exercised by the contract tests on the CPU device.  Only discovery touches torch_npu,
and it is imported lazily: ``import edgesparse`` never needs it."""
from __future__ import annotations

import functools

import torch

from ..reference import TorchExecutor


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError as e:
        missing = e.name or str(e)   # torch_npu itself, or a module it needs
        return False, ("torch_npu not installed" if missing == "torch_npu"
                       else f"torch_npu cannot be imported: module {missing} is missing")
    except OSError as e:  # e.g. libhccl.so missing: CANN's set_env.sh was not sourced
        return False, f"CANN toolkit not found ({e}); source Ascend's set_env.sh"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return False, "torch_npu imported but no NPU device is visible"
    return True, f"{npu.device_count()} NPU(s): {npu.get_device_name(0)}"


class CannExecutor(TorchExecutor):
    name = "cann"

    @classmethod
    def availability(cls):
        return _probe()

    @classmethod
    def default_device(cls):
        return "npu:0"

    def synchronize(self):
        if self.device.type == "npu":
            torch.npu.synchronize()

"""The cann backend on a real Ascend NPU.  NOT RUN in CI or on any development machine so far:
it needs torch_npu, the CANN toolkit and an NPU, and skips without them (see docs/deploy-atlas.md)."""
import pytest
import torch

from edgesparse.backends.cann import CannExecutor

from backends_contract import check_contract

ok, why = CannExecutor.availability()
pytestmark = pytest.mark.skipif(not ok, reason=f"no usable NPU: {why}")


def test_contract_on_npu():
    check_contract(CannExecutor("npu:0"), tol=1e-3)


def test_decode_on_npu_matches_cpu(llama_relu):
    import edgesparse
    on_npu = edgesparse.load(llama_relu, backend="cann")
    on_cpu = edgesparse.load(llama_relu, backend="cpu")
    a = on_npu.generate("The quick brown fox", max_new_tokens=12)
    b = on_cpu.generate("The quick brown fox", max_new_tokens=12)
    assert a.token_ids == b.token_ids
    assert torch.npu.is_available()

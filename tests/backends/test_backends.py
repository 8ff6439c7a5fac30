"""Every backend passes one contract (tests/backends_contract.py), plus registry behaviour."""
import pytest
import torch

import edgesparse
from edgesparse.backends import backend_status, get_executor
from edgesparse.backends.cann import CannExecutor
from edgesparse.backends.cpu import CpuExecutor
from edgesparse.backends.cuda import CudaExecutor

from backends_contract import check_contract

# The cann executor's logic is device-agnostic torch code: here it runs on the CPU device
# (the real-NPU run lives in tests/test_cann_npu.py and needs hardware).
# The cuda executor's Triton kernels run on a GPU when there is one, and otherwise on the
# CPU under the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py).
GPU = torch.cuda.is_available()
EXECUTORS = {"cpu": lambda: CpuExecutor("cpu"), "cann@cpu": lambda: CannExecutor("cpu"),
             "cuda-triton": lambda: CudaExecutor("cuda" if GPU else "cpu", use_triton=True),
             "cuda-torch-fallback": lambda: CudaExecutor("cuda" if GPU else "cpu", use_triton=False)}


@pytest.mark.parametrize("name", list(EXECUTORS))
def test_contract(name):
    check_contract(EXECUTORS[name]())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("name", list(EXECUTORS))
def test_contract_quantised_weights(name, fmt):
    # Every backend runs block-quantised weights: cpu with its native kernels, the others
    # through the reference's de-quantise-on-gather ops.  The cpu kernels round activations
    # to int8 blocks for their dots (~1%), hence the tolerance.
    check_contract(EXECUTORS[name](), tol=3e-2, fmt=fmt)


def test_predicted_neurons_kernel_matches_reference():
    ex = EXECUTORS["cuda-triton"]()
    cpu = CpuExecutor("cpu")
    g = torch.Generator().manual_seed(3)
    for d, r, f in [(40, 5, 300), (64, 16, 1000), (8, 1, 7)]:
        a, b, bias = torch.randn(d, r, generator=g), torch.randn(r, f, generator=g), torch.randn(f, generator=g)
        x = torch.randn(1, d, generator=g)
        want, _ = cpu.predicted_neurons(x, cpu.prepare_predictor(a, b, bias))
        got, own = ex.predicted_neurons(x.to(ex.device), ex.prepare_predictor(a, b, bias))
        assert own is None and torch.equal(got.cpu(), want)


def test_auto_picks_an_available_backend_and_cpu_is_always_there():
    status = backend_status()
    assert status["cpu"][0]
    ex = get_executor("auto")
    assert status[ex.name][0]


def test_unavailable_backend_names_the_available_ones(llama_relu):
    if backend_status()["cann"][0]:
        pytest.skip("an NPU is present")
    with pytest.raises(edgesparse.BackendUnavailableError, match=r"available: .*cpu") as e:
        edgesparse.load(llama_relu, backend="cann")
    assert "torch_npu" in str(e.value)


def test_unknown_backend_is_an_option_error():
    with pytest.raises(edgesparse.InvalidOptionError, match="unknown backend 'tpu'"):
        get_executor("tpu")


def test_cann_probe_reports_missing_torch_npu():
    ok, why = CannExecutor.availability()
    try:
        import torch_npu  # noqa: F401
    except (ImportError, OSError):
        assert not ok and ("torch_npu" in why or "CANN" in why)


def test_cpu_places_large_weights_once_in_2mb_aligned_memory():
    from edgesparse.backends.cpu import HUGE_PAGE
    ex = CpuExecutor("cpu")
    w = torch.randn(1024, 1024)            # 4 MB: copied into huge-page memory
    placed = ex.place(w)
    assert torch.equal(placed, w) and placed.data_ptr() % HUGE_PAGE == 0
    assert ex.place(placed).data_ptr() == placed.data_ptr()   # tied heads etc. are not copied twice
    small = torch.randn(10)
    assert ex.place(small).data_ptr() == small.data_ptr()


def test_huge_page_advice_refused_by_the_kernel_still_places_the_weights(monkeypatch):
    import mmap as mmap_mod

    from edgesparse.backends import cpu

    class NoTHP(mmap_mod.mmap):
        def madvise(self, *a):
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(cpu.mmap, "mmap", NoTHP)
    w = torch.randn(1024, 1024)
    placed = CpuExecutor("cpu").place(w)
    assert torch.equal(placed, w)

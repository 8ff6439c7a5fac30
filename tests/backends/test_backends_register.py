"""A backend added from outside the package with ``register()``: it is a real backend from
then on (contract suite, ``get_executor``, the CLI's ``--backend``, a model decodes on it)."""
import pytest
import torch

import edgesparse.backends as backends
from edgesparse.backends import register
from edgesparse.backends.reference import TorchExecutor
from edgesparse.errors import InvalidOptionError

from backends_contract import check_contract


class ToyExecutor(TorchExecutor):
    """A plugin: the torch reference with one op of its own (a linear done by einsum)."""
    name = "toy"
    calls = 0

    @classmethod
    def availability(cls):
        return True, "toy plugin"

    def linear(self, x, w):
        ToyExecutor.calls += 1
        out = torch.einsum("...i,oi->...o", x, w.weight)
        return out if w.bias is None else out + w.bias


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_AUTO", list(backends._AUTO))
    register(ToyExecutor)
    return ToyExecutor


def test_registered_backend_passes_the_contract(toy):
    assert "toy" in backends.choices() and "toy" in backends.backend_status()
    ex = backends.get_executor("toy")
    assert isinstance(ex, ToyExecutor)
    check_contract(ex)
    assert ToyExecutor.calls > 0
    assert backends.get_executor("auto").name != "toy"      # not auto-picked unless asked


def test_auto_registration_goes_first(toy):
    register(ToyExecutor, auto=True)
    assert backends.get_executor("auto").name == "toy"


def test_a_model_decodes_on_it_from_the_api_and_the_cli(toy, llama_relu, capsys):
    from edgesparse import load
    from edgesparse.apps.cli import main
    want = load(llama_relu, backend="cpu").generate("The quick", max_new_tokens=6).token_ids
    llm = load(llama_relu, backend="toy")
    assert llm.backend == "toy" and llm.generate("The quick", max_new_tokens=6).token_ids == want
    assert main(["generate", str(llama_relu), "--backend", "toy", "--prompt", "The quick", "--max-new-tokens",
                 "3", "--json"]) == 0
    assert '"backend": "toy"' in capsys.readouterr().out


@pytest.mark.parametrize("bad", [int, TorchExecutor, object()])
def test_register_refuses_what_is_not_a_named_executor(toy, bad):
    with pytest.raises(InvalidOptionError):
        register(bad)

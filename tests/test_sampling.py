"""Next-token selection: min-p and the repetition penalty against hand-computed cases, and
their option checks."""
import pytest
import torch

import edgesparse
from edgesparse.errors import InvalidOptionError
from edgesparse.sampling import SamplingParams, sample


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5]])
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(logits, greedy, None).item() == 0
    # token 0 seen: 2.0 -> 1.0, so token 1 (1.5) wins; a seen negative logit only sinks further
    assert sample(logits, greedy, None, [[0, 2]]).item() == 1
    assert sample(logits, SamplingParams(temperature=0), None, [[0]]).item() == 0   # penalty 1: no change


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0, min_p=0.4)   # keeps p >= 0.2: tokens 0 and 1
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, p, g).item() for _ in range(300)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("kw", [dict(min_p=-0.1), dict(min_p=1.5), dict(repetition_penalty=0), dict(repetition_penalty=11)])
def test_bad_values_are_option_errors(kw):
    with pytest.raises(InvalidOptionError):
        SamplingParams(**kw).validate()


def test_generate_with_a_repetition_penalty_repeats_less():
    llm = edgesparse.load("tiny", backend="cpu")
    prompt = "The history of the city"
    plain = llm.generate(prompt, max_new_tokens=40, stop_token_ids=[]).token_ids
    pen = llm.generate(prompt, max_new_tokens=40, stop_token_ids=[], repetition_penalty=1.5).token_ids
    assert len(set(pen)) > len(set(plain))

"""The minimal cached generator against recomputing the full forward at every step."""

import pytest
import torch

from nanoseek import build
from nanoseek.infer import generate


def test_greedy_generate_matches_full_recompute():
    model = build("tiny").eval()
    prompt = [0, 5, 17, 99, 3]
    out = generate(model, prompt, 12)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_sampling_is_reproducible_with_seed_and_stops_at_eos():
    model = build("tiny").eval()
    a = generate(model, [0, 1, 2], 10, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, [0, 1, 2], 10, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
    first = generate(model, [0, 1, 2], 1)[0]
    assert generate(model, [0, 1, 2], 10, eos_token_id=first) == [first]


def test_bad_arguments_are_rejected():
    model = build("tiny")
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=0)

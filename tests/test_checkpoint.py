"""Trainer-state format: exact resume, atomic `latest`, clear errors."""

from dataclasses import replace

import pytest
import torch

from nanoseek import build
from nanoseek.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanoseek.model import PRESETS


def _step(model, opt, data):
    x = data[torch.randint(0, data.shape[0], (4,))]  # uses the torch RNG: resume must restore it
    out = model.loss(x[:, :-1], x[:, 1:])
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    model.update_router_bias(1e-3)
    return out["loss"].item()


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    data = torch.randint(0, 64, (16, 17))
    torch.manual_seed(0)
    model = build("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    reference = [_step(model, opt, data) for _ in range(6)]

    torch.manual_seed(0)
    model = build("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    first = [_step(model, opt, data) for _ in range(3)]
    save_checkpoint(tmp_path, 3, model, opt, data={"position": 3})
    torch.manual_seed(999)  # a fresh process: different RNG, fresh model and optimizer
    model = build("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    state = load_checkpoint(tmp_path, model, opt)
    assert state["step"] == 3 and state["data"] == {"position": 3}
    rest = [_step(model, opt, data) for _ in range(3)]
    assert first + rest == reference


def test_latest_only_moves_after_a_complete_write(tmp_path, monkeypatch):
    model = build("tiny")
    save_checkpoint(tmp_path, 1, model)
    assert latest_checkpoint(tmp_path).name == "step_00000001"

    import nanoseek.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no temp litter


def test_checkpoint_from_different_config_is_rejected(tmp_path):
    save_checkpoint(tmp_path, 1, build("tiny"))
    other = build(replace(PRESETS["tiny"], hidden_size=96))
    with pytest.raises(ValueError, match="different model config: hidden_size=64 in the checkpoint vs 96"):
        load_checkpoint(tmp_path, other)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = build("tiny")
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, model, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]

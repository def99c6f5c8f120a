"""V3's ablations (nanoseek/ablations.py) end to end at toy size: the arms differ only where they should, the
numbers are the same on every run, a re-run resumes; and the balance verdict of the report takes its threshold from
the moe-balance finding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import load
from nanoseek.ablations import MoEBalanceConfig, MTPConfig, moe_balance, mtp
from nanoseek.cli import main
from nanoseek.files import read_jsonl
from nanoseek.report import UNBALANCED_MAXVIO, maxvio_noise_floor, verdicts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy models: a second thread only waits (conftest)


@pytest.fixture(scope="module")
def balance(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("moe-balance")
    return out, moe_balance(MoEBalanceConfig(fast=True, out=str(out)))


@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("mtp")
    return out, mtp(MTPConfig(fast=True, out=str(out)))


def _first_main_loss(run_dir):
    return read_jsonl(run_dir / "metrics.jsonl")[0]["main"]


def test_moe_balance_arms_differ_only_in_their_balancing(balance):
    out, res = balance
    assert set(res["summary"]) == {"aux_free", "aux_loss", "neither"} and len(res["seeds"]) == 2
    assert set(res["comparisons"]) == {"aux_free - neither", "aux_loss - neither", "aux_free - aux_loss"}
    cfgs = {name: json.loads((out / "runs" / name / "train_config.json").read_text()) for name in res["runs"]}
    for i in range(2):
        arms = {a: cfgs[f"{a}-seed{i}"] for a in ("aux_free", "aux_loss", "neither")}
        for c in arms.values():  # everything but the balancing (and the output directory) is the same
            assert {k: v for k, v in c.items() if k not in ("out", "bias_update_speed", "balance_alpha")} == \
                {k: v for k, v in arms["neither"].items() if k not in ("out", "bias_update_speed", "balance_alpha")}
        assert (arms["neither"]["bias_update_speed"], arms["neither"]["balance_alpha"]) == (0.0, 0.0)
        assert (arms["aux_loss"]["bias_update_speed"], arms["aux_loss"]["balance_alpha"]) == (0.0, 0.01)
        assert arms["aux_free"]["bias_update_speed"] == 1e-3
        # same seed: same initial weights and first batch, so the first step's main loss is identical in every arm
        first = {a: _first_main_loss(out / "runs" / f"{a}-seed{i}") for a in arms}
        assert first["aux_free"] == first["aux_loss"] == first["neither"]
    # only the aux-loss-free arm moved its router bias; the two others trained with it frozen at 0
    for arm in ("aux_free", "aux_loss", "neither"):
        sd = load_file(out / res["runs"][f"{arm}-seed0"]["model"] / "model.safetensors")
        bias = torch.cat([v for k, v in sd.items() if k.endswith("e_score_correction_bias")])
        assert (bias.abs().sum() > 0) == (arm == "aux_free")
    metrics = read_jsonl(out / "runs" / "neither-seed0" / "metrics.jsonl")
    assert all(len(m["seq_maxvio"]) == len(m["maxvio"]) == 2 for m in metrics)  # 1 MoE layer + the MTP module's
    assert all(m.get("balance") is None for m in metrics)  # alpha 0: no balance loss computed


def test_moe_balance_results_are_complete_and_consistent(balance):
    out, res = balance
    for arm, m in res["summary"].items():
        runs = [r for name, r in res["runs"].items() if name.startswith(arm)]
        assert m["val_loss"]["per_seed"] == [r["val_loss"] for r in runs]
        assert m["val_loss"]["mean"] == pytest.approx(sum(r["val_loss"] for r in runs) / 2)
    d = res["comparisons"]["aux_free - neither"]["val_loss"]
    assert d["diffs"] == [res["runs"][f"aux_free-seed{i}"]["val_loss"] - res["runs"][f"neither-seed{i}"]["val_loss"]
                          for i in range(2)]
    curve = res["curves"]["neither-seed0"]
    assert [p[0] for p in curve["val"]] == [2, 4] and len(curve["maxvio"]) == len(curve["seq_maxvio"]) == 4
    # a sequence is a quarter of this batch: chance alone unbalances it more than the whole batch
    assert res["noise_floor"]["seq_maxvio"]["median"] > res["noise_floor"]["maxvio"]["median"]
    assert (out / "moe-balance.png").stat().st_size > 10_000
    assert "aux_free - neither" in (out / "results.md").read_text()


def test_moe_balance_is_deterministic_and_resumes(balance, tmp_path, capsys):
    out, res = balance
    state = (out / "state.json").read_text()
    again = moe_balance(MoEBalanceConfig(fast=True, out=str(out)))  # every stage finished: nothing re-runs
    assert (out / "state.json").read_text() == state and again["summary"] == res["summary"]
    assert main(["experiment", "moe-balance", "--fast", "--out", str(tmp_path / "b")]) == 0
    other = json.loads((tmp_path / "b" / "results.json").read_text())
    first = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in other.items() if k not in ("timings_s", "config")} == \
        {k: v for k, v in first.items() if k not in ("timings_s", "config")}
    with pytest.raises(ValueError, match="another plan"):  # the same directory with another plan is refused
        moe_balance(MoEBalanceConfig(fast=True, out=str(out), aux_alpha=0.1))


def test_mtp_arms_share_the_main_model_and_compute(mtp_run):
    out, res = mtp_run
    for i in range(2):
        full = load_file(out / "init" / f"seed{i}" / "mtp" / "model.safetensors")
        main_only = load_file(out / "init" / f"seed{i}" / "no_mtp" / "model.safetensors")
        extra = set(full) - set(main_only)
        assert extra and all(".layers.2." in k or k.startswith("model.layers.2") for k in extra)  # the MTP module
        assert set(main_only) < set(full) and all(torch.equal(full[k], main_only[k]) for k in main_only)
        assert _first_main_loss(out / "runs" / f"mtp-seed{i}") == _first_main_loss(out / "runs" / f"no_mtp-seed{i}")
    assert len(load(out / res["runs"]["no_mtp-seed0"]["model"]).mtp) == 0
    assert len(load(out / res["runs"]["mtp-seed0"]["model"]).mtp) == 1
    f = res["flops"]
    assert f["mtp"]["main"] == f["no_mtp"]["main"] == f["no_mtp"]["total"] < f["mtp"]["total"]
    assert f["no_mtp"]["params"] < f["mtp"]["params"]
    assert res["runs"]["no_mtp-seed0"]["train_config"]["mtp_lambda"] == 0.0
    assert "mtp" not in read_jsonl(out / "runs" / "no_mtp-seed0" / "metrics.jsonl")[0]


def test_mtp_measures_accuracy_and_speculative_decoding(mtp_run):
    out, res = mtp_run
    for name, r in res["runs"].items():
        assert r["eval"]["n_items"] == 4 and (out / "eval" / name / "items.jsonl").exists()
        assert ("speculative" in r) == name.startswith("mtp-")
    spec = res["runs"]["mtp-seed0"]["speculative"]
    for mode in ("greedy", "sampled"):
        s = spec[mode]
        assert 0 <= s["acceptance_rate"] <= 1 and s["drafted"] > 0
        assert s["tokens_per_step"] == pytest.approx(1 + s["acceptance_rate"], rel=0.2)  # k = 1: 1 + accepted
    assert spec["greedy"]["identical_to_plain"] == 1.0  # greedy speculative decoding reproduces plain decoding
    assert res["pooled_pass@1"]["n"] == 2 * 4
    assert set(res["timed"]["speculative_batch1"]) == {"mtp-seed0", "mtp-seed1"}
    assert (out / "mtp.png").stat().st_size > 10_000


def test_mtp_is_deterministic(mtp_run, tmp_path):
    out, res = mtp_run
    again = mtp(MTPConfig(fast=True, out=str(tmp_path / "b")))
    assert {k: v for k, v in again.items() if k not in ("timed", "config")} == \
        {k: v for k, v in res.items() if k not in ("timed", "config")}


def test_noise_floor_hand_cases():
    # one token, one of two experts: loads [1, 0] whichever it picks, max / mean - 1 = 1 / 0.5 - 1 = 1
    assert maxvio_noise_floor(1, 2, 1, 1, steps=5) == {"median": 1.0, "p95": 1.0, "steps": 5}
    # one token, two of three experts: loads [1, 1, 0] in some order, 1 / (2/3) - 1 = 0.5 — in every sequence too
    assert maxvio_noise_floor(1, 3, 2, 2, steps=5, sequences=4)["p95"] == pytest.approx(0.5)
    # two tokens per sequence, one of two experts each: a sequence is balanced (0) or not (1); the mean over 64
    # sequences sits near 0.5, far from either
    assert 0.25 < maxvio_noise_floor(2, 2, 1, 1, steps=20, sequences=64)["median"] < 0.75


def _pretraining(maxvio, **shape):
    s = {**UNBALANCED_MAXVIO["shape"], **shape}
    return {"maxvio": {"last_steps": maxvio, "first_steps": 1.0, "steps_each": 60, "tokens_per_step":
                       s["tokens_per_step"], "experts": s["experts"], "experts_per_token": s["experts_per_token"],
                       "last_per_layer": [maxvio] * s["moe_layers"], "noise_floor": {"median": 0.1, "p95": 0.14}}}


def test_balance_verdict_takes_its_threshold_from_the_finding():
    ref = UNBALANCED_MAXVIO["maxvio"]
    rep = {"pretraining": {"base": _pretraining(ref - 0.01), "student": _pretraining(0.5, experts=8)}}
    base, student = [v for v in verdicts(rep) if v["id"].endswith("routing-balanced")]
    assert base["holds"] and base["numbers"]["reference"] == ref and "moe-balance.md" in base["rule"]
    assert f"{ref:.3f}" in base["text"] and "0.140" in base["text"]  # both references printed beside the verdict
    # another shape: the finding does not apply, the noise floor judges
    assert student["numbers"]["reference"] == 0.14 and not student["holds"]
    rep = {"pretraining": {"base": _pretraining(ref + 0.01)}}
    assert not [v for v in verdicts(rep) if v["id"] == "base-routing-balanced"][0]["holds"]

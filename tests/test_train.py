"""The trainer: learning signal, exact resume after a kill, DDP/FSDP equivalence, metrics, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import load
from nanoseek.data import prepare, train_tokenizer
from nanoseek.synthetic import generate, to_text
from nanoseek.train import NonFiniteLoss, TrainConfig, lr_at, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = "\n\n".join(to_text(it) for it in generate("arithmetic", 400, seed=3))
    (d / "train.txt").write_text(text)
    (d / "val.txt").write_text("\n\n".join(to_text(it) for it in generate("arithmetic", 40, split="test")))
    train_tokenizer([d / "train.txt"], 384, d / "tok")
    prepare([d / "train.txt"], d / "tok", d / "data")
    prepare([d / "val.txt"], d / "tok", d / "val")
    return d


def _cfg(corpus, out, **kw):
    base = dict(preset="tiny", data=str(corpus / "data"), tokenizer=str(corpus / "tok"), seq_len=64, batch_size=4,
                max_steps=12, warmup_steps=2, lr=3e-3, out=str(out), save_every=0, dtype="fp32", progress=False,
                model_overrides={"vocab_size": 384})
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_outputs_are_complete(corpus, tmp_path):
    res = train(_cfg(corpus, tmp_path, max_steps=30, val_data=str(corpus / "val"), eval_every=15))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert len(recs) == 30 and [r["step"] for r in recs] == list(range(1, 31))
    assert recs[-1]["main"] < recs[0]["main"] - 1.0
    for key in ("loss", "main", "mtp", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio"):
        assert key in recs[0]
    assert "val_loss" in recs[14] and res["val_loss"] < recs[0]["main"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = tmp_path / (tmp_path / "latest").read_text().strip()
    model = load(ckpt)  # every checkpoint is a complete model directory, tokenizer included
    assert (ckpt / "tokenizer.json").exists() and model.config.vocab_size == 384


def test_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_at(50, wsd) == 1.0 and lr_at(90, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == 0.0


class FakeClock:
    """A clock that advances `tick` seconds each time it is read: the trainer reads it 4 times per step, so a
    step "takes" 4 ticks whatever the machine's load (no wall-clock in the test)."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def test_fit_to_time_completes_the_schedule_within_the_budget(corpus, tmp_path):
    # 100k steps cannot fit in 4 s at 0.04 s/step: after 10 steps (8 timed) the run is shortened to what fits,
    # 10 + int(0.97 * (4 - 0.41) / 0.04) = 97 steps, so that the WSD decay completes within the budget
    res = train(_cfg(corpus, tmp_path, max_steps=100_000, schedule="wsd", decay_ratio=0.5, min_lr_ratio=0.0,
                     max_time=4.0, fit_to_time=True), clock=FakeClock(0.01))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert res["status"] == "finished" and res["step"] == len(recs) == 97
    assert recs[-1]["lr"] < 0.1 * recs[len(recs) // 3]["lr"]  # decayed, not cut off at peak
    state = json.loads((tmp_path / (tmp_path / "latest").read_text().strip() / "trainer_state.json").read_text())
    saved = state["extra"]["train_config"]  # the fitted length is what a resumed run will use
    assert saved["max_steps"] == res["step"] and saved["fit_to_time"] is False


class SlowingClock(FakeClock):
    """A FakeClock whose ticks double after `at` reads: the machine gets busy mid-run."""

    def __init__(self, tick: float, at: int) -> None:
        super().__init__(tick)
        self.reads, self.at = 0, at

    def __call__(self) -> float:
        self.reads += 1
        if self.reads == self.at:
            self.tick *= 2
        return super().__call__()


def test_refit_completes_the_decay_when_the_machine_slows_down(corpus, tmp_path):
    # steps take 0.04 s, then 0.08 s from step 20: fitting once (at step 10, to 48 steps) runs out of time before
    # the decay ends; refitting at every step from the median of the last 8 step times ends it inside 2 s
    kw = dict(max_steps=100_000, schedule="wsd", decay_ratio=0.5, min_lr_ratio=0.0, max_time=2.0, fit_to_time=True,
              batch_size=2, seq_len=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps: one thread is faster on a shared machine
    try:
        once = train(_cfg(corpus, tmp_path / "once", **kw), clock=SlowingClock(0.01, at=4 * 20))
        res = train(_cfg(corpus, tmp_path / "refit", refit=True, **kw), clock=SlowingClock(0.01, at=4 * 20))
    finally:
        torch.set_num_threads(threads)
    assert once["status"] == "time_budget"
    recs = read_metrics(tmp_path / "refit" / "metrics.jsonl")
    assert res["status"] == "finished" and res["step"] == len(recs)
    assert recs[-1]["elapsed"] <= 2.0
    assert recs[-1]["lr"] < 0.1 * max(r["lr"] for r in recs)  # decayed, not cut off


def test_max_time_stops_and_saves_at_the_budget(corpus, tmp_path):
    # without fit_to_time the budget cuts the run: it stops at the first step that ends past max_time and saves
    res = train(_cfg(corpus, tmp_path, max_steps=1000, max_time=0.98), clock=FakeClock(0.01))
    assert res["status"] == "time_budget" and res["step"] == 25  # 4 ticks per step: 25 steps take 1.0 s > 0.98
    assert (tmp_path / "latest").read_text().strip().endswith("25")


def test_muon_and_grad_accum_train(corpus, tmp_path):
    recs = None
    train(_cfg(corpus, tmp_path, optimizer="muon", grad_accum=2, max_steps=8, lr=2e-3))
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[-1]["main"] < recs[0]["main"]


def test_compiled_training_matches_eager(corpus, tmp_path):
    # compile = true: attention, norms and the loss in graphs, the routed-expert dispatch eagerly in between
    # (Experts._dispatch_eager); the same steps must give the same losses in fp32
    losses = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        train(_cfg(corpus, out, max_steps=4, compile=compiled, dtype="fp32"))
        losses[compiled] = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[True][-1] < losses[True][0]


def _cli_train(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill_matches_uninterrupted(corpus, tmp_path):
    common = [f"data={corpus / 'data'}", f"tokenizer={corpus / 'tok'}", "preset=tiny", "model.vocab_size=384",
              "seq_len=64", "batch_size=4", "max_steps=10", "warmup_steps=2", "dtype=fp32", "save_every=2",
              "progress=false"]
    ref = _cli_train([*common, f"out={tmp_path / 'ref'}"])
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    run = tmp_path / "run"
    p = _cli_train([*common, f"out={run}"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once step 5 is logged (a checkpoint exists at step 4)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (run / "latest").exists()
    p = _cli_train([*common, f"out={run}", "resume=true"])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    b = [(r["step"], r["loss"]) for r in read_metrics(metrics)]
    assert a == b  # bit-identical curve, no duplicated or missing steps


def _torchrun(nproc, args, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanoseek.cli", "train", *args, f"out={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [x["loss"] for x in read_metrics(Path(out) / "metrics.jsonl")]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, tmp_path, mode):
    args = [f"data={corpus / 'data'}", f"tokenizer={corpus / 'tok'}", "preset=tiny", "model.vocab_size=384",
            "seq_len=64", "batch_size=4", "max_steps=5", "warmup_steps=1", "dtype=fp32", "progress=false",
            "schedule=constant",  # the schedule must not depend on max_steps: the FSDP run stops at 3 first
            "save_every=0"]
    one = _torchrun(1, args, tmp_path / "one")
    if mode == "fsdp":  # also checkpoint under FSDP (gathered full state) and resume sharded
        _torchrun(2, [*args[:-1], "save_every=3", "fsdp=true", "max_steps=3"], tmp_path / "two")
        two = _torchrun(2, [*args[:-1], "save_every=3", "fsdp=true", "resume=true"], tmp_path / "two")
    else:
        two = _torchrun(2, args, tmp_path / "two")
    assert len(one) == len(two) == 5
    # fp32 reductions differ (two half-batch gradient sums vs one): agreement to 1e-5 relative
    assert max(abs(a - b) / a for a, b in zip(one, two)) < 1e-5, (one, two)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    train(_cfg(corpus, tmp_path, max_steps=2, save_every=1))
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        train(_cfg(corpus, tmp_path, max_steps=20, save_every=1, lr=1e12, grad_clip=0, resume=True, warmup_steps=0))
    assert load(tmp_path / (tmp_path / "latest").read_text().strip()) is not None


def test_bad_input_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        TrainConfig.from_sources(overrides=["max_step=3"])
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        TrainConfig.from_sources(overrides=["model.hiden_size=3"])
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        train(_cfg(corpus, tmp_path, seq_len=4096))
    with pytest.raises(ValueError, match="larger than the model's vocab_size"):
        train(_cfg(corpus, tmp_path, model_overrides={"vocab_size": 300}))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        train(_cfg(corpus, tmp_path, data=str(tmp_path)))
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[optim]\nlr = 0.01\n[model]\nhidden_size = 96\n')
    cfg = TrainConfig.from_sources(str(toml), ["max_steps=7"])
    assert cfg.lr == 0.01 and cfg.max_steps == 7 and cfg.model_overrides == {"hidden_size": 96}
    train(_cfg(corpus, tmp_path / "ok", max_steps=2, save_every=1))
    other = _cfg(corpus, tmp_path / "ok", max_steps=4, resume=True, model_overrides={"vocab_size": 384,
                                                                                     "hidden_size": 96})
    with pytest.raises(ValueError, match="different model config"):
        train(other)
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["step"] == 2  # nothing lost


def test_import_enlarges_the_onednn_primitive_cache_unless_the_user_set_it():
    code = "import os, nanoseek; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "16384"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "77"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "77"


def test_auto_dtype_picks_bf16_only_where_it_was_measured_faster():
    from nanoseek.train import TrainConfig, _autocast_dtype

    cpu = torch.device("cpu")
    amx = torch.cpu._is_amx_tile_supported()
    auto = TrainConfig(preset="tiny")
    assert _autocast_dtype(auto, cpu, 512) == (torch.bfloat16 if amx else None)  # `wide` and wider, on AMX
    assert _autocast_dtype(auto, cpu, 256) is None  # `small`: fp32 faster with the default two threads
    assert _autocast_dtype(TrainConfig(preset="tiny", dtype="fp32"), cpu, 4096) is None
    assert _autocast_dtype(TrainConfig(preset="tiny", dtype="bf16"), cpu, 64) == torch.bfloat16

"""DeepSeek-V3's own ablations at demo scale, as findings: `nanoseek experiment moe-balance | mtp`.

Both run through nanoseek.experiment's runner (resumable: OUT/state.json; --skip / --only / --fresh), on the demo's
corpus (its `data` stage, nanoseek/demo.py, plus held-out documents for the validation loss) and its pretraining
recipe (WSD, lr 3e-3, 16 x 256 batches). One stage per (arm, seed), seeds interleaved so that every finished seed is
a complete paired comparison; each stage does fixed work. Across seeds the arms are compared pairwise with Student's
t intervals (nanoseek.stats.paired_t): each seed is one initialisation and one data order shared by the arms.

moe-balance (docs/findings/moe-balance.md; V3 report §2.1.2, §4.5.2-4.5.3, Table 5, Figure 9)
  aux_free   the router bias of eq. 16 (speed gamma) with V3's extremely small sequence-wise loss (alpha 1e-4):
             the demo's recipe, V3's
  aux_loss   no bias update; the sequence-wise balance loss (eq. 17-20) at a weight that balances (V2-style)
  neither    no bias update, no balance loss
  The model: the demo's base (32 routed experts, 4 active, 3 MoE layers + the MTP module's). Recorded over
  training: validation loss, batch-wise MaxVio (a step's whole batch) and sequence-wise MaxVio (each batch row).

mtp (docs/findings/mtp.md; V3 report §2.2, Table 4, §5.4.3)
  mtp        the model with one MTP module, loss weight 0.3 (V3's first 10T tokens)
  no_mtp     the same main model without it: identical initial main weights and batches, so the main model's
             compute is equal and the arms differ only by the MTP module's gradient
  The model: the demo's student (`tiny`: the demo's base solves too little of the task within this budget).
  Measured: held-out loss of the main model, pass@1 on held-out arithmetic (nanoseek.eval, the demo's protocol),
  and the MTP module's draft acceptance in speculative decoding (nanoseek.infer.Engine) with tokens per step;
  tokens per second are timed apart (results["timed"]: they vary with the machine's load).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import experiment
from .demo import DemoPlan, chat_document, median_worst
from .demo import stage_data as demo_stage_data
from .experiment import Stage, StageRun
from .files import atomic_write_json, atomic_write_jsonl, read_jsonl
from .stats import derive_seed, paired_t, t_interval

_DEMO = DemoPlan()


@dataclass
class AblationConfig:
    """What both ablations share: the demo's corpus and pretraining recipe, the seeds, the held-out loss."""

    out: str = ""
    fast: bool = False  # toy sizes: every code path in seconds, the numbers mean nothing
    seed: int = 0  # the corpus's seed, and the root the training seeds derive from
    n_seeds: int = 3
    # the demo's corpus: 2-digit arithmetic with chain of thought in the R1 chat format, BPE vocab 1024
    task: str = _DEMO.task
    task_options: dict[str, Any] = field(default_factory=lambda: dict(_DEMO.task_options))
    n_train: int = _DEMO.n_train
    vocab_size: int = _DEMO.vocab_size
    val_docs: int = 600  # held-out documents (the task's test split) for the validation loss
    # the model and the demo's pretraining recipe (WSD: warmup, flat, linear decay over the last 30%)
    preset: str = _DEMO.preset
    model_overrides: dict[str, Any] = field(default_factory=lambda: dict(_DEMO.model_overrides))
    seq_len: int = _DEMO.seq_len
    batch_size: int = _DEMO.batch_size
    steps: int = 160
    lr: float = _DEMO.pretrain_lr
    warmup: int = _DEMO.pretrain_warmup
    decay_ratio: float = _DEMO.decay_ratio
    eval_every: int = 20  # validation loss every this many steps (and at the end)
    eval_batches: int = 4  # of batch_size x seq_len held-out tokens, the same batches at every evaluation
    device: str | None = None
    dtype: str = "fp32"  # the reference estimates were measured in fp32 on a CPU
    # torch threads for the whole run (None: torch's default). Results differ in their last digits between thread
    # counts; the runner records the count and flags a resume with another one
    threads: int | None = None
    step_s: float = 0.75  # reference seconds per step (2-core CPU alone, evaluations included); estimate only

    def _fast(self) -> None:
        self.n_seeds, self.n_train, self.vocab_size, self.val_docs = 2, 300, 512, 40
        self.preset, self.model_overrides, self.seq_len, self.batch_size = "tiny", {}, 64, 4
        self.steps, self.warmup, self.eval_every, self.eval_batches, self.step_s = 4, 1, 2, 1, 0.05

    def seeds(self) -> list[int]:
        """The training seeds (initialisation and data order), one per seed index, shared by the arms."""
        return [derive_seed(self.seed, "ablation-seed", i, bits=31) for i in range(self.n_seeds)]

    def identity(self) -> dict[str, Any]:
        """The plan a run directory is bound to: everything but the output path and the timing estimate."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "step_s", "threads")}

    def demo_plan(self) -> DemoPlan:
        return DemoPlan(fast=self.fast, seed=self.seed, task=self.task, task_options=dict(self.task_options),
                        n_train=self.n_train, vocab_size=self.vocab_size)


@dataclass
class MoEBalanceConfig(AblationConfig):
    out: str = "runs/moe-balance"
    gamma: float = 1e-3  # bias update speed, V3 §4.2 (train.py bias_update_speed), the demo's
    aux_free_alpha: float = 1e-4  # V3's complementary sequence-wise loss in the aux-free arm (the small preset's)
    # the aux-loss arm's weight: Switch Transformer's 0.01, between V2's 0.003 and 0.03; a one-seed 60-step probe
    # of 0.003 / 0.01 / 0.03 / 0.1 (docs/findings/moe-balance.md) showed 0.01 balancing (MaxVio 6.6 -> 1.2) with no
    # visible loss penalty
    aux_alpha: float = 0.01

    def __post_init__(self) -> None:
        if self.fast:
            self._fast()

    def arms(self) -> dict[str, dict[str, float]]:
        """Arm -> the TrainConfig fields it sets; nothing else differs between arms."""
        return {"aux_free": {"bias_update_speed": self.gamma, "balance_alpha": self.aux_free_alpha},
                "aux_loss": {"bias_update_speed": 0.0, "balance_alpha": self.aux_alpha},
                "neither": {"bias_update_speed": 0.0, "balance_alpha": 0.0}}


@dataclass
class MTPConfig(AblationConfig):
    out: str = "runs/mtp"
    # the demo's student shape: in docs/LOG.md it reached 70% held-out pass@1 in 1,200 steps of this recipe, where
    # the base needs ~600 steps at 4x the step time. 720 steps: all six runs in ~18 minutes (one thread: 0.27 s per
    # step with MTP, 0.17 s without; 800 steps took 20.1 minutes, 1,000 would take ~24)
    preset: str = _DEMO.student_preset
    model_overrides: dict[str, Any] = field(default_factory=lambda: dict(_DEMO.student_overrides))
    steps: int = 720
    eval_every: int = 80
    mtp_lambda: float = 0.3  # V3 §4.2: 0.3 for the first 10T tokens
    # held-out accuracy through nanoseek.eval with the demo's protocol (chat prompts, R1's T 0.6 / top_p 0.95)
    eval_n: int = 200
    eval_k: int = 4
    max_new_tokens: int = _DEMO.rl_max_new
    # speculative decoding with the MTP module as the draft (k = 1: V3's second-token acceptance)
    spec_prompts: int = 100
    spec_batch: int = 16
    tps_prompts: int = 16  # timed at batch 1, plain vs speculative (results["timed"])
    # one thread: the tiny model's matrices gain little from a second one, and on a shared 2-core machine two
    # OpenMP threads made its steps 30x slower (5 s instead of 0.16 s: they wait for each other's core)
    threads: int | None = 1
    step_s: float = 0.22

    def __post_init__(self) -> None:
        if self.fast:
            self._fast()
            self.eval_n, self.eval_k, self.max_new_tokens = 4, 2, 16
            self.spec_prompts, self.spec_batch, self.tps_prompts = 4, 2, 2

    def arms(self) -> dict[str, dict[str, Any]]:
        return {"mtp": {"num_nextn_predict_layers": 1, "mtp_lambda": self.mtp_lambda},
                "no_mtp": {"num_nextn_predict_layers": 0, "mtp_lambda": 0.0}}


# ------------------------------------------------------------------------------------------------------------
# shared stages


def stage_data(r: StageRun, cfg: AblationConfig) -> dict[str, Any]:
    """The demo's data stage (corpus, tokenizer, token shards), plus held-out documents in the same chat format
    from the task's test split, for the validation loss."""
    from .data import prepare
    from .tasks import get_task
    from .tokenizer import Tokenizer

    res = demo_stage_data(r, cfg.demo_plan())
    d = r.root / "data"
    tok = Tokenizer.load(d / "tokenizer")
    task = get_task(cfg.task, **cfg.task_options)
    items = task.items("test", cfg.val_docs, derive_seed(cfg.seed, "val", bits=31))
    atomic_write_jsonl(d / "val_chat.jsonl", [{"text": chat_document(it, tok, task)} for it in items])
    manifest = prepare([d / "val_chat.jsonl"], d / "tokenizer", d / "val_tokens", overwrite=True)
    return {**res, "val_documents": len(items), "val_tokens": manifest["total_tokens"]}


def _train(r: StageRun, cfg: AblationConfig, name: str, seed: int, model: Path | None = None,
           **arm: Any) -> dict[str, Any]:
    """One arm's pretraining at one seed: the demo's recipe, fixed steps, validation loss every eval_every steps.
    Resumes from its own checkpoints. Returns the curves and end-of-training numbers."""
    from . import accounting
    from .train import TrainConfig, train
    from .weights import config_from_hf

    out = r.root / "runs" / name
    source: dict[str, Any] = {"model": str(model)} if model is not None else {
        "preset": cfg.preset, "model_overrides": {"vocab_size": cfg.vocab_size, **cfg.model_overrides}}
    tcfg = TrainConfig(**source, data=str(r.root / "data" / "tokens"), val_data=str(r.root / "data" / "val_tokens"),
                       tokenizer=str(r.root / "data" / "tokenizer"), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                       max_steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup, schedule="wsd",
                       decay_ratio=cfg.decay_ratio, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
                       save_every=50, keep_last=1, out=str(out), seed=seed, resume=(out / "latest").exists(),
                       progress=not cfg.fast, device=cfg.device, dtype=cfg.dtype, **arm)
    summary = train(tcfg, clock=r.clock)
    ckpt = out / (out / "latest").read_text().strip()
    recs = [x for x in read_jsonl(out / "metrics.jsonl") if "event" not in x]
    mcfg = config_from_hf(ckpt / "config.json")
    tokens = summary["step"] * cfg.batch_size * cfg.seq_len
    tenth = max(1, len(recs) // 10)
    val = [[x["step"], x["val_loss"]] for x in recs if "val_loss" in x]
    if not val or val[-1][0] != summary["step"]:
        val.append([summary["step"], summary["val_loss"]])
    res: dict[str, Any] = {
        "seed": seed, "steps": summary["step"], "model": str(ckpt.relative_to(r.root)), "tokens": tokens,
        "val_loss": summary["val_loss"], "val_curve": val, "main_last": recs[-1]["main"],
        # the main model's training FLOPs (equal across arms of the mtp ablation), and all of them (MTP included)
        "main_flops": accounting.flops_per_token(mcfg, cfg.seq_len, training=True, mtp=False) * tokens,
        "train_flops": accounting.flops_per_token(mcfg, cfg.seq_len, training=True,
                                                  mtp=tcfg.mtp_lambda > 0) * tokens,
        "params": accounting.count_params(mcfg)["total_with_mtp"], "moe_layers": len(recs[-1]["maxvio"]),
        "train_config": {k: getattr(tcfg, k) for k in ("bias_update_speed", "balance_alpha", "mtp_lambda")}}
    if res["moe_layers"]:
        for key in ("maxvio", "seq_maxvio"):
            # the demo's statistic (median over the last 10% of steps of the worst layer) and the mean over training
            res[key] = {"end": median_worst(recs[-tenth:], key),
                        "mean": sum(max(x[key]) for x in recs) / len(recs), "steps_each": tenth,
                        "curve": [max(x[key]) for x in recs], "last_per_layer": recs[-1][key]}
    return res


def _stages(cfg: AblationConfig, runs: dict[str, Any]) -> list[Stage]:
    """`data`, then one stage per (seed, arm), seeds outermost. runs: arm -> fn(r, seed_index, seed) -> results."""
    est = {"data": 10.0 if not cfg.fast else 1.0}
    stages = [Stage("data", lambda r: stage_data(r, cfg), work=f"the demo corpus ({cfg.n_train:,} problems) + "
                    f"{cfg.val_docs} held-out documents", estimate_s=est["data"])]
    for i, seed in enumerate(cfg.seeds()):
        for arm, fn in runs.items():
            stages.append(Stage(f"{arm}-seed{i}", lambda r, fn=fn, i=i, seed=seed: fn(r, i, seed), needs=("data",),
                                work=f"{cfg.steps} steps x {cfg.batch_size * cfg.seq_len:,} tokens (seed {seed})",
                                estimate_s=cfg.steps * cfg.step_s + 10))
    return stages


def _per_seed(res: dict[str, dict[str, Any]], arm: str, get: Any) -> dict[int, float]:
    """{seed index: value} of one arm's finished runs."""
    out = {}
    for name, r in res.items():
        if name.startswith(f"{arm}-seed"):
            out[int(name.rsplit("seed", 1)[1])] = get(r)
    return out


def _compare(res: dict[str, dict[str, Any]], pairs: Sequence[tuple[str, str]], metrics: dict[str, Any]
             ) -> dict[str, Any]:
    """For each (b, a) arm pair and metric: b - a per seed, their mean and 95% t interval (stats.paired_t)."""
    out: dict[str, Any] = {}
    for b, a in pairs:
        for m, get in metrics.items():
            va, vb = _per_seed(res, a, get), _per_seed(res, b, get)
            if va and vb and set(va) & set(vb):
                d = paired_t(va, vb)
                out.setdefault(f"{b} - {a}", {})[m] = {"mean": d["mean"], "ci": list(d["ci"]), "n": d["n"],
                                                       "diffs": d["diffs"]}
    return out


def _summaries(res: dict[str, dict[str, Any]], arms: Sequence[str], metrics: dict[str, Any]) -> dict[str, Any]:
    """Per arm and metric: the per-seed values, their mean and 95% t interval."""
    out: dict[str, Any] = {}
    for arm in arms:
        for m, get in metrics.items():
            v = _per_seed(res, arm, get)
            if v:
                t = t_interval(list(v.values()))
                out.setdefault(arm, {})[m] = {"mean": t["mean"], "ci": list(t["ci"]), "per_seed": list(v.values())}
    return out


def _run(cfg: AblationConfig, title: str, stages: list[Stage], skip: Sequence[str], only: Sequence[str],
         fresh: bool, console: Console) -> experiment.Outcome:
    out = Path(cfg.out)
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        outcome = experiment.run(out, stages, cfg.identity(), skip=skip, only=only, fresh=fresh, console=console,
                                 title=title, threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    atomic_write_json(out / "experiment_config.json", dataclasses.asdict(cfg))
    return outcome


def _fmt_ci(d: dict[str, Any], scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    lo, hi = d["ci"]
    ci = "" if lo != lo else f" ({f.format(scale * lo)} to {f.format(scale * hi)})"  # NaN: a single seed
    return f.format(scale * d["mean"]) + ci


# ------------------------------------------------------------------------------------------------------------
# moe-balance


BALANCE_METRICS = {"val_loss": lambda r: r["val_loss"], "maxvio_end": lambda r: r["maxvio"]["end"],
                   "seq_maxvio_end": lambda r: r["seq_maxvio"]["end"], "maxvio_mean": lambda r: r["maxvio"]["mean"],
                   "seq_maxvio_mean": lambda r: r["seq_maxvio"]["mean"]}
BALANCE_PAIRS = (("aux_free", "neither"), ("aux_loss", "neither"), ("aux_free", "aux_loss"))


def moe_balance_stages(cfg: MoEBalanceConfig) -> list[Stage]:
    return _stages(cfg, {arm: (lambda r, i, seed, arm=arm, kw=kw: _train(r, cfg, f"{arm}-seed{i}", seed, **kw))
                         for arm, kw in cfg.arms().items()})


def moe_balance(cfg: MoEBalanceConfig, skip: Sequence[str] = (), only: Sequence[str] = (),
                fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the balance ablation; once every stage has run, write OUT/results.json, results.md and
    moe-balance.png."""
    from .report import maxvio_noise_floor

    console = Console()
    outcome = _run(cfg, "moe-balance", moe_balance_stages(cfg), skip, only, fresh, console)
    res = {k: v for k, v in outcome.results.items() if k != "data"}
    if len(res) < len(cfg.arms()) * cfg.n_seeds:
        console.print("[yellow]not every run has finished: results.json is written once they have[/]")
        return {"stages": outcome.results}
    first = next(iter(res.values()))
    mcfg = _model_shape(Path(cfg.out) / first["model"])
    layers = first["moe_layers"]
    noise = {"maxvio": maxvio_noise_floor(cfg.batch_size * cfg.seq_len, mcfg["experts"], mcfg["experts_per_token"],
                                          layers, seed=derive_seed(cfg.seed, "noise", "batch", bits=31)),
             "seq_maxvio": maxvio_noise_floor(cfg.seq_len, mcfg["experts"], mcfg["experts_per_token"], layers,
                                              seed=derive_seed(cfg.seed, "noise", "sequence", bits=31),
                                              sequences=cfg.batch_size)}
    results = {"config": dataclasses.asdict(cfg), "arms": cfg.arms(), "shape": {**mcfg, "moe_layers": layers,
                                                                                "tokens_per_step": cfg.batch_size *
                                                                                cfg.seq_len},
               "seeds": cfg.seeds(), "summary": _summaries(res, list(cfg.arms()), BALANCE_METRICS),
               "comparisons": _compare(res, BALANCE_PAIRS, BALANCE_METRICS), "noise_floor": noise,
               "curves": {name: {"val": r["val_curve"], "maxvio": r["maxvio"]["curve"],
                                 "seq_maxvio": r["seq_maxvio"]["curve"]} for name, r in res.items()},
               "runs": {name: _without_curves(r) for name, r in res.items()},
               "timings_s": {k: v["seconds"] for k, v in outcome.timings["stages"].items()}}
    _write(cfg, results, balance_markdown(results), plot_balance, "moe-balance.png", console)
    return results


def _without_curves(r: dict[str, Any]) -> dict[str, Any]:
    """A run's numbers without its per-step curves (results.json keeps those apart, under "curves")."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "curve"} if isinstance(v, dict) else v)
            for k, v in r.items() if k != "val_curve"}


def _model_shape(model_dir: Path) -> dict[str, Any]:
    from .weights import config_from_hf

    c = config_from_hf(model_dir / "config.json")
    return {"experts": c.n_routed_experts, "experts_per_token": c.num_experts_per_tok, "hidden": c.hidden_size,
            "layers": c.num_hidden_layers, "mtp_modules": c.num_nextn_predict_layers}


def _write(cfg: AblationConfig, results: dict[str, Any], md: str, plot: Any, png: str, console: Console) -> None:
    out = Path(cfg.out)
    atomic_write_json(out / "results.json", results)
    (out / "results.md").write_text(md)
    try:
        plot(results, out / png)
    except Exception as e:  # plotting never fails a run
        console.print(f"[yellow]plot failed: {e}[/]")
    console.print(md)


ARM_LABELS = {"aux_free": "aux-loss-free (bias, gamma {gamma:g}; alpha {aux_free_alpha:g})",
              "aux_loss": "auxiliary loss (alpha {aux_alpha:g}, no bias)", "neither": "neither",
              "mtp": "with MTP (lambda {mtp_lambda:g})", "no_mtp": "without MTP"}


def _label(arm: str, cfg: dict[str, Any]) -> str:
    return ARM_LABELS[arm].format(**cfg)


def balance_markdown(r: dict[str, Any]) -> str:
    s, c, nf = r["summary"], r["comparisons"], r["noise_floor"]
    n = len(r["seeds"])
    lines = [f"Mean over {n} seeds (95% t interval across seeds). MaxVio = max expert load / mean - 1 of the worst "
             "MoE layer; *end* = median over the last 10% of steps (the demo report's statistic), *mean* = over "
             "all steps.", "",
             "| arm | validation loss | MaxVio batch, end | MaxVio batch, mean | MaxVio sequence, end | "
             "MaxVio sequence, mean |", "|---|---|---|---|---|---|"]
    for arm, m in s.items():
        lines.append(f"| {_label(arm, r['config'])} | " + " | ".join(
            _fmt_ci(m[k]) for k in ("val_loss", "maxvio_end", "maxvio_mean", "seq_maxvio_end", "seq_maxvio_mean"))
            + " |")
    lines.append(f"| uniformly random routing (median / p95 of {nf['maxvio']['steps']} simulated steps) | | "
                 f"{nf['maxvio']['median']:.3f} / {nf['maxvio']['p95']:.3f} | | "
                 f"{nf['seq_maxvio']['median']:.3f} / {nf['seq_maxvio']['p95']:.3f} | |")
    lines += ["", "Paired differences (same seed: same initialisation and batches), mean and 95% t interval over "
              f"{n} seeds:", "",
              "| difference | validation loss | MaxVio batch, end | MaxVio sequence, end |", "|---|---|---|---|"]
    for pair, m in c.items():
        lines.append(f"| {pair} | {_fmt_ci(m['val_loss'], digits=4, sign=True)} | "
                     f"{_fmt_ci(m['maxvio_end'], sign=True)} | {_fmt_ci(m['seq_maxvio_end'], sign=True)} |")
    return "\n".join(lines) + "\n"


def plot_balance(r: dict[str, Any], png: Path) -> Path:
    """Over training: validation loss minus the `neither` arm's at the same seed (the paired difference the table
    tests), batch-wise and sequence-wise MaxVio (worst layer, 10-step mean); each seed faint, the mean over seeds
    bold; the uniform-routing noise floor (p95) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"aux_free": "#1f77b4", "aux_loss": "#ff7f0e", "neither": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm, color in colors.items():
        runs = [v for k, v in r["curves"].items() if k.startswith(f"{arm}-seed")]
        if not runs:
            continue
        label = _label(arm, r["config"])
        for ax, key in zip(axes, ("val", "maxvio", "seq_maxvio")):
            if key == "val":
                ref = {k.rsplit("seed", 1)[1]: v["val"] for k, v in r["curves"].items() if k.startswith("neither")}
                series = [([p[0] for p in c["val"]],
                           [p[1] - q[1] for p, q in zip(c["val"], ref[k.rsplit("seed", 1)[1]])])
                          for k, c in r["curves"].items() if k.startswith(f"{arm}-seed")]
            else:
                series = [(list(range(1, len(c[key]) + 1)), _smooth(c[key], 10)) for c in runs]
            for xs, ys in series:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
            xs = series[0][0]
            mean = [sum(s[1][i] for s in series) / len(series) for i in range(len(xs))]
            ax.plot(xs, mean, color=color, lw=1.8, label=label)
    for ax, key, title in zip(axes, ("val", "maxvio", "seq_maxvio"),
                              ("validation loss minus neither's (same seed)", "MaxVio, batch-wise (worst layer)",
                               "MaxVio, sequence-wise (worst layer)")):
        if key == "val":
            ax.axhline(0, color="gray", lw=1)
        else:
            ax.axhline(r["noise_floor"][key]["p95"], color="gray", ls="--", lw=1, label="uniform routing (p95)")
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"moe-balance: {len(r['seeds'])} seeds per arm, {r['shape']['experts']} routed experts "
                 f"({r['shape']['experts_per_token']} active), {r['shape']['moe_layers']} MoE layers, "
                 f"{r['shape']['tokens_per_step']:,} tokens per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _smooth(ys: Sequence[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


# ------------------------------------------------------------------------------------------------------------
# mtp


def init_models(root: Path, cfg: MTPConfig, i: int, seed: int) -> dict[str, Path]:
    """The two arms' initial weights for seed i: the model with its MTP module initialised from `seed`, and the
    same main weights without it (building a model draws every module's init from one RNG stream, so building the
    two configs from one seed would give different main weights). Written once, atomically; deterministic."""
    from .model import ModelConfig, build
    from .weights import save_pretrained

    base = root / "init" / f"seed{i}"
    dirs = {"mtp": base / "mtp", "no_mtp": base / "no_mtp"}
    if all((d / "config.json").exists() for d in dirs.values()):
        return dirs
    mcfg = ModelConfig.from_preset(cfg.preset, **{"vocab_size": cfg.vocab_size, **cfg.model_overrides,
                                                  "num_nextn_predict_layers": 1})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = build(mcfg)
        main = build(dataclasses.replace(mcfg, num_nextn_predict_layers=0))
    main.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("mtp.")}, strict=True)
    tok = root / "data" / "tokenizer"
    for arm, model in (("mtp", full), ("no_mtp", main)):
        save_pretrained(model, dirs[arm], tokenizer=tok)  # atomic: written aside, renamed into place
    return dirs


def _mtp_run(r: StageRun, cfg: MTPConfig, arm: str, i: int, seed: int) -> dict[str, Any]:
    """Train one arm from the shared initial weights, evaluate its main model on held-out problems, and (with MTP)
    measure speculative decoding with the module as the draft."""
    from .eval import EvalConfig, evaluate

    kw = dict(cfg.arms()[arm])
    kw.pop("num_nextn_predict_layers")
    init = init_models(r.root, cfg, i, seed)[arm]
    res = _train(r, cfg, f"{arm}-seed{i}", seed, model=init, **kw)
    model_dir = r.root / res["model"]
    ev_dir = r.root / "eval" / f"{arm}-seed{i}"
    if (ev_dir / "summary.json").exists():
        s = json.loads((ev_dir / "summary.json").read_text())
    else:
        s = evaluate(EvalConfig(task=cfg.task, task_options=cfg.task_options, model=str(model_dir), n=cfg.eval_n,
                                k=cfg.eval_k, max_tokens=cfg.max_new_tokens, prompt_format="chat",
                                seed=derive_seed(cfg.seed, "eval", bits=31), out=str(ev_dir), device=cfg.device,
                                dtype=cfg.dtype))
    res["eval"] = {k: s[k] for k in ("n_items", "k", "pass@1", "pass@1_ci", "greedy", "greedy_ci")}
    r.console.print(f"{arm} seed {i}: val loss {res['val_loss']:.4f}, pass@1 {100 * s['pass@1']:.1f}%, "
                    f"greedy {100 * s['greedy']:.1f}%")
    if arm == "mtp":
        res["speculative"] = speculative(model_dir, cfg, r.console)
    return res


def speculative(model_dir: Path, cfg: MTPConfig, console: Console | None = None) -> dict[str, Any]:
    """The MTP module as the draft (k = 1, V3 §5.4.3) on held-out prompts: acceptance and tokens per step, greedy
    and at the evaluation's T 0.6 / top_p 0.95, and whether greedy speculative outputs equal plain decoding's (they
    must). Then tokens per second at batch 1, plain vs speculative, under "timed" (wall clock: varies with load)."""
    from .device import resolve_device, resolve_dtype
    from .infer import Engine, SamplingParams
    from .tasks import get_task
    from .tokenizer import Tokenizer
    from .weights import load

    device = resolve_device(cfg.device)
    model = load(model_dir, device=device, dtype=resolve_dtype(cfg.dtype, device)).eval()
    tok = Tokenizer.load(model_dir)
    task = get_task(cfg.task, **cfg.task_options)
    items = task.items("test", cfg.spec_prompts, derive_seed(cfg.seed, "speculative", bits=31))
    prompts = [task.encode_prompt(it, tok, "chat") for it in items]
    max_len = max(map(len, prompts)) + cfg.max_new_tokens + 1
    out: dict[str, Any] = {"prompts": len(prompts), "draft_tokens": 1}
    for mode, temperature in (("greedy", 0.0), ("sampled", 0.6)):
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=temperature,
                                 top_p=0.95 if temperature else 1.0, seed=derive_seed(cfg.seed, "spec", mode, j))
                  for j in range(len(prompts))]
        seed = derive_seed(cfg.seed, "engine", mode)
        plain = Engine(model, tok, max_batch=cfg.spec_batch, max_model_len=max_len, seed=seed).generate(prompts,
                                                                                                       params)
        eng = Engine(model, tok, max_batch=cfg.spec_batch, max_model_len=max_len, num_speculative_tokens=1,
                     seed=seed)
        spec = eng.generate(prompts, params)
        st = eng.stats
        out[mode] = {"acceptance_rate": st.acceptance_rate, "tokens_per_step": st.tokens_per_verify,
                     "drafted": st.drafted, "accepted": st.accepted,
                     "completion_tokens": sum(len(o.token_ids) for o in spec),
                     "plain_completion_tokens": sum(len(o.token_ids) for o in plain)}
        if not temperature:  # greedy speculative decoding must reproduce plain greedy decoding
            out[mode]["identical_to_plain"] = sum(a.token_ids == b.token_ids for a, b in zip(plain, spec)) / len(spec)
    # timed: batch 1, greedy, the first tps_prompts prompts, after one warm-up request per engine
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0)
    timed: dict[str, Any] = {}
    for name, k in (("plain", 0), ("speculative", 1)):
        eng = Engine(model, tok, max_batch=1, max_model_len=max_len, num_speculative_tokens=k, seed=0)
        eng.generate(prompts[:1], params)
        t0 = time.perf_counter()
        outs = eng.generate(prompts[:cfg.tps_prompts], params)
        dt = time.perf_counter() - t0
        timed[name] = {"tokens": sum(len(o.token_ids) for o in outs), "seconds": dt,
                       "tokens_per_s": sum(len(o.token_ids) for o in outs) / dt}
    timed["speedup"] = timed["speculative"]["tokens_per_s"] / timed["plain"]["tokens_per_s"]
    out["timed"] = timed
    if console is not None:
        g, s = out["greedy"], out["sampled"]
        console.print(f"MTP draft acceptance: greedy {100 * g['acceptance_rate']:.1f}% ({g['tokens_per_step']:.2f} "
                      f"tokens/step), T 0.6 {100 * s['acceptance_rate']:.1f}%; batch-1 speed "
                      f"{timed['speedup']:.2f}x plain")
    return out


MTP_METRICS = {"val_loss": lambda r: r["val_loss"], "pass@1": lambda r: r["eval"]["pass@1"],
               "greedy": lambda r: r["eval"]["greedy"]}
SPEC_METRICS = {f"{mode}_{k}": (lambda r, mode=mode, k=k: r["speculative"][mode][k])
                for mode in ("greedy", "sampled") for k in ("acceptance_rate", "tokens_per_step")}


def mtp_stages(cfg: MTPConfig) -> list[Stage]:
    return _stages(cfg, {arm: (lambda r, i, seed, arm=arm: _mtp_run(r, cfg, arm, i, seed)) for arm in cfg.arms()})


def mtp(cfg: MTPConfig, skip: Sequence[str] = (), only: Sequence[str] = (), fresh: bool = False) -> dict[str, Any]:
    """Run (or resume) the MTP ablation; once every stage has run, write OUT/results.json, results.md and mtp.png."""
    from .eval import per_item
    from .stats import paired_difference

    console = Console()
    outcome = _run(cfg, "mtp", mtp_stages(cfg), skip, only, fresh, console)
    res = {k: v for k, v in outcome.results.items() if k != "data"}
    if len(res) < len(cfg.arms()) * cfg.n_seeds:
        console.print("[yellow]not every run has finished: results.json is written once they have[/]")
        return {"stages": outcome.results}
    out = Path(cfg.out)
    # the evaluation's own noise: pass@1 paired over every (seed, problem); it leaves out what the seed does
    items = {arm: {(i, k): v for i in range(cfg.n_seeds)
                   for k, v in per_item(read_jsonl(out / "eval" / f"{arm}-seed{i}" / "items.jsonl")).items()}
             for arm in cfg.arms()}
    pooled = paired_difference(items["no_mtp"], items["mtp"], seed=derive_seed(cfg.seed, "pooled", bits=31))
    spec = {name: r["speculative"] for name, r in res.items() if "speculative" in r}
    results = {"config": dataclasses.asdict(cfg), "arms": cfg.arms(), "seeds": cfg.seeds(),
               "shape": _model_shape(out / res["mtp-seed0"]["model"]),
               "summary": _summaries(res, list(cfg.arms()), MTP_METRICS),
               "comparisons": _compare(res, (("mtp", "no_mtp"),), MTP_METRICS),
               "pooled_pass@1": {"mean": pooled["mean"], "ci": list(pooled["ci"]), "n": pooled["n"]},
               "speculative": _summaries(res, ["mtp"], SPEC_METRICS).get("mtp", {}),
               "flops": {arm: {"main": _per_seed(res, arm, lambda r: r["main_flops"])[0],
                               "total": _per_seed(res, arm, lambda r: r["train_flops"])[0],
                               "params": _per_seed(res, arm, lambda r: r["params"])[0]} for arm in cfg.arms()},
               "curves": {name: {"val": r["val_curve"]} for name, r in res.items()},
               "runs": {name: _without_curves({k: v for k, v in r.items() if k != "speculative"})
                        | ({"speculative": {m: v for m, v in r["speculative"].items() if m != "timed"}}
                           if "speculative" in r else {}) for name, r in res.items()},
               # wall-clock numbers: they vary with the machine's load, unlike everything above
               "timed": {"speculative_batch1": {name: s["timed"] for name, s in spec.items()},
                         "timings_s": {k: v["seconds"] for k, v in outcome.timings["stages"].items()}}}
    _write(cfg, results, mtp_markdown(results), plot_mtp, "mtp.png", console)
    return results


def mtp_markdown(r: dict[str, Any]) -> str:
    s, c, n = r["summary"], r["comparisons"]["mtp - no_mtp"], len(r["seeds"])
    f = r["flops"]
    lines = [f"Mean over {n} seeds (95% t interval across seeds). Held-out loss: the main model's next-token loss on "
             f"held-out documents; pass@1 / greedy: {r['runs']['mtp-seed0']['eval']['n_items']} held-out problems, "
             f"{r['runs']['mtp-seed0']['eval']['k']} samples at T 0.6 / top_p 0.95, and greedy.", "",
             "| arm | parameters | main-model training FLOPs | all training FLOPs | held-out loss | pass@1 | greedy |",
             "|---|---|---|---|---|---|---|"]
    for arm, m in s.items():
        lines.append(f"| {_label(arm, r['config'])} | {f[arm]['params']:,} | {f[arm]['main']:.3g} | "
                     f"{f[arm]['total']:.3g} | {_fmt_ci(m['val_loss'], digits=4)} | "
                     f"{_fmt_ci(m['pass@1'], 100, 1)}% | {_fmt_ci(m['greedy'], 100, 1)}% |")
    p = r["pooled_pass@1"]
    lines += ["", f"with MTP - without, paired by seed (95% t interval over {n} seeds): held-out loss "
              f"{_fmt_ci(c['val_loss'], digits=4, sign=True)}; pass@1 {_fmt_ci(c['pass@1'], 100, 1, True)} points; "
              f"greedy {_fmt_ci(c['greedy'], 100, 1, True)} points. Paired over all {p['n']} (seed, problem) pairs "
              f"(evaluation noise only): pass@1 {100 * p['mean']:+.1f} points (95% bootstrap CI "
              f"{100 * p['ci'][0]:+.1f} to {100 * p['ci'][1]:+.1f}).", ""]
    sp = r["speculative"]
    if sp:
        lines += ["| MTP module as the draft (k = 1) | second-token acceptance | tokens per step |", "|---|---|---|"]
        for mode, label in (("greedy", "greedy"), ("sampled", "T 0.6 / top_p 0.95")):
            lines.append(f"| {label} | {_fmt_ci(sp[f'{mode}_acceptance_rate'], 100, 1)}% | "
                         f"{_fmt_ci(sp[f'{mode}_tokens_per_step'], 1, 2)} |")
        timed = r["timed"]["speculative_batch1"]
        if timed:
            sp_x = [t["speedup"] for t in timed.values()]
            lines += ["", f"Batch-1 greedy tokens per second, speculative / plain (wall clock, varies with load): "
                      f"{', '.join(f'{x:.2f}x' for x in sp_x)} over the seeds."]
    return "\n".join(lines) + "\n"


def plot_mtp(r: dict[str, Any], png: Path) -> Path:
    """The main model's held-out loss with MTP minus without at the same seed over training (seeds faint, mean
    bold), pass@1 and greedy per arm (seeds as dots), and the draft acceptance per seed against V3's 85-90%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mtp": "#1f77b4", "no_mtp": "#d62728"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [3, 2, 2]})
    diffs = [[(p[0], p[1] - q[1]) for p, q in zip(r["curves"][f"mtp-seed{i}"]["val"],
                                                   r["curves"][f"no_mtp-seed{i}"]["val"])]
             for i in range(len(r["seeds"]))]
    for d in diffs:
        ax1.plot([p[0] for p in d], [p[1] for p in d], color=colors["mtp"], alpha=0.3, lw=0.8)
    ax1.plot([p[0] for p in diffs[0]], [sum(d[i][1] for d in diffs) / len(diffs) for i in range(len(diffs[0]))],
             color=colors["mtp"], lw=1.8, label="mean over seeds")
    ax1.axhline(0, color="gray", lw=1)
    ax1.set_title("main model's held-out loss, with MTP minus without (same seed)", fontsize=10)
    ax1.set_xlabel("step")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    arms = list(r["summary"])
    for j, metric in enumerate(("pass@1", "greedy")):
        for a, arm in enumerate(arms):
            m = r["summary"][arm][metric]
            x = j * (len(arms) + 1) + a
            lo, hi = m["ci"]
            err = [[100 * (m["mean"] - lo)], [100 * (hi - m["mean"])]] if lo == lo else None
            ax2.bar(x, 100 * m["mean"], yerr=err, color=colors[arm], capsize=3,
                    label=_label(arm, r["config"]) if j == 0 else None)
            ax2.plot([x] * len(m["per_seed"]), [100 * v for v in m["per_seed"]], "k.", ms=4)
    ax2.set_xticks([(len(arms) - 1) / 2 + j * (len(arms) + 1) for j in range(2)], ["pass@1", "greedy"])
    ax2.set_ylabel("held-out accuracy (%), 95% t CI over seeds")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=7)
    sp = r["speculative"]
    if sp:
        for j, mode in enumerate(("greedy", "sampled")):
            m = sp[f"{mode}_acceptance_rate"]
            ax3.bar(j, 100 * m["mean"], color="#1f77b4")
            ax3.plot([j] * len(m["per_seed"]), [100 * v for v in m["per_seed"]], "k.", ms=5)
        ax3.axhspan(85, 90, color="gray", alpha=0.4, label="V3 report: 85-90%")
        ax3.set_xticks([0, 1], ["greedy", "T 0.6 / top_p 0.95"])
        ax3.set_ylim(0, 105)
        ax3.set_ylabel("MTP second-token acceptance (%)")
        ax3.grid(axis="y", alpha=0.3)
        ax3.legend(fontsize=7, loc="lower center")
    fig.suptitle(f"mtp: {len(r['seeds'])} seeds per arm, the same main model and batches; "
                 f"{r['shape']['layers']} layers, hidden {r['shape']['hidden']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ------------------------------------------------------------------------------------------------------------
# the CLI's entry point

ABLATIONS: dict[str, tuple[type, Any]] = {"moe-balance": (MoEBalanceConfig, moe_balance), "mtp": (MTPConfig, mtp)}


def run_ablation(name: str, overrides: Sequence[str] = (), skip: Sequence[str] = (), only: Sequence[str] = (),
                 fresh: bool = False, **kwargs: Any) -> dict[str, Any]:
    """`nanoseek experiment moe-balance | mtp [key=value ...]`: the config from keyword arguments and overrides."""
    cls, fn = ABLATIONS[name]
    cfg = experiment.experiment_config(overrides, cls=cls, **kwargs)
    return fn(cfg, skip=skip, only=only, fresh=fresh)

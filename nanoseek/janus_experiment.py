"""The mini Janus as staged experiments on nanoseek.experiment's runner: the demo's Janus part and two findings.

  the demo's Janus part (`nanoseek demo`, `--only janus`, `--skip janus`): four stages of fixed work —
    janus_data   the shapes world's training scenes (nanoseek.shapes)
    janus_vq     the VQ tokenizer (`nanoseek janus train-vq`, nanoseek.minijanus)
    janus_train  the unified mini Janus from scratch (`nanoseek janus train`, nanoseek.janus_train)
    janus_eval   GenEval-style score per category with the baselines, VQA accuracy beside the majority guesser, and a
                 short guidance curve (nanoseek.janus_eval)
  `nanoseek experiment janus-encoding` (docs/findings/janus.md): decoupled (ViT) vs shared (VQ tokens) visual
    encoding for understanding, same data, steps and seeds, VQA accuracy with paired CIs (Janus section 4.5's
    central ablation)
  `nanoseek experiment janus-cfg` (docs/findings/janus.md): the GenEval-style score against the guidance weight
    (1, 2, 3, 5, 7, 10), with image grids showing what too much guidance does

Composition floor: this module imports the stages (minijanus, janus_train, janus_eval); they never import it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .experiment import Stage, StageRun, run
from .files import atomic_dir, atomic_write, atomic_write_json, read_jsonl
from .stats import derive_seed, paired_difference

STAGES = ("janus_data", "janus_vq", "janus_train", "janus_eval")
EXPERIMENTS = ("janus-encoding", "janus-cfg")


@dataclass
class JanusPlan:
    """The work of the demo's Janus part (and the base of the two findings). Every number is fixed work; the
    `*_s` fields are reference timings (this 2-core CPU, fp32, alone; docs/demo.md) for estimates only."""

    fast: bool = False
    seed: int = 0
    n_train: int = 12000  # training scenes (6 categories in turn), each with a caption and 1-3 questions
    vq_steps: int = 800  # the VQ: train-vq's defaults (32 px -> 8 x 8 tokens, 512 codes; 800 x 16 beat 400 x 32 by
    vq_batch: int = 16  # 6 points of round-trip ceiling on the same images, docs/mini-janus.md)
    train_steps: int = 1200  # with 24 images per step: the Janus part within 8 minutes
    und_batch: int = 10  # Janus-Pro stage III's 5 : 1 : 4 (understanding : text : text-to-image)
    text_batch: int = 2
    t2i_batch: int = 24
    lr: float = 2e-3
    model_overrides: dict[str, Any] = field(default_factory=dict)  # the janus-mini trunk (model.* keys)
    eval_per_category: int = 60  # 360 held-out prompts
    vqa_questions: int = 600
    cfg_weight: float = 5.0  # Janus-Pro's default guidance
    guidance: tuple[float, ...] = (1.0, 3.0, 5.0, 7.0)  # the demo's guidance curve (janus-cfg has the full sweep)
    device: str | None = None  # None: CUDA if available, else CPU (the demo's --device)
    # ---- reference timings (not part of the plan's identity)
    # measured in the demo's runs of 2026-12-05 (docs/LOG.md): VQ 0.128 s per step of 16, unified 0.25 s per step,
    # the Janus eval 25 s for 6 x 360 images and 600 answers
    vq_step_s: float = 0.13
    train_step_s: float = 0.26
    images_s: float = 0.01  # one generated image (64 tokens x 2 CFG rows, batched) incl. decoding and scoring
    answer_s: float = 0.005

    def __post_init__(self) -> None:
        self.guidance = tuple(float(w) for w in self.guidance)

    @classmethod
    def make(cls, fast: bool) -> JanusPlan:
        if not fast:
            return cls()
        # toy sizes that run every stage and code path in seconds; the numbers mean nothing
        return cls(fast=True, n_train=120, vq_steps=12, vq_batch=16, train_steps=6, und_batch=3, text_batch=1,
                   t2i_batch=3, model_overrides={"hidden_size": 32, "num_hidden_layers": 1,
                                                 "first_k_dense_replace": 0, "q_lora_rank": 16, "kv_lora_rank": 16,
                                                 "intermediate_size": 64, "moe_intermediate_size": 16},
                   eval_per_category=2, vqa_questions=12, guidance=(1.0, 5.0), vq_step_s=0.05, train_step_s=0.1,
                   images_s=0.01, answer_s=0.005)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.endswith("_s")}

    def estimates(self) -> dict[str, float]:
        n_img = 6 * self.eval_per_category
        return {"janus_data": 0.0003 * self.n_train + 1, "janus_vq": self.vq_steps * self.vq_step_s + 3,
                "janus_train": self.train_steps * self.train_step_s + 10,
                "janus_eval": (2 + len(self.guidance)) * n_img * self.images_s + self.vqa_questions * self.answer_s
                + 10}

    def train_config(self, root: Path, name: str, seed: int, encoder: str = "vit", **kw: Any) -> Any:
        from .janus_train import JanusTrainConfig

        out = root / name
        over = [f"model.{k}={json.dumps(v)}" for k, v in self.model_overrides.items()]
        return JanusTrainConfig.from_sources(None, over, **{
            "data": str(root / "world"), "vq": str(root / "vq"), "out": str(out), "max_steps": self.train_steps,
            "und_batch": self.und_batch, "text_batch": self.text_batch, "t2i_batch": self.t2i_batch,
            "lr": self.lr, "seed": seed, "understanding_encoder": encoder, "warmup_steps": min(20, self.train_steps),
            "save_every": 100, "keep_last": 1, "progress": not self.fast, "resume": (out / "latest").exists(),
            "device": self.device, **kw})


# ----------------------------------------------------------------------------------------------------------------
# stages (the demo's Janus part; the findings reuse them under their own OUT)


def stage_data(r: StageRun, plan: JanusPlan, root: Path) -> dict[str, Any]:
    from . import shapes

    world = shapes.ShapesConfig()
    shapes.synth(plan.n_train, "train", derive_seed(plan.seed, "janus-world", bits=31), root / "world", world)
    _, items, _ = shapes.load_split(root / "world", "train")
    questions = sum(len(it["questions"]) for it in items)
    r.console.print(f"{len(items):,} training scenes, {questions:,} questions; held-out pairings "
                    f"{', '.join(' '.join(p) for p in world.holdout)}")
    return {"scenes": len(items), "questions": questions, "world": world.to_dict()}


def stage_vq(r: StageRun, plan: JanusPlan, root: Path) -> dict[str, Any]:
    from .minijanus import VQTrainConfig, train_vq

    s = train_vq(VQTrainConfig(data=str(root / "world"), out=str(root / "vq"), max_steps=plan.vq_steps,
                               batch_size=plan.vq_batch, seed=derive_seed(plan.seed, "janus-vq", bits=31),
                               resume=(root / "vq" / "latest").exists(), progress=not plan.fast, ceiling=False,
                               device=plan.device))
    return {"steps": s["steps"], **{k: round(v, 6) for k, v in s["final"].items()}}


def stage_train(r: StageRun, plan: JanusPlan, root: Path, name: str = "run", seed: int | None = None,
                encoder: str = "vit", publish: Path | None = None) -> dict[str, Any]:
    """One unified training run (fixed steps; with a time budget the schedule is fitted to it, and the report says
    the run was time-limited)."""
    from .janus_train import train_janus

    seed = derive_seed(plan.seed, "janus-train", bits=31) if seed is None else seed
    cfg = plan.train_config(root, name, seed, encoder, max_time=r.budget_s, fit_to_time=r.budget_s is not None)
    s = train_janus(cfg, clock=r.clock)
    if publish is not None:
        with atomic_dir(publish) as tmp:
            shutil.copytree(Path(s["model"]), tmp, dirs_exist_ok=True)
    recs = [x for x in read_jsonl(Path(cfg.out) / "metrics.jsonl") if "event" not in x]
    tenth = max(1, len(recs) // 10)

    def mean(rs: list[dict[str, Any]], k: str) -> float | None:
        v = [x[k] for x in rs if k in x]
        return sum(v) / len(v) if v else None

    return {"planned_steps": plan.train_steps, "steps": s["step"], "time_limited": s["step"] < plan.train_steps,
            "encoder": encoder, "seed": seed, "params": s["params"], "trainable": s["trainable"],
            "model": str((publish or Path(s["model"])).relative_to(r.root)),
            **{f"{k}_{w}": mean(rs, k) for k in ("t2i", "und", "text") for w, rs in
               (("first", recs[:tenth]), ("last", recs[-tenth:]))}, "steps_averaged": tenth}


def stage_eval(r: StageRun, plan: JanusPlan, root: Path, model: Path) -> dict[str, Any]:
    """The GenEval-style score (with baselines), VQA (with the majority guesser) and a guidance curve."""
    from .janus_eval import (
        JanusEvalConfig,
        evaluate_geneval,
        evaluate_vqa,
        geneval_markdown,
        load_model,
        vqa_markdown,
    )

    m, tok = load_model(model, plan.device)
    ev = root / "eval"
    common = dict(model=str(model), seed=derive_seed(plan.seed, "janus-eval", bits=31), progress=not plan.fast,
                  device=plan.device)
    g = evaluate_geneval(JanusEvalConfig(n=6 * plan.eval_per_category, cfg_weight=plan.cfg_weight,
                                         out=str(ev / "geneval"), **common), m, tok)
    r.console.print(geneval_markdown(g))
    v = evaluate_vqa(JanusEvalConfig(task="shapes-vqa", n=plan.vqa_questions, out=str(ev / "vqa"), **common),
                     m, tok)
    r.console.print(vqa_markdown(v))
    curve = {}
    for w in plan.guidance:
        s = g if w == plan.cfg_weight else evaluate_geneval(JanusEvalConfig(
            n=6 * plan.eval_per_category, cfg_weight=w, baselines=False, out=str(ev / f"cfg-{w:g}"), **common),
            m, tok)
        curve[f"{w:g}"] = {"overall": s["overall"], "geneval_overall": s["geneval_overall"],
                           "categories": s["categories"],
                           "items": str((ev / ("geneval" if w == plan.cfg_weight else f"cfg-{w:g}") / "items.jsonl")
                                        .relative_to(r.root))}
    r.console.print("guidance curve: " + ", ".join(f"w {w}: {100 * c['overall']['pass@1']:.1f}%"
                                                    for w, c in curve.items()))
    rel = str(ev.relative_to(r.root))
    # paths relative to OUT: two runs in different directories write the same results
    g, v = {**g, "model": str(model.relative_to(r.root))}, {**v, "model": str(model.relative_to(r.root))}
    return {"geneval": g, "vqa": v, "guidance": curve, "dir": rel}


def demo_stages(plan: JanusPlan, root_of: Any = None) -> list[Stage]:
    """The demo's Janus part, under OUT/janus; the model is published as OUT/models/janus."""
    est = plan.estimates()

    def sub(r: StageRun) -> Path:
        return r.root / "janus"

    return [
        Stage("janus_data", lambda r: stage_data(r, plan, sub(r)),
              work=f"{plan.n_train:,} scenes of the shapes world", estimate_s=est["janus_data"]),
        Stage("janus_vq", lambda r: stage_vq(r, plan, sub(r)), ("janus_data",),
              f"VQ tokenizer, {plan.vq_steps} steps x {plan.vq_batch} images", est["janus_vq"]),
        Stage("janus_train", lambda r: stage_train(r, plan, sub(r), publish=r.root / "models" / "janus"),
              ("janus_data", "janus_vq"), f"unified mini Janus, {plan.train_steps} steps x ({plan.und_batch} "
              f"answers + {plan.text_batch} texts + {plan.t2i_batch} images)", est["janus_train"], fits_time=True),
        Stage("janus_eval", lambda r: stage_eval(r, plan, sub(r), r.root / "models" / "janus"), ("janus_train",),
              f"{6 * plan.eval_per_category} held-out prompts x (model + shuffled + {len(plan.guidance) - 1} "
              f"guidance weights), {plan.vqa_questions} questions", est["janus_eval"]),
    ]


def expand_stage_names(names: Sequence[str]) -> list[str]:
    """`janus` names the whole Janus part (--only janus, --skip janus)."""
    return [n for x in names for n in (STAGES if x == "janus" else (x,))]


# ----------------------------------------------------------------------------------------------------------------
# the findings


@dataclass
class JanusExperimentConfig:
    name: str = "janus-encoding"
    out: str = "runs/janus-encoding"
    fast: bool = False
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)  # janus-encoding: training seeds (each trains both encoders)
    weights: tuple[float, ...] = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0)  # janus-cfg: guidance weights
    sample_seeds: tuple[int, ...] = (0, 1)  # janus-cfg: image sampling seeds per weight (paired over prompts)
    model: str | None = None  # janus-cfg: sweep this trained model instead of training one
    plan: JanusPlan = field(default_factory=JanusPlan)

    def __post_init__(self) -> None:
        if self.name not in EXPERIMENTS:
            raise ValueError(f"unknown Janus experiment {self.name!r} (one of {', '.join(EXPERIMENTS)})")
        self.seeds, self.sample_seeds = tuple(self.seeds), tuple(self.sample_seeds)
        self.weights = tuple(float(w) for w in self.weights)
        if not self.seeds or not self.weights or not self.sample_seeds:
            raise ValueError("seeds, weights and sample_seeds must not be empty")
        if any(w < 1 for w in self.weights):
            raise ValueError(f"guidance weights must be >= 1, got {self.weights}")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model={self.model}: not a model directory (no config.json)")


def janus_experiment_config(name: str, overrides: Sequence[str] = (), **kwargs: Any) -> JanusExperimentConfig:
    """A config from keyword arguments and `key=value` strings: the experiment's fields, or the plan's (n_train,
    train_steps, ...)."""
    from .train import _unknown, parse_overrides

    values = parse_overrides(list(overrides))
    plan = JanusPlan.make(bool(kwargs.get("fast")))
    own = {f.name for f in dataclasses.fields(JanusExperimentConfig)} - {"plan"}
    plan_fields = {f.name for f in dataclasses.fields(JanusPlan)} - {"fast"}
    for k, v in values.items():
        if k in own:
            kwargs[k] = v
        elif k in plan_fields:
            setattr(plan, k, v)
        else:
            raise ValueError(_unknown(k, own | plan_fields, "janus experiment key"))
    plan.__post_init__()
    plan.seed = kwargs.get("seed", plan.seed)
    return JanusExperimentConfig(name=name, plan=plan, **{k: v for k, v in kwargs.items() if v is not None})


def encoding_stages(cfg: JanusExperimentConfig) -> list[Stage]:
    plan, root = cfg.plan, Path(cfg.out)
    est = plan.estimates()
    runs = [(s, enc) for s in cfg.seeds for enc in ("vit", "vq")]
    stages = [Stage("data", lambda r: stage_data(r, plan, root), work=f"{plan.n_train:,} scenes",
                    estimate_s=est["janus_data"]),
              Stage("vq", lambda r: stage_vq(r, plan, root), ("data",), f"{plan.vq_steps} VQ steps", est["janus_vq"])]
    for s, enc in runs:
        stages.append(Stage(f"train_{enc}_s{s}", lambda r, s=s, enc=enc: stage_train(
            r, plan, root, f"{enc}-s{s}", seed=derive_seed(plan.seed, "janus-train", s, bits=31), encoder=enc),
            ("data", "vq"), f"{plan.train_steps} steps, understanding through the {enc.upper()}",
            est["janus_train"]))

    def evaluation(r: StageRun) -> dict[str, Any]:
        from .janus_eval import JanusEvalConfig, evaluate_geneval, evaluate_vqa

        out: dict[str, Any] = {}
        for s, enc in runs:
            name = f"{enc}-s{s}"
            model = root / name / "model"
            common = dict(model=str(model), seed=derive_seed(plan.seed, "janus-eval", bits=31),
                          progress=not plan.fast)
            v = evaluate_vqa(JanusEvalConfig(task="shapes-vqa", n=plan.vqa_questions, baselines=False,
                                             out=str(root / "eval" / name / "vqa"), **common))
            g = evaluate_geneval(JanusEvalConfig(n=6 * plan.eval_per_category, cfg_weight=plan.cfg_weight,
                                                 baselines=False, out=str(root / "eval" / name / "geneval"),
                                                 **common))
            out[name] = {"seed": s, "encoder": enc, "vqa": v["overall"], "vqa_kinds": v["kinds"],
                         "geneval": g["overall"], "geneval_overall": g["geneval_overall"]}
            r.console.print(f"{name}: VQA {100 * v['overall']['pass@1']:.1f}%, GenEval-style "
                            f"{100 * g['overall']['pass@1']:.1f}%")
        return {"models": out}

    stages.append(Stage("eval", evaluation, tuple(f"train_{enc}_s{s}" for s, enc in runs),
                        f"{len(runs)} models x ({plan.vqa_questions} questions + {6 * plan.eval_per_category} "
                        "prompts)", len(runs) * est["janus_eval"] / 3))
    return stages


def encoding_results(cfg: JanusExperimentConfig, res: dict[str, Any]) -> dict[str, Any]:
    """Per seed and pooled over seeds: VQA accuracy (decoupled ViT - shared VQ) paired over the same questions, and
    the generation score of both (the encoders should not change it)."""
    from .eval import per_item

    root = Path(cfg.out)
    models = res["eval"]["models"]
    seeds = [s for s in cfg.seeds if f"vit-s{s}" in models and f"vq-s{s}" in models]

    def items(name: str, which: str) -> dict[Any, float]:
        return per_item(read_jsonl(root / "eval" / name / which / "items.jsonl"))

    out: dict[str, Any] = {"models": models, "per_seed": {}}
    pooled: dict[str, dict[Any, float]] = {"vit": {}, "vq": {}}
    pooled_gen: dict[str, dict[Any, float]] = {"vit": {}, "vq": {}}
    for s in seeds:
        a, b = items(f"vit-s{s}", "vqa"), items(f"vq-s{s}", "vqa")
        d = paired_difference(b, a, seed=cfg.seed)
        ga, gb = items(f"vit-s{s}", "geneval"), items(f"vq-s{s}", "geneval")
        dg = paired_difference(gb, ga, seed=cfg.seed)
        out["per_seed"][str(s)] = {"vqa_vit_minus_vq": {"mean": d["mean"], "ci": list(d["ci"]), "n": d["n"]},
                                   "geneval_vit_minus_vq": {"mean": dg["mean"], "ci": list(dg["ci"]), "n": dg["n"]}}
        for enc, m in (("vit", a), ("vq", b)):
            pooled[enc].update({(s, k): v for k, v in m.items()})
        for enc, m in (("vit", ga), ("vq", gb)):
            pooled_gen[enc].update({(s, k): v for k, v in m.items()})
    if seeds:
        d = paired_difference(pooled["vq"], pooled["vit"], seed=cfg.seed)
        dg = paired_difference(pooled_gen["vq"], pooled_gen["vit"], seed=cfg.seed)
        out["pooled"] = {"vqa_vit_minus_vq": {"mean": d["mean"], "ci": list(d["ci"]), "n": d["n"]},
                         "geneval_vit_minus_vq": {"mean": dg["mean"], "ci": list(dg["ci"]), "n": dg["n"]},
                         "seeds": seeds}
    return out


def cfg_stages(cfg: JanusExperimentConfig) -> list[Stage]:
    plan, root = cfg.plan, Path(cfg.out)
    est = plan.estimates()
    stages: list[Stage] = []
    if cfg.model is None:
        stages = [Stage("data", lambda r: stage_data(r, plan, root), work=f"{plan.n_train:,} scenes",
                        estimate_s=est["janus_data"]),
                  Stage("vq", lambda r: stage_vq(r, plan, root), ("data",), f"{plan.vq_steps} VQ steps",
                        est["janus_vq"]),
                  Stage("train", lambda r: stage_train(r, plan, root), ("data", "vq"), f"{plan.train_steps} steps",
                        est["janus_train"])]

    def sweep(r: StageRun) -> dict[str, Any]:
        from .janus_eval import JanusEvalConfig, evaluate_geneval, load_model

        model = Path(cfg.model) if cfg.model else root / "run" / "model"
        m, tok = load_model(model)
        out: dict[str, Any] = {}
        for w in cfg.weights:
            for ss in cfg.sample_seeds:
                g = evaluate_geneval(JanusEvalConfig(model=str(model), n=6 * plan.eval_per_category, cfg_weight=w,
                                                     seed=ss, baselines=False, progress=not plan.fast,
                                                     out=str(root / "sweep" / f"w{w:g}-s{ss}")), m, tok)
                out[f"{w:g}/{ss}"] = {"weight": w, "sample_seed": ss, "overall": g["overall"],
                                      "categories": g["categories"], "geneval_overall": g["geneval_overall"]}
                r.console.print(f"guidance {w:g}, sampling seed {ss}: {100 * g['overall']['pass@1']:.1f}%")
        return {"model": str(model), "runs": out}

    stages.append(Stage("sweep", sweep, ("train",) if cfg.model is None else (),
                        f"{len(cfg.weights)} weights x {len(cfg.sample_seeds)} seeds x "
                        f"{6 * plan.eval_per_category} prompts",
                        len(cfg.weights) * len(cfg.sample_seeds) * 6 * plan.eval_per_category * plan.images_s))
    return stages


def cfg_results(cfg: JanusExperimentConfig, res: dict[str, Any]) -> dict[str, Any]:
    """Per weight: accuracy pooled over the sampling seeds (Wilson over prompts x seeds), per category, and the
    paired difference to weight 1 (no guidance) over the same (prompt, seed) pairs."""
    from .stats import wilson

    root = Path(cfg.out)
    per_w: dict[str, Any] = {}
    items: dict[str, dict[Any, float]] = {}
    for w in cfg.weights:
        rows: dict[Any, float] = {}
        cats: dict[str, list[float]] = {}
        for ss in cfg.sample_seeds:
            for row in read_jsonl(root / "sweep" / f"w{w:g}-s{ss}" / "items.jsonl"):
                rows[(ss, row["id"])] = row["pass1"]
                cats.setdefault(row["group"], []).append(row["pass1"])
        items[f"{w:g}"] = rows
        k, n = sum(rows.values()), len(rows)
        per_w[f"{w:g}"] = {"weight": w, "n": n, "pass@1": k / n, "ci": list(wilson(k, n)), "categories": {
            c: {"n": len(v), "pass@1": sum(v) / len(v), "ci": list(wilson(sum(v), len(v)))} for c, v in cats.items()}}
    base = f"{min(cfg.weights):g}"
    for w, e in per_w.items():
        if w != base:
            d = paired_difference(items[base], items[w], seed=cfg.seed)
            e["minus_lowest"] = {"vs": base, "mean": d["mean"], "ci": list(d["ci"]), "n": d["n"]}
    best = max(per_w, key=lambda w: per_w[w]["pass@1"])
    return {"weights": per_w, "best": best, "model": res["sweep"]["model"]}


def run_experiment(cfg: JanusExperimentConfig, skip: Sequence[str] = (), only: Sequence[str] = (),
                   fresh: bool = False) -> dict[str, Any]:
    """`nanoseek experiment janus-encoding|janus-cfg`: the stages on the runner (resumable), then OUT/results.json,
    results.md and the plot."""
    console = Console()
    out = Path(cfg.out)
    stages = encoding_stages(cfg) if cfg.name == "janus-encoding" else cfg_stages(cfg)
    plan = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    plan["plan"] = cfg.plan.identity()
    outcome = run(out, stages, plan, skip=skip, only=only, fresh=fresh, console=console, title=cfg.name)
    last = stages[-1].name
    if last not in outcome.results:
        console.print(f"[yellow]not every stage has run: results.json is written once `{last}` has[/]")
        return {"stages": outcome.results}
    if cfg.name == "janus-encoding":
        results = encoding_results(cfg, outcome.results)
        md = encoding_markdown(results)
        plot_encoding(results, out / "encoding.png")
    else:
        results = cfg_results(cfg, outcome.results)
        md = cfg_markdown(results)
        plot_guidance(results, out / "guidance.png")
        guidance_grid(cfg, out / "guidance_grid.png")
    results["config"] = dataclasses.asdict(cfg)
    results["timings_s"] = {k: v["seconds"] for k, v in outcome.timings["stages"].items()}
    atomic_write_json(out / "results.json", results)
    atomic_write(out / "results.md", md)
    console.print(md)
    return results


# ----------------------------------------------------------------------------------------------------------------
# tables and plots


def _pct(e: dict[str, Any]) -> str:
    return f"{100 * e['pass@1']:.1f}% ({100 * e['ci'][0]:.1f}–{100 * e['ci'][1]:.1f})"


def _diff(d: dict[str, Any]) -> str:
    return f"{100 * d['mean']:+.1f} points (95% CI {100 * d['ci'][0]:+.1f} to {100 * d['ci'][1]:+.1f}, n={d['n']})"


def encoding_markdown(r: dict[str, Any]) -> str:
    L = ["| model | VQA accuracy (95% CI) | GenEval-style overall (95% CI) |", "|---|---|---|"]
    for name, m in r["models"].items():
        L.append(f"| {name} | {_pct(m['vqa'])} | {_pct(m['geneval'])} |")
    L += ["", "Decoupled (ViT) - shared (VQ tokens), paired over the same held-out questions / prompts:", ""]
    for s, d in r["per_seed"].items():
        L.append(f"- seed {s}: VQA {_diff(d['vqa_vit_minus_vq'])}; generation {_diff(d['geneval_vit_minus_vq'])}")
    if "pooled" in r:
        p = r["pooled"]
        L.append(f"- pooled over seeds {p['seeds']}: VQA {_diff(p['vqa_vit_minus_vq'])}; generation "
                 f"{_diff(p['geneval_vit_minus_vq'])}")
    return "\n".join(L) + "\n"


def cfg_markdown(r: dict[str, Any]) -> str:
    ws = r["weights"]
    cats = list(next(iter(ws.values()))["categories"])
    L = ["| guidance | overall (95% CI) | vs the lowest weight (paired) | " + " | ".join(cats) + " |",
         "|---|---|---|" + "---|" * len(cats)]
    for w, e in ws.items():
        d = _diff(e["minus_lowest"]) if "minus_lowest" in e else "—"
        L.append(f"| {w} | {_pct(e)} | {d} | " + " | ".join(f"{100 * e['categories'][c]['pass@1']:.0f}%"
                                                          for c in cats) + " |")
    L += ["", f"Best weight: {r['best']}."]
    return "\n".join(L) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_encoding(r: dict[str, Any], png: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = list(r["models"])
    for i, n in enumerate(names):
        e = r["models"][n]["vqa"]
        ax.errorbar([i], [100 * e["pass@1"]], yerr=[[100 * (e["pass@1"] - e["ci"][0])], [100 * (e["ci"][1] -
                                                                                             e["pass@1"])]],
                    fmt="o", color="#1f77b4" if n.startswith("vit") else "#d62728", capsize=4)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("held-out VQA accuracy (%, 95% CI)")
    ax.set_title("understanding through the ViT (blue) vs the VQ tokens (red)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def plot_guidance(r: dict[str, Any], png: Path) -> Path:
    """Overall and per-category accuracy against the guidance weight (95% CIs on the overall)."""
    ws = r["weights"].values()
    return guidance_chart([e["weight"] for e in ws], list(ws), [e["categories"] for e in ws], png,
                          xlabel="guidance weight w (logits = uncond + w (cond - uncond))")


def guidance_chart(weights: Sequence[float], overall: Sequence[dict[str, Any]],
                   categories: Sequence[dict[str, dict[str, Any]]], png: Path, xlabel: str = "guidance weight",
                   figsize: tuple[float, float] = (7, 4), dpi: int = 120) -> Path:
    """GenEval-style accuracy against the guidance weight: the overall score with its 95% CI (`overall[i]`:
    "pass@1", "ci") and one line per category (`categories[i][name]["pass@1"]`), one entry per weight. Shared by
    the guidance experiment and the demo's report card."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize)
    y = [100 * e["pass@1"] for e in overall]
    lo = [100 * (e["pass@1"] - e["ci"][0]) for e in overall]
    hi = [100 * (e["ci"][1] - e["pass@1"]) for e in overall]
    ax.errorbar(weights, y, yerr=[lo, hi], fmt="o-", color="black", lw=2, capsize=4, label="overall")
    for c in categories[0]:
        ax.plot(weights, [100 * cats[c]["pass@1"] for cats in categories], "-", lw=1, alpha=0.7, label=c)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("GenEval-style accuracy (%)")
    ax.set_xticks(weights)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return png


def guidance_grid(cfg: JanusExperimentConfig, png: Path, per_category: int = 2) -> Path:
    """One row per guidance weight, the same prompts (the first `per_category` of each category) and seed in every
    column: what more guidance does to the same image."""
    import numpy as np
    from PIL import Image

    from . import shapes

    root = Path(cfg.out)
    ss = cfg.sample_seeds[0]
    first = read_jsonl(root / "sweep" / f"w{cfg.weights[0]:g}-s{ss}" / "items.jsonl")
    ids = [r["id"] for c in shapes.CATEGORIES for r in [x for x in first if x["group"] == c][:per_category]]
    tiles = []
    for w in cfg.weights:
        d = root / "sweep" / f"w{w:g}-s{ss}" / "images"
        tiles += [np.asarray(Image.open(d / f"{i}.png").convert("RGB")) for i in ids]
    shapes.grid(tiles, scale=4, cols=len(ids)).save(png)
    return png

"""A Janus on the shapes world, scored: `nanoseek eval --task shapes-geneval|shapes-vqa --model DIR`.

Both run through nanoseek.eval.evaluate (the task's items, verifier and groups; per-item rows) with samplers that
drive the Janus: images by classifier-free guidance (nanoseek.infer.generate_image_tokens, the sampler of `nanoseek
imagine`), answers by greedy decoding of the understanding prompt (the format of `nanoseek generate --image`), then
add what an image benchmark needs around the model's number:
  shapes-geneval  per-category accuracy with Wilson 95% intervals over the held-out prompts (default 60 per category,
                  360 in all) and GenEval's overall (mean of the categories); beside it the verifier's accuracy on
                  freshly rendered ground truth (is the checker right?), the VQ round-trip ceiling (what the
                  tokenizer allows) and images generated for *shuffled* prompts scored against the original prompt
                  (what an image that ignores its prompt scores); an image grid, one row per category.
  shapes-vqa      accuracy per question kind (Wilson) beside a majority-answer guesser that never sees the image
                  (the most common training answer to the same question, else to its kind).
Everything is seeded: the same command gives the same numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write, atomic_write_json, atomic_write_jsonl
from .infer import generate_image_tokens
from .janus import Janus
from .stats import derive_seed, wilson

TASKS = ("shapes-geneval", "shapes-vqa")
PER_CATEGORY = 60  # the issue: >= 50 held-out prompts per category, >= 300 in all
VQA_QUESTIONS = 600


@dataclass
class JanusEvalConfig:
    task: str = "shapes-geneval"
    model: str = ""
    out: str | None = None  # items.jsonl, summary.json, summary.md, grid.png (and baselines/)
    n: int | None = None  # geneval: prompts (6 x PER_CATEGORY); vqa: questions (VQA_QUESTIONS)
    cfg_weight: float = 5.0  # Janus-Pro's default guidance
    temperature: float = 1.0
    seed: int = 0
    baselines: bool = True
    world: str | None = None  # None: the model directory's world.json (written by `nanoseek janus train`)
    # "test": held-out scenes whose colour-naming prompts each contain a held-out colour-shape pairing (the score);
    # "train": prompts and scenes drawn like the training split's (seen pairings): a diagnostic of what the model
    # learned apart from composing, never the headline number
    split: str = "test"
    batch: int = 120
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True

    def __post_init__(self) -> None:
        from .janus import check_guidance

        if self.task not in TASKS:
            raise ValueError(f"a Janus is evaluated on {', '.join(TASKS)}, not {self.task!r}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.split not in ("test", "train"):
            raise ValueError(f"split must be test (held-out compositions) or train (seen pairings), got "
                             f"{self.split!r}")
        check_guidance(self.cfg_weight, self.temperature)


def load_model(model_dir: str | Path, device: str | None = None, dtype: str = "float32") -> tuple[Janus, Any]:
    """(Janus, tokenizer) of a Janus directory, on `device`."""
    from . import load
    from .device import resolve_device, resolve_dtype
    from .tokenizer import Tokenizer

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d} is not a model directory (no config.json)")
    dev = resolve_device(device)
    model = load(d, device=dev, dtype=resolve_dtype(dtype, dev))
    if not isinstance(model, Janus):
        raise ValueError(f"{d} holds a language model, not a Janus: the shapes tasks need images in and out")
    return model.eval(), Tokenizer.load(d)


def world_of(model_dir: str | Path, world: str | None) -> str | None:
    """The world a model was trained on: `world` if given, else the model directory's world.json, else None (the
    default world)."""
    if world is not None:
        return world
    f = Path(model_dir) / "world.json"
    return str(f) if f.is_file() else None


def _check_world(cfg: JanusEvalConfig, model: Janus | None, task: Any) -> None:
    """The world's image size is the model's (read from config.json before any weight is loaded)."""
    from .imagine import janus_config

    own = model.config.vision.image_size if model is not None else janus_config(cfg.model)[0].vision.image_size
    world = task.world.image_size
    if world != own:
        raise ValueError(f"the world's images are {world}x{world} but the model reads and writes {own}x{own}")


# ----------------------------------------------------------------------------------------------------------------
# samplers


@torch.inference_mode()
def generate_images(model: Janus, tok: Any, prompts: Sequence[str], *, cfg_weight: float = 5.0,
                    temperature: float = 1.0, seed: int = 0, batch: int = 120,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
    """One image per prompt, (N, S, S, 3) uint8: batches of `batch` prompts, each batch seeded from (seed, batch
    index), so the images do not depend on anything but the arguments."""
    from .imagine import generation_prompt
    from .minijanus import to_images

    out = []
    for b, s in enumerate(range(0, len(prompts), batch)):
        ids = [generation_prompt(tok, model.config, p) for p in prompts[s:s + batch]]
        tokens = generate_image_tokens(model, ids, cfg_weight=cfg_weight, temperature=temperature,
                                       seed=derive_seed(seed, "janus-images", b))
        out.append(to_images(model.decode_image(tokens)))
        if progress:
            progress(min(s + batch, len(prompts)))
    return np.concatenate(out)


@torch.inference_mode()
def answer_questions(model: Janus, tok: Any, images: np.ndarray, questions: Sequence[str], *,
                     encoder: str = "vit", batch: int = 120, max_tokens: int = 4) -> list[str]:
    """Greedy answers to one question per image (the understanding prompt of `nanoseek generate --image`), batched:
    left-padded prompts through the KV cache, decoding until EOS or max_tokens. encoder "vq": the image enters as
    its VQ tokens (a model trained with understanding_encoder = "vq")."""
    from .imagine import understanding_prompt
    from .janus_train import image_features, left_pad, understanding_embeds
    from .minijanus import to_pixels
    from .model import KVCache

    cfg, lm = model.config, model.language_model
    param = next(model.parameters())
    eos = cfg.text.eos_token_id
    answers: list[str] = []
    for s in range(0, len(questions), batch):
        px = to_pixels(images[s:s + batch]).to(param.device, param.dtype)
        ids, mask = (t.to(param.device) for t in left_pad([understanding_prompt(tok, cfg, q)
                                                            for q in questions[s:s + batch]], cfg.pad_token_id))
        B, T = ids.shape
        feats = image_features(model, encoder, px, model.encode_image(px) if encoder == "vq" else None)
        cache = KVCache(cfg.text, B, T + max_tokens, param.device, param.dtype)
        h, _ = lm.trunk(None, inputs_embeds=understanding_embeds(model, ids, feats),
                        attention_mask=None if bool(mask.all()) else mask, cache=cache)
        done = torch.zeros(B, dtype=torch.bool, device=param.device)
        gen: list[list[int]] = [[] for _ in range(B)]
        for _ in range(max_tokens):
            nxt = lm.lm_head(h[:, -1]).float().argmax(-1)
            for i in range(B):
                if not done[i]:
                    if int(nxt[i]) == eos:
                        done[i] = True
                    else:
                        gen[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            h, _ = lm.trunk(nxt[:, None], cache=cache)
        answers += [tok.decode(g, skip_special_tokens=True).strip() for g in gen]
    return answers


# ----------------------------------------------------------------------------------------------------------------
# the two evaluations


def _progress(enabled: bool, what: str, total: int) -> tuple[Any, Callable[[int], None] | None]:
    from .metrics import progress_bar

    bar = progress_bar(enabled)
    if bar is None:
        return None, None
    task = bar.add_task(what, total=total)
    return bar, lambda done: bar.update(task, completed=done)


def _categories(summary: dict[str, Any]) -> dict[str, Any]:
    from .shapes import CATEGORIES

    g = summary.get("groups", {})
    return {c: g[c] for c in CATEGORIES if c in g}


def _shapes_summary(s: dict[str, Any]) -> dict[str, Any]:
    """shapes.summarize's form ({"categories": {c: {accuracy, ci, n}}, "overall", "geneval_overall"}) -> the
    form of eval's groups, so every row of the table reads alike."""
    cats = {c: {"n": v["n"], "pass@1": v["accuracy"], "ci": list(v["ci"])} for c, v in s["categories"].items()}
    return {"categories": cats, "overall": {"n": s["overall"]["n"], "pass@1": s["overall"]["accuracy"],
                                            "ci": list(s["overall"]["ci"])}, "geneval_overall": s["geneval_overall"]}


def _eval_summary(s: dict[str, Any]) -> dict[str, Any]:
    cats = _categories(s)
    n, p = s["n_items"], s["pass@1"]
    return {"categories": cats, "overall": {"n": n, "pass@1": p, "ci": list(wilson(round(p * n), n))},
            "geneval_overall": sum(v["pass@1"] for v in cats.values()) / len(cats) if cats else float("nan")}


def evaluate_geneval(cfg: JanusEvalConfig, model: Janus | None = None, tok: Any = None) -> dict[str, Any]:
    """The GenEval-style score of a Janus on held-out prompts of its world, with the baselines (module doc)."""
    from . import shapes
    from .eval import EvalConfig, evaluate
    from .minijanus import vq_ceiling
    from .tasks import get_task

    world = world_of(cfg.model, cfg.world)
    task = get_task("shapes-geneval", world=world)
    _check_world(cfg, model, task)
    if model is None:
        model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
    n = cfg.n or PER_CATEGORY * len(shapes.CATEGORIES)
    items = task.items(cfg.split, n, cfg.seed)
    out = Path(cfg.out) if cfg.out else None
    images: dict[str, np.ndarray] = {}

    def sampler(its: list[dict[str, Any]], k: int, temperature: float, key: str = "") -> list[list[Any]]:
        from PIL import Image

        bar, tick = _progress(cfg.progress, f"images{key} (cfg {cfg.cfg_weight:g})", len(its) * k)
        with bar or nullcontext():
            arr = generate_images(model, tok, [it["prompt"] for it in its for _ in range(k)],
                                  cfg_weight=cfg.cfg_weight, temperature=temperature,
                                  seed=derive_seed(cfg.seed, "geneval", key), batch=cfg.batch, progress=tick)
        for i, it in enumerate(its):
            images[key + it["id"]] = arr[i * k]
        return [[Image.fromarray(a) for a in arr[i * k:(i + 1) * k]] for i in range(len(its))]

    def run(its: list[dict[str, Any]], where: Path | None, key: str) -> dict[str, Any]:
        ec = EvalConfig(task="shapes-geneval", task_options={"world": world}, model=cfg.model, k=1, n=len(its),
                        temperature=cfg.temperature, greedy=False, seed=cfg.seed,
                        out=str(where) if where else None)
        return evaluate(ec, items=its, sampler=lambda i, k, t: sampler(i, k, t, key))

    s = run(items, out, "")
    result: dict[str, Any] = {"task": "shapes-geneval", "model": cfg.model, "world": task.world.to_dict(),
                              "split": cfg.split, "cfg_weight": cfg.cfg_weight, "temperature": cfg.temperature,
                              "seed": cfg.seed,
                              "n_items": len(items), **_eval_summary(s)}
    if cfg.baselines:
        # shuffled prompts: image i is generated for another item's prompt, and scored against item i's
        perm = np.random.default_rng(derive_seed(cfg.seed, "shuffle")).permutation(len(items))
        shuffled = [{**it, "prompt": items[j]["prompt"]} for it, j in zip(items, perm)]
        sh = run(shuffled, out / "baselines" / "shuffled" if out else None, "shuffled/")
        per = n // len(shapes.CATEGORIES)
        result["baselines"] = {
            "shuffled_prompts": _eval_summary(sh),
            "vq_ceiling": _shapes_summary(vq_ceiling(model.vqmodel, task.world, per, cfg.seed)),
            "verifier_on_ground_truth": _shapes_summary(shapes.validate(task.world, per, cfg.seed))}
    if out:
        from PIL import Image

        (out / "images").mkdir(parents=True, exist_ok=True)
        for it in items:  # every image as the PNG `nanoseek imagine` would write (the report and findings show them)
            Image.fromarray(images[it["id"]]).save(out / "images" / f"{it['id']}.png")
        rows = {c: [x for x in items if x["category"] == c][:8] for c in shapes.CATEGORIES}
        cols = min(len(r) for r in rows.values())
        order = [it for r in rows.values() for it in r[:cols]]
        shapes.grid([images[it["id"]] for it in order], scale=4, cols=cols).save(out / "grid.png")
        result["grid"] = "grid.png"
        result["grid_prompts"] = {c: [it["prompt"] for it in r[:cols]] for c, r in rows.items()}
        atomic_write_json(out / "summary.json", result)
        atomic_write(out / "summary.md", geneval_markdown(result))
    return result


def majority_guesser(task: Any, seed: int, n_scenes: int = 6000) -> Callable[[dict[str, Any]], str]:
    """The most common answer to each question text over n_scenes training scenes (else to its kind): the score of
    a model that reads the question and never the image."""
    by_q: dict[str, Counter] = {}
    by_kind: dict[str, Counter] = {}
    for it in task.items("train", n_scenes, derive_seed(seed, "majority")):
        by_q.setdefault(it["prompt"], Counter())[it["answer"]] += 1
        by_kind.setdefault(it["kind"], Counter())[it["answer"]] += 1

    def guess(item: dict[str, Any]) -> str:
        c = by_q.get(item["prompt"]) or by_kind.get(item["kind"]) or Counter({"": 1})
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]  # ties: the alphabetically first answer

    return guess


def evaluate_vqa(cfg: JanusEvalConfig, model: Janus | None = None, tok: Any = None,
                 encoder: str | None = None) -> dict[str, Any]:
    """Understanding accuracy on held-out scenes per question kind, beside the majority-answer guesser."""
    from .eval import EvalConfig, evaluate
    from .janus_train import run_settings
    from .tasks import get_task

    world = world_of(cfg.model, cfg.world)
    task = get_task("shapes-vqa", world=world)
    _check_world(cfg, model, task)
    if model is None:
        model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
    encoder = encoder or run_settings(cfg.model).get("understanding_encoder", "vit")
    items = task.items(cfg.split, cfg.n or VQA_QUESTIONS, cfg.seed)
    out = Path(cfg.out) if cfg.out else None

    def sampler(its: list[dict[str, Any]], k: int, temperature: float) -> list[list[str]]:
        images = np.stack([task.image(it) for it in its])
        ans = answer_questions(model, tok, images, [it["prompt"] for it in its], encoder=encoder, batch=cfg.batch)
        return [[a] * k for a in ans]

    s = evaluate(EvalConfig(task="shapes-vqa", task_options={"world": world}, model=cfg.model, k=1, n=len(items),
                            temperature=0.0, greedy=False, seed=cfg.seed, out=str(out) if out else None),
                 items=items, sampler=sampler)
    n, p = s["n_items"], s["pass@1"]
    result: dict[str, Any] = {"task": "shapes-vqa", "model": cfg.model, "encoder": encoder, "seed": cfg.seed,
                              "split": cfg.split,
                              "n_items": n, "kinds": s.get("groups", {}),
                              "overall": {"n": n, "pass@1": p, "ci": list(wilson(round(p * n), n))}}
    if cfg.baselines:
        guess = majority_guesser(task, cfg.seed)
        kinds: dict[str, list[float]] = {}
        rows = []
        for it in items:
            ok = task.verify(it, guess(it))
            kinds.setdefault(it["kind"], []).append(ok)
            rows.append({"id": it["id"], "group": it["kind"], "guess": guess(it), "answer": it["answer"], "pass1": ok})
        if out:  # per question, as eval's items.jsonl: what paired comparisons read
            (out / "baselines" / "majority").mkdir(parents=True, exist_ok=True)
            atomic_write_jsonl(out / "baselines" / "majority" / "items.jsonl", rows)
        allv = [v for vs in kinds.values() for v in vs]
        result["baselines"] = {"majority_answer": {
            "kinds": {k: {"n": len(v), "pass@1": sum(v) / len(v), "ci": list(wilson(sum(v), len(v)))}
                      for k, v in kinds.items()},
            "overall": {"n": len(allv), "pass@1": sum(allv) / len(allv), "ci": list(wilson(sum(allv), len(allv)))}}}
    if out:
        atomic_write_json(out / "summary.json", result)
        atomic_write(out / "summary.md", vqa_markdown(result))
    return result


def run_janus_eval(cfg: JanusEvalConfig) -> dict[str, Any]:
    """`nanoseek eval --task shapes-geneval|shapes-vqa --model DIR`: prints the markdown table."""
    if cfg.task == "shapes-geneval":
        r = evaluate_geneval(cfg)
        print(geneval_markdown(r))
    else:
        r = evaluate_vqa(cfg)
        print(vqa_markdown(r))
    return r


# ----------------------------------------------------------------------------------------------------------------
# tables


def _cell(e: dict[str, Any] | None) -> str:
    if not e:
        return "—"
    return f"{100 * e['pass@1']:.1f}% ({100 * e['ci'][0]:.0f}–{100 * e['ci'][1]:.0f})"


def geneval_markdown(r: dict[str, Any]) -> str:
    b = r.get("baselines", {})
    cols = [("model", r)] + [(name, b[key]) for name, key in (
        ("shuffled prompts", "shuffled_prompts"), ("VQ ceiling", "vq_ceiling"),
        ("verifier on ground truth", "verifier_on_ground_truth")) if key in b]
    which = "held-out" if r.get("split", "test") == "test" else "seen-pairing (training-split)"
    L = [f"# shapes-geneval: {r['n_items']} {which} prompts, guidance {r['cfg_weight']:g}, temperature "
         f"{r['temperature']:g}", "", f"Model `{r['model']}`. Accuracy (95% Wilson CI); one image per prompt.", "",
         "| category | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for cat in r["categories"]:
        L.append(f"| {cat} | " + " | ".join(_cell(x["categories"].get(cat)) for _, x in cols) + " |")
    L.append("| **overall** | " + " | ".join(_cell(x["overall"]) for _, x in cols) + " |")
    L.append("| GenEval overall (mean of categories) | " + " | ".join(
        f"{100 * x['geneval_overall']:.1f}%" for _, x in cols) + " |")
    if r.get("grid"):
        L += ["", f"![images]({r['grid']}) (rows: {', '.join(r['categories'])}; 8 prompts each)"]
    return "\n".join(L) + "\n"


def vqa_markdown(r: dict[str, Any]) -> str:
    m = r.get("baselines", {}).get("majority_answer", {})
    which = "held-out" if r.get("split", "test") == "test" else "training-split"
    L = [f"# shapes-vqa: {r['n_items']} questions on {which} scenes (encoder: {r['encoder']})", "",
         "| question kind | model | majority-answer guesser |", "|---|---|---|"]
    for k, v in r["kinds"].items():
        L.append(f"| {k} | {_cell(v)} | {_cell(m.get('kinds', {}).get(k))} |")
    L.append(f"| **overall** | {_cell(r['overall'])} | {_cell(m.get('overall'))} |")
    return "\n".join(L) + "\n"



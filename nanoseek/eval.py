"""Evaluation as the R1 paper defines it: `nanoseek eval --model DIR|--url URL --task NAME|FILE.jsonl [--k 8]`.

For each held-out item: k samples at temperature 0.6 / top_p 0.95 (R1 §3.1) and one greedy answer.
  pass@1   mean correctness over the k samples, averaged over items (the paper's headline metric)
  pass@k   unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), for k' in {1, 2, 4, ..., k}
  cons@k   majority vote over the k extracted answers (maj@k), then verified
  greedy   accuracy of the temperature-0 answer
Confidence intervals: Wilson for per-item binary metrics (greedy, cons@k), a percentile bootstrap over items for
pass@1. Per-item results are saved as JSONL, the summary as JSON + markdown. Items, prompts, the grade and the
answer normaliser are the task's (nanoseek.tasks); a task whose output is an image is graded the same way, by a
sampler that returns images.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_jsonl
from .stats import bootstrap_ci, derive_seed, majority_vote, pass_at_k, wilson
from .tasks import Task, get_task


def per_item(rows: list[dict[str, Any]], key: str = "pass1") -> dict[Any, float]:
    """{item id: value} from the per-item rows of an evaluation (items.jsonl): what stats.paired_difference pairs
    two evaluations by."""
    return {r["id"]: float(r[key]) for r in rows}


# ------------------------------------------------------------------------------------------------------------
# samplers: a local model through the engine, or any OpenAI-compatible endpoint


@dataclass
class EvalConfig:
    task: str = "arithmetic"  # a built-in task, a JSONL file or a plugin module:name (nanoseek.tasks.get_task)
    task_options: dict[str, Any] | None = None  # the task's settings (must match what the model was trained on)
    model: str | None = None
    url: str | None = None
    served_model: str | None = None  # model name at the URL
    api_key: str | None = None
    k: int = 8
    n: int = 200
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256
    prompt_format: str = "chat"  # chat | r1_zero (for local models)
    greedy: bool = True
    seed: int = 0
    out: str | None = None
    concurrency: int = 8
    max_batch: int = 32  # local model: engine rows decoded together (more rows, fewer Python steps per token)
    device: str | None = None  # local model: None = nanoseek.device.default_device() (CUDA if available, else CPU)
    dtype: str = "auto"  # local model's weights and cache: auto (bf16 on CUDA, fp32 on a CPU) | float32 | ...

    def __post_init__(self) -> None:
        from .device import dtype_name

        if (self.model is None) == (self.url is None):
            raise ValueError("give exactly one of --model DIR or --url URL")
        dtype_name(self.dtype)
        if self.k < 1 or self.n < 1 or self.max_batch < 1:
            raise ValueError(f"k, n and max_batch must be >= 1, got k={self.k}, n={self.n}, "
                             f"max_batch={self.max_batch}")
        if self.url is not None:
            from .client import normalize_url

            self.url = normalize_url(self.url)


def _local_sampler(cfg: EvalConfig, task: Task):
    from .device import resolve_device, resolve_dtype
    from .infer import Engine, SamplingParams
    from .tokenizer import Tokenizer
    from .weights import load

    task.require_output("text", "a local language model")
    if cfg.prompt_format not in task.formats:
        raise ValueError(f"prompt format {cfg.prompt_format!r} is not one of task {task.name}'s "
                         f"({', '.join(task.formats)})")
    device = resolve_device(cfg.device)
    model = load(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device)).eval()
    tok = Tokenizer.load(cfg.model)

    def run(items: list[dict[str, Any]], k: int, temperature: float) -> list[list[str]]:
        prompts = [task.encode_prompt(it, tok, cfg.prompt_format) for it in items]
        engine = Engine(model, tok, max_batch=cfg.max_batch, max_model_len=max(map(len, prompts)) + cfg.max_tokens + 1,
                        seed=cfg.seed)
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=temperature, top_p=cfg.top_p if temperature
                                 else 1.0, seed=derive_seed(cfg.seed, "eval", i, j), detokenize=False)
                  for i in range(len(items)) for j in range(k)]
        outs = engine.generate([p for p in prompts for _ in range(k)], params)
        # the chat template pre-fills "<think>\n": graders see the completion, reasoning then "</think>" and answer
        texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        return [texts[i * k:(i + 1) * k] for i in range(len(items))]

    return run


def _remote_sampler(cfg: EvalConfig, task: Task):
    from .client import Endpoint
    from .reasoning import join as join_reasoning
    from .reasoning import split as split_reasoning

    endpoint = Endpoint(cfg.url, cfg.served_model, cfg.api_key, model_flag="--served-model")  # type: ignore[arg-type]

    task.require_output("text", "a chat endpoint")

    def one(messages: list[dict[str, Any]], temperature: float, seed: int) -> str:
        r = endpoint.chat(messages, temperature=temperature,
                          top_p=cfg.top_p if temperature else 1.0, max_tokens=cfg.max_tokens, seed=seed)
        # graders read the answer after "</think>": the R1 format, whether the endpoint split the reasoning or not
        out = split_reasoning(r.content, r.reasoning)
        return join_reasoning(out.reasoning, out.answer)

    def run(items: list[dict[str, Any]], k: int, temperature: float) -> list[list[str]]:
        jobs = [(i, j) for i in range(len(items)) for j in range(k)]
        prompts = [task.messages(it) for it in items]  # the chat format
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            # the same per-sample seeds as the local sampler (31 bits: what OpenAI-compatible servers accept)
            texts = list(pool.map(lambda ij: one(prompts[ij[0]], temperature,
                                                 derive_seed(cfg.seed, "eval", *ij, bits=31)), jobs))
        return [texts[i * k:(i + 1) * k] for i in range(len(items))]

    return run


def evaluate(cfg: EvalConfig, items: list[dict[str, Any]] | None = None,
             sampler: Callable[[list[dict[str, Any]], int, float], list[list[Any]]] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the summary (and writes OUT/items.jsonl, summary.json, summary.md). `items`
    default to the task's held-out items; `sampler(items, k, temperature)` returns k outputs per item, of the
    task's output kind (default: the local model or the endpoint of `cfg`, for text tasks)."""
    task = get_task(cfg.task, **(cfg.task_options or {}))
    items = items if items is not None else task.items("test", cfg.n, cfg.seed)
    if not items:
        raise ValueError(f"task {cfg.task!r} has no items to evaluate")
    task.check_items(items)
    sampler = sampler or (_local_sampler(cfg, task) if cfg.model else _remote_sampler(cfg, task))
    samples = sampler(items, cfg.k, cfg.temperature)
    greedy = sampler(items, 1, 0.0) if cfg.greedy else [[None]] * len(items)
    text = task.output == "text"  # text outputs are kept in the rows; images are not JSON
    rows = []
    for it, outs, g in zip(items, samples, greedy):
        ok = [task.correct(it, o) for o in outs]
        answers = [task.normalize(o) for o in outs]
        maj = majority_vote(answers)  # cons@k; ties go to the earliest sample
        maj_ok = False
        if maj is not None:  # the majority answer is correct iff a sample giving it was graded correct
            maj_ok = any(o for o, a in zip(ok, answers) if a == maj)
        row = {"id": it.get("id"), "prompt": it.get("prompt"), "answer": it.get("answer"), "correct": ok,
               "pass1": sum(ok) / len(ok), "majority_answer": maj, "cons_correct": maj_ok,
               "greedy_correct": task.correct(it, g[0]) if g[0] is not None else None}
        if task.group(it) is not None:
            row["group"] = task.group(it)
        if text:
            row.update({"greedy_text": g[0], "samples": outs, "lengths": [len(o) for o in outs]})
        else:
            row["answers"] = answers  # what the task read from each output
        rows.append(row)
    summary = summarize(rows, cfg)
    if cfg.out:
        write_results(Path(cfg.out), rows, summary)
    return summary


def summarize(rows: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    n, k = len(rows), cfg.k
    pass1 = [r["pass1"] for r in rows]
    cons = sum(r["cons_correct"] for r in rows)
    out: dict[str, Any] = {
        "task": cfg.task, "n_items": n, "k": k, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "prompt_format": cfg.prompt_format, "source": cfg.model or cfg.url,
        "pass@1": sum(pass1) / n, "pass@1_ci": bootstrap_ci(pass1, seed=cfg.seed),
        f"cons@{k}": cons / n, f"cons@{k}_ci": wilson(cons, n),
    }
    ks = sorted({1, *(2**i for i in range(1, 8) if 2**i <= k), k})
    for kk in ks:
        out[f"pass@{kk}"] = sum(pass_at_k(k, sum(r["correct"]), kk) for r in rows) / n
    if rows[0]["greedy_correct"] is not None:
        g = sum(bool(r["greedy_correct"]) for r in rows)
        out["greedy"], out["greedy_ci"] = g / n, wilson(g, n)
    if any("group" in r for r in rows):  # the task's groups (Task.group): pass@1 per group, Wilson over its items
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(str(r.get("group")), []).append(r["pass1"])
        out["groups"] = {name: {"n": len(v), "pass@1": sum(v) / len(v), "ci": wilson(sum(v), len(v))}
                         for name, v in groups.items()}
    out["config"] = {k2: v for k2, v in asdict(cfg).items() if k2 != "api_key"}  # never write the key
    return out


def write_results(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "items.jsonl", rows)
    (out / "summary.md").write_text(summary_markdown(summary))
    atomic_write_json(out / "summary.json", summary)  # last: its presence marks a finished evaluation (distill)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_markdown(s: dict[str, Any]) -> str:
    k = s["k"]
    lines = [f"# Evaluation: {s['task']} ({s['n_items']} held-out items)", "",
             f"Source: `{s['source']}`; prompt format `{s['prompt_format']}`; k = {k} samples at temperature "
             f"{s['temperature']}, top_p {s['top_p']}.", "", "| metric | value | 95% CI |", "|---|---|---|"]
    lines.append(f"| pass@1 (mean of {k}) | {_pct(s['pass@1'])} | {_pct(s['pass@1_ci'][0])} - "
                 f"{_pct(s['pass@1_ci'][1])} (bootstrap) |")
    lines.append(f"| cons@{k} (majority) | {_pct(s[f'cons@{k}'])} | {_pct(s[f'cons@{k}_ci'][0])} - "
                 f"{_pct(s[f'cons@{k}_ci'][1])} (Wilson) |")
    if "greedy" in s:
        lines.append(f"| greedy | {_pct(s['greedy'])} | {_pct(s['greedy_ci'][0])} - {_pct(s['greedy_ci'][1])} "
                     "(Wilson) |")
    for key in sorted((x for x in s if x.startswith("pass@") and not x.endswith("_ci") and x != "pass@1"),
                      key=lambda x: int(x[5:])):
        lines.append(f"| {key} (unbiased) | {_pct(s[key])} | |")
    return "\n".join(lines) + "\n"

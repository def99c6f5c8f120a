"""Tasks: what a model is asked, how it is prompted and how its output is checked, one object per task, used by
every stage alike (rl, eval, distill, experiment, demo and the CLI).

A task owns
  items       its problems, `items(split, n, seed)`: a built-in generator (nanoseek.synthetic: arithmetic,
              Countdown) or the rows of a JSONL file
  prompts     its prompt formats: `chat` (the R1 chat template with the `<answer>` instruction: what `nanoseek chat`
              and `serve` send, so a trained model can be talked to) and `r1_zero` (R1 paper table 1: a plain
              template for base models); `messages`, `plain_prompt`, `encode_prompt`, and `sft_messages` (the
              conversation with the reference reasoning, for SFT data)
  verifier    `verify(item, output) -> float` in [0, 1] (NaN: it cannot be checked, e.g. a row without an answer);
              `correct(item, output)` is `verify >= 1`: what eval and RL's held-out accuracy count
  normaliser  `normalize(output)`: the comparable answer, for majority voting (cons@k / maj@k, R1 §3.1)
  rewards     its default GRPO reward specs (nanoseek.rewards built-ins or module:fn, with weights)
and declares the kind of `output` its verifier reads: "text" (a completion, str) or "image" (a PIL image: a
text-to-image task scored by a rule-based detector). Stages that only produce text say so before any compute.

`get_task(name, **options)` resolves a name: a built-in task (`task_names()`), a JSONL file, or a plugin
`module:name` / `path/file.py:name` (a Task, a Task subclass or a function of the options returning one: the import
rule of reward plugins, nanoseek.plugins). A built-in task is its domain code in its own module (items, checks; that
module does not import this one), a Task subclass here, and one line in BUILTIN_TASKS. docs/rl.md#tasks.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import synthetic
from .files import atomic_write_jsonl
from .plugins import import_object
from .rewards import resolve_reward

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

OUTPUT_KINDS = ("text", "image")
PROMPT_FORMATS = ("chat", "r1_zero")
ANSWER_INSTRUCTION = " Give the final answer in <answer> </answer> tags."
# R1 paper, table 1: the R1-Zero prompt (quoted in /work/shared/REFERENCE.md), for base models
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

Verifier = Callable[[dict[str, Any], Any], float]


class Task:
    """The base of every task. A subclass sets the class attributes it changes and implements `items` and `verify`
    (and `normalize` when the base rule, the whitespace-collapsed `<answer>` content, does not fit)."""

    name: str = "task"
    output: str = "text"  # what `verify` and `normalize` receive: "text" (str) | "image" (PIL.Image.Image)
    rewards: tuple[tuple[str, float], ...] = ()  # default GRPO rewards: (spec, weight)
    held_out: bool = False  # items("test") never shares a problem with items("train")
    required: tuple[str, ...] = ()  # item columns the verifier reads (check_items: before any compute)
    instruction: str = ANSWER_INSTRUCTION  # appended to the prompt in the chat format
    formats: tuple[str, ...] = PROMPT_FORMATS

    # ---- items -------------------------------------------------------------------------------------------------

    @property
    def size(self) -> int | None:
        """How many items a fixed set has; None when items are generated on demand (then `n` is required)."""
        return None

    def items(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        """`n` items of `split` ("train" | "test"; None: all of a fixed set), each with an `id`, a `prompt` (or a
        `messages` conversation) and the columns the verifier and reward functions read; deterministic in
        (split, n, seed)."""
        raise NotImplementedError

    def check_items(self, items: list[dict[str, Any]]) -> None:
        """Raise a ValueError naming the first item the verifier cannot grade (a required column is missing)."""
        for it in items:
            for col in self.required:
                if it.get(col) is None:
                    raise ValueError(f"task {self.name}: item {it.get('id')!r} has no {col!r} column, which its "
                                     f"verifier ({self.verifier_name}) grades against")

    def require_output(self, kind: str, stage: str) -> None:
        """A clear error, before any compute, when `stage` (which handles `kind` outputs only) gets another task."""
        if self.output != kind:
            raise ValueError(f"task {self.name} is checked on {self.output} outputs, and {stage} produces {kind}")

    # ---- prompts -----------------------------------------------------------------------------------------------

    def messages(self, item: dict[str, Any], instruction: bool = True) -> list[dict[str, Any]]:
        """The chat format's conversation: the item's prompt as the user turn (+ the instruction, unless the prompt
        already asks for `<answer>` tags), or the item's own `messages` without a trailing assistant turn."""
        if isinstance(item.get("messages"), list):
            msgs = [dict(m) for m in item["messages"]]
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
            if not msgs:
                raise ValueError(f"item {item.get('id')!r}: 'messages' has no user turn")
            return msgs
        content = item["prompt"]
        if instruction and self.instruction and "<answer>" not in content:
            content += self.instruction
        return [{"role": "user", "content": content}]

    def plain_prompt(self, item: dict[str, Any]) -> str:
        """The r1_zero format's text: R1-Zero's template around the prompt (R1 paper, table 1)."""
        if not isinstance(item.get("prompt"), str):
            raise ValueError(f"item {item.get('id')!r}: the r1_zero format needs a 'prompt' string")
        return R1_ZERO_TEMPLATE.format(prompt=item["prompt"])

    def encode_prompt(self, item: dict[str, Any], tokenizer: Tokenizer, fmt: str) -> list[int]:
        """The prompt's token ids in format `fmt`: `chat` renders `messages` with the tokenizer's chat template and
        its generation prompt (R1's ends in `<think>\\n`); `r1_zero` is `plain_prompt` after BOS."""
        if fmt not in self.formats:
            raise ValueError(f"prompt format {fmt!r} is not one of task {self.name}'s ({', '.join(self.formats)})")
        if fmt == "chat":
            return tokenizer.encode_chat(self.messages(item), add_generation_prompt=True)
        return tokenizer.encode(self.plain_prompt(item), add_bos=True)

    def sft_messages(self, item: dict[str, Any], answer_tags: bool = True,
                     system: str | None = None) -> list[dict[str, Any]]:
        """A training chat: the chat format's user turn, then the assistant's `reasoning_content` (the item's
        reference reasoning) and `<answer>...</answer>` content (the bare answer with answer_tags=False)."""
        if "reasoning" not in item:
            raise ValueError(f"item {item.get('id')!r} of task {self.name} has no reference reasoning to train on")
        head = [{"role": "system", "content": system}] if system else []
        answer = f"<answer>{item['answer']}</answer>" if answer_tags else item["answer"]
        return head + self.messages(item, instruction=answer_tags) + [
            {"role": "assistant", "reasoning_content": item["reasoning"], "content": answer}]

    # ---- checking ----------------------------------------------------------------------------------------------

    @property
    def verifier_name(self) -> str:
        """What the verifier is called in logs and statistics (distill's stats.json)."""
        return self.name

    def verify(self, item: dict[str, Any], output: Any) -> float:
        """The score of `output` (of kind `self.output`) for `item`, in [0, 1]; NaN when it cannot be checked."""
        raise NotImplementedError

    def correct(self, item: dict[str, Any], output: Any) -> bool:
        return self.verify(item, output) >= 1.0  # NaN (unverifiable) is not correct

    def group(self, item: dict[str, Any]) -> str | None:
        """The group an item is reported under (GenEval's categories, a question's kind): eval adds each group's
        accuracy with a Wilson interval. None: no groups."""
        return None

    def normalize(self, output: Any) -> str | None:
        """The comparable answer of an output, for majority voting; None: no answer (never the majority). Text:
        the last `<answer>` after the reasoning, whitespace collapsed; images: None unless the task says."""
        if self.output != "text":
            return None
        answer = synthetic.extract_answer(output)
        return None if answer is None else " ".join(answer.split())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.output} output)>"


# ------------------------------------------------------------------------------------------------------------
# built-in tasks: nanoseek.synthetic's generators


class SyntheticTask(Task):
    """Generated problems with a reference chain of thought: endless, a hash-based held-out split, options = the
    generator's difficulty keywords (synthetic.iter_items: max_digits, mul_digits, ...)."""

    held_out = True

    def __init__(self, **options: Any) -> None:
        known = [p.name for p in inspect.signature(synthetic.iter_items).parameters.values()
                 if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"task {self.name} has no option {unknown[0]!r} (options: {', '.join(known)})")
        self.options = options

    def items(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        if n is None:
            raise ValueError(f"task {self.name} generates its items: give how many (n)")
        return synthetic.generate(self.name, n, split, seed, **self.options)


class ArithmeticTask(SyntheticTask):
    name = "arithmetic"
    rewards = (("arithmetic", 1.0), ("format", 0.5))

    def verify(self, item: dict[str, Any], output: str) -> float:
        return synthetic.verify_arithmetic(item, output)

    def normalize(self, output: str) -> str | None:
        value = synthetic.arithmetic_answer(output)  # the verifier's reading: `5,222` and `5222` vote together
        return None if value is None else str(value)


class CountdownTask(SyntheticTask):
    name = "countdown"
    rewards = (("countdown", 1.0), ("format", 0.1))  # TinyZero's reward already includes its 0.1 format credit

    def verify(self, item: dict[str, Any], output: str) -> float:
        return synthetic.verify_countdown(item, output)


# ------------------------------------------------------------------------------------------------------------
# JSONL files


def reward_verifier(spec: str) -> Verifier:
    """A TRL-style reward function (a nanoseek.rewards built-in, `module:fn` or `file.py:fn`) as the verifier of one
    item: the item's columns other than its prompt are the reward's keyword arguments. math-verify on an item
    without an `answer` is NaN (nothing to check against)."""
    fn = resolve_reward(spec)  # import errors now, before any compute

    def verify(item: dict[str, Any], output: Any) -> float:
        if spec == "math_verify" and item.get("answer") is None:
            return math.nan
        columns = {k: [v] for k, v in item.items() if k not in ("prompt", "messages")}
        prompt = item.get("prompt") or json.dumps(item.get("messages"), ensure_ascii=False)
        return float(fn([output], prompts=[prompt], **columns)[0])

    return verify


class JsonlTask(Task):
    """The rows of a JSONL file (a GSM8K/MATH-style set): each has a `prompt` string or a `messages` conversation,
    and an `answer` to be graded, by math-verify on the `<answer>` content (or the text after `</think>`). Every
    other column is passed to reward functions. Ids default to `<file stem>-<line>` and must be unique (they are
    resume keys and what paired comparisons match). A file is one set of items, whatever the split asked for."""

    rewards = (("math_verify", 1.0), ("format", 0.5))
    required = ("answer",)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self.rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str)
                                                     or isinstance(row.get("messages"), list)):
                    raise ValueError(f"{where}: missing the 'prompt' column (each row needs a 'prompt' string or a "
                                     "'messages' list, and an 'answer' to be graded)")
                row["id"] = str(row.get("id", f"{self.path.stem}-{lineno}"))
                if row["id"] in seen:
                    raise ValueError(f"{where}: duplicate id {row['id']!r} (ids are the resume keys)")
                seen.add(row["id"])
                self.rows.append(row)
        if not self.rows:
            raise ValueError(f"task file {self.path} has no rows")
        self._verify = reward_verifier("math_verify")

    @property
    def size(self) -> int:
        return len(self.rows)

    def items(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows[:n]]

    @property
    def verifier_name(self) -> str:
        return "math_verify"

    def verify(self, item: dict[str, Any], output: str) -> float:
        return self._verify(item, output)


# ------------------------------------------------------------------------------------------------------------
# built-in tasks: the shapes world of the mini Janus (nanoseek.shapes: items, scenes and the verifier)


class ShapesTask(Task):
    """A task on the shapes world (docs/janus.md "Mini Janus"): options `world` = a world.json or a directory
    holding one (default: the default world, 32 x 32). Items are generated, the test split on held-out
    colour-shape pairings (composition-disjoint from training)."""

    held_out = True
    instruction = ""  # Janus' own prompt formats, no <answer> tags
    formats = ("chat",)

    def __init__(self, world: str | os.PathLike | None = None) -> None:
        from . import shapes

        self.world = shapes.load_config(world)

    def group(self, item: dict[str, Any]) -> str | None:
        return item.get("category")

    def scenes(self, split: str, n: int | None, seed: int) -> list[dict[str, Any]]:
        from . import shapes

        if n is None:
            raise ValueError(f"task {self.name} generates its items: give how many (n)")
        return shapes.make_items(self.world, split, n, seed)


class ShapesGenevalTask(ShapesTask):
    """Text-to-image, scored GenEval-style (Ghosh et al. 2023): a prompt in one of six categories, an image,
    nanoseek.shapes' rule-based detector checking the prompt's requirement. Items come in the categories' order, so
    n = 6k gives k of each."""

    name = "shapes-geneval"
    output = "image"
    required = ("requirement", "category")

    def items(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        return self.scenes(split, n, seed)

    @property
    def verifier_name(self) -> str:
        return "shapes.score_image"

    def verify(self, item: dict[str, Any], output: Any) -> float:
        from . import shapes

        return 1.0 if shapes.score_image(item["requirement"], output, self.world)["correct"] else 0.0


NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                 "eight", "nine"))}


class ShapesVQATask(ShapesTask):
    """Questions about a picture of the world with one-word answers (how many X, what colour is the X, is X left of
    Y), each item one question about one scene (its `objects`, rendered by `image`); grouped by kind."""

    name = "shapes-vqa"
    output = "text"
    required = ("answer", "objects")

    def items(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        # every scene has >= 1 question, so n scenes hold >= n questions (make_items extends a shorter list)
        out = []
        for sc in self.scenes(split, n, seed):
            for q in sc["questions"]:
                out.append({"id": f"{sc['id']}-{q['kind']}", "prompt": q["question"], "answer": q["answer"],
                            "kind": q["kind"], "category": sc["category"], "objects": sc["objects"],
                            "scene": sc["id"]})
        return out[:n]

    def group(self, item: dict[str, Any]) -> str | None:
        return item.get("kind")

    def image(self, item: dict[str, Any]) -> Any:
        """The item's picture, (S, S, 3) uint8."""
        from . import shapes

        return shapes.render(item["objects"], self.world)

    def normalize(self, output: str) -> str | None:
        """The first word, lower-case, without punctuation, number words as digits ("Two." -> "2")."""
        words = output.strip().lower().split()
        if not words:
            return None
        w = words[0].strip(".,!?;:'\"")
        return NUMBER_WORDS.get(w, w) or None

    def verify(self, item: dict[str, Any], output: str) -> float:
        return 1.0 if self.normalize(output) == str(item["answer"]).lower() else 0.0


# ------------------------------------------------------------------------------------------------------------
# the registry

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "shapes-geneval": ShapesGenevalTask,
    "shapes-vqa": ShapesVQATask,
}


def task_names() -> list[str]:
    """The built-in tasks' names."""
    return list(BUILTIN_TASKS)


def _known() -> str:
    return f"a built-in task ({', '.join(task_names())})"


def get_task(name: str, **options: Any) -> Task:
    """The task `name` means: a built-in task (`options` are its settings, e.g. arithmetic's max_digits), a JSONL
    file (no options), or a plugin `module:name` / `path/file.py:name` naming a Task (no options), or a Task
    subclass or function that `options` are passed to. Errors name the known tasks."""
    if name in BUILTIN_TASKS:
        task = BUILTIN_TASKS[name](**options)
    elif Path(name).is_file():
        if options:
            raise ValueError(f"task file {name} takes no options (got {', '.join(sorted(options))})")
        task = JsonlTask(name)
    elif ":" in name:
        obj = import_object(name, "task")
        if obj is None:
            mod_name, attr = name.rsplit(":", 1)
            raise ValueError(f"task module {mod_name!r} has no {attr!r}")
        if isinstance(obj, Task):
            if options:
                raise ValueError(f"task {name} is a Task object and takes no options (got {', '.join(options)})")
            task = obj
        elif callable(obj):
            task = obj(**options)
        else:
            raise ValueError(f"task plugin {name} is neither a Task nor a function returning one")
    elif name.endswith(".jsonl") or os.sep in name:
        raise FileNotFoundError(f"task file {name} does not exist (and {name!r} is neither {_known()} nor a plugin "
                                "`module:name`)")
    else:
        raise ValueError(f"task {name!r} is neither {_known()} nor a JSONL file nor a plugin `module:name` / "
                         "`file.py:name`")
    if not isinstance(task, Task):
        raise ValueError(f"task plugin {name} returned {type(task).__name__}, not a nanoseek.tasks.Task")
    if task.output not in OUTPUT_KINDS:
        raise ValueError(f"task {task.name} declares output {task.output!r}, not one of {OUTPUT_KINDS}")
    return task


# ------------------------------------------------------------------------------------------------------------
# `nanoseek data synth`


def synth(task: str, n: int, split: str, seed: int, out: str | os.PathLike, fmt: str = "item") -> Path:
    """Writes `n` items of a task as JSONL: raw items (`item`, for RL and eval), `{"text"}` records (`text`,
    synthetic.to_text: pretraining) or `{"messages"}` (`chat`, sft_messages: SFT)."""
    if fmt not in ("item", "text", "chat"):
        raise ValueError(f"format must be 'item', 'text' or 'chat', got {fmt!r}")
    t = get_task(task)
    items = t.items(split, n, seed)
    if fmt != "item" and items and "reasoning" not in items[0]:
        raise ValueError(f"task {t.name} has no reference reasoning: only the 'item' format")

    def record(item: dict[str, Any]) -> dict[str, Any]:
        if fmt == "text":
            return {"id": item["id"], "text": synthetic.to_text(item)}
        if fmt == "chat":
            return {"id": item["id"], "messages": t.sft_messages(item)}
        return item

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_jsonl(out, map(record, items))

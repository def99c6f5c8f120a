"""Synthetic reasoning tasks with verifiable answers: multi-digit arithmetic and Countdown (as in TinyZero).

No downloads: every item comes from a seeded generator, with a step-by-step chain of thought and an answer a rule
can check (R1-Zero is trained on rule-based rewards only). The train/test split is a function of the problem itself
(a hash), so the two splits never share a problem whatever the seed or size. Formats, samples and the verifier rules
are in docs/data.md. This module is the generators and the checking rules; the tasks built on them (prompt formats,
which verifier, default rewards, the registry) are in nanoseek/tasks.py.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from .reasoning import split as split_reasoning

TASKS = ("arithmetic", "countdown")  # what iter_items generates (the registry of tasks is tasks.BUILTIN_TASKS)
TEST_PERMILLE = 100  # 10 % of all problems are held out
_COLUMNS = ("ones", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands", "millions")


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_of(key: str) -> str:
    """'test' or 'train', from a hash of the problem's canonical key (never from its position)."""
    return "test" if int(_digest("split:" + key)[:8], 16) % 1000 < TEST_PERMILLE else "train"


def _column(i: int) -> str:
    return _COLUMNS[i] if i < len(_COLUMNS) else f"column {i + 1}"


# ---- arithmetic ----------------------------------------------------------------------------------------------


def _add_steps(a: int, b: int) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [f"Add {a} + {b} column by column from the right, carrying tens."], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{_column(i)}: {x} + {y}{f' + {carry}' if carry else ''} = {s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        steps.append(f"the last carry {carry} is the leading digit")
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    if a < b:
        return [f"{a} is smaller than {b}, so compute {b} - {a} and make it negative."] + _sub_steps(b, a)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [f"Subtract {a} - {b} column by column from the right, borrowing when needed."], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        v = x - y - borrow
        line = f"{_column(i)}: {x} - {y}{' - 1 (borrowed)' if borrow else ''} = {v}"
        borrow = int(v < 0)
        if borrow:
            v += 10
            line += f", borrow 10: {v}"
        steps.append(line + f", write {v}")
    if len(str(a - b)) < len(da):
        steps.append(f"drop the leading zeros: {a - b}")
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    steps, partials = [f"Multiply {a} by each digit of {b} from the right, then add the shifted products."], []
    for i, d in enumerate(str(b)[::-1]):
        d = int(d)
        parts, carry = [], 0
        for x in str(a)[::-1]:
            p = int(x) * d + carry
            parts.append(f"{x}*{d}{f'+{carry}' if carry else ''}={p}")
            carry = p // 10
        shifted = a * d * 10**i
        steps.append(f"{a} * {d}: {', '.join(parts)}, so {a * d}" + (f", shifted: {shifted}" if i else ""))
        partials.append(shifted)
    if len(partials) > 1:
        steps.append(f"add: {' + '.join(map(str, partials))} = {sum(partials)}")
    return steps


def _arithmetic_item(rng: random.Random, max_digits: int, mul_digits: tuple[int, int]) -> dict[str, Any]:
    def number(digits: int) -> int:
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    op = rng.choice(("add", "sub", "mul"))
    if op == "mul":
        a, b = number(rng.randint(1, mul_digits[0])), number(rng.randint(1, mul_digits[1]))
    else:
        a, b = number(rng.randint(1, max_digits)), number(rng.randint(1, max_digits))
    sym, value = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("*", a * b)}[op]
    steps = {"add": _add_steps, "sub": _sub_steps, "mul": _mul_steps}[op](a, b)
    steps.append(f"So {a} {sym} {b} = {value}.")
    key = f"arithmetic:{op}:{a}:{b}"
    return {"id": "ar-" + _digest(key)[:12], "task": "arithmetic", "prompt": f"What is {a} {sym} {b}?",
            "reasoning": "\n".join(steps), "answer": str(value), "op": op, "a": a, "b": b, "_key": key}


# ---- countdown -----------------------------------------------------------------------------------------------


def _countdown_item(rng: random.Random, sizes: tuple[int, ...], max_number: int,
                    max_target: int) -> dict[str, Any] | None:
    numbers = [rng.randint(1, max_number) for _ in range(rng.choice(sizes))]
    order = rng.sample(numbers, len(numbers))
    value, expr, last_op, steps = order[0], str(order[0]), "", []
    for n in order[1:]:  # a left fold keeps every intermediate a positive integer
        op = rng.choice("+-*/")
        if op == "-" and value - n <= 0 or op == "/" and value % n:
            return None
        new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
        steps.append(f"{value} {op} {n} = {new}")
        expr = f"({expr}) {op} {n}" if op in "*/" and last_op in ("+", "-") else f"{expr} {op} {n}"
        value, last_op = new, op
    if not 1 <= value <= max_target:
        return None
    key = f"countdown:{','.join(map(str, sorted(numbers)))}:{value}"
    reasoning = "\n".join([f"Numbers: {', '.join(map(str, numbers))}. Target: {value}.",
                           "Combine them one at a time, keeping every intermediate result a positive integer.",
                           *steps, f"Check: {expr} = {value}, and each number is used exactly once."])
    prompt = (f"Using the numbers {numbers}, create an equation that equals {value}. You can use +, -, * and /, and "
              "each number exactly once.")
    return {"id": "cd-" + _digest(key)[:12], "task": "countdown", "prompt": prompt, "reasoning": reasoning,
            "answer": expr, "numbers": numbers, "target": value, "_key": key}


# ---- generation ----------------------------------------------------------------------------------------------


def iter_items(task: str, split: str = "train", seed: int = 0, *, max_digits: int = 4,
               mul_digits: tuple[int, int] = (3, 2), countdown_sizes: tuple[int, ...] = (3, 4),
               max_number: int = 99, max_target: int = 100) -> Iterator[dict[str, Any]]:
    """An endless stream of distinct problems of one split, deterministic in (task, split, seed)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"nanoseek:{task}:{seed}")
    seen: set[str] = set()
    misses = 0
    while True:
        if task == "arithmetic":
            item = _arithmetic_item(rng, max_digits, mul_digits)
        else:
            item = _countdown_item(rng, countdown_sizes, max_number, max_target)
        if item is None or item["_key"] in seen or split_of(item["_key"]) != split:
            misses += 1
            if misses > 100_000 + 100 * len(seen):
                raise ValueError(f"only {len(seen)} distinct {task} problems found for split {split!r}; "
                                 "allow larger numbers to get more")
            continue
        seen.add(item.pop("_key"))
        yield item


def generate(task: str, n: int, split: str = "train", seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """`n` distinct items: {"id", "task", "prompt", "reasoning", "answer"} + the problem's fields."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_items(task, split, seed, **kwargs)
    return [next(stream) for _ in range(n)]


def to_text(item: dict[str, Any]) -> str:
    """Plain pretraining text (no blank lines, so a .txt of items splits back into one document per item)."""
    return f"Question: {item['prompt']}\nReasoning:\n{item['reasoning']}\nAnswer: {item['answer']}"


# ---- verifiers -----------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_INT = re.compile(r"([-+]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.0*)?")
_LAST_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?![\d,])|-?\d+")
_EQUATION_CHARS = re.compile(r"[\d\s+\-*/()]+")


def extract_answer(completion: str) -> str | None:
    """The last <answer>...</answer> in the answer (after the reasoning, by the one reasoning split)."""
    found = _ANSWER.findall(split_reasoning(completion).answer)
    return found[-1].strip() if found else None


def _parse_int(text: str) -> int | None:
    m = _INT.fullmatch(text.strip())
    return None if m is None else int(m.group(1) + m.group(2).replace(",", ""))


def arithmetic_answer(completion: str) -> int | None:
    """The integer a completion answers: from <answer> tags, or else the last number after the reasoning."""
    answer = extract_answer(completion)
    if answer is None:
        numbers = _LAST_NUMBER.findall(split_reasoning(completion).answer)
        answer = numbers[-1] if numbers else ""
    return _parse_int(answer)


def verify_arithmetic(item: dict[str, Any], completion: str) -> float:
    """1.0 for the exact integer (see arithmetic_answer); 0.0 otherwise."""
    value = arithmetic_answer(completion)
    return 1.0 if value is not None and value == int(item["answer"]) else 0.0


def safe_eval(expression: str) -> tuple[Fraction, list[int]] | None:
    """Value and integer literals of + - * / ( ) arithmetic, parsed with `ast` (never `eval`); None if invalid."""
    if len(expression) > 256 or not _EQUATION_CHARS.fullmatch(expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used: list[int] = []
    ops = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
           ast.Div: lambda x, y: x / y}

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))  # Fraction: exact; x / 0 raises
        raise ValueError(f"disallowed syntax {type(node).__name__}")

    try:
        return ev(tree.body), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def verify_countdown(item: dict[str, Any], completion: str) -> float:
    """TinyZero's reward: 0 without <answer> tags; 0.1 with them but a wrong/invalid equation; 1.0 when the
    equation uses every given number exactly once (no other numbers) and equals the target. `lhs = rhs` is judged
    on lhs."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    result = safe_eval(answer.split("=", 1)[0])
    if result is None:
        return 0.1
    value, used = result
    if Counter(used) != Counter(item["numbers"]) or value != item["target"]:
        return 0.1
    return 1.0


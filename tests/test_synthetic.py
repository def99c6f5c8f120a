"""Synthetic tasks: deterministic, disjoint splits, correct chains of thought, and strict, safe verifiers."""

import json

import pytest

from nanoseek import synthetic as S
from nanoseek.cli import main
from nanoseek.tasks import ANSWER_INSTRUCTION, get_task

COUNTDOWN = {"id": "cd-hand", "task": "countdown", "numbers": [3, 7, 25, 50], "target": 75}
ARITH = {"id": "ar-hand", "task": "arithmetic", "answer": "5222"}


@pytest.mark.parametrize("task", S.TASKS)
def test_generation_is_deterministic_and_splits_never_overlap(task):
    a = S.generate(task, 300, "train", seed=3)
    assert a == S.generate(task, 300, "train", seed=3)
    assert a != S.generate(task, 300, "train", seed=4)
    assert len({i["id"] for i in a}) == 300  # distinct problems
    train = {i["id"] for seed in (0, 1) for i in S.generate(task, 1500, "train", seed)}
    test = {i["id"] for seed in (0, 1) for i in S.generate(task, 150, "test", seed)}
    assert not train & test  # by problem hash, whatever the seed
    for item in a[:20]:
        assert set(item) >= {"id", "task", "prompt", "reasoning", "answer"} and item["task"] == task


@pytest.mark.parametrize("task", S.TASKS)
def test_every_generated_answer_is_correct(task):
    for item in S.generate(task, 500, "train", seed=5):
        completion = f"<think>\n{item['reasoning']}\n</think>\n\n<answer>{item['answer']}</answer>"
        assert get_task(task).verify(item, completion) == 1.0, item
        if task == "arithmetic":
            a, b = item["a"], item["b"]
            assert int(item["answer"]) == {"add": a + b, "sub": a - b, "mul": a * b}[item["op"]]
            assert item["reasoning"].endswith(f"= {item['answer']}.")
        else:
            assert 1 <= item["target"] <= 100 and len(item["numbers"]) in (3, 4)
            assert item["reasoning"].splitlines()[-1].startswith(f"Check: {item['answer']} = {item['target']}")


def test_column_arithmetic_is_written_out():
    assert S._add_steps(4827, 395) == [
        "Add 4827 + 395 column by column from the right, carrying tens.",
        "ones: 7 + 5 = 12, write 2, carry 1",
        "tens: 2 + 9 + 1 = 12, write 2, carry 1",
        "hundreds: 8 + 3 + 1 = 12, write 2, carry 1",
        "thousands: 4 + 0 + 1 = 5, write 5, carry 0",
    ]
    assert S._sub_steps(402, 7) == [
        "Subtract 402 - 7 column by column from the right, borrowing when needed.",
        "ones: 2 - 7 = -5, borrow 10: 5, write 5",
        "tens: 0 - 0 - 1 (borrowed) = -1, borrow 10: 9, write 9",
        "hundreds: 4 - 0 - 1 (borrowed) = 3, write 3",
    ]
    assert S._sub_steps(5, 12)[0] == "5 is smaller than 12, so compute 12 - 5 and make it negative."
    assert S._sub_steps(100, 98)[-1] == "drop the leading zeros: 2"
    assert S._mul_steps(67, 38) == [
        "Multiply 67 by each digit of 38 from the right, then add the shifted products.",
        "67 * 8: 7*8=56, 6*8+5=53, so 536",
        "67 * 3: 7*3=21, 6*3+2=20, so 201, shifted: 2010",
        "add: 536 + 2010 = 2546",
    ]


def test_renderings():
    item = S.generate("countdown", 1, seed=0)[0]
    text = S.to_text(item)
    assert "\n\n" not in text and text.startswith(f"Question: {item['prompt']}\nReasoning:\n")
    assert text.endswith(f"\nAnswer: {item['answer']}")
    task = get_task("countdown")
    user, assistant = task.sft_messages(item)
    assert user == {"role": "user", "content": item["prompt"] + ANSWER_INSTRUCTION}
    assert assistant == {"role": "assistant", "reasoning_content": item["reasoning"],
                         "content": f"<answer>{item['answer']}</answer>"}
    terse = task.sft_messages(item, answer_tags=False, system="Be terse.")
    assert terse[1]["content"] == item["prompt"] and terse[2]["content"] == item["answer"]
    assert task.plain_prompt(item).endswith(f"User: {item['prompt']}. Assistant:")


@pytest.mark.parametrize("completion, reward", [
    ("<think>\n...\n</think>\n\n<answer>5222</answer>", 1.0),
    ("<answer> 5,222 </answer>", 1.0),
    ("<answer>5222.0</answer>", 1.0),
    ("so the sum is 5222.", 1.0),  # no tags: the last number
    ("<think>\nit is 5222\n</think>\n\nthe answer is 5221", 0.0),  # numbers in the reasoning do not count
    ("<think><answer>5222</answer></think>", 0.0),
    ("<answer>5222</answer> wait, <answer>5221</answer>", 0.0),  # the last answer counts
    ("<answer>5222 or 5223</answer>", 0.0),
    ("<answer>52 22</answer>", 0.0),
    ("<answer>5,22,2</answer>", 0.0),
    ("", 0.0),
])
def test_verify_arithmetic(completion, reward):
    assert S.verify_arithmetic(ARITH, completion) == reward


def test_verify_arithmetic_negative_answers():
    assert S.verify_arithmetic({"answer": "-12"}, "<answer>-12</answer>") == 1.0
    assert S.verify_arithmetic({"answer": "-12"}, "<answer>12</answer>") == 0.0
    assert S.verify_arithmetic({"answer": "-12"}, "it is -12") == 1.0


@pytest.mark.parametrize("completion, reward", [
    ("<think>25*7 = 175, +50 = 225, /3 = 75</think>\n<answer>(25 * 7 + 50) / 3</answer>", 1.0),
    ("<answer>(50 + 7 * 25) / 3 = 75</answer>", 1.0),  # `lhs = rhs` is judged on lhs
    ("<answer>(25*7+50)/3</answer>", 1.0),
    ("(25 * 7 + 50) / 3", 0.0),  # right equation, no answer format
    ("<answer>50 + 25</answer>", 0.1),  # hits 75 but leaves numbers unused
    ("<answer>(25 * 7 + 50) / 3 + 0</answer>", 0.1),  # a number that was not given
    ("<answer>(25 * 7 + 50 + 3 - 3) / 3</answer>", 0.1),  # 3 used twice
    ("<answer>(25 * 7 + 50) // 3</answer>", 0.1),  # floor division is not allowed
    ("<answer>(25 * 7 + 50) / 3 ** 1</answer>", 0.1),  # nor powers
    ("<answer>(25 * 7 + 50) / 3.0</answer>", 0.1),  # nor decimals
    ("<answer>(25 * 7 + 50) / (3 - 3)</answer>", 0.1),  # division by zero
    ("<answer>__import__('os').system('echo pwned')</answer>", 0.1),  # never evaluated
    ("<answer>" + "(" * 200 + "3" + ")" * 200 + "</answer>", 0.1),
    ("<answer>(25 * 7 + 50) / 3 if 1 else 0</answer>", 0.1),
    ("<answer>075</answer>", 0.1),
    ("<answer></answer>", 0.1),
    ("<answer>(25 * 7 + 50) / 3", 0.0),  # unclosed tag: no format
])
def test_verify_countdown(completion, reward):
    assert S.verify_countdown(COUNTDOWN, completion) == reward


def test_safe_eval_is_exact():
    assert S.safe_eval("7 / 2 * 2") == (7, [7, 2, 2])  # Fractions: no float rounding
    assert S.safe_eval("-(3 - 7)") == (4, [3, 7])
    assert S.safe_eval("1 + x") is None


def test_errors_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        S.generate("poetry", 1)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        S.generate("countdown", 1, split="val")
    with pytest.raises(ValueError, match="only .* distinct arithmetic problems"):
        S.generate("arithmetic", 1000, max_digits=1, mul_digits=(1, 1))  # at most 300 one-digit problems exist
    out = tmp_path / "cd.jsonl"
    assert main(["data", "synth", "--task", "countdown", "--n", "5", "--split", "test", "--seed", "2",
                 "--out", str(out), "--format", "chat"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    items = S.generate("countdown", 5, "test", 2)
    assert [r["messages"] for r in records] == [get_task("countdown").sft_messages(i) for i in items]
    assert main(["data", "synth", "--task", "arithmetic", "--n", "3", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == S.generate("arithmetic", 3)
    assert not list(tmp_path.glob(".*tmp*"))

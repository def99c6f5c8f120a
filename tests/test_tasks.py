"""Tasks (nanoseek/tasks.py): the registry and its errors, JSONL tasks, prompt formats, each built-in task's verifier
and normaliser, plugin tasks, and a task whose output is an image going through the registry and eval."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from nanoseek import synthetic
from nanoseek.eval import EvalConfig, evaluate
from nanoseek.rl import RLConfig, rl
from nanoseek.tasks import ANSWER_INSTRUCTION, R1_ZERO_TEMPLATE, JsonlTask, Task, get_task, synth, task_names

PLUGINS = Path(__file__).with_name("task_plugins.py")


# ------------------------------------------------------------------------------------------------------------
# the registry


def test_registry_names_and_errors_that_name_the_known_tasks(tmp_path):
    assert task_names() == ["arithmetic", "countdown", "shapes-geneval", "shapes-vqa"]
    for name in task_names():
        task = get_task(name)
        output = "image" if name == "shapes-geneval" else "text"  # the mini Janus' text-to-image task
        assert isinstance(task, Task) and task.name == name and task.output == output and task.held_out
    with pytest.raises(ValueError, match=r"task 'poetry' is neither a built-in task \(arithmetic, countdown, "
                                         r"shapes-geneval, shapes-vqa\)"):
        get_task("poetry")
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist .*neither a built-in task"):
        get_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="task arithmetic has no option 'digits' .*max_digits"):
        get_task("arithmetic", digits=3)  # a typo fails before any item is drawn
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    with pytest.raises(ValueError, match="takes no options"):
        get_task(str(f), max_digits=2)


def test_builtin_items_are_the_generators_and_options_reach_them():
    task = get_task("arithmetic", max_digits=2, mul_digits=(2, 1))
    items = task.items("test", 20, seed=3)
    assert items == synthetic.generate("arithmetic", 20, "test", 3, max_digits=2, mul_digits=(2, 1))
    assert all(abs(it["a"]) < 100 and abs(it["b"]) < 100 for it in items)
    assert not {i["id"] for i in task.items("train", 300)} & {i["id"] for i in task.items("test", 100)}
    assert task.size is None
    with pytest.raises(ValueError, match="give how many"):
        task.items("train")
    assert get_task("arithmetic").rewards == (("arithmetic", 1.0), ("format", 0.5))
    assert get_task("countdown").rewards == (("countdown", 1.0), ("format", 0.1))  # TinyZero's 0.1 is in the reward


# ------------------------------------------------------------------------------------------------------------
# prompt formats


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nanoseek.data import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text("\n\n".join(synthetic.to_text(it) for it in synthetic.generate("arithmetic", 100)))
    return train_tokenizer([d / "c.txt"], 300, d / "tok")


def test_prompt_formats(tok):
    task = get_task("arithmetic")
    item = task.items("test", 1)[0]
    chat = tok.decode(task.encode_prompt(item, tok, "chat"))
    # the R1 chat template with its generation prompt (what `nanoseek chat` sends), the <answer> instruction added
    assert chat == (f"<｜begin▁of▁sentence｜><｜User｜>{item['prompt']} Give the final answer in <answer> </answer> "
                    "tags.<｜Assistant｜><think>\n")
    plain = tok.decode(task.encode_prompt(item, tok, "r1_zero"))
    assert plain == "<｜begin▁of▁sentence｜>" + R1_ZERO_TEMPLATE.format(prompt=item["prompt"])
    assert plain.endswith(f"<answer> answer here </answer>. User: {item['prompt']}. Assistant:")
    with pytest.raises(ValueError, match="prompt format 'plain' is not one of task arithmetic's"):
        task.encode_prompt(item, tok, "plain")
    # a prompt that already asks for the tags gets no second instruction; a conversation is sent as it is, without
    # a trailing assistant turn (the answer to be learnt)
    assert task.messages({"prompt": "Put 3 in <answer></answer>."}) == [
        {"role": "user", "content": "Put 3 in <answer></answer>."}]
    assert task.messages({"prompt": "Say 3."}, instruction=False) == [{"role": "user", "content": "Say 3."}]
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    assert task.messages({"messages": convo}) == convo[:2]
    with pytest.raises(ValueError, match="'messages' has no user turn"):
        task.messages({"id": "x", "messages": convo[2:]})
    with pytest.raises(ValueError, match="r1_zero format needs a 'prompt' string"):
        task.encode_prompt({"id": "x", "messages": convo}, tok, "r1_zero")
    # the SFT conversation: the chat format's user turn, then the reference reasoning and the tagged answer
    user, assistant = task.sft_messages(item)
    assert user == {"role": "user", "content": item["prompt"] + ANSWER_INSTRUCTION}
    assert assistant == {"role": "assistant", "reasoning_content": item["reasoning"],
                         "content": f"<answer>{item['answer']}</answer>"}


# ------------------------------------------------------------------------------------------------------------
# verifiers and normalisers


def _r1(answer: str) -> str:
    return f"<think>\nsome work\n</think>\n\n{answer}"


def test_arithmetic_verifier_and_normaliser():
    task = get_task("arithmetic")
    item = {"id": "h", "answer": "5222"}
    assert task.verify(item, _r1("<answer> 5,222 </answer>")) == 1.0
    assert task.correct(item, _r1("<answer>5222</answer>"))
    assert task.verify(item, _r1("<answer>5221</answer>")) == 0.0
    # the normaliser reads what the verifier reads: separators, a .0 tail and an untagged last number vote together
    assert {task.normalize(_r1(a)) for a in ("<answer>5,222</answer>", "<answer>5222.0</answer>", "so 5222")} \
        == {"5222"}
    assert task.normalize(_r1("<answer>-12</answer>")) == "-12"
    assert task.normalize(_r1("no number")) is None
    assert task.normalize("<think>\nit is 5222\n</think>\n\nno idea") is None  # the reasoning does not count


def test_countdown_verifier_and_normaliser():
    task = get_task("countdown")
    item = {"id": "h", "numbers": [3, 7, 25, 50], "target": 75}
    assert task.verify(item, _r1("<answer>(25 * 7 + 50) / 3</answer>")) == 1.0
    assert task.verify(item, _r1("<answer>50 + 25</answer>")) == 0.1  # TinyZero's format credit: not correct
    assert not task.correct(item, _r1("<answer>50 + 25</answer>"))
    assert task.verify(item, _r1("(25 * 7 + 50) / 3")) == 0.0
    assert task.normalize(_r1("<answer> (25 * 7   + 50) /\n3 </answer>")) == "(25 * 7 + 50) / 3"
    assert task.normalize(_r1("(25 * 7 + 50) / 3")) is None


def test_jsonl_task_round_trip_and_math_verify(tmp_path):
    f = tmp_path / "held.jsonl"
    synth("arithmetic", 5, "test", 2, f)  # `nanoseek data synth` of a built-in task ...
    task = get_task(str(f))  # ... read back as a task
    assert isinstance(task, JsonlTask) and task.name == "held" and task.size == 5 and not task.held_out
    assert task.items() == synthetic.generate("arithmetic", 5, "test", 2) and task.items("test", 2) == task.items()[:2]
    assert task.rewards == (("math_verify", 1.0), ("format", 0.5)) and task.verifier_name == "math_verify"
    synth(str(f), 5, "train", 0, tmp_path / "copy.jsonl")  # any task's items, as they are
    assert get_task(str(tmp_path / "copy.jsonl")).items() == task.items()
    for it in task.items():
        assert task.correct(it, _r1(f"<answer>{it['answer']}</answer>"))
        assert task.verify(it, _r1(f"<answer>{int(it['answer']) + 1}</answer>")) == 0.0
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"prompt": "Half of 1?", "answer": "0.5"}) + "\n\n"
                 + json.dumps({"id": 7, "messages": [{"role": "user", "content": "Say hi."}]}) + "\n")
    task = get_task(str(g))
    rows = task.items()
    assert [r["id"] for r in rows] == ["g-1", "7"]  # ids: `<stem>-<line>` by default, always strings
    assert task.verify(rows[0], _r1("<answer>\\frac{1}{2}</answer>")) == 1.0  # math-verify: 1/2 == 0.5
    assert task.normalize(_r1("<answer>\\frac{1}{2}</answer>")) == "\\frac{1}{2}"
    assert math.isnan(task.verify(rows[1], "hi")) and not task.correct(rows[1], "hi")  # nothing to check against
    with pytest.raises(ValueError, match=r"item '7' has no 'answer' column, which its verifier \(math_verify\)"):
        task.check_items(rows)
    task.check_items(rows[:1])
    with pytest.raises(ValueError, match="task g has no reference reasoning: only the 'item' format"):
        synth(str(g), 2, "train", 0, tmp_path / "chat.jsonl", "chat")  # SFT chats need a reference reasoning


def test_jsonl_task_errors(tmp_path):
    f = tmp_path / "t.jsonl"
    for text, error in [('{"question": "1+1?", "answer": "2"}\n', "t.jsonl:1: missing the 'prompt' column"),
                        ("\n", "has no rows"),
                        ('{"prompt": "a"}\n{"prompt": \n', "t.jsonl:2: not valid JSON"),
                        ('{"id": "a", "prompt": "q"}\n{"id": "a", "prompt": "r"}\n', "t.jsonl:2: duplicate id 'a'")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=error):
            get_task(str(f))


# ------------------------------------------------------------------------------------------------------------
# plugins


def test_plugin_tasks_resolve_like_reward_plugins():
    echo = get_task("tests.task_plugins:ECHO")  # an instance
    assert echo.name == "echo" and echo.items("test") == [
        {"id": f"echo-{w}", "prompt": f"Say {w}.", "answer": w} for w in ("beta", "delta", "zeta")]
    assert echo.correct(echo.items("test")[0], _r1("<answer>beta</answer>"))
    assert get_task("tests.task_plugins:Echo", upper=True).items("train", 1)[0]["answer"] == "ALPHA"  # a class
    assert get_task("tests.task_plugins:shouting_echo").items("train", 1)[0]["answer"] == "ALPHA"  # a function
    assert get_task(f"{PLUGINS}:Echo").name == "echo"  # a file path, as `--reward path/file.py:fn`
    with pytest.raises(ValueError, match="task module 'tests.task_plugins' has no 'nope'"):
        get_task("tests.task_plugins:nope")
    with pytest.raises(ValueError, match="cannot import task module 'no_such_tasks'"):
        get_task("no_such_tasks:T")
    with pytest.raises(ValueError, match="returned int, not a nanoseek.tasks.Task"):
        get_task("tests.task_plugins:not_a_task")
    with pytest.raises(ValueError, match="is a Task object and takes no options"):
        get_task("tests.task_plugins:ECHO", upper=True)
    with pytest.raises(ValueError, match="declares output 'prose'"):
        get_task("tests.task_plugins:Prose")


def test_a_plugin_task_is_evaluated_with_its_own_grader_and_normaliser(tmp_path):
    def sampler(items, k, temperature):  # item i: the first i samples right (shouted: a different answer)
        return [[_r1(f"<answer>{it['answer']}</answer>")] * min(i, k)
                + [_r1(f"<answer>{it['answer'].upper()}</answer>")] * (k - min(i, k)) for i, it in enumerate(items)]

    s = evaluate(EvalConfig(task="tests.task_plugins:ECHO", model="unused", k=2, greedy=False, out=str(tmp_path)),
                 sampler=sampler)
    assert s["n_items"] == 3 and s["pass@1"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert s["cons@2"] == pytest.approx(2 / 3)  # item 1: a 1-1 tie goes to the earliest sample, the right one


# ------------------------------------------------------------------------------------------------------------
# a task whose output is an image


def _square(rgb):
    return Image.new("RGB", (16, 16), rgb)


def test_an_image_output_task_verifies_images_and_goes_through_eval(tmp_path):
    task = get_task("tests.task_plugins:ColorSquares")
    assert task.output == "image" and task_names() == ["arithmetic", "countdown", "shapes-geneval", "shapes-vqa"]
    red, green, blue = _square((230, 20, 30)), _square((10, 200, 40)), _square((0, 0, 255))
    grey = _square((128, 128, 128))
    item = task.items("test")[0]
    assert item["color"] == "red" and task.verify(item, red) == 1.0 and task.verify(item, green) == 0.0
    assert [task.normalize(im) for im in (red, green, blue, grey)] == ["red", "green", "blue", None]
    images = {"red": [red, red, grey], "green": [blue, green, green], "blue": [grey, grey, grey]}

    def sampler(items, k, temperature):  # k images per item; the greedy one is the first
        return [images[it["color"]][:k] for it in items]

    s = evaluate(EvalConfig(task="tests.task_plugins:ColorSquares", model="unused", k=3, out=str(tmp_path)),
                 sampler=sampler)
    assert s["pass@1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert s["cons@3"] == pytest.approx(2 / 3)  # the detected colour's majority: red, green; none for blue
    assert s["greedy"] == pytest.approx(1 / 3)  # red's first image only
    rows = [json.loads(x) for x in (tmp_path / "items.jsonl").read_text().splitlines()]  # images are not JSON
    assert [r["answers"] for r in rows] == [["red", "red", None], ["blue", "green", "green"], [None] * 3]
    assert "samples" not in rows[0] and rows[1]["majority_answer"] == "green"


def test_text_stages_refuse_an_image_task_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="color-squares is checked on image outputs, and a local language model"):
        evaluate(EvalConfig(task="tests.task_plugins:ColorSquares", model=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="checked on image outputs, and GRPO produces text"):
        rl(RLConfig(model=str(tmp_path / "none"), task="tests.task_plugins:ColorSquares", out=str(tmp_path / "o")))
    from nanoseek.distill import GenerateConfig, generate

    with pytest.raises(ValueError, match="checked on image outputs, and distill generate"):
        generate(GenerateConfig(out=str(tmp_path / "o"), teacher=str(tmp_path / "none"),
                                prompts="tests.task_plugins:ColorSquares"))
    assert not (tmp_path / "o").exists()

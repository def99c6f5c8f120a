"""Rewards: rule-based scores on hand examples, the TRL-style plugin API, and failure isolation in the worker."""

import re
import subprocess
import sys

import pytest

from nanoseek.rewards import RewardRunner, format_reward, math_verify_accuracy, parse_reward_spec


def test_format_reward_hand_cases():
    good = "<think>3 + 4 = 7</think> <answer>7</answer>"
    prefilled = "3 + 4 = 7\n</think>\n\n<answer>7</answer>"  # R1 template pre-fills <think>
    assert format_reward([good, prefilled]) == [1.0, 1.0]
    assert format_reward(["<answer>7</answer>", "<think></think><answer>7</answer>",
                          "<think>x</think><answer>7</answer> trailing", "no tags"]) == [0.0, 0.0, 0.0, 0.0]


def test_math_verify_accuracy():
    comps = ["<think>half</think><answer>\\frac{1}{2}</answer>", "<think>..</think><answer>0.5</answer>",
             "<think>..</think><answer>3</answer>", "so the answer is 0.5"]
    assert math_verify_accuracy(comps, answer=["0.5", "1/2", "0.5", "\\frac{1}{2}"]) == [1.0, 1.0, 0.0, 1.0]


def test_plugins_receive_prompts_and_columns_and_weights_add_up():
    r = RewardRunner([("tests.reward_plugins:uses_columns", 1.0), ("tests.reward_plugins:length_reward", 0.5)])
    total, parts = r(["the answer is 42", "no"], ["q1", "q2"], {"answer": [42, 7]})
    assert parts["tests.reward_plugins:uses_columns"] == [1.0, 0.0]
    assert total == pytest.approx([1.0 + 0.5 * 1.0, 0.5 * 0.2])
    r.close()


def test_raising_hanging_and_nan_rewards_score_zero_and_are_counted():
    r = RewardRunner([("tests.reward_plugins:raises_on_bad", 1.0), ("tests.reward_plugins:nan_reward", 1.0)],
                     timeout=2.0)
    total, _ = r(["fine", "bad one", "x"], ["p"] * 3, {})
    assert total == [1.5, 0.5, 1.0]  # only the raising item lost its score; NaN -> 0
    assert r.failures == {"tests.reward_plugins:raises_on_bad": 1, "tests.reward_plugins:nan_reward": 1}
    r.close()
    h = RewardRunner([("tests.reward_plugins:hangs", 1.0), ("format", 1.0)], timeout=1.0)
    total, _ = h(["<think>a</think><answer>1</answer>"] * 4, ["p"] * 4, {})
    assert total == [1.0] * 4 and h.failures["tests.reward_plugins:hangs"] == 4
    # bounded: the batch and two items time out, then the hanging reward is not waited for again
    assert h.timeouts_waited == 3
    h.close()


def test_bad_specs_fail_before_compute(tmp_path):
    with pytest.raises(ValueError, match="cannot import reward module 'no_such_module'"):
        RewardRunner([("no_such_module:fn", 1.0)])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        RewardRunner([("tests.reward_plugins:nope", 1.0)])
    with pytest.raises(ValueError, match="not built in"):
        RewardRunner([("nonsense", 1.0)])
    assert parse_reward_spec("m:f=0.25") == ("m:f", 0.25)
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_spec("m:f=abc")


def test_worker_that_cannot_start_fails_fast_with_the_fix(tmp_path):
    # a script without a __main__ guard: the spawned worker re-runs it, cannot start a process while
    # bootstrapping and dies; the parent must say why at once, not wait out the start timeout
    script = tmp_path / "no_guard.py"
    script.write_text("from nanoseek.rewards import RewardRunner\n"
                      "RewardRunner([('format', 1.0)])(['x'], ['p'], {})\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "reward worker process did not start" in res.stderr and "__name__ == \"__main__\"" in res.stderr
    # at once, on the worker's death: a dead worker has an exit code; one waited out for 120 s would still be
    # alive (exit code None)
    assert re.search(r"did not start \(exit code -?\d+\)", res.stderr), res.stderr[-500:]

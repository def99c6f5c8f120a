"""Tokenizer: DeepSeek special-token layout, digit splitting, R1's chat format, the SFT render, HF interop."""

import json
import shutil

import pytest

from nanoseek import synthetic
from nanoseek.cli import main
from nanoseek.data import tokenizer_stats, train_tokenizer
from nanoseek.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer

ENGLISH = ("The quick brown fox jumps over the lazy dog while the assistant thinks about the answer.\n"
           "A user asks a question and the assistant reasons step by step before it answers.")
JAPANESE = "東京は日本の首都です。今日はいい天気ですね。ひらがなとカタカナも使います。"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    items = synthetic.generate("arithmetic", 200, seed=1) + synthetic.generate("countdown", 100, seed=1)
    corpus.write_text("\n\n".join([ENGLISH, JAPANESE] * 20 + [synthetic.to_text(i) for i in items]))
    train_tokenizer([corpus], 600, root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


SYSTEM_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "reasoning_content": "5 * 4 = 20", "content": "20"},
    {"role": "user", "content": "Thanks!"},
]


def test_special_tokens_have_deepseek_ids_and_files(tok, tok_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 600
    for s in SPECIAL_TOKENS:  # never split, wherever they appear
        assert tok.encode(f"a{s}b")[1:-1] == [tok.token_id(s)]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    assert "<｜Assistant｜><think>\\n" in config["chat_template"]
    assert json.loads((tok_dir / "special_tokens_map.json").read_text())["bos_token"] == BOS
    # skip_special_tokens drops bos/eos/roles but keeps the reasoning tags the reward parsers look for
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True) + tok.encode("x</think>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>\nx</think>"


def test_digits_are_one_token_each(tok):
    ids = tok.encode("4827 + 395 = 5222")
    assert [tok.decode([i]) for i in ids if tok.decode([i]).strip()][:4] == ["4", "8", "2", "7"]
    for token in tok.tok.get_vocab():  # no merge ever joins two digits
        text = tok.decode([tok.token_id(token)])
        assert sum(c.isdigit() for c in text) <= 1, text


@pytest.mark.parametrize("text", [ENGLISH, JAPANESE, "émoji 🦊 mixed 12.5%\n\ttabs  and  spaces\n\n", ""])
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, add_bos=True) == [0, *tok.encode(text)]


def test_chat_template_renders_like_deepseek_r1(tok):
    # Hand-written from DeepSeek-R1's updated template: system prompt right after BOS, earlier answers keep only
    # the text after </think> (newlines included), reasoning_content is ignored, generation prompt opens <think>.
    expected = ("<｜begin▁of▁sentence｜>You are a helpful assistant."
                "<｜User｜>What is 2 + 3?<｜Assistant｜>\n\nThe answer is 5.<｜end▁of▁sentence｜>"
                "<｜User｜>And times 4?<｜Assistant｜>20<｜end▁of▁sentence｜>"
                "<｜User｜>Thanks!<｜Assistant｜><think>\n")
    assert tok.render_chat(SYSTEM_CHAT, add_generation_prompt=True) == expected
    assert tok.render_chat(SYSTEM_CHAT) == expected.removesuffix("<｜Assistant｜><think>\n")
    moved = SYSTEM_CHAT[1:3] + [{"role": "system", "content": "Ignored."}, SYSTEM_CHAT[0]] + SYSTEM_CHAT[3:]
    assert tok.render_chat(moved, add_generation_prompt=True) == expected  # the last system message wins


def test_chat_template_tool_calls_match_r1_quirks(tok):
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]
    chat = [{"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "18C"},
            {"role": "tool", "content": "24C"}]
    prompt = ("<｜begin▁of▁sentence｜><｜User｜>Weather in Paris and Rome?"
              "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
              '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n'
              "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
              '```json\n{"city": "Rome"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
              "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n"
              "<｜tool▁output▁begin｜>24C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    assert tok.render_chat(chat, add_generation_prompt=True) == prompt  # no generation prompt after tool outputs
    answer = {"role": "assistant", "content": "Paris 18C, Rome 24C."}
    assert tok.render_chat([*chat, answer]) == prompt + "Paris 18C, Rome 24C.<｜end▁of▁sentence｜>"
    # R1 quirk: "first call" is per conversation, so a single later call opens no block and closes it itself
    one = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls[:1]}]
    assert tok.render_chat(one).endswith('{"city": "Paris"}\n```<｜tool▁call▁end｜>')


def test_autotokenizer_loads_the_directory_with_identical_ids(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    out = hf.apply_chat_template(SYSTEM_CHAT, tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
    assert list(ids) == tok.encode_chat(SYSTEM_CHAT, add_generation_prompt=True)
    assert hf.apply_chat_template(SYSTEM_CHAT, tokenize=False, add_generation_prompt=True) == \
        tok.render_chat(SYSTEM_CHAT, add_generation_prompt=True)
    assert hf(ENGLISH)["input_ids"] == tok.encode(ENGLISH, add_bos=True)  # BOS prepended, as DeepSeek's does


def test_training_render_masks_exactly_the_final_assistant_turn(tok):
    chat = [*SYSTEM_CHAT, {"role": "assistant", "reasoning_content": "Nothing to compute.",
                           "content": "You are welcome."}]
    ids, mask = tok.encode_chat_for_training(chat)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    target = "<think>\nNothing to compute.\n</think>\n\nYou are welcome.<｜end▁of▁sentence｜>"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == target
    n = mask.index(1)
    assert all(mask[n:]) and not any(mask[:n])  # one contiguous target at the end
    # the prompt is exactly what the model sees at inference, <think>\n prefill included
    prompt = tok.encode_chat(SYSTEM_CHAT, add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and tok.decode(ids[n:len(prompt)]) == "<think>\n"
    assert tok.decode(ids) == tok.render_chat(SYSTEM_CHAT, add_generation_prompt=True) + target[len("<think>\n"):]
    assert ids == tok.encode(tok.decode(ids))  # piecewise tokenization == one encode of the text
    # reasoning inline in content is the same as reasoning_content
    inline = [*SYSTEM_CHAT, {"role": "assistant",
                             "content": "<think>\nNothing to compute.\n</think>\n\nYou are welcome."}]
    assert tok.encode_chat_for_training(inline) == (ids, mask)


def test_training_render_all_turns_trains_earlier_answers_without_reasoning(tok):
    chat = SYSTEM_CHAT[:5]
    ids, mask = tok.encode_chat_for_training(chat, all_turns=True)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("\n\nThe answer is 5.<｜end▁of▁sentence｜>"
                       "<think>\n5 * 4 = 20\n</think>\n\n20<｜end▁of▁sentence｜>")
    assert ids == tok.encode_chat_for_training(chat)[0]  # same tokens, only the mask differs


def test_training_render_errors(tok):
    with pytest.raises(ValueError, match="last message must be an assistant"):
        tok.encode_chat_for_training(SYSTEM_CHAT)
    with pytest.raises(ValueError, match="both reasoning_content and an inline"):
        tok.encode_chat_for_training([{"role": "user", "content": "q"},
                                      {"role": "assistant", "reasoning_content": "r", "content": "<think>r</think>a"}])


def test_load_reads_a_foreign_hf_directory(tok_dir, tmp_path):
    # DeepSeek's repos store special tokens as AddedToken dicts, pad with EOS, and newer exports keep the template
    # in chat_template.jinja
    d = tmp_path / "foreign"
    shutil.copytree(tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    config.pop("pad_token")
    config["bos_token"] = {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True}
    config["eos_token"] = {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True}
    config["tokenizer_class"] = "LlamaTokenizerFast"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").write_text(template)
    (d / "special_tokens_map.json").unlink()
    foreign = Tokenizer.load(d)
    assert (foreign.bos_id, foreign.eos_id) == (0, 1)
    assert foreign.render_chat(SYSTEM_CHAT, True) == Tokenizer.load(tok_dir).render_chat(SYSTEM_CHAT, True)
    foreign.save(d)  # keeps the directory's other config keys
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == template


def test_training_errors_name_the_problem(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text(ENGLISH)
    with pytest.raises(ValueError, match="vocab_size 200 is too small.*at least 272"):
        train_tokenizer([good], 200, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        train_tokenizer([good, tmp_path / "missing.txt"], 400, tmp_path / "t")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        train_tokenizer([tmp_path / "empty.txt"], 400, tmp_path / "t")
    (tmp_path / "blank.txt").write_text("\n\n\n")
    with pytest.raises(ValueError, match="no text to train on"):
        train_tokenizer([tmp_path / "blank.txt"], 400, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_cli_train_and_stats(tmp_path, capsys):
    en, ja = tmp_path / "en.txt", tmp_path / "ja.txt"
    en.write_text("\n\n".join([ENGLISH] * 30))
    ja.write_text("\n\n".join([JAPANESE] * 30))
    assert main(["tokenizer", "train", "--input", str(en), str(ja), "--vocab-size", "400", "--out",
                 str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "tok"), "--input", str(en), str(ja),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [str(en), str(ja)]
    assert rows[0]["characters"] == 30 * len(ENGLISH) and rows[0]["bytes"] == rows[0]["characters"]
    assert rows[1]["bytes"] == 3 * rows[1]["characters"]  # kana/kanji/punctuation are 3 UTF-8 bytes each
    assert all(r["chars_per_token"] > 1 for r in rows)
    assert rows == tokenizer_stats(tmp_path / "tok", [en, ja])
    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "x")]) == 2
    assert "x does not exist" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines

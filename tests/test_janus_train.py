"""The mini Janus: CFG dropout, train -> save -> load -> imagine -> score, resume, the shapes tasks through eval."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import shapes
from nanoseek.cli import main
from nanoseek.imagine import load_vq, save_vq
from nanoseek.janus import Janus, VQModel, guidance_rows, janus_preset
from nanoseek.janus_train import (
    JanusTrainConfig,
    build_model,
    draw_batch,
    prepare_world,
    train_janus,
    world_tokenizer,
)

# a trunk small enough for seconds per run, still MLA + MoE (every layer routed)
SMALL = {"model.hidden_size": 32, "model.num_hidden_layers": 1, "model.first_k_dense_replace": 0,
         "model.q_lora_rank": 16, "model.kv_lora_rank": 16, "model.intermediate_size": 64,
         "model.moe_intermediate_size": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one thread for tiny ops


@pytest.fixture(scope="module")
def world_vq(tmp_path_factory) -> Path:
    """A 96-scene training world and a random VQ directory (the tokenizer's quality does not matter here)."""
    d = tmp_path_factory.mktemp("minijanus")
    shapes.synth(96, "train", 0, d / "world")
    torch.manual_seed(0)
    save_vq(VQModel(replace(janus_preset("janus-mini").vq, num_embeddings=64), 8), d / "vq")
    return d


def _cfg(d: Path, out: str, **kw) -> JanusTrainConfig:
    over = [f"{k}={v}" for k, v in SMALL.items()]
    base = dict(data=str(d / "world"), vq=str(d / "vq"), out=str(d / out), max_steps=4, warmup_steps=1,
                save_every=2, und_batch=3, t2i_batch=3, text_batch=1, progress=False)
    return JanusTrainConfig.from_sources(None, over, **{**base, **kw})


def _data(d: Path, cfg: JanusTrainConfig):
    world, items, images = shapes.load_split(cfg.data, "train")
    tok = world_tokenizer(items, d / "tok", 300)
    model = build_model(cfg, tok, world, torch.device("cpu"))
    return model, tok, prepare_world(items, images, world, model, tok)


def test_cfg_dropout_replaces_the_prompt_by_pads_at_its_rate(world_vq):
    """~10% of the text-to-image prompts become BOS, pads, <begin_of_image>: sampling's unconditional row."""
    cfg = _cfg(world_vq, "unused", t2i_batch=50, cfg_dropout=0.1)
    model, tok, data = _data(world_vq, cfg)
    pad, boi = model.config.pad_token_id, model.config.boi_token_id
    dropped = kept = 0
    for step in range(40):
        b = draw_batch(data, cfg, step, pad)
        originals = {tuple(p) for i in b.t2i_items for p in data.gen_prompts[i]}
        for i, p, d in zip(b.t2i_items, b.t2i_prompts, b.dropped):
            if d:
                dropped += 1
                own = [q for q in data.gen_prompts[i] if len(q) == len(p)]
                assert own, "a dropped prompt keeps its length"
                ids, _ = guidance_rows([own[0]], pad)
                assert p == ids[1].tolist()  # exactly the unconditional row of janus.guidance_rows
                assert p[0] == tok.bos_id and p[-1] == boi and set(p[1:-1]) == {pad}
            else:
                kept += 1
                assert tuple(p) in originals
    rate = dropped / (dropped + kept)
    assert 0.08 <= rate <= 0.12, rate  # 2,000 draws at p = 0.1: binomial sd 0.0067
    assert draw_batch(data, cfg, 7, pad).t2i_prompts == draw_batch(data, cfg, 7, pad).t2i_prompts  # (seed, step)
    none = _cfg(world_vq, "unused", t2i_batch=50, cfg_dropout=0.0)
    assert not any(draw_batch(data, none, s, pad).dropped.any() for s in range(10))


@pytest.fixture(scope="module")
def trained(world_vq) -> dict:
    return train_janus(_cfg(world_vq, "run", max_steps=6, lr=3e-3))


def test_train_save_load_imagine_score(world_vq, trained, tmp_path):
    """A few steps end to end: the losses move, OUT/model loads with nanoseek.load, `nanoseek imagine` draws a 32 x 32
    PNG from it, the verifier reads it, and the eval tasks run on it."""
    summary = trained
    run = Path(summary["out"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(k in recs[0] for k in ("t2i", "und", "text", "balance", "maxvio"))
    assert recs[-1]["t2i"] < recs[0]["t2i"] and recs[-1]["und"] < recs[0]["und"]
    assert (run / "loss.png").is_file()
    m = nanoseek.load(summary["model"])
    assert isinstance(m, Janus) and m.config.text.attention == "mla" and m.config.text.n_routed_experts == 8
    # the frozen VQ is the one it was given
    assert torch.equal(m.vqmodel.quantize.embedding.weight, load_vq(world_vq / "vq").quantize.embedding.weight)
    assert json.loads((run / "model" / "world.json").read_text())["image_size"] == 32
    # transformers reads it as a Janus around a DeepseekV3Model, with the same logits
    from transformers import JanusForConditionalGeneration

    hf = JanusForConditionalGeneration.from_pretrained(summary["model"], dtype=torch.float32).eval()
    assert type(hf.model.language_model).__name__ == "DeepseekV3Model"
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, m(ids), atol=1e-5, rtol=1e-5)
    assert main(["imagine", "--model", summary["model"], "a red circle", "--n", "2", "--seed", "1",
                 "--out", str(tmp_path / "img")]) == 0
    png = tmp_path / "img" / "image_0.png"
    from PIL import Image

    im = Image.open(png)
    assert im.size == (32, 32)
    r = shapes.score_image({"include": [{"shape": "circle", "count": 1, "color": "red"}], "exclude": []}, im)
    assert set(r) >= {"correct", "objects"}

    from nanoseek.janus_eval import JanusEvalConfig, evaluate_geneval, evaluate_vqa

    g = evaluate_geneval(JanusEvalConfig(model=summary["model"], n=12, out=str(tmp_path / "ev"), batch=5,
                                         progress=False))
    assert set(g["categories"]) == set(shapes.CATEGORIES) and all(v["n"] == 2 for v in g["categories"].values())
    b = g["baselines"]
    assert b["verifier_on_ground_truth"]["overall"]["pass@1"] == 1.0  # the checker on fresh ground truth
    assert set(b) == {"shuffled_prompts", "vq_ceiling", "verifier_on_ground_truth"}
    assert (tmp_path / "ev" / "grid.png").is_file() and (tmp_path / "ev" / "items.jsonl").is_file()
    again = evaluate_geneval(JanusEvalConfig(model=summary["model"], n=12, batch=5, progress=False,
                                             baselines=False))
    assert again["categories"] == g["categories"]  # seeded: the same images, the same score
    v = evaluate_vqa(JanusEvalConfig(task="shapes-vqa", model=summary["model"], n=20, out=str(tmp_path / "vqa"),
                                     progress=False))
    assert v["n_items"] == 20 and set(v["kinds"]) <= {"count", "color", "position"}
    assert "majority_answer" in v["baselines"]


def test_resume_continues_exactly(world_vq):
    """4 steps in one go = 2 steps, stop, resume to 4: the same weights and the same curve."""
    full = _cfg(world_vq, "full")
    train_janus(full)
    part = _cfg(world_vq, "part", max_steps=2)
    train_janus(part)
    resumed = _cfg(world_vq, "part", resume=True)
    train_janus(resumed)
    a, b = nanoseek.load(Path(full.out) / "model"), nanoseek.load(Path(resumed.out) / "model")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    la = [json.loads(x)["loss"] for x in (Path(full.out) / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (Path(resumed.out) / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_batched_answers_equal_the_single_image_path(world_vq, tmp_path):
    """answer_questions (batched, left-padded) gives what imagine.understand (one image, greedy) gives."""
    from PIL import Image

    from nanoseek.imagine import DEFAULT_PROCESSOR, understand
    from nanoseek.janus_eval import answer_questions

    cfg = _cfg(world_vq, "unused")
    model, tok, data = _data(world_vq, cfg)
    with torch.no_grad():  # a random model answers anything: make its answers differ between images
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    _, items, images = shapes.load_split(world_vq / "world", "train")
    qs = ["How many circles are there?", "What color is the square?", "Is the red circle left of the blue square?"]
    got = answer_questions(model, tok, images[:3], qs, batch=3, max_tokens=3)
    proc = {**DEFAULT_PROCESSOR, "size": {"height": 32, "width": 32}}
    want = [tok.decode(understand(model, tok, Image.fromarray(im), q, proc, max_tokens=3),
                       skip_special_tokens=True).strip() for im, q in zip(images[:3], qs)]
    assert got == want


def test_bad_input_fails_before_compute(world_vq, trained, tmp_path, capsys):
    assert main(["eval", "--task", "shapes-nope", "--model", str(world_vq / "world")]) == 2
    assert "shapes-nope" in capsys.readouterr().err
    with pytest.raises(ValueError, match="understanding_encoder"):
        JanusTrainConfig(understanding_encoder="clip")
    # a world of 48 x 48 images for a model that reads 32 x 32
    shapes.synth(12, "train", 0, tmp_path / "big", config=shapes.ShapesConfig(image_size=48))
    with pytest.raises(ValueError, match="48 px"):
        train_janus(_cfg(world_vq, "big", data=str(tmp_path / "big")))
    assert not (tmp_path / "big" / "step_00000002").exists()
    assert main(["eval", "--task", "shapes-geneval", "--model", trained["model"], "--world",
                 str(tmp_path / "big" / "world.json"), "--n", "6"]) == 2
    assert "48x48" in capsys.readouterr().err
    assert main(["eval", "--task", "shapes-vqa", "--model", trained["model"], "--temperature", "0.5"]) == 2
    assert "greedily" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no VQ"):
        train_janus(_cfg(world_vq, "novq", vq=""))
    with pytest.raises(ValueError, match="understanding_encoder|no training data"):
        train_janus(_cfg(world_vq, "nodata", data=""))


def test_eval_cli_passes_the_sampling_temperature(trained, tmp_path):
    # --temperature reaches the image sampler (it was once dropped for the shapes tasks: 1 whatever was asked)
    assert main(["eval", "--task", "shapes-geneval", "--model", trained["model"], "--n", "6", "--cfg", "1",
                 "--temperature", "0.5", "--out", str(tmp_path / "t05")]) == 0
    summary = json.loads((tmp_path / "t05" / "summary.json").read_text())
    assert summary["temperature"] == 0.5 and "temperature 0.5" in (tmp_path / "t05" / "summary.md").read_text()


def test_the_findings_run_on_the_runner(trained, tmp_path):
    """`nanoseek experiment janus-cfg` (a given model: the sweep alone) and `janus-encoding` at toy sizes: results
    with paired comparisons, plots, and a resume that redoes nothing."""
    from nanoseek.janus_experiment import janus_experiment_config, run_experiment

    cfg = janus_experiment_config("janus-cfg", ["weights=[1, 3]", "sample_seeds=[0]"], out=str(tmp_path / "cfg"),
                                  fast=True, model=trained["model"])
    r = run_experiment(cfg)
    assert set(r["weights"]) == {"1", "3"} and r["weights"]["3"]["minus_lowest"]["n"] == 12
    assert (tmp_path / "cfg" / "guidance.png").is_file() and (tmp_path / "cfg" / "guidance_grid.png").is_file()
    enc = janus_experiment_config("janus-encoding", ["seeds=[0]"], out=str(tmp_path / "enc"), fast=True)
    r = run_experiment(enc)
    assert set(r["models"]) == {"vit-s0", "vq-s0"} and r["pooled"]["vqa_vit_minus_vq"]["n"] == 12
    assert json.loads((tmp_path / "enc" / "vq-s0" / "model" / "janus_train.json").read_text())[
        "understanding_encoder"] == "vq"
    state = (tmp_path / "enc" / "state.json").read_text()
    assert run_experiment(enc)["pooled"] == r["pooled"] and (tmp_path / "enc" / "state.json").read_text() == state
    with pytest.raises(ValueError, match="unknown janus experiment key"):
        janus_experiment_config("janus-cfg", ["wieghts=[1]"])


def test_serve_runs_the_trained_mini_janus(trained):
    """The published model serves unchanged: /v1/images/generations at its native 32 x 32, and a question about an
    image in /v1/chat/completions (the openai client, as tests/test_serve_janus.py)."""
    import base64
    import io

    import openai
    from PIL import Image

    from nanoseek.serve import BackgroundServer, ServeConfig, Server

    srv = Server.from_config(ServeConfig(model=trained["model"], served_model_name="mini"))
    with BackgroundServer(srv) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.images.generate(model="mini", prompt="a red circle", n=2, size="32x32",
                                   response_format="b64_json")
        ims = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
        assert [im.size for im in ims] == [(32, 32), (32, 32)]
        buf = io.BytesIO()
        ims[0].save(buf, format="PNG")
        url_png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        chat = client.chat.completions.create(model="mini", max_tokens=3, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_png}},
                                         {"type": "text", "text": "How many circles are there?"}]}])
    import numpy as np

    from nanoseek.janus_eval import answer_questions, load_model

    model, tok = load_model(trained["model"])
    want = answer_questions(model, tok, np.asarray(ims[0])[None], ["How many circles are there?"], max_tokens=3)
    # greedy: the eval's own answer, as content (a Janus chat has no R1 reasoning split)
    message = chat.choices[0].message
    assert message.content.strip() == want[0] and getattr(message, "reasoning_content", None) is None


def test_eval_on_seen_pairings_is_a_separate_split(trained, tmp_path):
    """`--split train` draws colour-naming prompts from the training pairings only; the default test split puts a
    held-out pairing in every one (the headline score); a bad split is refused before compute."""
    from nanoseek.janus_eval import JanusEvalConfig, evaluate_geneval

    world = shapes.load_config(trained["model"])
    held = {tuple(p) for p in world.holdout}
    named = {"colors", "color_attr", "position"}
    for split, out in (("train", tmp_path / "seen"), ("test", tmp_path / "held")):
        r = evaluate_geneval(JanusEvalConfig(model=trained["model"], n=12, split=split, baselines=False,
                                             progress=False, out=str(out)))
        assert r["split"] == split and r["n_items"] == 12
        rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
        for row in (x for x in rows if x["group"] in named):
            words = row["prompt"].split()
            pairs = {(c, s.rstrip("s")) for c, s in zip(words, words[1:]) if c in world.colors}
            assert bool(pairs & held) == (split == "test"), row["prompt"]
    with pytest.raises(ValueError, match="split must be test"):
        JanusEvalConfig(model=trained["model"], split="dev")

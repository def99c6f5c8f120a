"""Token shards and packed batches: exact round trips, worker-independent output, resumable and rank-split batches."""

import json

import numpy as np
import pytest
import torch

from nanoseek import synthetic
from nanoseek.cli import main
from nanoseek.data import PackedBatches, TokenDataset, prepare, token_dtype, train_tokenizer
from nanoseek.tasks import get_task
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    items = synthetic.generate("arithmetic", 150, seed=7) + synthetic.generate("countdown", 150, seed=7)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic.to_text(i) for i in items) + "\n\nSome plain English words, too.")
    train_tokenizer([corpus], 500, root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def _texts(n, seed=0):
    return [synthetic.to_text(i) for i in synthetic.generate("arithmetic", n, seed=seed)]


def _documents(ds):
    """The documents of a dataset: the stream split at BOS, each checked to be BOS ... EOS."""
    stream = ds.tokens(0, len(ds)).tolist()
    starts = [i for i, t in enumerate(stream) if t == ds.bos_id] + [len(stream)]
    docs = [stream[a:b] for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and all(d[-1] == ds.eos_id for d in docs)
    return docs


def test_prepare_round_trips_txt_jsonl_and_parquet(tok, tok_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = _texts(30)
    (tmp_path / "a.txt").write_text("\n\n".join(texts[:10]) + "\n\n\n")  # one document per paragraph
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[10:20]))
    pq.write_table(pa.table({"text": texts[20:]}), tmp_path / "c.parquet")
    inputs = [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"]
    m = prepare(inputs, tok_dir, tmp_path / "out")
    ds = TokenDataset(tmp_path / "out")
    assert [tok.decode(d[1:-1]) for d in _documents(ds)] == texts
    assert (m["num_documents"], m["total_tokens"], m["dtype"], m["sft"]) == (30, len(ds), "uint16", False)
    assert [s["documents"] for s in m["sources"]] == [10, 10, 10]
    assert sum(s["tokens"] for s in m["sources"]) == len(ds) and ds.num_documents == 30
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size == ds.vocab_size and m["tokenizer"]["sha256"] == tok.sha256
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert (tmp_path / "out" / "tokens_00000.bin").stat().st_size == 2 * len(ds)  # raw little-endian uint16
    ds.check_tokenizer(tok)


def test_token_dtype_follows_the_vocabulary(tok_dir, tmp_path):
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    big = Tokenizer.load(tok_dir)
    big.tok.add_tokens([f"<x{i}>" for i in range(65537 - big.vocab_size)])  # ids up to 65536 need uint32
    big.save(tmp_path / "big")
    text = f"12 + 3 = 15 <x{65536 - Tokenizer.load(tok_dir).vocab_size}>"  # the token with id 65536
    (tmp_path / "a.txt").write_text(text)
    m = prepare([tmp_path / "a.txt"], tmp_path / "big", tmp_path / "out")
    ds = TokenDataset(tmp_path / "out")
    assert m["dtype"] == "uint32" and (tmp_path / "out" / "tokens_00000.bin").stat().st_size == 4 * len(ds)
    ids = ds.tokens(0, len(ds)).tolist()
    assert ids[-2] == 65536 and big.decode(ids[1:-1]) == text


def test_parallel_workers_write_identical_shards(tok_dir, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(_texts(60, seed=1)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(50, seed=2)))
    inputs = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    one = prepare(inputs, tok_dir, tmp_path / "w1", workers=1, chunk_docs=7, shard_tokens=1000)
    two = prepare(inputs, tok_dir, tmp_path / "w2", workers=2, chunk_docs=7, shard_tokens=1000)
    assert one == two and len(one["shards"]) > 3  # documents span shard boundaries
    for shard in one["shards"]:
        assert (tmp_path / "w1" / shard["tokens"]).read_bytes() == (tmp_path / "w2" / shard["tokens"]).read_bytes()
    assert [s["num_tokens"] for s in one["shards"][:-1]] == [1000] * (len(one["shards"]) - 1)


@pytest.fixture
def packed(tok_dir, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(_texts(80, seed=3)))
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "ds", shard_tokens=999)
    return TokenDataset(tmp_path / "ds")


def test_batches_are_packed_windows_with_document_ids(packed):
    T = 64
    batches = PackedBatches(packed, 4, T, seed=1)
    assert batches.num_windows == (len(packed) - 1) // T
    seen = []
    for _ in range(batches.steps_per_epoch):
        b = next(batches)
        assert b["input_ids"].shape == b["targets"].shape == b["document_ids"].shape == (4, T)
        assert b["input_ids"].dtype == torch.long
        for x, y, doc in zip(b["input_ids"], b["targets"], b["document_ids"]):
            w = int(np.flatnonzero([np.array_equal(packed.tokens(k * T, k * T + T), x.numpy())
                                    for k in range(batches.num_windows)])[0])
            seen.append(w)
            assert torch.equal(y, torch.from_numpy(packed.tokens(w * T + 1, w * T + T + 1).astype(np.int64)))
            # a new document id exactly at each BOS
            assert torch.equal(doc[1:] - doc[:-1], (x[1:] == packed.bos_id).long())
            assert doc[0] == int(x[0] == packed.bos_id)
    assert sorted(seen) == sorted(set(seen))  # an epoch never repeats a window
    assert batches.epoch == 1 and batches.step == 0


def test_resume_continues_with_exactly_the_next_batch(packed):
    reference = PackedBatches(packed, 3, 32, seed=5)
    n = reference.steps_per_epoch + 3  # crosses an epoch boundary
    expected = [next(reference) for _ in range(n)]
    first = PackedBatches(packed, 3, 32, seed=5)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives trainer_state.json
    resumed = PackedBatches(packed, 3, 32, seed=5)
    resumed.load_state_dict(state)
    for want in expected[4:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(expected[0]["input_ids"], expected[reference.steps_per_epoch]["input_ids"])  # reshuffled
    with pytest.raises(ValueError, match="seq_len=32, this loader has seq_len=16"):
        PackedBatches(packed, 3, 16, seed=5).load_state_dict(state)


def test_ranks_split_the_single_process_batch(packed):
    single = PackedBatches(packed, 4, 32, seed=2)
    ranks = [PackedBatches(packed, 2, 32, rank=r, world_size=2, seed=2) for r in range(2)]
    for _ in range(single.steps_per_epoch + 2):
        whole = next(single)
        parts = [next(r) for r in ranks]
        for k in whole:
            rebuilt = torch.stack([parts[j % 2][k][j // 2] for j in range(4)])  # rank j % W, row j // W
            assert torch.equal(rebuilt, whole[k])


def test_sft_targets_are_ignored_outside_the_assistant_turns(tok, tok_dir, tmp_path):
    items = synthetic.generate("countdown", 20, seed=4)
    chats = [get_task("countdown").sft_messages(i) for i in items]
    with (tmp_path / "chat.jsonl").open("w") as f:
        for c in chats:
            f.write(json.dumps({"messages": c}) + "\n")
        f.write(json.dumps({"text": "plain text trains everywhere"}) + "\n")
    m = prepare([tmp_path / "chat.jsonl"], tok_dir, tmp_path / "sft", sft=True)
    assert m["sft"] and all("mask" in s for s in m["shards"])
    ds = TokenDataset(tmp_path / "sft")
    mask = ds.mask(0, len(ds))
    docs, start = _documents(ds), 0
    for doc, item in zip(docs, items + [None]):
        trained = [t for t, keep in zip(doc, mask[start:start + len(doc)]) if keep]
        start += len(doc)
        if item is None:
            assert tok.decode(trained) == "plain text trains everywhere<｜end▁of▁sentence｜>"
        else:
            assert tok.decode(trained) == (f"<think>\n{item['reasoning']}\n</think>\n\n<answer>{item['answer']}"
                                           "</answer><｜end▁of▁sentence｜>")
    T = 48
    batches = PackedBatches(ds, 2, T, seed=0)
    for _ in range(batches.steps_per_epoch):
        b = next(batches)
        for x, y in zip(b["input_ids"], b["targets"]):
            w = int(np.flatnonzero([np.array_equal(ds.tokens(k * T, k * T + T), x.numpy())
                                    for k in range(batches.num_windows)])[0])
            keep = torch.from_numpy(ds.mask(w * T + 1, w * T + T + 1)).bool()
            nxt = torch.from_numpy(ds.tokens(w * T + 1, w * T + T + 1).astype(np.int64))
            assert torch.equal(y, torch.where(keep, nxt, torch.full_like(nxt, -100)))
            assert (y[x == tok.token_id("<｜Assistant｜>")] == tok.token_id("<think>")).all()


def test_bad_inputs_name_the_problem(tok_dir, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(_texts(5)))
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        prepare([good, tmp_path / "nope.txt"], tok_dir, tmp_path / "o")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        prepare([tmp_path / "empty.txt"], tok_dir, tmp_path / "o")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match="the corpus has no tokens"):
        prepare([tmp_path / "blank.txt"], tok_dir, tmp_path / "o")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="chat.jsonl: document 1 is a chat.*--sft"):
        prepare([tmp_path / "chat.jsonl"], tok_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="chat.jsonl: document 1: a chat must end with the assistant message"):
        prepare([tmp_path / "chat.jsonl"], tok_dir, tmp_path / "o", sft=True)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object with a 'text'"):
        prepare([tmp_path / "bad.jsonl"], tok_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="unsupported format '.csv'"):
        (tmp_path / "x.csv").write_text("a,b")
        prepare([tmp_path / "x.csv"], tok_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # no partial output left behind

    m = prepare([good], tok_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="is not empty.*overwrite"):
        prepare([good], tok_dir, tmp_path / "o")
    with pytest.raises(ValueError, match="bad.jsonl:2"):  # a failed rewrite keeps the old dataset intact
        prepare([good, tmp_path / "bad.jsonl"], tok_dir, tmp_path / "o", overwrite=True)
    ds = TokenDataset(tmp_path / "o")
    assert ds.manifest == m and len(_documents(ds)) == 5 and not list(tmp_path.glob(".o.*"))

    with pytest.raises(ValueError, match=f"seq_len 100000 is larger than the corpus.*has {len(ds)}"):
        PackedBatches(ds, 1, 100_000)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedBatches(ds, len(ds), 8)
    with pytest.raises(ValueError, match="larger than the model's vocab_size 100"):
        TokenDataset(tmp_path / "o", vocab_size=100)
    other = tmp_path / "other"
    train_tokenizer([good], 400, other)
    with pytest.raises(ValueError, match="was tokenized with 'tok'.*not with 'other'"):
        ds.check_tokenizer(Tokenizer.load(other))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TokenDataset(tmp_path)
    (tmp_path / "o" / "tokens_00000.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="tokens_00000.bin has 2 bytes"):
        TokenDataset(tmp_path / "o")


def test_cli_prepare(tok_dir, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert main(["data", "synth", "--task", "arithmetic", "--n", "20", "--out", str(out), "--format", "chat"]) == 0
    assert main(["data", "prepare", "--input", str(out), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d"),
                 "--sft", "--workers", "2"]) == 0
    assert TokenDataset(tmp_path / "d").num_documents == 20
    assert main(["data", "prepare", "--input", str(out), "--tokenizer", str(tok_dir), "--out",
                 str(tmp_path / "d")]) == 2
    assert "is not empty" in " ".join(capsys.readouterr().err.split())


def test_a_retrained_tokenizer_directory_is_reloaded(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(_texts(40)))
    for vocab in (300, 420):  # same directory, new tokenizer: cached copies must not be reused
        train_tokenizer([tmp_path / "a.txt"], vocab, tmp_path / "tok")
        m = prepare([tmp_path / "a.txt"], tmp_path / "tok", tmp_path / "d", workers=2, overwrite=True)
        assert m["tokenizer"]["vocab_size"] == vocab
        ds = TokenDataset(tmp_path / "d")
        ds.check_tokenizer(Tokenizer.load(tmp_path / "tok"))
        assert [Tokenizer.load(tmp_path / "tok").decode(d[1:-1]) for d in _documents(ds)] == _texts(40)

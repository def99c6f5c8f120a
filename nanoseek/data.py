"""Token shards on disk and packed training batches.

`prepare` streams documents from .txt / .jsonl / .parquet files, tokenizes them in parallel and writes flat
little-endian token shards (+ a loss mask for SFT) and a manifest; `TokenDataset` memory-maps them; `PackedBatches`
cuts the stream into windows of seq_len + 1 tokens and yields shuffled, resumable, rank-sharded batches with
document ids for attention masking across packed documents. Formats and rules: docs/data.md.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_dir
from .tokenizer import Tokenizer, train_bpe

FORMAT, VERSION = "nanoseek-tokens", 1
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
IGNORE_INDEX = -100  # targets the loss skips (model.loss ignores -100)

Document = str | list  # plain text, or a chat as OpenAI-style messages


# ---- reading documents ---------------------------------------------------------------------------------------


def check_inputs(files: Sequence[str | os.PathLike]) -> list[Path]:
    """The input paths, after checking that each exists, is a non-empty file and has a supported format."""
    if not files:
        raise ValueError("no input files given")
    paths = []
    for f in files:
        p = Path(f)
        if not p.exists():
            raise FileNotFoundError(f"input file {p} does not exist")
        if not p.is_file():
            raise ValueError(f"input {p} is not a file")
        if p.stat().st_size == 0:
            raise ValueError(f"input file {p} is empty")
        if p.suffix.lower() not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
            raise ValueError(f"input file {p}: unsupported format {p.suffix!r} "
                             f"(use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)})")
        paths.append(p)
    return paths


def iter_documents(path: str | os.PathLike, txt_split: str = "paragraph") -> Iterator[Document]:
    """Streams the documents of one file: text (str) or a chat (list of messages).

    .txt/.md: one document per blank-line-separated paragraph (`txt_split="paragraph"`, read line by line), or the
    whole file (`"file"`). .jsonl: one JSON object per line with `text` or `messages`. .parquet: a `text` or
    `messages` column, read in record batches.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    elif txt_split == "file":
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield text
    elif txt_split == "paragraph":
        lines: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\n")
                    lines = []
        if lines:
            yield "".join(lines).rstrip("\n")
    else:
        raise ValueError(f"txt_split must be 'paragraph' or 'file', got {txt_split!r}")


def _record_document(record: Any, where: str) -> Document:
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            return record["messages"]
        if isinstance(record.get("text"), str):
            return record["text"]
    raise ValueError(f"{where}: expected an object with a 'text' string or a 'messages' list")


def _iter_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            yield _record_document(record, f"{path}:{lineno}")


def _iter_parquet(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    column = next((c for c in ("messages", "text") if c in names), None)
    if column is None:
        raise ValueError(f"{path}: no 'text' or 'messages' column (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _record_document({column: value}, f"{path}: row {row}")


# ---- prepare -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(tokenizer_dir: str, stamp: tuple[int, int]) -> Tokenizer:
    # once per process, not once per chunk; `stamp` (mtime, size of tokenizer.json) sees a retrained directory
    return Tokenizer.load(tokenizer_dir)


def _stamp(tokenizer_dir: str) -> tuple[int, int]:
    st = (Path(tokenizer_dir) / "tokenizer.json").stat()
    return st.st_mtime_ns, st.st_size


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism; avoid oversubscription


def _encode_chunk(tokenizer: tuple[str, tuple[int, int]], docs: list[Document], sft: bool,
                  all_turns: bool) -> tuple[list[int], list[int] | None, int]:
    """Tokens (and mask) of a chunk of documents, concatenated; every document is BOS ... EOS."""
    tok = _cached_tokenizer(*tokenizer)
    bos, eos = tok.bos_id, tok.eos_id
    texts = [d for d in docs if isinstance(d, str)]
    encoded = iter(tok.encode_batch(texts))
    ids: list[int] = []
    mask: list[int] = []
    for doc in docs:
        if isinstance(doc, str):
            body = next(encoded)
            ids += [bos, *body, eos]
            mask += [0] + [1] * (len(body) + 1)  # plain text in an SFT mix: every token after BOS is trained
        else:  # the chat template writes BOS, and the trained final turn ends with EOS
            doc_ids, doc_mask = tok.encode_chat_for_training(doc, all_turns=all_turns)
            ids += doc_ids
            mask += doc_mask
    return ids, (mask if sft else None), len(docs)


class _ShardWriter:
    """Appends tokens (and masks) to fixed-size shards in `root`; the last shard may be shorter."""

    def __init__(self, root: Path, shard_tokens: int, with_mask: bool) -> None:
        self.root, self.shard_tokens, self.with_mask = root, shard_tokens, with_mask
        self.shards: list[dict[str, Any]] = []

    def write(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        while len(ids):
            if not self.shards or self.shards[-1]["num_tokens"] == self.shard_tokens:
                i = len(self.shards)
                self.shards.append({"tokens": f"tokens_{i:05d}.bin", "num_tokens": 0,
                                    **({"mask": f"mask_{i:05d}.bin"} if self.with_mask else {})})
            shard = self.shards[-1]
            room = self.shard_tokens - shard["num_tokens"]
            with open(self.root / shard["tokens"], "ab") as f:
                f.write(ids[:room].tobytes())
            if self.with_mask:
                with open(self.root / shard["mask"], "ab") as f:
                    f.write(mask[:room].tobytes())
            shard["num_tokens"] += min(room, len(ids))
            ids = ids[room:]
            mask = None if mask is None else mask[room:]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def prepare(inputs: Sequence[str | os.PathLike], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
            workers: int = 1, sft: bool = False, all_turns: bool = False, txt_split: str = "paragraph",
            shard_tokens: int = 2**26, chunk_docs: int = 256, overwrite: bool = False) -> dict[str, Any]:
    """Tokenizes `inputs` into token shards + manifest.json in `out_dir`; returns the manifest.

    Streaming: documents are read lazily, tokenized in chunks of `chunk_docs` (by `workers` processes, at most
    2 x workers chunks in flight) and appended to the shards in input order, so the output does not depend on
    `workers`. Everything is written into a staging directory that replaces `out_dir` only once complete
    (manifest last); on any error the staging directory is removed and an existing `out_dir` is untouched.
    """
    paths = check_inputs(inputs)
    if workers < 1 or shard_tokens < 1 or chunk_docs < 1:
        raise ValueError("workers, shard_tokens and chunk_docs must be >= 1")
    if txt_split not in ("paragraph", "file"):
        raise ValueError(f"txt_split must be 'paragraph' or 'file', got {txt_split!r}")
    tok = Tokenizer.load(tokenizer_dir)
    if tok.bos_id is None or tok.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} needs bos and eos tokens to delimit documents")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out} is not empty (pass overwrite=True / --overwrite to replace it)")
    dtype = token_dtype(tok.vocab_size)
    with atomic_dir(out) as staging:  # a crash or an error leaves no half-written directory at `out`
        sources = [{"path": str(p), "documents": 0, "tokens": 0, "skipped_empty": 0} for p in paths]
        writer = _ShardWriter(staging, shard_tokens, with_mask=sft)
        tok_dir = str(Path(tokenizer_dir).resolve())
        for src, (ids, mask, n_docs) in _encode_all((tok_dir, _stamp(tok_dir)), paths, sources, sft, all_turns,
                                                     txt_split, chunk_docs, workers):
            writer.write(np.asarray(ids, dtype=dtype), None if mask is None else np.asarray(mask, dtype=np.uint8))
            sources[src]["documents"] += n_docs
            sources[src]["tokens"] += len(ids)
        total = sum(s["num_tokens"] for s in writer.shards)
        if total == 0:
            raise ValueError(f"the corpus has no tokens: no non-empty document in {', '.join(map(str, paths))}")
        manifest = {
            "format": FORMAT, "version": VERSION,
            "tokenizer": {"name": tok.name, "path": tok_dir, "vocab_size": tok.vocab_size, "sha256": tok.sha256,
                          "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
            "dtype": dtype.name, "byte_order": "little", "sft": sft, "all_turns": all_turns if sft else None,
            "txt_split": txt_split, "shard_tokens": shard_tokens,
            "shards": writer.shards, "total_tokens": total,
            "num_documents": sum(s["documents"] for s in sources), "sources": sources,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _encode_all(tokenizer: tuple[str, tuple[int, int]], paths: list[Path], sources: list[dict[str, Any]], sft: bool,
                all_turns: bool, txt_split: str, chunk_docs: int, workers: int) -> Iterator[tuple[int, tuple]]:
    """(source index, encoded chunk) in input order, from `workers` processes."""

    def chunks() -> Iterator[tuple[int, list[Document]]]:
        for i, path in enumerate(paths):
            docs: list[Document] = []
            for n, doc in enumerate(iter_documents(path, txt_split), 1):
                if isinstance(doc, list) and not sft:
                    raise ValueError(f"{path}: document {n} is a chat ('messages'); prepare chat data with "
                                     "sft=True / --sft")
                if isinstance(doc, list) and not (doc and isinstance(doc[-1], dict)
                                                  and doc[-1].get("role") == "assistant"):
                    raise ValueError(f"{path}: document {n}: a chat must end with the assistant message to train on")
                if isinstance(doc, str) and not doc.strip():
                    sources[i]["skipped_empty"] += 1
                    continue
                docs.append(doc)
                if len(docs) == chunk_docs:
                    yield i, docs
                    docs = []
            if docs:
                yield i, docs

    if workers == 1:
        for i, docs in chunks():
            yield i, _encode_chunk(tokenizer, docs, sft, all_turns)
        return
    import multiprocessing as mp
    import sys

    # fork on Linux: spawn would re-import torch in every worker (seconds) and needs a __main__ guard in scripts.
    # The workers only run tokenizers, which disables its own thread pool in a forked child when the parent has
    # used it, so the parent's threads are never touched. macOS cannot fork safely: spawn there.
    method = "fork" if sys.platform == "linux" else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker) as pool:
        pending: collections.deque = collections.deque()
        for i, docs in chunks():
            pending.append((i, pool.apply_async(_encode_chunk, (tokenizer, docs, sft, all_turns))))
            if len(pending) >= 2 * workers:  # bounded: the corpus is never all in flight
                j, result = pending.popleft()
                yield j, result.get()
        while pending:
            j, result = pending.popleft()
            yield j, result.get()


# ---- reading shards ------------------------------------------------------------------------------------------


class TokenDataset:
    """The shards of a prepared directory as one memory-mapped token stream (and loss mask, for SFT)."""

    def __init__(self, path: str | os.PathLike, *, vocab_size: int | None = None) -> None:
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"no manifest.json in {self.path}: not a prepared dataset "
                                    "(run `nanoseek data prepare`), or its preparation did not finish")
        self.manifest = m = json.loads(mf.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{mf}: format {m.get('format')!r} version {m.get('version')!r} is not "
                             f"{FORMAT!r} version {VERSION}")
        if vocab_size is not None and m["tokenizer"]["vocab_size"] > vocab_size:
            raise ValueError(f"dataset {self.path} was tokenized with a {m['tokenizer']['vocab_size']}-token "
                             f"vocabulary ({m['tokenizer']['name']}), larger than the model's vocab_size {vocab_size}")
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.tokens_mm: list[np.ndarray] = []
        self.masks_mm: list[np.ndarray] = []
        for shard in m["shards"]:
            self.tokens_mm.append(self._map(shard["tokens"], self.dtype, shard["num_tokens"]))
            if m["sft"]:
                self.masks_mm.append(self._map(shard["mask"], np.dtype(np.uint8), shard["num_tokens"]))
        self.offsets = np.cumsum([0] + [s["num_tokens"] for s in m["shards"]])
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self.bos_id: int = m["tokenizer"]["bos_id"]
        self.eos_id: int = m["tokenizer"]["eos_id"]

    def _map(self, name: str, dtype: np.dtype, count: int) -> np.ndarray:
        f = self.path / name
        if not f.is_file():
            raise FileNotFoundError(f"shard {f} listed in the manifest is missing")
        if f.stat().st_size != count * dtype.itemsize:
            raise ValueError(f"shard {f} has {f.stat().st_size} bytes; the manifest says {count} x {dtype.itemsize}")
        return np.memmap(f, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def has_mask(self) -> bool:
        return bool(self.masks_mm)

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self._read(self.tokens_mm, start, stop)

    def mask(self, start: int, stop: int) -> np.ndarray | None:
        return self._read(self.masks_mm, start, stop) if self.masks_mm else None

    def _read(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) outside the {len(self)} tokens of {self.path}")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:  # a range may cross shard boundaries
            lo, hi = start - self.offsets[i], min(stop, self.offsets[i + 1]) - self.offsets[i]
            parts.append(arrays[i][lo:hi])
            start, i = int(self.offsets[i] + hi), i + 1
        return np.concatenate(parts) if parts else np.empty(0, arrays[0].dtype if arrays else self.dtype)

    def check_tokenizer(self, tok: Tokenizer) -> None:
        """Raises if `tok` is not the tokenizer the shards were written with."""
        t = self.manifest["tokenizer"]
        if tok.vocab_size != t["vocab_size"] or tok.sha256 != t["sha256"]:
            raise ValueError(f"dataset {self.path} was tokenized with {t['name']!r} (vocab {t['vocab_size']}, "
                             f"sha256 {t['sha256'][:12]}), not with {tok.name!r} (vocab {tok.vocab_size}, "
                             f"sha256 {tok.sha256[:12]})")


class PackedBatches:
    """Shuffled, resumable batches of packed windows from a `TokenDataset`.

    The stream is cut into `(len - 1) // seq_len` windows of seq_len + 1 tokens (window w starts at w * seq_len,
    so consecutive windows share one token and every token is a target once). Each epoch visits the windows in a
    permutation drawn from (seed, epoch). Step s of an epoch takes the global batch of windows
    perm[s*G : (s+1)*G], G = batch_size * world_size, and rank r keeps every world_size-th of them starting at r:
    the ranks together see exactly the batch one process with batch_size G would see (its row j is rank j % W's
    row j // W). Incomplete global batches at the end of an epoch are dropped so all ranks step together.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_windows = (len(dataset) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"seq_len {seq_len} is larger than the corpus: a window needs {seq_len + 1} tokens and "
                             f"{dataset.path} has {len(dataset)}")
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.num_windows // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"the corpus has {self.num_windows} windows of {seq_len + 1} tokens, fewer than one "
                             f"global batch of {self.global_batch} (batch_size {batch_size} x world_size "
                             f"{world_size})")
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _windows(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            self._perm_epoch = self.epoch
        g = self._perm[self.step * self.global_batch:(self.step + 1) * self.global_batch]
        return g[self.rank::self.world_size]

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        T, windows = self.seq_len, self._windows()
        rows = [self.dataset.tokens(w * T, w * T + T + 1).astype(np.int64) for w in windows]
        x = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        input_ids, targets = x[:, :-1], x[:, 1:].clone()
        if self.dataset.has_mask:
            mask = np.stack([self.dataset.mask(w * T + 1, w * T + T + 1) for w in windows])
            targets[torch.from_numpy(mask) == 0] = IGNORE_INDEX
        # a new document starts at every BOS; tokens before the row's first BOS continue an earlier one (id 0)
        document_ids = torch.cumsum(input_ids == self.dataset.bos_id, dim=1)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return {"input_ids": input_ids.contiguous(), "targets": targets, "document_ids": document_ids}

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position: the next batch is step `step` of epoch `epoch`."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "global_batch", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data state was saved with {key}={state[key]}, this loader has "
                                 f"{key}={getattr(self, key)}: the resumed run would see different batches")
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"data state step {state['step']} is outside [0, {self.steps_per_epoch})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# ---- tokenizer training and statistics over files (the tokenizer itself only sees texts) ----------------------


def train_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike, *,
                    min_frequency: int = 2) -> Tokenizer:
    """Trains nanoseek's byte-level BPE on text files (.txt, .jsonl with `text`/`messages`, .parquet) and saves it
    (tokenizer.train_bpe on their documents)."""
    paths = check_inputs(files)
    return train_bpe(_training_texts(paths), vocab_size, out_dir, min_frequency=min_frequency,
                     source=", ".join(map(str, paths)))


def _training_texts(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        for doc in iter_documents(path):  # .txt paragraphs are enough context for BPE's pair counts
            if isinstance(doc, str):
                yield doc
            else:
                for m in doc:
                    yield from (m[k] for k in ("content", "reasoning_content") if isinstance(m.get(k), str))


def tokenizer_stats(tokenizer_dir: str | os.PathLike, files: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Characters, UTF-8 bytes and tokens per file, to compare what a language or domain costs."""
    tok = Tokenizer.load(tokenizer_dir)
    rows = []
    for path in check_inputs(files):
        chars = nbytes = ntok = 0
        batch: list[str] = []
        for doc in iter_documents(path, txt_split="paragraph"):
            text = doc if isinstance(doc, str) else "\n".join(str(m.get("content") or "") for m in doc)
            chars += len(text)
            nbytes += len(text.encode())
            batch.append(text)
            if len(batch) >= 1024:
                ntok += sum(map(len, tok.encode_batch(batch)))
                batch = []
        ntok += sum(map(len, tok.encode_batch(batch)))
        rows.append({"file": str(path), "characters": chars, "bytes": nbytes, "tokens": ntok,
                     "chars_per_token": chars / max(ntok, 1), "bytes_per_token": nbytes / max(ntok, 1)})
    return rows

"""Byte-level BPE tokenizer with DeepSeek's special tokens and DeepSeek-R1's chat format.

Training, encoding and decoding are HF `tokenizers` (Rust); this module adds what a DeepSeek-style model needs around
it: the special-token layout (bos/eos/pad at ids 0/1/2, as the model presets assume), a chat template that renders
exactly like DeepSeek-R1's updated template (generation prompt `<｜Assistant｜><think>\\n`), a *training* render that
keeps the target turn's reasoning (R1's template drops it) with a loss mask, and the HF directory files
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) that `transformers.AutoTokenizer` loads.
`Tokenizer.load` reads any HF tokenizer directory, e.g. one exported from DeepSeek's repositories. See
docs/tokenizer.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from .files import atomic_write
from .reasoning import END_THINK, THINK
from .reasoning import split as split_reasoning

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
TOOL_TOKENS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
               "<｜tool▁output▁end｜>")
# Order = ids: the model presets use bos 0, eos 1, pad 2.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, *TOOL_TOKENS)
# `skip_special_tokens` drops these; <think>/</think> and the tool tokens are content the model writes and parsers
# (reward functions, tool-call parsers) look for, so they survive decoding as in DeepSeek's own tokenizer.
_SKIPPED_ON_DECODE = {BOS, EOS, PAD, USER, ASSISTANT}

# Pre-tokenizer, after DeepSeek-V3's tokenizer.json: numbers, CJK runs and the main pattern are split before BPE.
# V3 isolates runs of up to three digits (\p{N}{1,3}); nanoseek splits every digit (as DeepSeek LLM did) so that a
# small model sees one token per digit and column arithmetic stays learnable.
_DIGITS = r"\p{N}"
_CJK = "[一-龥\u3040-ゟ゠-ヿ]+"
_MAIN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
         r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# nanoseek's own template with DeepSeek-R1's rendering, quirks included (tested string-for-string): only the last
# system message is used, placed right after BOS; every assistant turn keeps only the text after its last </think>;
# "which tool call / tool output is the first" is tracked over the whole conversation, not per turn; an assistant
# message that follows tool outputs is written after <｜tool▁outputs▁end｜> without a role tag; and there is no
# generation prompt after tool outputs. Dict-valued tool arguments are JSON-encoded (R1's template needs strings).
CHAT_TEMPLATE = r"""
{%- set ns = namespace(system='', in_tool=false, seen_call=false, seen_output=false) -%}
{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}
{{- bos_token ~ ns.system -}}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}
    {%- set ns.in_tool = false -%}
    {{- '<｜User｜>' ~ m['content'] -}}
  {%- elif m['role'] == 'assistant' and m['content'] is none -%}
    {%- set ns.in_tool = false -%}
    {%- for call in m['tool_calls'] -%}
      {%- set args = call['function']['arguments'] -%}
      {%- set body = '<｜tool▁call▁begin｜>' ~ call['type'] ~ '<｜tool▁sep｜>' ~ call['function']['name']
          ~ '\n```json\n' ~ (args if args is string else args | tojson) ~ '\n```<｜tool▁call▁end｜>' -%}
      {%- if not ns.seen_call -%}
        {{- '<｜Assistant｜><｜tool▁calls▁begin｜>' ~ body -}}
        {%- set ns.seen_call = true -%}
      {%- else -%}
        {{- '\n' ~ body ~ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- if ns.in_tool -%}
      {{- '<｜tool▁outputs▁end｜>' ~ m['content'] ~ '<｜end▁of▁sentence｜>' -}}
      {%- set ns.in_tool = false -%}
    {%- else -%}
      {{- '<｜Assistant｜>' ~ m['content'].split('</think>')[-1] ~ '<｜end▁of▁sentence｜>' -}}
    {%- endif -%}
  {%- elif m['role'] == 'tool' -%}
    {{- ('\n' if ns.seen_output else '<｜tool▁outputs▁begin｜>') ~ '<｜tool▁output▁begin｜>' ~ m['content']
        ~ '<｜tool▁output▁end｜>' -}}
    {%- set ns.in_tool = true -%}
    {%- set ns.seen_output = true -%}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_tool -%}
  {{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}
  {{- '<｜Assistant｜><think>\n' -}}
{%- endif -%}
"""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of its HF directory."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str | None, eos_token: str | None,
                 pad_token: str | None = None, chat_template: str | None = None, name: str = "",
                 config: dict[str, Any] | None = None) -> None:
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.name = name
        self.config = dict(config or {})  # the directory's tokenizer_config.json, kept on save
        self._compiled = None

    # ---- loading and saving --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, revision: str | None = None) -> Tokenizer:
        """A tokenizer directory (tokenizer.json + tokenizer_config.json), or a Hub id (see nanoseek.hub)."""
        from .hub import resolve_model_dir

        path = resolve_model_dir(path, revision, flag="tokenizer")
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (train one with `nanoseek tokenizer train`)")
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # some hub repos store named templates
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():  # newer transformers save it apart, and prefer it on load
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        def special(key: str, default: str | None) -> str | None:
            value = config.get(key, default)
            if isinstance(value, dict):  # {"__type": "AddedToken", "content": ...}
                value = value.get("content")
            return value if value is None or tok.token_to_id(value) is not None else None

        return cls(tok, bos_token=special("bos_token", BOS), eos_token=special("eos_token", EOS),
                   pad_token=special("pad_token", PAD), chat_template=template, name=path.resolve().name,
                   config=config)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the HF tokenizer files into `path` (which may already hold a model); other files are kept."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.config.items() if k not in ("added_tokens_decoder",)}
        config.update({
            # the generic fast class loads tokenizer.json as is (model-specific classes may rebuild the pipeline)
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": None, "clean_up_tokenization_spaces": False,
            "model_max_length": config.get("model_max_length", 163840),
        })
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        special_map = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                         ("pad_token", self.pad_token)) if v is not None}
        atomic_write(path / "tokenizer.json", self.tok.to_str(pretty=True))
        atomic_write(path / "special_tokens_map.json", json.dumps(special_map, indent=2, ensure_ascii=False))
        atomic_write(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        if self.chat_template is not None and (path / "chat_template.jinja").is_file():  # it would win on load
            atomic_write(path / "chat_template.jinja", self.chat_template)
        self.name = self.name or path.resolve().name
        return path

    # ---- vocabulary ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """The pad token, or EOS when the tokenizer has none (DeepSeek-R1's config pads with EOS)."""
        return self.token_id(self.pad_token) if self.pad_token is not None else self.eos_id

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary of tokenizer {self.name!r}")
        return i

    @property
    def sha256(self) -> str:
        """Fingerprint of the tokenizer (vocabulary, merges, pipeline): data shards record it."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    # ---- text ----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # add_special_tokens=False: the post-processor's BOS is added here explicitly, so every tokenizer directory
        # behaves the same whatever its post-processor; special-token strings in `text` are still recognised.
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self._need(self.bos_id, "bos"), *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _need(self, value: int | None, what: str) -> int:
        if value is None:
            raise ValueError(f"tokenizer {self.name!r} has no {what} token")
        return value

    # ---- chat ----------------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The stored chat template rendered as transformers' `apply_chat_template(tokenize=False)` renders it."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name!r} has no chat_template")
        if self._compiled is None:
            self._compiled = _jinja_env().from_string(self.chat_template)
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                    "pad_token": self.pad_token or "", "unk_token": ""}
        return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **specials)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def encode_chat_for_training(self, messages: Sequence[dict[str, Any]],
                                 all_turns: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and a 0/1 loss mask for SFT on the final assistant turn, reasoning included.

        The prompt is exactly `encode_chat(messages[:-1], add_generation_prompt=True)` (what the model sees at
        inference); the final turn becomes `<think>\\n{reasoning}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>`
        with mask 1 on all of it, `<think>\\n` included. Reasoning comes from `reasoning_content` or an inline
        `<think>...</think>` in `content`. Earlier assistant turns are rendered as the template renders them
        (answer only); with `all_turns=True` their answer + EOS are trained too, otherwise they are context only.
        Pieces are tokenized separately, split at special tokens and after the `<think>\\n` prefill (a newline is
        its own pre-token before stripped reasoning), so the ids equal one encode of the whole text.
        """
        if not messages:
            raise ValueError("empty conversation")
        history, last = list(messages[:-1]), messages[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise ValueError("the last message must be an assistant message with string content (the SFT target)")
        reasoning, answer = message_reasoning(last)

        pieces = self._history_pieces(history, all_turns)
        head = "".join(text for text, _ in pieces)
        prompt = self.render_chat(history, add_generation_prompt=True)
        if not prompt.startswith(head):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        gen = prompt[len(head):]
        prefill = THINK + "\n"
        if gen.endswith(prefill):  # R1: the prompt already opens the reasoning; train on it too
            pieces += [(gen[: -len(prefill)], 0), (prefill, 1)]
            target = f"{reasoning}\n{END_THINK}\n\n{answer}"
        else:  # e.g. right after tool outputs, where R1's template prefills nothing
            pieces.append((gen, 0))
            target = f"{THINK}\n{reasoning}\n{END_THINK}\n\n{answer}" if reasoning else answer
        pieces.append((target + (self.eos_token or ""), 1))

        ids: list[int] = []
        mask: list[int] = []
        for text, trained in pieces:
            piece = self.encode(text) if text else []
            ids += piece
            mask += [trained] * len(piece)
        return ids, mask

    def _history_pieces(self, history: list[dict[str, Any]], all_turns: bool) -> list[tuple[str, int]]:
        if not all_turns:
            return [(self.render_chat(history), 0)]
        pieces: list[tuple[str, int]] = []
        done = ""
        for i, m in enumerate(history):
            text = self.render_chat(history[: i + 1])
            if not text.startswith(done):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            delta, done = text[len(done):], text
            trained = ""
            if m.get("role") == "assistant" and isinstance(m.get("content"), str):
                # the *template's* rule for past turns (DeepSeek's official template keeps the text after the last
                # </think>), mirrored here so the trained span is exactly what the template renders
                answer = m["content"].split(END_THINK)[-1] + (self.eos_token or "")
                if delta.endswith(answer):
                    trained = answer
            pieces += [(delta[: len(delta) - len(trained)], 0), (trained, 1)]
        return pieces


def message_reasoning(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message by the one reasoning split (nanoseek/reasoning.py):
    `reasoning_content`, or an inline `<think>...</think>` in `content`, split at the first `</think>`."""
    content = message.get("content") or ""
    field = message.get("reasoning_content")
    if field is not None and END_THINK in content:
        raise ValueError("assistant message has both reasoning_content and an inline </think>")
    out = split_reasoning(content, field)
    return out.reasoning or "", out.answer


def _jinja_env():
    # The same sandbox and options as transformers' chat templates, so any template renders identically.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# ---- training ------------------------------------------------------------------------------------------------


def build_pipeline() -> tokenizers.Tokenizer:
    """An empty byte-level BPE with nanoseek's pre-tokenizer (digits split one per token)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(_MAIN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *, min_frequency: int = 2,
              source: str = "the texts") -> Tokenizer:
    """Trains a byte-level BPE with DeepSeek's special tokens on an iterable of texts and saves it to `out_dir`.
    Reading files is data.py's job (`data.train_tokenizer` walks .txt/.jsonl/.parquet into this); `source` names
    where the texts came from in errors."""
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small: {len(SPECIAL_TOKENS)} special tokens + 256 bytes "
                         f"need at least {minimum}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    tok = build_pipeline()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted() -> Iterator[str]:
        for text in texts:
            seen[0] += len(text)
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise ValueError(f"no text to train on in {source}")
    # The trainer marks every special token `special`; keep the ones the model writes visible on decode.
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in _SKIPPED_ON_DECODE
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    # Like DeepSeek's tokenizer.json: plain `tokenizer(text)` in transformers prepends BOS.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])
    out = Tokenizer(tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE.strip(),
                    name=Path(out_dir).resolve().name)
    out.save(out_dir)
    return out


# ---- stats ---------------------------------------------------------------------------------------------------


def print_stats(rows: list[dict[str, Any]], console: Any, title: str = "") -> None:
    from rich.table import Table

    table = Table(title=title or None)
    for col in ("file", "characters", "bytes", "tokens", "chars/token", "bytes/token"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in rows:
        table.add_row(r["file"], f"{r['characters']:,}", f"{r['bytes']:,}", f"{r['tokens']:,}",
                      f"{r['chars_per_token']:.2f}", f"{r['bytes_per_token']:.2f}")
    console.print(table)

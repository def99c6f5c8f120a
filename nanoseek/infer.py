"""Inference engine: batched generation over the absorbed-MLA KV cache, continuous batching, per-request sampling
and speculative decoding with the model's own MTP module as the draft (DeepSeek-V3 report section 5.4.3).

Read top to bottom: SamplingParams / RequestOutput (the API) -> CacheRows (a KVCache view of some rows) ->
sampling (process_logits: penalties, temperature, top-k, top-p, min-p; inverse-CDF draws) -> incremental
detokenisation with stop strings -> Engine (add_request / step / abort) -> generate() and the CLI entry point.
docs/inference.md has the design notes and the measured numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from .janus import Janus, check_guidance, guidance_rows, guided_next_tokens
from .model import KVCache, Transformer
from .prepack import DECOMPOSE_ROWS, prepack

GREEDY_BELOW = 1e-5  # temperatures below this are greedy decoding (as vLLM)
SPAN_BUCKET = 256  # the compiled decode step attends over 256, 512, 1024, ... cache slots
# compile=None compiles the decode step of models from this size (compile_pays). Measured on the demo's 3.4M base
# (64 eval problems x 5 samples, one thread, 2-core Zen 4): eager 11 s, compiled 119 s from a cold Inductor cache and
# 29.5 s from a warm one (a graph per (rows, span) bucket as the batch drains); the 20.1M v3-320 of
# benchmarks/decode.py repays its buckets within one 128-token batch (docs/inference.md)
COMPILE_FROM_PARAMS = 10_000_000


# ----------------------------------------------------------------------------------------------------------------
# The request API


@dataclass
class SamplingParams:
    """Per-request sampling, with OpenAI/vLLM semantics.

    Order of processing (vLLM's): penalties on the raw logits -> temperature -> top_k -> top_p -> min_p. logprobs
    are those of the *final processed* distribution (vLLM returns the raw model logprobs by default): at
    temperature 1 with no other knob they are the model's log_softmax. Greedy rows (temperature < 1e-5) are
    processed at temperature 1.
    """

    max_tokens: int | None = 16  # None: until max_model_len
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # -1: off
    min_p: float = 0.0  # drop tokens with p < min_p * max p
    repetition_penalty: float = 1.0  # CTRL/HF: logits of prompt+output tokens: > 0 divided, < 0 multiplied
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    seed: int | None = None  # same request + same seed -> same output when run alone
    stop: str | Sequence[str] | None = None  # stop strings (need a tokenizer); not included in the text
    stop_token_ids: Sequence[int] | None = None  # in addition to EOS
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: of the sampled token; n: also the n most likely tokens
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, text "" (vLLM's flag), for callers that decode the ids themselves

    def __post_init__(self) -> None:
        errors = []
        if self.max_tokens is not None and self.max_tokens < 1:
            errors.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # also rejects NaN
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            errors.append(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            errors.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            errors.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                errors.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and self.logprobs < 0:
            errors.append(f"logprobs must be None or >= 0, got {self.logprobs}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in self.stop):
            errors.append("stop strings must be non-empty")
        if self.stop and not self.detokenize:
            errors.append("stop strings need detokenize=True (they are matched in the text)")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids or ())
        if any(t < 0 for t in self.stop_token_ids):
            errors.append(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")
        if errors:
            raise ValueError("invalid SamplingParams: " + "; ".join(errors))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class RequestOutput:
    """What step() returns per request: a delta (the new tokens/text of this step). Engine.generate merges them."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # "" without a tokenizer; never a partial stop string
    logprobs: list[float] | None = None  # of each token in token_ids
    top_logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far

    def merge(self, delta: RequestOutput) -> None:
        self.token_ids += delta.token_ids
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + delta.top_logprobs
        self.finished, self.finish_reason, self.stop_reason = delta.finished, delta.finish_reason, delta.stop_reason
        self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    shared_prefill_tokens: int = 0  # of those, tokens not recomputed: a prompt another new request also had
    generated_tokens: int = 0
    verify_steps: int = 0  # speculative: row-steps (one per running request per step)
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Mean tokens emitted per request per speculative step (1 + accepted drafts)."""
        return (self.verify_steps + self.accepted) / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "prefill_tokens": self.prefill_tokens,
                "shared_prefill_tokens": self.shared_prefill_tokens,
                "generated_tokens": self.generated_tokens, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_verify": self.tokens_per_verify}


class TokenizerLike(Protocol):  # nanoseek.tokenizer.Tokenizer, or a test stand-in
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


# ----------------------------------------------------------------------------------------------------------------
# The cache: a view of some rows of a preallocated KVCache


class DecodeStep(nn.Module):
    """One decode forward over rows [0, b) of a cache, (b, 1) tokens -> (b, V) fp32 logits: the one decode path of
    every caller (generate, serve, eval, distillation and GRPO sampling through `Engine`; Janus' image sampler with
    its own `embed` and `head`: image-token embeddings in, image logits out).

    `run(compile=True)` runs it as one static-shape graph per bucket of rows (the caller pads b to a bucket) and of
    attended cache slots (`span`: powers of two from SPAN_BUCKET up to the cache length). The weights are graph
    inputs, read from the modules at every call, never constants frozen into the graph: an optimizer step or a
    load_state_dict on the model is seen by the next decode step without recompiling.
    """

    def __init__(self, model: Transformer, embed: nn.Module | None = None, head: nn.Module | None = None,
                 compile: bool = False):
        super().__init__()
        self.model = model
        self.embed = embed if embed is not None else model.embed_tokens
        self.head = head if head is not None else model.lm_head
        self.compiled = compile
        device = next(model.parameters()).device
        if device.type == "cpu":  # eager products (prefill, eager steps) through oneDNN's packed weights
            prepack(model)
            prepack(self.head)
        # cpp_wrapper: the graph's kernels are called from generated C++ rather than Python (a decode step is a few
        # hundred small kernels). Held in a list: an attribute would register the wrapper as a submodule (a cycle)
        # One-row buckets are compiled ahead of their first call (Dynamo's aot_compile, run()) into a function called
        # without Dynamo's frame evaluation or guards (none kept: the bucket picks the function); other buckets are
        # guarded calls of the same code. Ahead-of-time compiling misses the compile caches (~11 s per bucket even
        # when warm, against ~3.6 s), so it is kept where a step is short and the ~65 us per call matters most
        import torch._inductor.config as inductor_config

        options: dict[str, Any] = {"cpp_wrapper": device.type == "cpu"}
        aot = hasattr(torch.compiler, "skip_all_guards_unsafe") and not inductor_config.force_disable_caches
        self._graph = [torch.compile(self.forward, fullgraph=True, dynamic=False, options=options)] if compile else []
        if compile and aot:
            self._graph.append(torch.compile(self.forward, fullgraph=True, dynamic=False, options={
                **options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}))
        self._warm: dict[tuple[int, int], Any] = {}  # (rows, span) -> its ahead-of-time step, or False: guarded, warm

    def forward(self, tokens: torch.Tensor, rows: CacheRows) -> torch.Tensor:
        # RoPE positions come from the cache (its real tokens so far: left padding, Janus): inside the graph, not
        # an eager sum before every call (~10 us of the demo model's 0.6 ms step)
        h, _ = self.model.trunk(None, inputs_embeds=self.embed(tokens), cache=rows)
        return self.head(h[:, 0]).float()

    def run(self, tokens: torch.Tensor, cache: KVCache, need: int) -> torch.Tensor:
        """Feed tokens (b, 1) to rows [0, b) of `cache` (each at its own next slot); `need`: the most slots any row
        holds after this step. Returns (b, V) fp32 logits."""
        b = tokens.shape[0]
        if not self._graph:
            return self(tokens, CacheRows(cache, 0, b))
        span = min(cache.max_len, max(SPAN_BUCKET, 1 << (need - 1).bit_length()))
        rows = CacheRows(cache, 0, b, span=span)
        step = self._warm.get((b, span))
        if step is None and b == 1 and len(self._graph) > 1:
            # the bucket's shapes pick its function; the caller keeps the model's dtype and device fixed. The weights
            # stay graph inputs, read at every call. Per call this saves ~65 us (the demo model's batch-1 step,
            # 0.49 -> 0.42 ms) over a guarded call, and 0.3-0.4 ms over checking every parameter's guards
            with _compiling(b):
                step = self._graph[1].aot_compile(((tokens, rows), {}))
            step.disable_guard_check()
            self._warm[(b, span)] = step
        if step:
            return step(self, tokens, rows)
        # a guarded call: the first one compiles the bucket, later ones skip its guards (False: warm)
        warm = step is False
        with (contextlib.nullcontext() if warm else _compiling(b)), \
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=warm):
            out = self._graph[0](tokens, rows)
        self._warm[(b, span)] = False
        return out


def compile_pays(model: nn.Module) -> bool:
    """What `Engine(compile=None)` decides: compile the decode step for models of at least COMPILE_FROM_PARAMS
    parameters on a CPU or CUDA device. Below, the one-off compilation (seconds from a warm cache, tens of seconds
    cold) is not repaid by the few decode steps small models are asked for (the test models: ~1M parameters).
    Buffers count too: a quantized model's int8 weights are buffers (nanoseek.quant)."""
    param = next(model.parameters())
    n = sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))
    return param.device.type in ("cpu", "cuda") and n >= COMPILE_FROM_PARAMS




@contextlib.contextmanager
def _compiling(rows: int) -> Iterator[None]:
    """While a bucket of `rows` rows compiles (or its first call checks its guards): room for one Dynamo cache
    entry per (rows, span) bucket of the same code (the per-code limit defaults to 8), and small buckets' products
    as Inductor reductions."""
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096), _gemv_as_reductions(rows):
        yield


@contextlib.contextmanager
def _gemv_as_reductions(rows: int) -> Iterator[None]:
    """While a decode bucket of `rows` rows compiles: let Inductor write its matrix-vector products as its own
    reduction kernels (`sum(x[:, :, None] * W.T, -2)`, its `decompose_mm_pass`) instead of calling the BLAS.

    A decode step streams the weights once, from memory: cold-cache fp32 matrix-vector products through MKL ran at
    7.9 GB/s here, Inductor's generated reductions at 16.7 GB/s (a plain `sum` of the same bytes: 20 GB/s), and
    the step time halved (docs/inference.md). The pass ships with Inductor for memory-bound CPU matmuls but only
    for 1 x 2048-sized ones (module constants read at import): the limits are raised while this bucket compiles.
    """
    if rows > DECOMPOSE_ROWS:
        yield
        return
    import torch._inductor.config as inductor_config
    from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_module

    limits = {"cpu_max_first_dimension_decomposition": DECOMPOSE_ROWS,
              "cpu_max_other_dimension_decomposition": 1 << 40}
    saved = {k: getattr(pass_module, k) for k in limits}
    try:
        for k, v in limits.items():
            setattr(pass_module, k, v)
        with inductor_config.patch(post_grad_fusion_options={"decompose_mm_pass": dict(limits)}):
            yield
    finally:
        for k, v in saved.items():
            setattr(pass_module, k, v)


class CacheRows:
    """Rows [start, stop) of a KVCache, seen by the model as a cache of their own.

    Duck-types what the model calls (use_absorbed / next_positions / begin / write / commit) and writes into the
    parent's preallocated tensors, so the engine runs a forward over the running rows only (a contiguous prefix:
    the engine compacts rows when a request leaves) or prefills new requests into free rows while the others keep
    their state. Attention reads `c_kv[layer, start:stop, :end]`: a view, no copy.
    """

    def __init__(self, parent: KVCache, start: int, stop: int, absorb_upto: int = 1, span: int | None = None):
        self.parent, self.rows, self.batch_size = parent, slice(start, stop), stop - start
        self.absorb_upto = absorb_upto
        self.span = span or parent.max_len  # compiled: the slots attention reads (a static bucket >= every length)
        self._slots: torch.Tensor | None = None
        self._end = 0

    @property
    def lengths(self) -> torch.Tensor:
        return self.parent.lengths[self.rows]

    @property
    def valid(self) -> torch.Tensor:
        return self.parent.valid[self.rows]

    def use_absorbed(self, T: int) -> bool:
        # V2 section 2.1.3: with few queries per row (decode, speculative verification) attention in latent space
        # beats decompressing every cached latent into per-head keys/values; prefill chunks use SDPA.
        return self.absorb_upto >= T

    def next_positions(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor:
        seen = self.valid.sum(dim=1, keepdim=True)
        if attention_mask is None:
            return seen + torch.arange(T, device=seen.device)
        return seen + (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)

    def begin(self, T: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        lengths = self.lengths
        if torch.compiler.is_compiling():  # static shapes: attend over `span` slots, masked (no host sync); the
            end = self.span                # engine picks a span bucket that holds every row's slots
        else:
            end = int(lengths.max()) + T
            if end > self.parent.max_len:
                raise ValueError(f"KV cache is full: {end} tokens needed, max_len={self.parent.max_len}")
        self._slots = lengths[:, None] + torch.arange(T, device=lengths.device)  # (B, T)
        new_valid = torch.ones_like(self._slots, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        valid = self.valid
        valid.scatter_(1, self._slots, new_valid)  # in place: a view of the parent's rows
        self._end = end
        key_pos = torch.arange(end, device=lengths.device)
        mask = (key_pos[None, None, :] <= self._slots[:, :, None]) & valid[:, None, :end]  # (B, T, S)
        mask |= key_pos[None, None, :] == self._slots[:, :, None]  # a padding query sees itself: no NaN rows
        return mask[:, None]

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._slots is not None, "begin() must be called before write()"
        layer -= self.parent.layer_offset
        cache_c, cache_k = self.parent.c_kv, self.parent.k_pe
        # index_put_ on the whole cache tensors, not on views of them: a compiled step then updates the cache in
        # place (through a view, Inductor copies every layer's cache on each write)
        b = torch.arange(self.rows.start, self.rows.stop, device=cache_c.device)[:, None].expand_as(self._slots)
        at = (torch.full_like(self._slots, layer), b, self._slots)
        cache_c.index_put_(at, c_kv.to(cache_c.dtype))
        cache_k.index_put_(at, k_pe.to(cache_k.dtype))
        return cache_c[layer, self.rows, : self._end], cache_k[layer, self.rows, : self._end]

    def commit(self) -> None:
        assert self._slots is not None
        self.parent.lengths[self.rows] = self._slots[:, -1] + 1
        self._slots = None

    def truncate(self, new_lengths: torch.Tensor) -> None:
        """Roll rows back to `new_lengths` slots (rejected drafts, right padding): later slots become free."""
        self.parent.lengths[self.rows] = new_lengths
        keep = torch.arange(self.parent.max_len, device=new_lengths.device)[None, :] < new_lengths[:, None]
        self.parent.valid[self.rows] &= keep


def _move_cache_row(cache: KVCache, src: int, dst: int) -> None:
    cache.c_kv[:, dst] = cache.c_kv[:, src]
    cache.k_pe[:, dst] = cache.k_pe[:, src]
    cache.valid[dst] = cache.valid[src]
    cache.lengths[dst] = cache.lengths[src]


# ----------------------------------------------------------------------------------------------------------------
# Sampling: one vectorised pass over the batch, per-row parameters as tensors


@dataclass
class SamplingTensors:
    """The sampling parameters of N logits rows as (N,) tensors, plus flags to skip unused work."""

    temperature: torch.Tensor  # 1 for greedy rows
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # long; vocab size when off
    top_p: torch.Tensor  # 2 when off (never reached by a cumulative probability)
    min_p: torch.Tensor
    repetition: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    generators: list[torch.Generator | None]  # per-request generators (seed), None: the engine's
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    any_repetition: bool
    any_temperature: bool = True  # some row divides by a temperature other than 1

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str | None = None,
                    generators: Sequence[torch.Generator | None] | None = None) -> SamplingTensors:
        """device: the logits' device (None: torch's default device); generators must live on the same device."""
        def t(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        greedy = [p.greedy for p in params]
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        top_p = [p.top_p if p.top_p < 1 else 2.0 for p in params]
        return cls(
            temperature=t([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device), top_p=t(top_p),
            min_p=t([p.min_p for p in params]), repetition=t([p.repetition_penalty for p in params]),
            presence=t([p.presence_penalty for p in params]), frequency=t([p.frequency_penalty for p in params]),
            generators=list(generators) if generators is not None else [None] * len(params),
            all_greedy=all(greedy), any_greedy=any(greedy),
            any_top_k=any(k < vocab_size for k in top_k), any_top_p=any(p < 1 for p in top_p),
            any_min_p=any(p.min_p > 0 for p in params),
            any_penalty=any(_has_penalty(p) for p in params),
            any_repetition=any(p.repetition_penalty != 1 for p in params),
            any_temperature=any(not g and p.temperature != 1 for p, g in zip(params, greedy)),
        )

    def repeat(self, n: int) -> SamplingTensors:
        """Each row repeated n times (the k+1 positions of a speculative verification)."""
        kw = {f: getattr(self, f).repeat_interleave(n) for f in
              ("temperature", "greedy", "top_k", "top_p", "min_p", "repetition", "presence", "frequency")}
        return replace(self, **kw, generators=[g for g in self.generators for _ in range(n)])

    def without_penalties(self) -> SamplingTensors:
        return replace(self, any_penalty=False, any_repetition=False)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def process_logits(logits: torch.Tensor, st: SamplingTensors, counts: torch.Tensor | None = None,
                   prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) model logits -> (N, V) logits of the final sampling distribution (-inf = removed).

    counts (N, V): occurrences of each token in the output so far; prompt_mask (N, V): tokens of the prompt.
    """
    x = logits.float()
    if st.any_penalty:
        counts = torch.zeros_like(x) if counts is None else counts.to(x.dtype)
        in_output = counts > 0
        if st.any_repetition:  # CTRL (Keskar et al. 2019) as HF/vLLM: tokens seen in the prompt or the output
            seen = in_output if prompt_mask is None else in_output | prompt_mask
            r = st.repetition[:, None]
            x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        # OpenAI: logit -= frequency_penalty * count + presence_penalty * (count > 0), over output tokens only
        x = x - st.frequency[:, None] * counts - st.presence[:, None] * in_output
    if st.any_temperature:  # greedy and temperature-1 rows skip a pass over (N, V): 16 us of a 0.63 ms step
        x = x / st.temperature[:, None]
    if st.any_top_k or st.any_top_p:
        # top-k, then top-p, over the K best candidates (torch.topk) instead of a sort of the whole vocabulary:
        # 10x faster at V = 4096 and 30x at V = 129k on a CPU. A row with top_p but no top_k whose nucleus does not
        # close within the candidates is redone with K = V (a full sort).
        V = x.shape[-1]
        K = min(V, max(_TOP_P_CANDIDATES if st.any_top_p else 0, int(st.top_k.masked_fill(st.top_k >= V, 0).max())))
        out, ok = _top_k_top_p(x, st, K)
        if not ok:
            out, _ = _top_k_top_p(x, st, V)
        x = out
    if st.any_min_p:  # Nguyen et al. 2024: threshold relative to the most likely token
        p = x.softmax(dim=-1)
        x = x.masked_fill(p < st.min_p[:, None] * p.amax(dim=-1, keepdim=True), float("-inf"))
    return x


_TOP_P_CANDIDATES = 256


def _top_k_top_p(x: torch.Tensor, st: SamplingTensors, K: int) -> tuple[torch.Tensor, bool]:
    """Truncate the rows of x that use top_k/top_p to their kept set, looking at the K best tokens only.
    Returns (logits, False if some top-p row needs more than K candidates)."""
    V = x.shape[-1]
    vals, idx = x.topk(K, dim=-1)  # sorted, descending
    remove = torch.arange(K, device=x.device)[None, :] >= st.top_k[:, None]  # keeps exactly k (ties: any k)
    use_k = st.top_k < V
    use_p = st.top_p <= 1
    if st.any_top_p:  # keep the tokens whose preceding mass is below top_p (the first one always)
        kept = vals.masked_fill(remove, float("-inf"))
        lse = torch.where(use_k, kept.logsumexp(dim=-1), x.logsumexp(dim=-1))  # top-p renormalises after top-k
        p = (kept - lse[:, None]).exp()
        cum = p.cumsum(dim=-1)
        remove |= (cum - p) >= st.top_p[:, None]
        if K < V and bool((use_p & ~use_k & (cum[:, -1] < st.top_p)).any()):
            return x, False
    out = torch.full_like(x, float("-inf")).scatter_(1, idx, vals.masked_fill(remove, float("-inf")))
    return torch.where((use_k | use_p)[:, None], out, x), True


def _uniform(shape: tuple[int, ...], generators: list[torch.Generator | None], default: torch.Generator,
             device: torch.device) -> torch.Tensor:
    """U[0, 1) with row i drawn from generators[i] when set (seeded requests), else from the engine's generator.
    The generators live on `device` (the Engine creates them there): drawing on the host and copying would add a
    host-to-device transfer per step for nothing, since a seed cannot reproduce tokens across device types anyway
    (CPU and CUDA generators are different algorithms, and the probabilities themselves differ by rounding)."""
    u = torch.rand(shape, device=device, generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(shape[1:], device=device, generator=g)
    return u


def sample_from(probs: torch.Tensor, generators: list[torch.Generator | None], default: torch.Generator
                ) -> torch.Tensor:
    """One token per row of (unnormalised) probabilities (N, V) by inverse CDF: one uniform per row, so seeds stay
    per request, and no per-element noise (an exponential race costs V random numbers per row: 10x slower)."""
    cdf = probs.float().cumsum(dim=-1)
    u = _uniform((probs.shape[0], 1), generators, default, probs.device) * cdf[:, -1:]
    # side="right": the first token whose cumulative mass exceeds u; zero-probability tokens are never chosen
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def draw(x: torch.Tensor, st: SamplingTensors, default: torch.Generator) -> torch.Tensor:
    """Sample one token per row of processed logits x (N, V): argmax for greedy rows, else a draw from softmax(x)."""
    if st.all_greedy:
        return x.argmax(dim=-1)
    sampled = sample_from(x.softmax(dim=-1), st.generators, default)
    return torch.where(st.greedy, x.argmax(dim=-1), sampled) if st.any_greedy else sampled


def verify_drafts(x: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, st: SamplingTensors,
                  default: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance for n rows. x (n, k+1, V): processed target logits after [last, d_1..d_k];
    drafts (n, k); q (n, k, V): the draft distributions the sampled rows drew from (None if all rows are greedy).

    Greedy rows accept the longest prefix of drafts equal to the target argmax, so the output is the plain greedy
    output. Sampled rows use speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_j with
    probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection draw from norm(max(0, p_j - q_j)); after k
    acceptances draw a bonus token from p_k. Each emitted token then follows p exactly.
    Returns (accepted drafts a (n,), tokens (n, k+1)); a row emits tokens[:a+1] (d_1..d_a, then the correction).
    """
    n, k = drafts.shape
    b = torch.arange(n, device=x.device)
    best = x.argmax(dim=-1)  # (n, k+1)
    accept = drafts == best[:, :k]
    if q is not None and not st.all_greedy:
        p = x.softmax(dim=-1)
        p_d = p[:, :k].gather(2, drafts[..., None]).squeeze(-1)
        q_d = q.gather(2, drafts[..., None]).squeeze(-1)
        u = _uniform((n, k), st.generators, default, x.device)
        accept = torch.where(st.greedy[:, None], accept, u * q_d <= p_d)
    n_acc = accept.long().cumprod(dim=1).sum(dim=1)
    fix = best[b, n_acc]
    if q is not None and not st.all_greedy:  # residual at the first rejection, p_k itself after k acceptances
        p_a = p[b, n_acc]
        q_a = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[b, n_acc]
        res = (p_a - q_a).clamp(min=0)
        res = torch.where(res.sum(dim=-1, keepdim=True) > 0, res, p_a)
        fix = torch.where(st.greedy, fix, sample_from(res, st.generators, default))
    tokens = torch.cat([drafts, drafts[:, :1]], dim=1)
    tokens[b, n_acc] = fix  # entries after a row's correction token are unused
    return n_acc, tokens


# ----------------------------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings


class _Text:
    """Decoded text of a request's output, grown one token at a time.

    Incremental (vLLM's prefix/read offsets): each token decodes a short window, and a window ending in U+FFFD (an
    incomplete UTF-8 sequence of byte-level BPE) waits for the next token. Text that could be the start of a stop
    string is held back until resolved, so a client never sees a partial stop string.
    """

    def __init__(self, tokenizer: TokenizerLike, params: SamplingParams):
        self.tok, self.stops = tokenizer, tuple(params.stop)  # type: ignore[arg-type]
        self.skip_special, self.include_stop = params.skip_special_tokens, params.include_stop_str_in_output
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.prefix, self.read = 0, 0

    def add(self, token: int) -> str | None:
        """Append a token; returns the stop string it completed (the text is then cut there), else None."""
        self.ids.append(token)
        return self._decode(final=False)

    def finish(self) -> str | None:
        """At the end of the request, decode what is still pending (an incomplete UTF-8 tail as U+FFFD)."""
        return self._decode(final=True) if self.read < len(self.ids) else None

    def _decode(self, final: bool) -> str | None:
        before = self.tok.decode(self.ids[self.prefix: self.read], skip_special_tokens=self.skip_special)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip_special)
        if (after.endswith("\ufffd") and not final) or len(after) <= len(before):
            return None
        old = len(self.text)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        hit: tuple[int, str] | None = None
        for s in self.stops:  # only a match that ends in the new text can be new
            i = self.text.find(s, max(0, old - len(s) + 1))
            if i >= 0 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is None:
            return None
        self.text = self.text[: hit[0] + (len(hit[1]) if self.include_stop else 0)]
        return hit[1]

    def delta(self, final: bool) -> str:
        hold = 0
        if not final:
            for s in self.stops:  # longest suffix of the text that is a proper prefix of a stop string
                for n in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                    if self.text.endswith(s[:n]):
                        hold = n
                        break
        end = len(self.text) - hold
        out = self.text[self.sent: end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


# ----------------------------------------------------------------------------------------------------------------
# The engine


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    text: _Text | None
    embeds: torch.Tensor | None = None  # (T, D) prompt embeddings replacing the lookup (Janus: image features)
    output: list[int] = field(default_factory=list)
    row: int = -1
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Engine:
    """Batched generation with continuous batching over one preallocated absorbed-MLA cache of max_batch rows.

    A server drives it from one thread: add_request() and abort() may be called from any thread, step() runs one
    scheduling step (finish aborted requests, admit waiting requests into free rows and prefill them, one decode
    forward for all running rows) and returns the per-request deltas. Running requests occupy rows 0..n-1; when
    one leaves, the last row moves into its slot, so every forward reads a contiguous block of the cache.

    num_speculative_tokens k > 0 drafts k tokens per step with MTP module 1 (V3 section 5.4.3; module 1 re-applied
    to its own output hidden state for k > 1) and verifies them with one main-model forward of k + 1 tokens.

    Not batch-invariant: a request's tokens can differ by rounding when it shares the batch with others (other
    matmul shapes); seeded sampling is reproducible for the same request run alone.

    compile=True compiles the plain decode forward (`DecodeStep`; prefill and speculative steps stay eager) into
    one static-shape graph per bucket of running rows (powers of two up to max_batch) and of attended cache slots
    (powers of two from 256 up to the cache length). The weights are graph inputs, not constants: the engine keeps
    seeing the model's current weights (an optimizer step, a load_state_dict), so one engine serves a training
    loop's rollouts. compile=None (the default) compiles when the model is large enough for it to pay
    (`compile_pays`); `warmup()` compiles the buckets up front. docs/inference.md, "The fast decode path".
    """

    def __init__(self, model: Transformer, tokenizer: TokenizerLike | None = None, *, max_batch: int = 16,
                 max_model_len: int | None = None, dtype: torch.dtype | None = None,
                 num_speculative_tokens: int = 0, seed: int | None = None, compile: bool | None = None):
        cfg = model.config
        if dtype is not None:
            model.to(dtype)  # in place: nn.Module.to
        param = next(model.parameters())
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = cfg.vocab_size
        self.max_batch = max_batch
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, 4096)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        self.k = num_speculative_tokens
        if self.k < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.k}")
        if self.k and not len(model.mtp):
            raise ValueError("speculative decoding drafts with the model's MTP modules, and this model has none "
                             "(num_nextn_predict_layers = 0)")
        # verification writes k + 1 slots beyond the last accepted token before rolling back
        cache_len = self.max_model_len + self.k + 1
        self.cache = KVCache(cfg, max_batch, cache_len, self.device, self.dtype)
        self.mtp_cache = KVCache(cfg, max_batch, cache_len, self.device, self.dtype, mtp=True) if self.k else None
        if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            eos: Any = tokenizer.eos_id  # type: ignore[attr-defined]
        else:
            eos = cfg.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = cfg.pad_token_id or 0
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))  # follows torch.manual_seed
        # on the model's device, as every per-request generator (add_request): sampling never leaves the device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # per-row state, moved with the request when rows are compacted
        self._last = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # token to feed next
        self._drafts = torch.zeros(max_batch, max(self.k, 1), dtype=torch.long, device=self.device)
        self._q: torch.Tensor | None = None  # (max_batch, k, V) draft distributions of sampled rows
        self._counts: torch.Tensor | None = None  # (max_batch, V) output token counts, for penalties
        self._prompt_mask: torch.Tensor | None = None  # (max_batch, V), for the repetition penalty
        self.rows: list[_Request] = []
        self.waiting: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._incoming: list[_Request] = []
        self._aborts: set[str] = set()
        self._ids = itertools.count()
        self._st: tuple[tuple[str, ...], SamplingTensors] | None = None
        self.stats = EngineStats()
        self.compiled = compile_pays(model) if compile is None else compile
        self._step = DecodeStep(model, compile=self.compiled)

    # ---- public API -------------------------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int] | str, params: SamplingParams | None = None,
                    request_id: str | None = None, *, prompt_embeds: torch.Tensor | None = None) -> str:
        """Queue a request (token ids, or text with a tokenizer: BOS is prepended). request_id, when given, must be
        unique among the live requests; by default "0", "1", ...

        prompt_embeds (len(prompt), hidden_size), optional: the prompt's input embeddings, used at prefill instead of
        the token lookup (Janus: image features over the <image_placeholder> tokens). The ids still count for
        lengths, penalties and usage; decoding is plain tokens."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass token ids")
            prompt = self.tokenizer.encode(prompt, add_bos=True)  # type: ignore[attr-defined]
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt_ids is empty: at least one token (e.g. BOS) is needed")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        n = len(prompt)
        if prompt_embeds is not None and tuple(prompt_embeds.shape) != (n, self.config.hidden_size):
            raise ValueError(f"prompt_embeds must be (len(prompt), hidden_size) = ({n}, {self.config.hidden_size}), "
                             f"got {tuple(prompt_embeds.shape)}")
        if n >= self.max_model_len:
            raise ValueError(f"prompt is {n} tokens, longer than max_model_len - 1 ({self.max_model_len - 1})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
                             f"({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (use stop_token_ids)")
        if any(t >= self.vocab_size for t in params.stop_token_ids):  # type: ignore[union-attr]
            raise ValueError(f"stop_token_ids must be < vocab_size ({self.vocab_size})")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs must be <= vocab_size ({self.vocab_size})")
        rid = request_id if request_id is not None else str(next(self._ids))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        gen = torch.Generator(self.device).manual_seed(params.seed) if params.seed is not None else None
        # the incremental detokenizer decodes two windows per token: skipped when the caller only wants the ids
        text = _Text(self.tokenizer, params) if self.tokenizer is not None and params.detokenize else None
        embeds = prompt_embeds.to(self.device, self.dtype) if prompt_embeds is not None else None
        req = _Request(rid, prompt, params, max_tokens, stop_ids, gen, text, embeds)
        with self._lock:
            self._incoming.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def warmup(self) -> list[int]:
        """Compile the decode step for every batch bucket now (seconds from a warm compile cache, ~10-30 s per
        bucket cold on a CPU) rather than on first use; call before adding requests. Longer contexts than the
        first span bucket compile when they first occur. Returns the batch buckets (none without compile)."""
        if not self.compiled:
            return []
        if self.rows or self.has_work():
            raise RuntimeError("warmup() runs the decode step on free rows: call it before adding requests")
        buckets = sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
        with torch.inference_mode():
            for b in buckets:
                self._step.run(self._last[:b, None], self.cache, 1)
                self.cache.reset_rows(list(range(b)))
        return buckets

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.rows or self.waiting or self._incoming or self._aborts)

    def generate(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Run the prompts to completion (in batches of max_batch, continuously refilled); one merged output each."""
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp))
        except ValueError:  # all or nothing: withdraw the prompts already queued
            with self._lock:
                self._incoming = [r for r in self._incoming if r.id not in ids]
            raise
        results = {i: RequestOutput(i) for i in ids}
        while not all(r.finished for r in results.values()):
            for delta in self.step():
                if delta.request_id in results:
                    results[delta.request_id].merge(delta)
        return [results[i] for i in ids]

    @torch.inference_mode()  # 5-10% faster decode steps than no_grad on a CPU (no version counters)
    def step(self) -> list[RequestOutput]:
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        out: list[RequestOutput] = []
        if aborts:
            for r in [r for r in self.waiting if r.id in aborts]:
                self.waiting.remove(r)
                out.append(self._finish_now(r, "abort"))
            out += [self._finish_now(r, "abort") for r in self.rows if r.id in aborts and not r.finished]
            self._free_finished()
        n_running = len(self.rows)
        new: list[_Request] = []
        while self.waiting and n_running + len(new) < self.max_batch:
            new.append(self.waiting.popleft())
        if n_running:
            out += self._speculative_step(n_running) if self.k else self._decode_step(n_running)
        if new:
            out += self._prefill(new)
        self._free_finished()
        self.stats.steps += 1
        return out

    # ---- scheduling helpers ------------------------------------------------------------------------------------
    def _batch_params(self, n: int) -> SamplingTensors:
        """SamplingTensors of rows 0..n-1, rebuilt only when the batch changes."""
        key = tuple(r.id for r in self.rows[:n])
        if self._st is None or self._st[0] != key:
            reqs = self.rows[:n]
            st = SamplingTensors.from_params([r.params for r in reqs], self.vocab_size, self.device,
                                             [r.generator for r in reqs])
            self._st = (key, st)
        return self._st[1]

    def _free_finished(self) -> None:
        i = 0
        while i < len(self.rows):
            if not self.rows[i].finished:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:  # move the last row into the hole: running rows stay a contiguous prefix
                self._move_row(last, i)
                self.rows[i] = self.rows[last]
                self.rows[i].row = i
            self.rows.pop()
            self.cache.reset_rows([last])
            if self.mtp_cache is not None:
                self.mtp_cache.reset_rows([last])

    def _move_row(self, src: int, dst: int) -> None:
        _move_cache_row(self.cache, src, dst)
        if self.mtp_cache is not None:
            _move_cache_row(self.mtp_cache, src, dst)
        for t in (self._last, self._drafts, self._q, self._counts, self._prompt_mask):
            if t is not None:
                t[dst] = t[src]

    def _finish_now(self, r: _Request, reason: str) -> RequestOutput:
        r.finished, r.finish_reason = True, reason
        if r.text is not None:
            r.text.finish()
        return RequestOutput(r.id, text=r.text.delta(final=True) if r.text else "", finished=True,
                             finish_reason=reason, prompt_tokens=len(r.prompt), completion_tokens=len(r.output))

    def _append(self, r: _Request, tokens: list[int], logprobs: list[float] | None,
                tops: list[dict[int, float]] | None) -> RequestOutput:
        """Record new tokens of a request, stopping at a stop token, stop string or max_tokens."""
        n = 0
        for tok in tokens:
            n += 1
            r.output.append(tok)
            if tok in r.stop_ids:  # the stop token is in token_ids, not in the text
                r.finished, r.finish_reason, r.stop_reason = True, "stop", tok
                break
            if r.text is not None and (s := r.text.add(tok)) is not None:
                r.finished, r.finish_reason, r.stop_reason = True, "stop", s
                break
            if len(r.output) >= r.max_tokens:
                r.finished, r.finish_reason = True, "length"
                break
        if r.finished and r.text is not None and (s := r.text.finish()) is not None:
            r.finish_reason, r.stop_reason = "stop", s  # the flushed tail completed a stop string
        self.stats.generated_tokens += n
        want = r.params.logprobs
        return RequestOutput(
            r.id, tokens[:n], r.text.delta(final=r.finished) if r.text else "",
            logprobs=logprobs[:n] if want is not None and logprobs is not None else None,
            top_logprobs=tops[:n] if want and tops is not None else None,
            finished=r.finished, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            prompt_tokens=len(r.prompt), completion_tokens=len(r.output))

    def _logprobs(self, x: torch.Tensor, tokens: torch.Tensor, reqs: Sequence[_Request]
                  ) -> tuple[list[Any] | None, list[Any] | None]:
        """Logprobs of the sampled tokens (and the top-n) under the processed distribution x (..., V)."""
        wants = [r.params.logprobs for r in reqs]
        if all(w is None for w in wants):
            return None, None
        lp = x.log_softmax(dim=-1)
        chosen = lp.gather(-1, tokens[..., None]).squeeze(-1).tolist()
        n_top = max(w or 0 for w in wants)
        if not n_top:
            return chosen, None
        vals, idx = lp.topk(n_top, dim=-1)
        vals, idx = vals.tolist(), idx.tolist()

        def top(ii: list[int], vv: list[float], w: int | None) -> dict[int, float]:
            return dict(zip(ii[: w or 0], vv[: w or 0]))

        if x.dim() == 2:  # one token per row
            tops: list[Any] = [top(idx[b], vals[b], w) for b, w in enumerate(wants)]
        else:  # (rows, positions)
            tops = [[top(ii, vv, w) for ii, vv in zip(idx[b], vals[b])] for b, w in enumerate(wants)]
        return chosen, tops

    def _penalty_state(self, reqs: Sequence[_Request]) -> None:
        """Allocate the count/prompt tensors the first time a request with penalties arrives; reset its rows."""
        if not any(_has_penalty(r.params) for r in reqs):
            if self._counts is not None:
                for r in reqs:
                    self._counts[r.row] = 0
            return
        if self._counts is None:
            self._counts = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.int32, device=self.device)
            self._prompt_mask = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        assert self._prompt_mask is not None
        for r in reqs:
            self._counts[r.row] = 0
            self._prompt_mask[r.row] = False
            self._prompt_mask[r.row, torch.tensor(r.prompt, device=self.device)] = True

    def _count(self, n: int, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        if self._counts is not None:
            ones = torch.ones_like(tokens, dtype=torch.int32) if keep is None else keep.to(torch.int32)
            self._counts[:n].scatter_add_(1, tokens.view(n, -1), ones.view(n, -1))

    # ---- prefill -------------------------------------------------------------------------------------------------
    def _prefill(self, new: list[_Request]) -> list[RequestOutput]:
        # Same-length prompts share a forward; prompts of different lengths are right-padded (rolled back after)
        # when that wastes < 25% of the group's tokens. No chunked prefill: a long prompt delays one decode step.
        new = sorted(new, key=lambda r: len(r.prompt))
        groups: list[list[_Request]] = [[new[0]]]
        for r in new[1:]:
            g = groups[-1]
            real = sum(len(q.prompt) for q in g) + len(r.prompt)
            if len(r.prompt) * (len(g) + 1) - real <= 0.25 * real:
                g.append(r)
            else:
                groups.append([r])
        out = []
        for g in groups:
            out += self._prefill_group(g)
        return out

    def _prefill_group(self, reqs: list[_Request]) -> list[RequestOutput]:
        # Requests with the same prompt (GRPO's G samples of each prompt, best-of-n) share one forward: the first
        # one's cache rows are copied to the others (vLLM's prefix caching, for whole prompts of one admission).
        # Rows are ordered distinct prompts first; src maps every row to the computed row it copies.
        first: dict[Any, int] = {}  # prompt -> its row among the distinct ones
        distinct: list[_Request] = []
        repeats: list[tuple[_Request, int]] = []
        for r in reqs:
            key = tuple(r.prompt) if r.embeds is None else id(r)  # given embeddings are never shared
            if key in first:
                repeats.append((r, first[key]))
            else:
                first[key] = len(distinct)
                distinct.append(r)
        reqs = distinct + [r for r, _ in repeats]
        src = list(range(len(distinct))) + [j for _, j in repeats]
        start, B, U = len(self.rows), len(reqs), len(distinct)
        for i, r in enumerate(reqs):
            r.row = start + i
            self.rows.append(r)
        lens = torch.tensor([len(r.prompt) for r in reqs[:U]], device=self.device)
        T = int(lens.max())
        ids = torch.full((U, T), self.pad_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(reqs[:U]):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt, device=self.device)
        pos = torch.arange(T, device=self.device).expand(U, T)
        am = None if bool((lens == T).all()) else (pos < lens[:, None]).long()
        rows = CacheRows(self.cache, start, start + U, self.k + 1)
        x = None
        if any(r.embeds is not None for r in reqs):  # given embeddings win over the lookup, row by row
            x = self.model.embed_tokens(ids)
            for i, r in enumerate(reqs[:U]):
                if r.embeds is not None:
                    x[i, : len(r.prompt)] = r.embeds
        h, _ = self.model.trunk(None if x is not None else ids, position_ids=pos, attention_mask=am, cache=rows,
                                inputs_embeds=x)
        if am is not None:
            rows.truncate(lens)
        self.stats.prefill_tokens += sum(len(r.prompt) for r in reqs)
        if U < B:
            for i in range(U, B):
                _move_cache_row(self.cache, start + src[i], start + i)
            self.stats.shared_prefill_tokens += sum(len(r.prompt) for r in reqs[U:])
            at = torch.tensor(src, device=self.device)
            h, ids, lens = h[at], ids[at], lens[at]
            pos, am = pos[:1].expand(B, T), am[at] if am is not None else None
        last = lens - 1
        b = torch.arange(B, device=self.device)
        logits = self.model.lm_head(h[b, last]).float()
        self._penalty_state(reqs)
        self._st = None
        st = SamplingTensors.from_params([r.params for r in reqs], self.vocab_size, self.device,
                                         [r.generator for r in reqs])
        sl = slice(start, start + B)
        x = process_logits(logits, st, self._counts[sl] if self._counts is not None else None,
                           self._prompt_mask[sl] if self._prompt_mask is not None else None)
        tokens = draw(x, st, self.generator)
        lps, tops = self._logprobs(x, tokens, reqs)
        self._last[sl] = tokens
        if self._counts is not None:
            self._counts[sl].scatter_add_(1, tokens[:, None], torch.ones(B, 1, dtype=torch.int32, device=self.device))
        if self.k:  # MTP over the prompt (one position behind: position i sees token i+1), then the first drafts
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
            nxt[b, last] = tokens
            mrows = CacheRows(self.mtp_cache, start, start + B, self.k + 1)  # type: ignore[arg-type]
            mlogits, g = self.model.mtp_step(1, h, nxt, pos, cache=mrows, attention_mask=am)
            if am is not None:
                mrows.truncate(lens)
            self._draft(start, B, mlogits[b, last], g[b, last], st)
        toks = tokens.tolist()
        return [self._append(r, [toks[i]], [lps[i]] if lps else None, [tops[i]] if tops else None)
                for i, r in enumerate(reqs)]

    # ---- plain decoding: one forward of one token per running row -----------------------------------------------
    def _decode_step(self, n: int) -> list[RequestOutput]:
        # compiled: run a power-of-two bucket of rows (free rows as padding, reset after) so that a batch that
        # shrinks or grows reuses a few graphs instead of compiling one per size
        b = min(1 << (n - 1).bit_length(), self.max_batch) if self.compiled else n
        need = max(len(r.prompt) + len(r.output) for r in self.rows[:n])  # slots after this step: host-side count
        logits = self._step.run(self._last[:b, None], self.cache, need)[:n]
        if b > n:
            self.cache.reset_rows(list(range(n, b)))
        st = self._batch_params(n)
        x = process_logits(logits, st, self._counts[:n] if self._counts is not None else None,
                           self._prompt_mask[:n] if self._prompt_mask is not None else None)
        tokens = draw(x, st, self.generator)
        reqs = self.rows[:n]
        lps, tops = self._logprobs(x, tokens, reqs)
        self._last[:n] = tokens
        self._count(n, tokens)
        toks = tokens.tolist()
        return [self._append(r, [toks[i]], [lps[i]] if lps else None, [tops[i]] if tops else None)
                for i, r in enumerate(reqs)]

    # ---- speculative decoding with MTP (V3 report section 5.4.3) ---------------------------------------------------
    def _draft(self, start: int, B: int, logits: torch.Tensor, g: torch.Tensor, st: SamplingTensors) -> None:
        """Draft k tokens for rows [start, start+B) from MTP logits (B, V) at each row's last true position.

        V3 has one MTP module (D = 1): draft j+1 re-applies module 1 to its own output hidden state and draft j,
        one position further. Those MTP cache entries are provisional (built from a draft hidden state, not the
        main model's) and are rolled back at verification. Greedy rows draft the argmax; sampled rows draw from the
        MTP distribution q processed like the target (temperature, top-k/p, min-p; no penalties: any q keeps
        speculative sampling exact) and keep q for the acceptance test.
        """
        st = st.without_penalties()
        if not st.all_greedy and self._q is None:
            self._q = torch.zeros(self.max_batch, self.k, self.vocab_size, device=self.device)
        sl = slice(start, start + B)
        mrows = CacheRows(self.mtp_cache, start, start + B, self.k + 1)  # type: ignore[arg-type]
        for j in range(self.k):
            x = process_logits(logits.float(), st)
            tok = draw(x, st, self.generator)
            self._drafts[sl, j] = tok
            if not st.all_greedy:
                self._q[sl, j] = x.softmax(dim=-1)  # type: ignore[index]
            if j + 1 < self.k:
                pos = self.mtp_cache.lengths[sl, None]  # type: ignore[union-attr]
                logits, g = self.model.mtp_step(1, g[:, None], tok[:, None], pos, cache=mrows)
                logits, g = logits[:, 0], g[:, 0]

    def _speculative_step(self, n: int) -> list[RequestOutput]:
        """Verify the k drafts of every running row with one main forward over [last, d_1..d_k] (verify_drafts has
        the acceptance rule). Rejected slots are rolled back in both caches, and the MTP module re-reads the
        accepted positions with the main model's hidden states before drafting again."""
        k, reqs = self.k, self.rows[:n]
        L0 = self.cache.lengths[:n].clone()
        ar = torch.arange(k + 1, device=self.device)
        pos = L0[:, None] + ar
        ids = torch.cat([self._last[:n, None], self._drafts[:n, :k]], dim=1)  # (n, k+1)
        h, _ = self.model.trunk(ids, position_ids=pos, cache=CacheRows(self.cache, 0, n, k + 1))
        logits = self.model.lm_head(h).float()  # (n, k+1, V)
        st = self._batch_params(n)
        drafts = self._drafts[:n, :k]
        counts = prompt = None
        if st.any_penalty and self._counts is not None:  # the target at position j has also seen d_1..d_j
            seen = torch.zeros(n, k + 1, self.vocab_size, dtype=torch.int32, device=self.device)
            seen[:, 1:].scatter_(2, drafts[..., None], 1)
            counts = (self._counts[:n, None] + seen.cumsum(dim=1)).flatten(0, 1)
            prompt = self._prompt_mask[:n].repeat_interleave(k + 1, dim=0)  # type: ignore[index]
        x = process_logits(logits.flatten(0, 1), st.repeat(k + 1), counts, prompt).view(n, k + 1, -1)
        q = None if st.all_greedy else self._q[:n]  # type: ignore[index]
        n_acc, tokens = verify_drafts(x, drafts, q, st, self.generator)
        b = torch.arange(n, device=self.device)
        fix = tokens[b, n_acc]
        n_emit = n_acc + 1
        # roll back the rejected slots; the MTP cache back to its true entries, then advance it with the accepted
        # positions (hidden of position L0+j with token L0+j+1), right-padded to the longest row
        CacheRows(self.cache, 0, n).truncate(L0 + n_emit)
        mrows = CacheRows(self.mtp_cache, 0, n, k + 1)  # type: ignore[arg-type]
        mrows.truncate(L0)
        T = int(n_emit.max())
        am = None if bool((n_emit == T).all()) else (ar[None, :T] < n_emit[:, None]).long()
        mlogits, g = self.model.mtp_step(1, h[:, :T], tokens[:, :T], pos[:, :T], cache=mrows, attention_mask=am)
        mrows.truncate(L0 + n_emit)
        self._last[:n] = fix
        self._count(n, tokens, ar[None, :] < n_emit[:, None])
        lps, tops = self._logprobs(x, tokens, reqs)
        self._draft(0, n, mlogits[b, n_acc], g[b, n_acc], st)
        emit, toks = n_emit.tolist(), tokens.tolist()
        out = []
        for i, r in enumerate(reqs):
            m = emit[i]
            out.append(self._append(r, toks[i][:m], lps[i][:m] if lps else None, tops[i][:m] if tops else None))
        self.stats.verify_steps += n
        self.stats.drafted += n * k
        self.stats.accepted += int(n_acc.sum())
        return out


# ----------------------------------------------------------------------------------------------------------------
# Convenience: one prompt, and the CLI entry point


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None) -> list[int]:
    """Generate for one prompt (greedy by default); stops only at eos_token_id when given."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: at least one token (e.g. BOS) is needed")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            ignore_eos=True, stop_token_ids=[eos_token_id] if eos_token_id is not None else None)
    engine = Engine(model, max_batch=1, max_model_len=len(prompt_ids) + max_new_tokens)
    return engine.generate([prompt_ids], params)[0].token_ids


# ----------------------------------------------------------------------------------------------------------------
# Janus image generation on the same decode path (classifier-free guidance rows: nanoseek.janus.guidance_rows)


class _ImageTokenEmbed(nn.Module):
    """(B, 1) image-token ids -> (B, 1, D) trunk inputs: the decode step's embedding for image generation."""

    def __init__(self, model: Janus):
        super().__init__()
        self.generation_embeddings, self.generation_aligner = model.generation_embeddings, model.generation_aligner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.generation_aligner(self.generation_embeddings(ids))


# each Janus model's image decode steps, by (compiled, dtype, device): compiled graphs outlive one call
_IMAGE_STEPS: weakref.WeakKeyDictionary[Janus, dict[tuple[bool, torch.dtype, torch.device], DecodeStep]] = \
    weakref.WeakKeyDictionary()


def _image_step(model: Janus, compile: bool) -> DecodeStep:
    param = next(model.parameters())
    steps = _IMAGE_STEPS.setdefault(model, {})
    key = (compile, param.dtype, param.device)  # a compiled bucket skips its guards: one step per dtype/device
    if key not in steps:
        steps[key] = DecodeStep(model.language_model, _ImageTokenEmbed(model), model.generation_head, compile=compile)
    return steps[key]


@torch.inference_mode()
def generate_image_tokens(model: Janus, prompts: Sequence[Sequence[int]], *, cfg_weight: float = 5.0,
                          temperature: float = 1.0, seed: int | None = None, num_tokens: int | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          compile: bool | None = False) -> torch.Tensor:
    """Sample image tokens (B, num_tokens) for B prompts (each ending with <begin_of_image>), two rows per image
    through the MHA/MLA KV cache: one prefill of the 2B rows, then one step of 2B single tokens per image token,
    on the engine's decode path (`DecodeStep`: compiled when `compile`, None = when it pays for the model's
    size). The step is kept with the model (per dtype and device), so its compiled graphs (one per cache-span
    bucket: three for a 576-token image) are built by the first call and reused by the next ones. Eager by
    default: compiling costs tens of seconds that one call does not win back; a server, which samples many
    images, passes None (docs/benchmarks.md, "Image generation").
    Official settings: cfg_weight 5, temperature 1, 576 tokens. temperature 0 is greedy."""
    check_guidance(cfg_weight, temperature)
    cfg, lm = model.config, model.language_model
    N = num_tokens or cfg.num_image_tokens
    param = next(model.parameters())
    ids, mask = (t.to(param.device) for t in guidance_rows(prompts, cfg.pad_token_id))
    B, T = len(prompts), ids.shape[1]
    if cfg.text.max_position_embeddings < T + N:
        raise ValueError(f"prompt ({T} tokens) + {N} image tokens exceed the context "
                         f"({cfg.text.max_position_embeddings})")
    g = torch.Generator(param.device).manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    cache = KVCache(cfg.text, 2 * B, T + N, param.device, param.dtype)
    am = None if bool(mask.all()) else mask
    step = _image_step(model, compile_pays(lm) if compile is None else compile)
    h, _ = lm.trunk(ids, attention_mask=am, cache=cache)
    logits = model.generation_head(h[:, -1]).float()
    out = torch.zeros(B, N, dtype=torch.long, device=param.device)
    for i in range(N):
        out[:, i] = tok = guided_next_tokens(logits, B, cfg_weight, temperature, g)
        if progress is not None:
            progress(i + 1, N)
        if i + 1 < N:
            logits = step.run(tok.repeat(2)[:, None], cache, T + i + 1)
    return out

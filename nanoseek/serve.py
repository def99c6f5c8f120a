"""OpenAI-compatible HTTP server over the engine, with DeepSeek-R1's reasoning split and a web chat page.

Read top to bottom (the reasoning split, `<think>...</think>` -> reasoning_content / content as vLLM's deepseek_r1
parser and DeepSeek's own API, is reasoning.StreamSplitter): OpenAI-shaped errors -> the request schemas (pydantic
models as vLLM's protocol.py: every parameter checked, unsupported ones rejected naming the `param`) -> the response
schemas -> the engine thread (one thread runs Engine.step() in a loop, and Janus' image jobs between steps; each
HTTP request waits on its own asyncio queue) -> Prometheus metrics (prometheus_client) -> the FastAPI app (chat
completions, completions, image generations, models, health, metrics, the static web page) -> serve() and a
background server for tests. A Janus-Pro model also reads images in chat messages and generates images
(nanoseek/multimodal.py has the conversation format and the image I/O). docs/serving.md has the API details and
the design notes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from starlette.exceptions import HTTPException

from .infer import Engine, RequestOutput, SamplingParams
from .janus import Janus
from .multimodal import ImageError, JanusChat, decode_data_url, generate_pngs, generation_prompt
from .reasoning import END_THINK, StreamSplitter, detect_reasoning
from .tokenizer import Tokenizer

log = logging.getLogger("nanoseek.serve")

# ----------------------------------------------------------------------------------------------------------------
# Errors, shaped as OpenAI's: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


def _bad(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------------------------
# Request schemas. Chat and completions share _SamplingRequest; image generation (ImageGenerationRequest) derives
# from OpenAIRequest alone, and user messages' content parts are text or image_url (UserContentPart).

MAX_N = 16
MAX_STOP = 16
MAX_LOGPROBS = 20


def _neutral(*accepted: Any) -> AfterValidator:
    """An OpenAI parameter whose feature this server does not have: accepted only at a value meaning "not used"."""

    def check(value: Any) -> Any:
        # the type too: 0 == False, but `store: 0` is not OpenAI's `store: false`
        if not any(value == a and type(value) is type(a) for a in accepted):
            raise PydanticCustomError("unsupported_parameter", "this server only accepts {accepted} (it does not "
                                      "have the feature)", {"accepted": " or ".join(json.dumps(a) for a in accepted)})
        return value

    return AfterValidator(check)


def _unsupported(value: Any) -> Any:
    raise PydanticCustomError("unsupported_parameter", "this server does not support it")


# an OpenAI feature this server does not have, refused whatever its value (a null one was never given)
Unsupported = Annotated[Any, AfterValidator(_unsupported)]


def _no_empty_strings(stops: list[str]) -> list[str]:
    if any(not s for s in stops):  # on the whole list, so that the error names `stop`, not `stop[i]`
        raise PydanticCustomError("invalid_value", "stop strings must be non-empty")
    return stops


Stop = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v), Field(max_length=MAX_STOP),
                 AfterValidator(_no_empty_strings)]


def _in_vocabulary(token: int, info: ValidationInfo) -> int:
    vocab_size = (info.context or {}).get("vocab_size")  # the server passes its model's (validation context)
    if vocab_size is not None and token >= vocab_size:
        raise PydanticCustomError("invalid_value", "token ids must be in [0, {vocab_size})",
                                  {"vocab_size": vocab_size})
    return token


TokenIds = Annotated[list[Annotated[int, Field(ge=0), AfterValidator(_in_vocabulary)]], Field(min_length=1)]

# Unions are tagged (a callable Discriminator picks the member from the JSON's shape), so a bad value gets the one
# error of the member it was meant for, not one error per member.


def _prompt_form(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return "string"
    if isinstance(prompt, list) and prompt:  # by the first element: the member's validation checks the others
        first = prompt[0]
        if isinstance(first, str):
            return "strings"
        return "token ids" if isinstance(first, int) else "token id lists" if isinstance(first, list) else None
    return None


Prompt = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[str], Tag("strings")] | Annotated[TokenIds, Tag("token ids")]
    | Annotated[list[TokenIds], Tag("token id lists")],
    Discriminator(_prompt_form, custom_error_type="invalid_type", custom_error_message=(
        "must be a string, a list of strings, a list of token ids or a list of lists of token ids "
        "(non-empty)"))]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # syntax and contents are checked by the server after the model is known (multimodal.decode_data_url): a text
    # model refuses the part itself, whatever its URL
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's; Janus sees every image at its one input size


class ImageURLPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


def _part_tag(part: Any) -> str | None:
    # the tag is not the type itself: OpenAI's parts have a key named as their type, which would blur error paths
    return f"{part.get('type')} part" if isinstance(part, dict) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("text part")],
    Discriminator(_part_tag, custom_error_type="unsupported_parameter",
                  custom_error_message="only text content parts are supported in this message")]

# user messages may also hold images (a text model refuses them with a 400 naming the part: Server._image_parts)
UserContentPart = Annotated[
    Annotated[TextPart, Tag("text part")] | Annotated[ImageURLPart, Tag("image_url part")],
    Discriminator(_part_tag, custom_error_type="unsupported_parameter",
                  custom_error_message="only text and image_url content parts are supported")]


def _content_form(c: Any) -> str | None:
    return "string" if isinstance(c, str) else "parts" if isinstance(c, list) else None


Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("parts")],
    Discriminator(_content_form, custom_error_type="invalid_type",
                  custom_error_message="message content must be a string or a list of text parts")]

UserContent = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[UserContentPart], Tag("parts")],
    Discriminator(_content_form, custom_error_type="invalid_type",
                  custom_error_message="message content must be a string or a list of content parts")]


class _Message(BaseModel):
    # Keys a message does not use are ignored, not refused: clients send back the assistant messages they received,
    # with the response's other fields (reasoning_content, refusal, annotations, ...)
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str  # each kind's Literal: the union's discriminator
    content: Content

    def for_template(self) -> dict[str, str]:
        """The chat template's {"role", "content"}; `developer` (OpenAI's newer name) means system. Text only: a
        text model refuses image parts before rendering."""
        c = self.content
        text = "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c if isinstance(p, TextPart))
        return {"role": "system" if self.role == "developer" else self.role, "content": text}

    def as_dict(self) -> dict[str, Any]:
        """{"role", "content"} in OpenAI's JSON form, image parts included (multimodal.render_conversation)."""
        c = self.content
        return {"role": self.role, "content": c if c is None or isinstance(c, str)
                else [p.model_dump(exclude_none=True) for p in c]}


class SystemMessage(_Message):
    role: Literal["system", "developer"]


class UserMessage(_Message):
    role: Literal["user"]
    content: UserContent


class AssistantMessage(_Message):
    role: Literal["assistant"]
    # null when that turn stopped inside the reasoning; an echoed reasoning_content is dropped, as R1's template
    # drops past reasoning anyway
    content: Content | None = None
    tool_calls: Annotated[list[Any], _neutral([])] | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None


class OpenAIRequest(BaseModel):
    """What every endpoint's request has: JSON types as sent (strict: "1" is not a number, 1 is not true), unknown
    parameters refused (`unknown_parameter`), `null` meaning "not given", and the model's name."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    model: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, body: Any) -> Any:
        # as OpenAI: a parameter sent as null takes its default, and an unsupported feature sent as null is not used
        return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body


# the sampling fields below that SamplingParams takes as they are (the same names: vLLM's)
_ENGINE_FIELDS = ("stop", "stop_token_ids", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


class _SamplingRequest(OpenAIRequest):
    """What chat and legacy completions share: choices, streaming, stop conditions and sampling.

    Fields are validated in order, so a check that depends on another field is declared after it."""

    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = []
    max_tokens: int | None = Field(None, ge=1)  # None: the rest of the context
    temperature: float | None = Field(None, ge=0, le=2)  # None: the model's generation_config, else 1
    top_p: float | None = Field(None, gt=0, le=1)  # likewise
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None  # OpenAI's end-user id: accepted, unused
    logit_bias: Annotated[dict[str, float], _neutral({})] | None = None
    # vLLM's extensions that the engine supports (the openai client sends them in extra_body)
    top_k: int = Field(-1, ge=-1)  # -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, options: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "only allowed when 'stream' is enabled")
        return options

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, k: int) -> int:
        if k == 0:
            raise PydanticCustomError("invalid_value", "must be -1 (off) or >= 1")
        return k

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, float]) -> list[SamplingParams]:
        """One per choice. n > 1 with a seed: choice j uses seed + j, so the choices differ and the response is
        still reproducible."""
        temperature = defaults.get("temperature", 1.0) if self.temperature is None else self.temperature
        top_p = defaults.get("top_p", 1.0) if self.top_p is None else self.top_p
        common = {name: getattr(self, name) for name in _ENGINE_FIELDS}
        return [SamplingParams(**common, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               logprobs=logprobs, seed=None if self.seed is None else (self.seed + j) % 2**64)
                for j in range(self.n)]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; it wins, as in vLLM
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI parameters accepted at the value that means "feature not used"
    response_format: Annotated[dict[str, Any], _neutral({"type": "text"})] | None = None
    modalities: Annotated[list[str], _neutral(["text"])] | None = None
    store: Annotated[bool, _neutral(False)] | None = None
    service_tier: Annotated[str, _neutral("auto", "default")] | None = None
    parallel_tool_calls: bool | None = None  # either value: there are no tools
    metadata: dict[str, Any] | None = None  # for OpenAI's stored completions: accepted, unused
    # OpenAI features this server does not have
    tools: Unsupported = None
    tool_choice: Unsupported = None
    functions: Unsupported = None
    function_call: Unsupported = None
    audio: Unsupported = None
    prediction: Unsupported = None
    reasoning_effort: Unsupported = None
    web_search_options: Unsupported = None
    verbosity: Unsupported = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):  # as OpenAI
            raise PydanticCustomError("invalid_value", "requires 'logprobs' to be true")
        return top

    @property
    def max_tokens_param(self) -> str:
        """The parameter that sets the completion's length (named in context-length errors)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def max_new_tokens(self) -> int | None:
        return getattr(self, self.max_tokens_param)

    @property
    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: None for none, else the number of top alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for legacy completions
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Annotated[bool, _neutral(False)] | None = None
    suffix: Annotated[str, _neutral("")] | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int, info: ValidationInfo) -> int:
        if best_of != info.data.get("n", 1):
            raise PydanticCustomError("unsupported_parameter", "it must equal n (there is no server-side best-of)")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """The prompts one by one: texts to encode or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)  # type: ignore[arg-type]


MAX_IMAGES = 10  # OpenAI's bound on `n` for image generation; the server's --max-images is usually lower


class ImageGenerationRequest(OpenAIRequest):
    """POST /v1/images/generations, as OpenAI's (images.generate). The model writes one native size, so `size`
    is that size or "auto"; images come back inline (`b64_json`): the server stores nothing, so it has no URLs.
    Extensions: `seed`, `guidance_scale` (classifier-free guidance weight, transformers' and diffusers' name; DeepSeek
    calls it cfg_weight, `nanoseek imagine --cfg`) and `temperature` (0 = greedy) of the image-token sampler."""

    prompt: str
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = None  # None / "auto": the model's native size
    response_format: str = "b64_json"
    stream: bool = False  # gpt-image's streaming: SSE events (progress, then each image as it is decoded)
    partial_images: Annotated[int, _neutral(0)] | None = None
    output_format: Annotated[str, _neutral("png")] | None = None
    quality: Annotated[str, _neutral("auto", "standard")] | None = None  # one quality: the model's
    background: Annotated[str, _neutral("auto", "opaque")] | None = None  # the PNGs are opaque
    user: str | None = None  # accepted, unused (as chat's)
    safety_identifier: str | None = None
    # nanoseek's extensions (the openai client sends them in extra_body); None: generation_config.json's, else 5 / 1
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # torch.Generator.manual_seed's range
    guidance_scale: float | None = Field(None, ge=1, le=100)  # 1 = no guidance
    temperature: float | None = Field(None, ge=0, le=2)
    # OpenAI features this server does not have
    style: Unsupported = None
    moderation: Unsupported = None  # there is no moderation model here: any value would promise one
    output_compression: Unsupported = None
    complexity: Unsupported = None
    frame_count: Unsupported = None
    frame_duration_ms: Unsupported = None
    svg: Unsupported = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise PydanticCustomError("invalid_value", "the prompt is empty")
        return prompt

    @field_validator("n")
    @classmethod
    def _at_most_max_images(cls, n: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_images")  # the server's --max-images (validation context)
        if limit is not None and n > limit:
            raise PydanticCustomError("invalid_value", "at most {limit} images per request on this server "
                                      "(--max-images)", {"limit": limit})
        return n

    @field_validator("size")
    @classmethod
    def _native_size(cls, size: str, info: ValidationInfo) -> str:
        native = (info.context or {}).get("image_size")  # None: a text model (refused after the model check)
        if native is not None and size not in ("auto", f"{native}x{native}"):
            raise PydanticCustomError("invalid_value", "'{size}' is not supported: this model generates "
                                      "{native}x{native} images only (or 'auto')", {"size": size, "native": native})
        return size

    @field_validator("response_format")
    @classmethod
    def _inline_only(cls, response_format: str) -> str:
        if response_format == "url":
            raise PydanticCustomError("unsupported_parameter", "only 'b64_json' is supported: the server stores no "
                                      "images, so it has no URLs to return")
        if response_format != "b64_json":
            raise PydanticCustomError("invalid_value", "must be 'b64_json'")
        return response_format


R = TypeVar("R", bound=OpenAIRequest)

# pydantic's error types -> OpenAI's codes; the rest are invalid_type (a *_type error) or invalid_value
_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter",
          "union_tag_not_found": "missing_required_parameter", "unsupported_parameter": "unsupported_parameter",
          "finite_number": "invalid_type"}


def parse_request(model: type[R], body: dict[str, Any], **context: Any) -> R:
    """Validate a request body; pydantic's first error becomes OpenAI's 400 naming the `param`."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as e:
        raise _invalid(e.errors(include_url=False)[0], body) from e


def _invalid(err: ErrorDetails, body: Any) -> APIError:
    kind, param = err["type"], _param(err["loc"], body)
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # pydantic names the union; the bad field is its tag
        param = f"{param}.{str(err.get('ctx', {}).get('discriminator', '')).strip(chr(39))}"
    code = _CODES.get(kind) or ("invalid_type" if kind.endswith("_type") else "invalid_value")
    if code == "unknown_parameter":
        message = f"Unrecognized request argument supplied: {param}"
    elif code == "missing_required_parameter":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid '{param}': {err['msg']}" if param else err["msg"]
    return APIError(400, message, param=param, code=code)


def _param(loc: tuple[int | str, ...], body: Any) -> str | None:
    """pydantic's error location -> OpenAI's `param`, the path in the request's JSON (`messages[0].content[0]`).

    The path is followed in the body itself: a union's tag (a message's role, a content's form) is in pydantic's
    location but not in the JSON, so it is left out; a last key that is not in the body is a missing field."""
    path, node = "", body
    for i, key in enumerate(loc):
        if isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            path, node = f"{path}[{key}]", node[key]
        elif isinstance(key, str) and isinstance(node, dict) and (key in node or i == len(loc) - 1):
            path, node = f"{path}.{key}" if path else key, node.get(key)
    return path or None


@dataclass
class GenerationRequest:
    """A validated request as the engine takes it: the prompts (token ids), the sampling of each sequence and the
    response options."""

    kind: str  # "chat" | "completion"
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per sequence: prompt p, choice j at p * n + j
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs; else the number of top alternatives
    max_tokens_param: str  # which field set max_tokens, for error messages
    images: list[tuple[str, str]] = field(default_factory=list)  # Janus: (param, data URL) of each image, in order

    @property
    def num_sequences(self) -> int:
        return len(self.params)


# ----------------------------------------------------------------------------------------------------------------
# Response schemas. Dumped with exclude_unset (as vLLM's stream chunks), so a key is in the JSON when the server set
# it, null included: OpenAI's shape has both kinds (`content: null`, `finish_reason: null`, `logprobs: null` are
# sent; an unused `reasoning_content` is not). So a required field is always in the JSON (constants too: they are
# passed, not defaulted), and a field defaulting to None only when it was given.


class _Response(BaseModel):
    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)

    def sse(self) -> str:
        """A server-sent event: `data: {json}`."""
        return f"data: {self.model_dump_json(exclude_unset=True)}\n\n"


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    error: ErrorInfo


class CompletionTokensDetails(_Response):
    reasoning_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None  # chat: the reasoning's share


class TopLogprob(_Response):
    token: str  # the token decoded alone
    logprob: float
    bytes: list[int]  # its UTF-8


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob]


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatMessage(_Response):
    role: Literal["assistant"]
    content: str | None  # null when the output stopped inside the reasoning
    reasoning_content: str | None = None  # with the reasoning split (DeepSeek's name) ...
    reasoning: str | None = None  # ... and under vLLM's newer name


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    finish_reason: str
    stop_reason: int | str | None  # vLLM's: the stop string or token id that ended it
    logprobs: ChatLogprobs | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None  # in the choice's last chunk


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # with include_usage: null in every chunk, then one more chunk carries it


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None  # null in a stream's chunks before the choice's last
    stop_reason: int | str | None = None  # once finished


class Completion(_Response):  # a response, or a chunk of a stream (OpenAI's legacy completions use one object)
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    # what the model reads and writes (OpenRouter's names): ["text"], or ["text", "image"] for Janus (the web page
    # shows its image tab and attach button from these)
    input_modalities: list[str]
    output_modalities: list[str]


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class ImageData(_Response):
    b64_json: str  # a PNG
    revised_prompt: str | None  # null: the prompt is used as written


class ImageTokensDetails(_Response):
    text_tokens: int
    image_tokens: int


class ImageUsage(_Response):  # gpt-image's usage: the prompt's tokens in, image tokens out
    input_tokens: int
    input_tokens_details: ImageTokensDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(_Response):
    created: int
    data: list[ImageData]
    size: str
    output_format: Literal["png"]
    usage: ImageUsage


class ImageProgressEvent(_Response):
    """nanoseek's stream event (OpenAI's has none): `step` of `steps` image tokens sampled for the request's
    images (they are sampled together); step == steps: the VQ decoder is turning them into pixels."""

    type: Literal["image_generation.progress"]
    created_at: int
    step: int
    steps: int

    def sse(self) -> str:
        return f"event: {self.type}\n" + super().sse()


class ImageCompletedEvent(_Response):
    """OpenAI's `image_generation.completed` stream event, one per image (`index`: nanoseek's, for n > 1)."""

    type: Literal["image_generation.completed"]
    index: int
    b64_json: str
    created_at: int
    size: str
    output_format: Literal["png"]
    background: Literal["opaque"]
    quality: Literal["auto"]
    usage: ImageUsage

    def sse(self) -> str:
        return f"event: {self.type}\n" + super().sse()


# ----------------------------------------------------------------------------------------------------------------
# The engine thread


class EngineDead(RuntimeError):
    pass


class ClientGone(Exception):
    pass


CLIENT_GONE = ClientGone()  # put on a request's queue when its client disconnects


class JobCancelled(Exception):
    pass


@dataclass
class _JobEnd:
    result: Any = None
    error: BaseException | None = None


class Job:
    """Model work other than the engine's steps (image features, image generation), run on the engine thread: one
    thread runs every model forward, so a long image generation and the text batch never compete for the cores
    with two OpenMP teams (docs/serving.md), and the event loop never runs model code.

    `fn(job)` runs on the engine thread; it reports to the request with `job.emit(item)` (items arrive on the
    request's asyncio queue, in order) and checks `job.check()` between its steps, which raises JobCancelled once
    the client has gone. The request reads `events()` until the job's end."""

    def __init__(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop,
                 on_end: Callable[[_JobEnd], None] | None = None) -> None:
        self.fn, self.loop, self.on_end = fn, loop, on_end
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.result: Any = None  # fn's return value, once events() has returned

    def emit(self, item: Any) -> None:  # engine thread -> event loop
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def end(self, result: Any = None, error: BaseException | None = None) -> None:
        """Engine thread: the job is over (ran, failed, or skipped). `on_end` runs on the loop whether or not
        anyone still reads the events (a client that left, a stream whose body never started)."""

        def ended(end: _JobEnd) -> None:
            self.queue.put_nowait(end)
            if self.on_end is not None:
                self.on_end(end)

        self.loop.call_soon_threadsafe(ended, _JobEnd(result, error))

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled

    def cancel(self) -> None:  # event loop: a job not started yet is skipped, a running one stops at its next check
        self.cancelled.set()

    def watch(self, request: Request) -> asyncio.Task:
        """Cancel the job, and wake its reader, when the client disconnects (see _Submission.watch)."""

        async def until_gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()
            self.queue.put_nowait(CLIENT_GONE)

        return asyncio.get_running_loop().create_task(until_gone())

    async def events(self) -> AsyncIterator[Any]:
        """The emitted items; then returns, or raises the job's error (EngineDead -> 503, ClientGone)."""
        while True:
            item = await self.queue.get()
            if item is CLIENT_GONE:
                raise item
            if isinstance(item, _JobEnd):
                if isinstance(item.error, EngineDead):
                    raise APIError(503, str(item.error), "server_error", code="engine_unavailable")
                if item.error is not None:
                    raise item.error
                self.result = item.result
                return
            yield item


class EngineWorker:
    """Runs Engine.step() in a loop on one thread; outputs go to per-request asyncio queues on the server's loop.

    Engine.add_request/abort are thread-safe, so the event loop calls them directly; the worker only steps.
    Every step's outputs are handed over in one call_soon_threadsafe (one loop wake-up per step, not per token).
    Jobs (image features, image generation) run on the same thread between steps, in arrival order; a long job
    calls `interleave()` between its own steps, which runs one engine step when the text batch has work, so chats
    keep streaming while an image is generated.
    """

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.queues: dict[str, asyncio.Queue] = {}
        self.started: dict[str, float] = {}  # sequence id -> submit time (for TTFT)
        self.last: dict[str, float] = {}  # sequence id -> time of its last token
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # appended on the loop, popped on the engine thread (deque ops are atomic); short jobs (an image's features)
        # also run between a long job's steps (an image generation), so an image chat does not wait minutes for it
        self._jobs: deque[Job] = deque()
        self._short: deque[Job] = deque()

    @property
    def in_flight(self) -> int:
        return len(self.queues)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: list[int], params: SamplingParams, rid: str, queue: asyncio.Queue,
               prompt_embeds: Any = None) -> None:
        """Called on the event loop. Raises ValueError (from the engine's own checks) for a bad request."""
        self.engine.add_request(prompt, params, rid, prompt_embeds=prompt_embeds)
        self.queues[rid] = queue
        self.started[rid] = time.perf_counter()
        self._wake.set()

    def start_job(self, fn: Callable[[Job], Any], on_end: Callable[[_JobEnd], None] | None = None, *,
                  short: bool = False) -> Job:
        """Called on the event loop: queue `fn` for the engine thread (see Job). A short job (seconds at most) may
        run inside a long one's interleave(); a long one runs alone, after the jobs before it."""
        assert self._loop is not None
        job = Job(fn, self._loop, on_end)
        (self._short if short else self._jobs).append(job)
        self._wake.set()
        if not self.alive:  # the thread died meanwhile: nobody would run it
            self._end_jobs()
        return job

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run a short fn on the engine thread and return its result (its exception raised here)."""
        job = self.start_job(lambda _: fn(), short=True)
        async for _ in job.events():
            pass
        return job.result

    def interleave(self) -> None:
        """Called by a running long job on the engine thread: the short jobs waiting, then one engine step if the
        text batch has work. Raises EngineDead if that step fails (the job cannot go on with a broken model)."""
        if self.error is not None:
            raise EngineDead(f"the engine failed: {type(self.error).__name__}: {self.error}")
        while self._short:
            self._run_job(self._short.popleft())
        if self.engine.has_work() and not self._step():
            raise EngineDead(f"the engine failed: {type(self.error).__name__}: {self.error}")

    def abort(self, rid: str) -> None:
        if rid in self.queues:
            self.engine.abort(rid)
            self._wake.set()

    def _run(self) -> None:
        assert self._loop is not None
        while not self._stopping:
            self._wake.clear()
            if self._short or self._jobs:
                self._run_job((self._short or self._jobs).popleft())
                if self.error is not None:
                    break
                continue
            if not self.engine.has_work():
                self._wake.wait(0.5)
                continue
            if not self._step():
                break
        self._end_jobs()

    def _step(self) -> bool:
        """One engine step, its outputs handed to the loop; False if the engine failed (the thread then ends)."""
        assert self._loop is not None
        try:
            outs = self.engine.step()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request, then the thread ends
            log.exception("engine step failed; the server stops accepting requests")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)
            return False
        if outs:
            self._loop.call_soon_threadsafe(self._dispatch, outs, time.perf_counter())
        return True

    def _run_job(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client left while it waited
            job.end(error=JobCancelled())
            return
        try:
            result = job.fn(job)
        except BaseException as e:  # noqa: BLE001 - the job's own failure is its request's, not the server's
            job.end(error=e)
        else:
            job.end(result=result)

    def _end_jobs(self) -> None:
        """Jobs that will never run (the thread has ended or is ending) fail as the engine did."""
        while self._short or self._jobs:
            try:
                job = (self._short or self._jobs).popleft()
            except IndexError:
                break
            job.end(error=EngineDead("the engine is not running" if self.error is None else
                                     f"the engine failed: {type(self.error).__name__}: {self.error}"))

    def _dispatch(self, outs: list[RequestOutput], now: float) -> None:
        m = self.metrics
        for out in outs:
            q = self.queues.get(out.request_id)
            if q is None:
                continue
            q.put_nowait(out)
            rid = out.request_id
            if out.token_ids:
                if rid not in self.last:
                    m.ttft.observe(now - self.started[rid])
                else:  # per-token latency: a step that emits k tokens (speculative) spreads its time over them
                    gap = (now - self.last[rid]) / len(out.token_ids)
                    for _ in out.token_ids:
                        m.itl.observe(gap)
                self.last[rid] = now
            if out.finished:
                m.finished.labels(finish_reason=out.finish_reason or "unknown").inc()
                m.prompt_tokens.inc(out.prompt_tokens)
                m.generation_tokens.inc(out.completion_tokens)
                m.e2e.observe(now - self.started[rid])
                del self.queues[rid], self.started[rid]
                self.last.pop(rid, None)

    def _fail_all(self, e: BaseException) -> None:
        for q in self.queues.values():
            q.put_nowait(EngineDead(f"the engine failed: {type(e).__name__}: {e}"))
        self.queues.clear()
        self.started.clear()
        self.last.clear()


# ----------------------------------------------------------------------------------------------------------------
# Prometheus metrics


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """One server's metrics, in a registry of its own: several servers in one process (the tests) do not collide,
    and each /metrics shows its own. Updated on the event loop (the worker hands its outputs over there)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.finished = Counter("nanoseek_requests_total", "Finished sequences (one per choice), by finish reason.",
                                ["finish_reason"], registry=r)
        self.http = Counter("nanoseek_http_requests_total", "HTTP responses of the API, by path and status.",
                            ["path", "code"], registry=r)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens_total", "Prompt tokens of finished sequences.",
                                     registry=r)
        self.generation_tokens = Counter("nanoseek_generation_tokens_total",
                                         "Generated tokens of finished sequences.", registry=r)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", buckets=_LATENCY, registry=r)
        self.itl = Histogram("nanoseek_time_per_output_token_seconds", "Time between output tokens of a sequence.",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("nanoseek_e2e_request_latency_seconds",
                             "Time from arrival to the last token of a sequence.", buckets=_LATENCY, registry=r)
        self.images = Counter("nanoseek_images_total", "Images generated (Janus).", registry=r)
        self.image_latency = Histogram("nanoseek_image_request_seconds",
                                       "Time from arrival to the last image of an image generation request.",
                                       buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200), registry=r)

    def watch(self, worker: EngineWorker) -> None:
        self.registry.register(_EngineState(worker))


class _EngineState:
    """A custom collector: the batch, the queue and the engine's own step count, read when scraped."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        running = len(self.worker.engine.rows)  # a len() of the engine thread's list: atomic under the GIL
        yield GaugeMetricFamily("nanoseek_requests_running", "Sequences in the running batch.", value=running)
        yield GaugeMetricFamily("nanoseek_requests_waiting", "Sequences queued for a batch slot (queue depth).",
                                value=max(0, self.worker.in_flight - running))
        yield CounterMetricFamily("nanoseek_engine_steps", "Engine scheduling steps.",
                                  value=self.worker.engine.stats.steps)


# ----------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: NANOSEEK_API_KEY from the environment, if set
    served_model_name: str | None = None  # default: the model directory's name
    max_model_len: int | None = None
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's template
    reasoning_parser: str = "auto"  # auto | deepseek_r1 | none
    max_batch: int = 8
    max_queue: int = 64  # sequences waiting beyond the batch before requests get 429
    max_body_bytes: int = 4 * 2**20
    max_images: int = 4  # Janus: images per /v1/images/generations request (n); they are sampled as one batch
    num_speculative_tokens: int = 0
    seed: int | None = None
    log_level: str = "info"
    compile: bool | None = None  # the engine's compiled decode step (None: when the model is large enough for it to
    # pay, infer.compile_pays); its batch buckets are compiled at startup
    dtype: str = "auto"  # weights and cache: auto (bf16 on CUDA, fp32 on a CPU) | float32 | bfloat16 | float16
    device: str | None = None  # None: nanoseek.device.default_device() (CUDA if available, else CPU)
    int8: bool = False  # weight-only int8 linear layers and experts (nanoseek.quant; CPU)

    def __post_init__(self) -> None:
        from .device import dtype_name

        dtype_name(self.dtype)  # a bad --dtype fails before the model is read
        if not 1 <= self.max_images <= MAX_IMAGES:
            raise ValueError(f"max_images must be in [1, {MAX_IMAGES}], got {self.max_images}")


class Server:
    """The loaded model, engine, worker and FastAPI app of `nanoseek serve`. With `janus` (a Janus-Pro directory)
    the engine runs its LLM for chat, images in chat messages become prompt embeddings, and
    /v1/images/generations generates images on the engine thread."""

    def __init__(self, cfg: ServeConfig, engine: Engine, tokenizer: Tokenizer,
                 generation_defaults: dict[str, float] | None = None, janus: JanusChat | None = None,
                 image_defaults: dict[str, float] | None = None) -> None:
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.janus = janus
        # Janus-Pro's image sampling (generation_config.json: guidance_scale 5, temperature 1)
        self.image_defaults = {"guidance_scale": 5.0, "temperature": 1.0, **(image_defaults or {})}
        self.image_requests = 0  # image generation requests running or waiting (429 beyond 1 + max_queue)
        self.name = cfg.served_model_name or Path(cfg.model).resolve().name
        self.api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("NANOSEEK_API_KEY") or None
        # a Janus chat is DeepSeek's Janus conversation format, never the tokenizer's chat template: `auto` must not
        # turn the R1 split on because a (mini Janus') tokenizer ships nanoseek's <think> template
        self.reasoning = detect_reasoning(tokenizer, cfg.reasoning_parser) and not (
            janus is not None and cfg.reasoning_parser == "auto")
        self.end_think_id = tokenizer.tok.token_to_id(END_THINK)
        self.defaults = generation_defaults or {}
        self.metrics = Metrics()
        self.worker = EngineWorker(engine, self.metrics)
        self.metrics.watch(self.worker)
        self.created = int(time.time())
        self.app = self._build_app()

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Server:
        from . import load  # the package's load: a DeepSeek LLM or a Janus directory
        from .device import resolve_device, resolve_dtype

        device = resolve_device(cfg.device)  # before reading anything: `--device cuda` without a GPU fails fast
        model_dir = Path(cfg.model)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}: the server needs the model's tokenizer")
        tokenizer = Tokenizer.load(model_dir)
        if cfg.chat_template is not None:
            tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        model = load(model_dir, device=device, dtype=resolve_dtype(cfg.dtype, device)).eval()
        janus = None
        g = json.loads((model_dir / "generation_config.json").read_text()) \
            if (model_dir / "generation_config.json").is_file() else {}
        g = {k: float(v) for k, v in g.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if isinstance(model, Janus):
            from .imagine import read_processor_config

            if cfg.chat_template is not None:
                raise ValueError("--chat-template does not apply to a Janus model: its chats use DeepSeek's Janus "
                                 "conversation format, as `nanoseek generate --image` (docs/janus.md)")
            janus = JanusChat(model, tokenizer, read_processor_config(model_dir, model.config))
            model = model.language_model  # the engine runs the LLM; images reach it as prompt embeddings
            # Janus' generation_config.json is image generation's (guidance_scale, temperature): chat keeps
            # OpenAI's defaults, and DeepSeek's own chat demo samples too
            defaults: dict[str, float] = {}
            image_defaults = {k: g[k] for k in ("guidance_scale", "temperature") if k in g}
        else:
            # as vLLM: the model's recommended sampling is the default (R1: 0.6 / 0.95)
            defaults = {k: g[k] for k in ("temperature", "top_p") if k in g}
            image_defaults = {}
        if cfg.int8:
            from .quant import quantize_int8

            quantize_int8(model)
        engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_model_len=cfg.max_model_len,
                        num_speculative_tokens=cfg.num_speculative_tokens, seed=cfg.seed, compile=cfg.compile)
        return cls(cfg, engine, tokenizer, defaults, janus, image_defaults)

    # ---- requests --------------------------------------------------------------------------------------------
    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(401, "You didn't provide an API key. Provide it in the Authorization header as "
                           "'Bearer YOUR_KEY'.", code="missing_api_key")
        scheme, _, key = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict[str, Any]:
        """The body, read here rather than by FastAPI: after the key is checked, and bounded while it arrives."""
        limit = self.cfg.max_body_bytes
        too_large = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without Content-Length (chunked)
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from e
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _check_model(self, model: str) -> None:
        if model != self.name:  # OpenAI answers an unknown model with 404 model_not_found
            raise APIError(404, f"The model '{model}' does not exist. This server serves '{self.name}'.",
                           param="model", code="model_not_found")

    def _generation_request(self, body: dict[str, Any], kind: str) -> GenerationRequest:
        if kind == "chat":
            chat = parse_request(ChatCompletionRequest, body)
            self._check_model(chat.model)
            images = self._image_parts(chat.messages)
            if self.janus is not None:
                prompt = self._encode_janus_chat([m.as_dict() for m in chat.messages])
            else:
                prompt = self._encode_chat([m.for_template() for m in chat.messages])
            params = chat.sampling_params(chat.max_new_tokens, chat.logprobs_k, self.defaults)
            return GenerationRequest("chat", [prompt], params, chat.n, chat.stream, chat.include_usage,
                                     chat.logprobs_k, chat.max_tokens_param, images)
        c = parse_request(CompletionRequest, body, vocab_size=self.engine.vocab_size)
        self._check_model(c.model)
        prompts = [self._encode_text(p) if isinstance(p, str) else p for p in c.prompts()]
        params = c.sampling_params(c.max_tokens, c.logprobs, self.defaults)
        return GenerationRequest("completion", prompts, params * len(prompts), c.n, c.stream, c.include_usage,
                                 c.logprobs, "max_tokens")

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise _bad("messages", "the model has no chat template (pass --chat-template FILE)", "no_chat_template")
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except Exception as e:  # a template's raise_exception (e.g. role order), or a rendering error
            raise _bad("messages", f"the chat template could not render the messages: {e}") from e

    def _image_parts(self, messages: list[Any]) -> list[tuple[str, str]]:
        """(param, url) of every image part; a text model refuses the first one (OpenAI: "image_url is only
        supported by certain models")."""
        images = [(f"messages[{i}].content[{j}]", p.image_url.url) for i, m in enumerate(messages)
                  if isinstance(m.content, list) for j, p in enumerate(m.content) if isinstance(p, ImageURLPart)]
        if images and self.janus is None:
            raise _bad(images[0][0], f"The model '{self.name}' is a text model: it does not read images "
                       "(image_url content parts need a Janus model)", "unsupported_parameter")
        return [(f"{param}.image_url.url", url) for param, url in images]

    def _encode_janus_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        assert self.janus is not None
        try:
            return self.janus.prompt(messages)
        except ValueError as e:  # placeholders typed into the text
            raise _bad("messages", str(e)) from e

    async def _prompt_embeds(self, req: GenerationRequest) -> Any:
        """Janus: decode the request's images (a worker thread: Pillow, off the event loop), then their features
        over the prompt's placeholders (the engine thread: the model's forwards all run there)."""
        if not req.images:
            return None
        janus = self.janus
        assert janus is not None

        def pixels() -> Any:
            images = []
            for param, url in req.images:
                try:
                    images.append(decode_data_url(url))
                except ImageError as e:
                    raise APIError(400, f"Invalid '{param}': {e}", param=param, code=e.code) from None
            return janus.pixels(images)

        values = await asyncio.to_thread(pixels)
        self._check_alive()
        return await self.worker.call(lambda: janus.embeds(req.prompts[0], values))

    def _check_alive(self) -> None:
        if not self.worker.alive:
            raise APIError(503, "The engine is not running; the server cannot generate.", "server_error",
                           code="engine_unavailable")

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.tokenizer.bos_id is not None)

    def _check_lengths(self, req: GenerationRequest) -> None:
        limit = self.engine.max_model_len
        where = "messages" if req.kind == "chat" else "prompt"
        for p, sp in zip(req.prompts, req.params[:: req.n]):
            if len(p) >= limit:
                raise _bad(where, f"This model's maximum context length is {limit} tokens. However, your "
                           f"{where} resulted in {len(p)} tokens.", "context_length_exceeded")
            if sp.max_tokens is not None and len(p) + sp.max_tokens > limit:
                raise _bad(req.max_tokens_param, f"This model's maximum context length is {limit} tokens. "
                           f"However, you requested {len(p) + sp.max_tokens} tokens ({len(p)} in the {where}, "
                           f"{sp.max_tokens} in the completion). Please reduce the length of the {where} or "
                           "completion.", "context_length_exceeded")

    def _submit(self, req: GenerationRequest, base: str, request: Request, prompt_embeds: Any = None) -> _Submission:
        w = self.worker
        self._check_alive()
        capacity = self.cfg.max_batch + self.cfg.max_queue
        if w.in_flight + req.num_sequences > capacity:
            raise APIError(429, f"The server is overloaded: {w.in_flight} sequences in flight, capacity "
                           f"{capacity}. Retry later.", "rate_limit_error", code="rate_limit_exceeded")
        sub = _Submission(w)
        try:
            for i, sp in enumerate(req.params):
                rid = f"{base}-{i}"
                w.submit(req.prompts[i // req.n], sp, rid, sub.queue, prompt_embeds)
                sub.add(rid)
        except ValueError as e:  # the engine's own checks; take back what was already queued
            sub.abort()
            raise _bad(None, str(e)) from e
        sub.watch(request)
        return sub

    # ---- responses -------------------------------------------------------------------------------------------
    # Logprobs are of the processed distribution (infer.SamplingParams): tokens removed by top-p/top-k are -inf,
    # which JSON cannot carry; vLLM's -9999.0 stands in for them.
    def _token_str(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def _chat_logprobs(self, out: RequestOutput) -> ChatLogprobs:
        entries = []
        tops = out.top_logprobs or [{}] * len(out.token_ids)
        for t, lp, top in zip(out.token_ids, out.logprobs or [], tops):
            s = self._token_str(t)
            entries.append(TokenLogprob(token=s, logprob=_finite(lp), bytes=list(s.encode()), top_logprobs=[
                TopLogprob(token=(ts := self._token_str(i)), logprob=_finite(v), bytes=list(ts.encode()))
                for i, v in top.items()]))
        return ChatLogprobs(content=entries)

    def _completion_logprobs(self, out: RequestOutput, offset: int) -> CompletionLogprobs:
        tokens = [self._token_str(t) for t in out.token_ids]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        tops = out.top_logprobs or [{}] * len(out.token_ids)
        return CompletionLogprobs(tokens=tokens, token_logprobs=[_finite(v) for v in out.logprobs or []],
                                  top_logprobs=[{self._token_str(i): _finite(v) for i, v in top.items()}
                                                for top in tops], text_offset=offsets)

    def _usage(self, req: GenerationRequest, outs: dict[int, RequestOutput],
               splitters: list[StreamSplitter] | None) -> Usage:
        prompt = sum(len(p) for p in req.prompts)
        completion = sum(o.completion_tokens for o in outs.values())
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        if splitters is not None:
            usage.completion_tokens_details = CompletionTokensDetails(
                reasoning_tokens=sum(s.reasoning_tokens for s in splitters))
        return usage

    def _splitters(self, req: GenerationRequest) -> list[StreamSplitter] | None:
        if req.kind != "chat":
            return None
        return [StreamSplitter(self.reasoning, self.end_think_id) for _ in range(req.num_sequences)]

    async def _collect(self, req: GenerationRequest, sub: _Submission) -> tuple[
            dict[int, RequestOutput], list[StreamSplitter] | None]:
        """Non-streaming: merge the deltas (ClientGone if the client disconnects meanwhile)."""
        outs: dict[int, RequestOutput] = {}
        splitters = self._splitters(req)
        try:
            async for i, delta in sub.events():
                outs.setdefault(i, RequestOutput(delta.request_id)).merge(delta)
                if splitters is not None:
                    splitters[i].feed(delta.text, delta.token_ids)
                    if delta.finished:
                        splitters[i].finish()
        finally:
            sub.abort()
        return dict(sorted(outs.items())), splitters

    # ---- endpoints -------------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._completions(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completions(request, "completion")

    async def _completions(self, request: Request, kind: str) -> Response:
        self._check_auth(request)
        req = self._generation_request(await self._read_json(request), kind)
        self._check_lengths(req)
        embeds = await self._prompt_embeds(req)  # Janus: the images' features (400 for a bad image)
        base = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        # submitted before the response starts: overload and engine errors are still an HTTP status
        sub = self._submit(req, base, request, embeds)
        if req.stream:
            return StreamingResponse(self._stream(req, base, sub), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            outs, splitters = await self._collect(req, sub)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log shows it
        return JSONResponse(self._response(req, base, outs, splitters).dump())

    async def images_generations(self, request: Request) -> Response:
        """POST /v1/images/generations (Janus): n images for a prompt, sampled together as one job on the engine
        thread (docs/serving.md); a client that disconnects cancels the job within one image-token step."""
        self._check_auth(request)
        body = await self._read_json(request)
        janus = self.janus
        req = parse_request(ImageGenerationRequest, body, max_images=self.cfg.max_images,
                            image_size=janus.image_size if janus is not None else None)
        self._check_model(req.model)
        if janus is None:
            raise _bad("model", f"The model '{self.name}' is a text model: it does not generate images "
                       "(/v1/images/generations needs a Janus model)")
        cfg = janus.config
        ids = generation_prompt(self.tokenizer, cfg, req.prompt)
        N, limit = cfg.num_image_tokens, cfg.text.max_position_embeddings
        if len(ids) + N > limit:
            raise _bad("prompt", f"This model's maximum context length is {limit} tokens. However, your prompt "
                       f"resulted in {len(ids)} tokens, and an image takes {N} more.", "context_length_exceeded")
        self._check_alive()
        capacity = 1 + self.cfg.max_queue  # one runs, the others wait their turn
        if self.image_requests >= capacity:
            raise APIError(429, f"The server is overloaded: {self.image_requests} image requests in flight, "
                           f"capacity {capacity}. Retry later.", "rate_limit_error", code="rate_limit_exceeded")
        guidance = self.image_defaults["guidance_scale"] if req.guidance_scale is None else req.guidance_scale
        temperature = self.image_defaults["temperature"] if req.temperature is None else req.temperature
        size = f"{janus.image_size}x{janus.image_size}"
        per_image = ImageUsage(input_tokens=len(ids), output_tokens=N, total_tokens=len(ids) + N,
                               input_tokens_details=ImageTokensDetails(text_tokens=len(ids), image_tokens=0))

        def run(job: Job) -> None:  # on the engine thread
            last = -1

            def progress(i: int, total: int) -> None:
                nonlocal last
                job.check()  # the client left: stop here (JobCancelled)
                if (pct := 100 * i // total) != last:  # at most ~100 events, whatever the token count
                    last = pct
                    job.emit(("progress", i, total))

            for index, png in generate_pngs(janus.model, self.tokenizer, janus.processor, ids, n=req.n,
                                            guidance_scale=guidance, temperature=temperature, seed=req.seed,
                                            progress=progress, between=self.worker.interleave,
                                            compile=self.cfg.compile):  # None: when it pays; graphs kept
                job.check()
                job.emit(("image", index, png))

        t0 = time.perf_counter()

        def finished(end: _JobEnd) -> None:  # on the loop, however the job ended
            self.image_requests -= 1
            if end.error is None:
                self.metrics.images.inc(req.n)
                self.metrics.image_latency.observe(time.perf_counter() - t0)

        self.image_requests += 1
        job = self.worker.start_job(run, finished)
        watcher = job.watch(request)
        if req.stream:
            return StreamingResponse(self._image_stream(job, watcher, size, per_image), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pngs: dict[int, bytes] = {}
        try:
            async for kind, a, b in job.events():
                if kind == "image":
                    pngs[a] = b
        except ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel()
            watcher.cancel()
        n_in = len(ids) * req.n
        return JSONResponse(ImagesResponse(
            created=int(time.time()), size=size, output_format="png",
            data=[ImageData(b64_json=base64.b64encode(pngs[i]).decode("ascii"), revised_prompt=None)
                  for i in sorted(pngs)],
            usage=ImageUsage(input_tokens=n_in, output_tokens=N * req.n, total_tokens=n_in + N * req.n,
                             input_tokens_details=ImageTokensDetails(text_tokens=n_in, image_tokens=0))).dump())

    async def _image_stream(self, job: Job, watcher: asyncio.Task, size: str, usage: ImageUsage
                            ) -> AsyncIterator[str]:
        """SSE as gpt-image's stream (`event:` + `data:` lines): nanoseek's progress events, then one
        `image_generation.completed` per image as it is decoded. Its `finally` cancels the job however it ends."""
        try:
            async for kind, a, b in job.events():
                now = int(time.time())
                if kind == "progress":
                    yield ImageProgressEvent(type="image_generation.progress", created_at=now, step=a,
                                             steps=b).sse()
                else:
                    yield ImageCompletedEvent(type="image_generation.completed", index=a, created_at=now, size=size,
                                              b64_json=base64.b64encode(b).decode("ascii"), output_format="png",
                                              background="opaque", quality="auto", usage=usage).sse()
        except (ClientGone, JobCancelled):
            return  # nobody is reading
        except APIError as e:  # mid-stream the status is sent: the openai client raises on an error event
            yield e.body().sse()
        except Exception:  # a bug: the status line has gone, so it becomes an error event (traceback in the log)
            log.exception("image generation failed")
            yield APIError(500, "Internal server error", "server_error", code="internal_error").body().sse()
        finally:
            job.cancel()
            watcher.cancel()

    def _response(self, req: GenerationRequest, base: str, outs: dict[int, RequestOutput],
                  splitters: list[StreamSplitter] | None) -> ChatCompletion | Completion:
        created, usage = int(time.time()), self._usage(req, outs, splitters)
        if req.kind == "completion":
            return Completion(id=base, object="text_completion", created=created, model=self.name, usage=usage,
                              choices=[CompletionChoice(
                                  index=i, text=out.text, finish_reason=_finish(out), stop_reason=out.stop_reason,
                                  logprobs=self._completion_logprobs(out, 0) if req.logprobs is not None else None)
                                  for i, out in outs.items()])
        choices = []
        for i, out in outs.items():
            if self.reasoning:
                s = splitters[i]  # type: ignore[index]
                message = ChatMessage(role="assistant", content=s.answer, reasoning_content=s.reasoning_content,
                                      reasoning=s.reasoning_content)
            else:
                message = ChatMessage(role="assistant", content=out.text)
            choices.append(ChatChoice(index=i, message=message, finish_reason=_finish(out), stop_reason=out.stop_reason,
                                      logprobs=self._chat_logprobs(out) if req.logprobs is not None else None))
        return ChatCompletion(id=base, object="chat.completion", created=created, model=self.name, choices=choices,
                              usage=usage)

    async def _stream(self, req: GenerationRequest, base: str, sub: _Submission) -> AsyncIterator[str]:
        """The SSE body. Its `finally` aborts the unfinished sequences however the stream ends: done, an error, the
        client gone (the watcher's ClientGone, or the response cancelled or closed: CancelledError, GeneratorExit)."""
        chat = req.kind == "chat"
        created = int(time.time())
        splitters = self._splitters(req)
        outs: dict[int, RequestOutput] = {}
        offsets = [0] * req.num_sequences
        # as OpenAI: with include_usage every chunk has "usage": null, and one more chunk fills it
        no_usage: dict[str, Any] = {"usage": None} if req.include_usage else {}

        def chunk(choices: list[Any], **usage: Any) -> str:
            if chat:
                return ChatCompletionChunk(id=base, object="chat.completion.chunk", created=created,
                                           model=self.name, choices=choices, **usage).sse()
            return Completion(id=base, object="text_completion", created=created, model=self.name,
                              choices=choices, **usage).sse()

        try:
            if chat:  # the first chunk of each choice carries the role, as OpenAI's
                yield chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""), logprobs=None,
                                             finish_reason=None) for i in range(req.num_sequences)], **no_usage)
            async for i, d in sub.events():
                outs.setdefault(i, RequestOutput(d.request_id)).merge(d)
                finish = _finish(d) if d.finished else None
                end = {"stop_reason": d.stop_reason} if finish else {}
                if chat:
                    s = splitters[i]  # type: ignore[index]
                    r, c = s.feed(d.text, d.token_ids)
                    if d.finished:
                        r2, c2 = s.finish()
                        r, c = r + r2, c + c2
                    delta: dict[str, str] = {"reasoning_content": r, "reasoning": r} if r else {}
                    if c:
                        delta["content"] = c
                    lp = self._chat_logprobs(d) if req.logprobs is not None and d.token_ids else None
                    if delta or lp or finish:
                        yield chunk([ChatChunkChoice(index=i, delta=Delta(**delta), logprobs=lp, finish_reason=finish,
                                                     **end)], **no_usage)
                else:
                    clp = self._completion_logprobs(d, offsets[i]) if req.logprobs is not None else None
                    offsets[i] += len(d.text)
                    if d.text or clp or finish:
                        yield chunk([CompletionChoice(index=i, text=d.text, logprobs=clp, finish_reason=finish,
                                                      **end)], **no_usage)
            if req.include_usage:
                yield chunk([], usage=self._usage(req, outs, splitters))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return  # nobody is reading
        except APIError as e:  # mid-stream the status is sent: the openai client raises on an error event
            yield e.body().sse()
        finally:
            sub.abort()

    def _model_card(self) -> ModelCard:
        modalities = ["text", "image"] if self.janus is not None else ["text"]
        return ModelCard(id=self.name, object="model", created=self.created, owned_by="nanoseek",
                         max_model_len=self.engine.max_model_len, input_modalities=modalities,
                         output_modalities=list(modalities))

    # ---- the app ---------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.worker.start(asyncio.get_running_loop())
            log.info("serving %s (max_batch %d, max_model_len %d, reasoning split %s, %s)", self.name,
                     self.engine.max_batch, self.engine.max_model_len, "on" if self.reasoning else "off",
                     "API key required" if self.api_key else "no API key")
            yield
            self.worker.stop()

        app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_CountResponses, metrics=self.metrics)

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError) -> JSONResponse:
            return JSONResponse(e.body().dump(), status_code=e.status)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
            code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
            return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body().dump(),
                                status_code=e.status_code)

        @app.exception_handler(Exception)
        async def internal_error(request: Request, e: Exception) -> JSONResponse:
            log.exception("internal error")
            return JSONResponse(APIError(500, f"Internal server error: {type(e).__name__}", "server_error",
                                         code="internal_error").body().dump(), status_code=500)

        @app.get("/v1/models")
        async def list_models(request: Request) -> JSONResponse:
            self._check_auth(request)
            return JSONResponse(ModelList(object="list", data=[self._model_card()]).dump())

        @app.get("/v1/models/{model:path}")
        async def get_model(model: str, request: Request) -> JSONResponse:
            self._check_auth(request)
            if model != self.name:
                raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
            return JSONResponse(self._model_card().dump())

        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/images/generations", self.images_generations, methods=["POST"])

        @app.get("/health")
        async def health() -> JSONResponse:
            if not self.worker.alive:
                return JSONResponse({"status": "engine not running"}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            # the library's content negotiation: OpenMetrics for a scraper that asks for it, else the text format
            encode, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encode(self.metrics.registry), media_type=content_type)

        web = resources.files("nanoseek.web")
        static = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}

        @app.get("/")
        async def index() -> FileResponse:
            return FileResponse(str(web / "index.html"), media_type="text/html")

        @app.get("/static/{name}")
        async def static_file(name: str) -> FileResponse:
            if name not in static:  # a fixed list: nothing from the URL reaches the filesystem
                raise HTTPException(404, "Not Found")
            return FileResponse(str(web / name), media_type=static[name])

        return app


def _finish(out: RequestOutput) -> str | None:
    return "stop" if out.finish_reason == "abort" else out.finish_reason  # an abort is the server's, not a reason


def _finite(logprob: float) -> float:
    return logprob if logprob > -9999.0 else -9999.0  # also NaN -> -9999.0


class _Submission:
    """The engine sequences of one HTTP request, the queue their deltas arrive on, and a watch on its client."""

    def __init__(self, worker: EngineWorker) -> None:
        self.worker = worker
        self.queue: asyncio.Queue = asyncio.Queue()
        self.index: dict[str, int] = {}
        self.pending: set[str] = set()
        self.watcher: asyncio.Task | None = None

    def add(self, rid: str) -> None:
        self.index[rid] = len(self.index)
        self.pending.add(rid)

    def watch(self, request: Request) -> None:
        """Abort as soon as the client disconnects, whether the handler waits, the stream runs or has not started
        yet (a response that never starts never runs its body's `finally`), whatever the ASGI spec version."""

        async def until_gone() -> None:
            # the body has been read, so the next ASGI message is http.disconnect (also sent once the response is
            # complete: the abort is then a no-op)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.queue.put_nowait(CLIENT_GONE)
            self.abort()

        self.watcher = asyncio.get_running_loop().create_task(until_gone())

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(sequence index, delta) until every sequence has finished."""
        while self.pending:
            item = await self.queue.get()
            if isinstance(item, EngineDead):
                self.pending.clear()
                raise APIError(503, str(item), "server_error", code="engine_unavailable")
            if item is CLIENT_GONE:
                raise item
            if item.finished:
                self.pending.discard(item.request_id)
            yield self.index[item.request_id], item

    def abort(self) -> None:
        """Free the batch slots of unfinished sequences (client gone, error) and stop watching; idempotent."""
        for rid in self.pending:
            self.worker.abort(rid)
        self.pending.clear()
        if self.watcher is not None:
            self.watcher.cancel()


class _CountResponses:
    """Pure ASGI middleware counting API responses by path and status (BaseHTTPMiddleware would wrap streams)."""

    PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/images/generations", "/v1/models")

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.PATHS else "other"  # bounded label values

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(path=path, code=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


# ----------------------------------------------------------------------------------------------------------------
# Running it


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: ServeConfig) -> int:
    """`nanoseek serve`: load the model and serve until interrupted."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s")
    server = Server.from_config(cfg)
    if server.engine.compiled:  # before accepting requests: seconds per bucket from a warm cache, more when cold
        t0 = time.perf_counter()
        buckets = server.engine.warmup()
        log.info("compiled the decode step for batch sizes %s in %.0f s", buckets, time.perf_counter() - t0)
    if not _is_loopback(cfg.host) and server.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach the port can use the model "
                    "(set --api-key or NANOSEEK_API_KEY)", cfg.host)
    log.info("model %s (%s, %s) -> http://%s:%d (web chat at /, API at /v1)", cfg.model, server.engine.device,
             str(server.engine.dtype).removeprefix("torch."), cfg.host, cfg.port)
    uvicorn.run(server.app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return 0


class BackgroundServer:
    """Run a Server's app with uvicorn in a thread on a free loopback port (tests, notebooks, benchmarks).

    with BackgroundServer(server) as url: ...   # url = "http://127.0.0.1:PORT"
    """

    def __init__(self, server: Server, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

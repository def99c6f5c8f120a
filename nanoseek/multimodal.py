"""Janus-Pro in conversations: images in chat messages and text-to-image as PNG bytes, for the server
(nanoseek/serve.py) and the terminal chat (nanoseek/chat.py). The model is nanoseek/janus.py; directories, image
processing and the `imagine` / `generate --image` commands are nanoseek/imagine.py, whose prompt formats this
module extends to whole conversations.

- Images arrive as OpenAI's content parts, `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.
  Only data URLs (PNG or JPEG) are read: a server that fetched remote URLs would make requests on behalf of anyone
  who can reach it (SSRF), and a local file path would read the server's disk. `decode_data_url` is the one reader.
- The conversation format is DeepSeek's "deepseek" template that Janus-Pro was tuned on (janus/utils/conversation.py,
  VLChatProcessor): `{system}\\n\\n<|User|>: {text}\\n\\n<|Assistant|>: {answer}<eos><|User|>: ...<|Assistant|>:`,
  with VLChatProcessor's system prompt unless the conversation has its own. An image part becomes one
  `<image_placeholder>` where it sits, which is then expanded to `<begin_of_image>`, num_image_tokens placeholders and
  `<end_of_image>`, exactly as `nanoseek generate --image` (imagine.understanding_prompt) builds its prompt; the
  image features replace the placeholders (Janus.embed). A one-turn conversation of [image, question] therefore
  gives the same token ids as `nanoseek generate --image photo.png --prompt question`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .imagine import IMAGE_TOKEN, UNDERSTANDING_SYSTEM, generation_prompt, preprocess, to_pil
from .infer import generate_image_tokens
from .janus import Janus

# declared type -> Pillow's format name; the bytes decide the format (a browser may label a JPEG .png), but only
# these two are read: Janus' processor was tested on them and they cover cameras and screenshots
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
# decoded size bound: a small compressed file can expand to gigabytes of pixels (a "decompression bomb"); 50 MP
# holds any camera photo (48 MP phones) and is 150 MB as RGB
MAX_PIXELS = 50_000_000
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)",
                       re.DOTALL | re.IGNORECASE)


class ImageError(ValueError):
    """A bad image input; `code` is OpenAI's error code for it (invalid_image_url, invalid_image_format,
    image_parse_error)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def decode_data_url(url: str) -> Any:
    """A `data:image/png;base64,...` or `data:image/jpeg;base64,...` URL -> an RGB PIL image (fully decoded)."""
    from PIL import Image, UnidentifiedImageError

    if re.match(r"https?://", url, re.IGNORECASE):
        raise ImageError("remote image URLs are not fetched (the server downloads nothing): send the image inline "
                         "as a data URL, data:image/png;base64,... or data:image/jpeg;base64,...", "invalid_image_url")
    m = _DATA_URL.fullmatch(url.strip())
    if m is None:
        raise ImageError("the image URL must be a data URL, data:image/png;base64,... or data:image/jpeg;base64,...",
                         "invalid_image_url")
    kind = (m["type"] or "").lower()
    if kind not in IMAGE_TYPES:
        raise ImageError(f"unsupported image type {kind or '(none)'!r}: send a PNG or JPEG (data:image/png;base64,... "
                         "or data:image/jpeg;base64,...)", "invalid_image_format")
    if not m["b64"]:
        raise ImageError("the data URL must be base64-encoded (data:image/png;base64,...)", "invalid_image_url")
    try:
        # validate=True: a stray character is an error, not silently dropped
        raw = base64.b64decode(re.sub(r"\s+", "", m["data"]), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data URL's base64 payload is invalid ({e})", "invalid_image_url") from None
    if not raw:
        raise ImageError("the data URL holds no image data", "image_parse_error")
    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only: the size is known before decoding
            if im.format not in ("PNG", "JPEG"):
                raise ImageError(f"the data is a {im.format} image: only PNG and JPEG are read",
                                 "invalid_image_format")
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"the image is {im.width}x{im.height} pixels, more than the {MAX_PIXELS:,} this "
                                 "server decodes (it is resized to the model's input size anyway)", "image_parse_error")
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError("the data is not a PNG or JPEG image Pillow can read", "image_parse_error") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageError):
            raise
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"the image is corrupt or truncated ({detail})", "image_parse_error") from None


def file_data_url(path: str | Path) -> str:
    """A PNG or JPEG file -> a data URL (what `nanoseek chat`'s /image sends); checked as the server checks it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"image {p} {'is not a file' if p.exists() else 'does not exist'}")
    raw = p.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {p}: not an image Pillow can open") from e
    if fmt not in ("PNG", "JPEG"):
        raise ValueError(f"image {p} is {fmt}: only PNG and JPEG are sent")
    url = f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode('ascii')}"
    decode_data_url(url)  # corrupt or oversized files fail here, with the server's message, not after sending
    return url


def image_parts(messages: Sequence[dict[str, Any]]) -> Iterator[tuple[int, int, str]]:
    """(message index, part index, url) of every image_url part, in conversation order."""
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    yield i, j, str((part.get("image_url") or {}).get("url", ""))


def _text_of(content: Any) -> str:
    """A message's text, images as one <image_placeholder> each where they sit (transformers' Janus chat template:
    a newline between an image and its neighbours, a space between two text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    out: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        prev = content[j - 1].get("type") if j else None
        if kind == "image_url":
            out.append(("\n" if j else "") + IMAGE_TOKEN + ("\n" if j < len(content) - 1 else ""))
        else:
            text = str(part.get("text", ""))
            text = text.lstrip() if j == 0 else text
            text = text.rstrip() if j == len(content) - 1 else text
            out.append(" " + text if prev == "text" else text)
    return "".join(out).strip()


def render_conversation(messages: Sequence[dict[str, Any]], eos_token: str) -> str:
    """DeepSeek's "deepseek" conversation template, as VLChatProcessor fills it: roles user / assistant (system
    messages form the system prompt; none: VLChatProcessor's default, an empty one: no system prompt), every message
    stripped, the prompt ending with the assistant's turn."""
    systems = [_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    system = "\n\n".join(s for s in systems if s) if systems else UNDERSTANDING_SYSTEM
    out = f"{system}\n\n" if system else ""
    for m in messages:
        if m.get("role") == "user":
            out += f"<|User|>: {_text_of(m.get('content'))}\n\n"
        elif m.get("role") == "assistant":
            out += f"<|Assistant|>: {_text_of(m.get('content'))}{eos_token}"
    return out + "<|Assistant|>:"


class JanusChat:
    """A Janus model and its tokenizer as a chat model: conversation -> token ids (image placeholders expanded) and
    prompt embeddings (image features over the placeholders) for Engine.add_request(prompt_embeds=...)."""

    def __init__(self, model: Janus, tokenizer: Any, processor: dict[str, Any]) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.config = model.config

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation, each image's placeholder expanded to <begin_of_image>, num_image_tokens
        placeholders, <end_of_image> (imagine.understanding_prompt's rule). Raises ValueError when the text itself
        holds placeholders (they would take an image's place)."""
        cfg = self.config
        ids = self.tokenizer.encode(render_conversation(messages, self.tokenizer.eos_token or ""), add_bos=True)
        want = sum(1 for _ in image_parts(messages))
        if ids.count(cfg.image_token_id) != want:
            raise ValueError(f"the messages hold {ids.count(cfg.image_token_id) - want:+d} {IMAGE_TOKEN} token(s) "
                             f"beyond their {want} image part(s): the text must not contain {IMAGE_TOKEN}")
        out: list[int] = []
        for t in ids:
            out += [cfg.boi_token_id, *[cfg.image_token_id] * cfg.num_image_tokens, cfg.eoi_token_id] \
                if t == cfg.image_token_id else [t]
        return out

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> the understanding encoder's input (n, 3, S, S) (transformers' JanusImageProcessor)."""
        return preprocess(images, self.processor)

    @torch.inference_mode()
    def embeds(self, ids: Sequence[int], pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """(T, D) prompt embeddings with the images' features over their placeholders (SigLIP + aligner); None for a
        text-only prompt (the engine's own lookup)."""
        if pixel_values is None or not len(pixel_values):
            return None
        param = next(self.model.parameters())
        x = torch.tensor([list(ids)], device=param.device)
        return self.model.embed(x, pixel_values.to(param.device, param.dtype))[0]


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # Pillow's defaults, as `nanoseek imagine` writes its files
    return buf.getvalue()


def generate_pngs(model: Janus, tokenizer: Any, processor: dict[str, Any], prompt: str | list[int], *, n: int,
                  guidance_scale: float, temperature: float, seed: int | None,
                  progress: Callable[[int, int], None] | None = None,
                  between: Callable[[], None] | None = None,
                  compile: bool | None = False) -> Iterator[tuple[int, bytes]]:
    """Text to n images as (index, PNG bytes), the way `nanoseek imagine` makes them: the same prompt, sampler, seed
    and decoding (VQ-decoded in chunks of 4), so the same arguments give the same files. `progress(i, N)` is called
    after each of the N image-token steps (it may raise to abort), `between()` after each step and each decoded
    chunk (the server runs other work there). `compile`: as generate_image_tokens'."""
    ids = prompt if isinstance(prompt, list) else generation_prompt(tokenizer, model.config, prompt)

    def step(i: int, total: int) -> None:
        if progress is not None:
            progress(i, total)
        if between is not None:
            between()

    tokens = generate_image_tokens(model, [ids] * n, cfg_weight=guidance_scale, temperature=temperature, seed=seed,
                                   progress=step, compile=compile)
    index = 0
    for chunk in tokens.split(4):
        with torch.inference_mode():
            images = to_pil(model.decode_image(chunk), processor)
        for im in images:
            yield index, png_bytes(im)
            index += 1
        if between is not None:
            between()

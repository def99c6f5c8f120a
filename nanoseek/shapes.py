"""A synthetic visual world for mini Janus, and a rule-based verifier that scores images GenEval-style.

The world: Pillow-drawn images (default 32 x 32, white background, no anti-aliasing) of 1-3 flat-coloured objects,
each a shape (circle, square, triangle), a colour (six hues 45-80 degrees apart) and a size (two classes), placed
with gaps. Every item is a prompt in one of GenEval's six categories (Ghosh et al. 2023, arXiv 2310.11513: single
object, two objects, counting, colours, position, colour attribution) with a machine-readable requirement in
GenEval's own form (`include` / `exclude` lists of objects with count, colour and relative position), the scene
that satisfies it, a caption and understanding questions with short answers.

Splits are disjoint in *compositions*, not only in samples: a few colour-shape pairs are held out. Training scenes
never show one; every test prompt that names colours names at least one. Prompts that name no colour (a circle,
two triangles) have no composition to hold out and may repeat across splits (there are only a handful of them).

The verifier reads an image the way GenEval's detector + colour classifier do, with rules instead of a network:
pixels far from the white background (chroma >= half the palette's) are labelled with the nearest palette hue (a
blend of a colour with white keeps its hue, so anti-aliased or blurry edges keep their colour), each colour's
connected components are objects, and an object's shape is the drawn template (same drawing code) with the best
IoU in its bounding box. Requirements are checked as GenEval's evaluate_images.py does (counts, colours, relative
position with its 0.1 box-size threshold). `validate` measures it on freshly rendered ground truth of the test
prompts; every score run reports that number beside the model's.

Public surface (the tasks module wraps these): ShapesConfig / load_config, make_items(config, split, n, seed)
(prompts, requirements, scenes, captions, questions), render(objects, config), detect(image, config),
score_image(requirement, image, config), score_images, summarize(rows), validate(config, ...), synth(...) and
load_split (`nanoseek data synth --task shapes`), read_generated (what `nanoseek janus score` reads).
"""

from __future__ import annotations

import colorsys
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_path, atomic_write_json, atomic_write_jsonl, check_resume, read_jsonl
from .stats import derive_seed, wilson

# Colours as RGB of HSV(hue, 0.85, 0.9): one chroma (195) for all, so one foreground threshold fits every colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 35, 35),  # hue 0
    "orange": (230, 132, 35),  # 30
    "yellow": (230, 214, 35),  # 55
    "green": (35, 230, 35),  # 120
    "cyan": (35, 230, 230),  # 180
    "blue": (35, 51, 230),  # 235
    "purple": (165, 35, 230),  # 280
    "pink": (230, 35, 132),  # 330
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_OBJECT_PX = 6  # below this a circle, a square and a triangle are a few pixels apart
MIN_HUE_GAP = 25.0  # degrees between any two colours of a world
POSITION_THRESHOLD = 0.1  # GenEval: offsets shrink by 0.1 x the summed box sizes before the direction is read


def _hue(rgb: Sequence[float]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360


def _hue_gap(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


# ----------------------------------------------------------------------------------------------------------------
# The world's settings


@dataclass(frozen=True)
class ShapesConfig:
    """The world. Sizes are the side in pixels of the square box a shape is drawn in (default: 0.3 and 0.4 of the
    image, 10 and 13 px at 32: at 8 px a VQ round trip loses the circle/square difference, docs/mini-janus.md);
    `holdout` lists the (colour, shape) pairs kept out of training (default: one per shape, on every second
    colour). Impossible settings raise ValueError here, before anything is drawn."""

    image_size: int = 32
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
    sizes: tuple[int, ...] = ()
    max_objects: int = 3
    gap: int = -1  # pixels between objects' boxes; -1: image_size // 10 (at least 2)
    margin: int = 1  # pixels between a box and the image border
    holdout: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        S = self.image_size
        set_ = object.__setattr__  # frozen: derived defaults are filled in once, here
        set_(self, "shapes", tuple(self.shapes))
        set_(self, "colors", tuple(self.colors))
        if not self.sizes:
            set_(self, "sizes", (round(0.3 * S), round(0.4 * S)))
        set_(self, "sizes", tuple(sorted(int(s) for s in self.sizes)))
        if self.gap < 0:
            set_(self, "gap", max(2, S // 10))
        if not self.holdout:
            n = min(len(self.shapes), len(self.colors) // 2)
            set_(self, "holdout", tuple((self.colors[2 * i + 1], self.shapes[i]) for i in range(n)))
        set_(self, "holdout", tuple(tuple(p) for p in self.holdout))
        errors = self._errors()
        if errors:
            raise ValueError("invalid shapes world: " + "; ".join(errors))

    def _errors(self) -> list[str]:
        S, errors = self.image_size, []
        if S < 16:
            return [f"image_size {S} is too small (>= 16: objects of >= {MIN_OBJECT_PX} px, two side by side)"]
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or len(set(self.shapes)) != len(self.shapes) or len(self.shapes) < 2:
            errors.append(f"shapes must be >= 2 distinct names from {', '.join(SHAPES)}, got {list(self.shapes)}")
        bad = [c for c in self.colors if c not in PALETTE]
        if bad or len(set(self.colors)) != len(self.colors) or len(self.colors) < 2:
            errors.append(f"colors must be >= 2 distinct names from {', '.join(PALETTE)}, got {list(self.colors)}")
        else:
            hues = [(_hue(PALETTE[c]), c) for c in self.colors]
            close = [(a, b) for i, (ha, a) in enumerate(hues) for hb, b in hues[i + 1:]
                     if _hue_gap(ha, hb) < MIN_HUE_GAP]
            if close:
                errors.append(f"colors {close[0][0]} and {close[0][1]} are less than {MIN_HUE_GAP:g} degrees of hue "
                              "apart: the verifier could not tell them apart")
        small, big = self.sizes[0], self.sizes[-1]
        if small < MIN_OBJECT_PX:
            errors.append(f"object size {small} px is too small: shapes need >= {MIN_OBJECT_PX} px to be told apart")
        if len(set(self.sizes)) != len(self.sizes) or any(b - a < 2 for a, b in zip(self.sizes, self.sizes[1:])):
            errors.append(f"sizes {list(self.sizes)} must differ by >= 2 px (size classes are read from boxes)")
        if len(self.sizes) > 3:
            errors.append(f"at most 3 size classes (small, medium, large), got {len(self.sizes)}")
        if not 2 <= self.max_objects < len(NUMBERS):
            errors.append(f"max_objects must be in 2..{len(NUMBERS) - 1} (two-object prompts need 2), "
                          f"got {self.max_objects}")
        if self.gap < 1 or self.margin < 0:
            errors.append(f"gap must be >= 1 px and margin >= 0, got gap {self.gap}, margin {self.margin}")
        # a sufficient packing: boxes of the largest size on a grid with the gap between them
        per_row = (S - 2 * self.margin + self.gap) // (big + self.gap)
        if not errors and per_row ** 2 < self.max_objects:
            errors.append(f"{self.max_objects} objects of {big} px with {self.gap} px gaps and {self.margin} px "
                          f"margins do not fit in a {S}x{S} image (at most {per_row ** 2} do): use fewer or "
                          "smaller objects, or a larger image")
        for pair in self.holdout:
            if len(pair) != 2 or pair[0] not in self.colors or pair[1] not in self.shapes:
                errors.append(f"held-out pair {list(pair)} is not a (color, shape) of this world")
        if not errors:
            train = self.train_pairs()
            if not self.holdout:
                errors.append("holdout is empty: the test split would not be compositional")
            for c in self.colors:
                if not any(p[0] == c for p in train):
                    errors.append(f"every pairing of {c} is held out: the test would need an unseen colour")
            for s in self.shapes:
                if not any(p[1] == s for p in train):
                    errors.append(f"every pairing of {s} is held out: the test would need an unseen shape")
        return errors

    def train_pairs(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs training scenes may show."""
        held = set(self.holdout)
        return [(c, s) for c in self.colors for s in self.shapes if (c, s) not in held]

    def size_name(self, size: int) -> str:
        names = {1: ("",), 2: ("small", "large"), 3: ("small", "medium", "large")}[len(self.sizes)]
        return names[self.sizes.index(size)]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapesConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown shapes world key(s) {unknown}; known: {sorted(names)}")
        conv = {k: (tuple(tuple(p) for p in v) if k == "holdout" else tuple(v) if isinstance(v, list) else v)
                for k, v in d.items()}
        return cls(**conv)


def load_config(path: str | Path | None) -> ShapesConfig:
    """A world from a world.json, or a directory holding one (`data synth` writes it); None: the default world."""
    if path is None:
        return ShapesConfig()
    p = Path(path)
    if p.is_dir():
        p = p / "world.json"
    if not p.is_file():
        raise ValueError(f"no shapes world at {path} (a world.json, or a directory written by `nanoseek data synth "
                         "--task shapes`)")
    try:
        return ShapesConfig.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _polygon(shape: str, x: float, y: float, s: int) -> list[tuple[float, float]]:
    e = s - 1  # Pillow boxes are inclusive: a shape of side s spans pixels x .. x + s - 1
    if shape == "triangle":  # apex up
        return [(x + e / 2, y), (x + e, y + e), (x, y + e)]
    return [(x + e / 2, y), (x + e, y + e / 2), (x + e / 2, y + e), (x, y + e / 2)]  # diamond


def draw_shape(draw: Any, shape: str, x: int, y: int, s: int, fill: Any) -> None:
    """Draw one shape in the box [x, x + s) x [y, y + s), aliased (Pillow's default): flat colours, exact edges."""
    box = [x, y, x + s - 1, y + s - 1]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_polygon(shape, x, y, s), fill=fill)


def render(objects: Sequence[Mapping[str, Any]], config: ShapesConfig) -> np.ndarray:
    """A scene's image, (S, S, 3) uint8; each object has shape, color, size and its box's top-left x, y."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (config.image_size,) * 2, BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in objects:
        draw_shape(d, o["shape"], o["x"], o["y"], o["size"], PALETTE[o["color"]])
    return np.asarray(im).copy()


@lru_cache(maxsize=512)
def shape_mask(shape: str, s: int) -> np.ndarray:
    """The (s, s) bool mask of a shape drawn in an s-pixel box: the verifier's templates."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (s, s), 0)
    draw_shape(ImageDraw.Draw(im), shape, 0, 0, s, 1)
    return np.asarray(im).astype(bool)


# ----------------------------------------------------------------------------------------------------------------
# Relative position, GenEval's rule (evaluate_images.py: relative_position)


def box_of(o: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1), x1 and y1 exclusive, of a scene object or a detection."""
    if "box" in o:
        return tuple(o["box"])  # type: ignore[return-value]
    return o["x"], o["y"], o["x"] + o["size"], o["y"] + o["size"]


def direction(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(dx, dy) of box a relative to box b: the centre offset, shrunk by 0.1 x the summed sizes and divided by the
    plain offset's length, as GenEval. Image y grows downwards."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]], dtype=float)
    off = ca - cb
    norm = float(np.linalg.norm(off))
    if norm == 0:
        return 0.0, 0.0
    rev = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0) * np.sign(off)
    return float(rev[0] / norm), float(rev[1] / norm)


def relations(a: Sequence[float], b: Sequence[float], threshold: float = 0.5) -> set[str]:
    """GenEval's relations of box a to box b ("left of", "right of", "above", "below"; threshold 0.5)."""
    dx, dy = direction(a, b)
    out = set()
    if dx < -threshold:
        out.add("left of")
    if dx > threshold:
        out.add("right of")
    if dy < -threshold:
        out.add("above")
    if dy > threshold:
        out.add("below")
    return out


def _clearly(rel: str, a: Sequence[float], b: Sequence[float]) -> bool:
    """Ground truth for a relation leaves margin: the relation's axis component >= 0.75 and the other <= 0.35,
    so a detection a pixel off still reads exactly this one relation."""
    dx, dy = direction(a, b)
    main, other = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    sign = -1 if rel in ("left of", "above") else 1
    return sign * main >= 0.75 and abs(other) <= 0.35


# ----------------------------------------------------------------------------------------------------------------
# Prompts, requirements, scenes


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _phrase(color: str | None, shape: str) -> str:
    words = f"{color} {shape}" if color else shape
    return f"{_a(words)} {words}"


def _req(shape: str, count: int = 1, color: str | None = None, position: list | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"shape": shape, "count": count}
    if color:
        r["color"] = color
    if position:
        r["position"] = position
    return r


def make_prompt(category: str, config: ShapesConfig, rng: random.Random, split: str) -> tuple[str, dict[str, Any]]:
    """(prompt text, requirement) of one item. Colour-naming categories use training pairs only in `train` and
    at least one held-out pair in `test`."""
    shapes, train, held = config.shapes, config.train_pairs(), list(config.holdout)

    def two_pairs() -> tuple[tuple[str, str], tuple[str, str]]:
        # two (colour, shape) pairs, different colours and shapes (GenEval names two classes); test: at least one
        # held out, in either order
        while True:
            if split == "train":
                p, q = rng.choice(train), rng.choice(train)
            else:
                p = rng.choice(held)
                q = rng.choice([(c, s) for c in config.colors for s in shapes])
                if rng.random() < 0.5:
                    p, q = q, p
            if p[0] != q[0] and p[1] != q[1]:
                return p, q

    if category == "single_object":
        s = rng.choice(shapes)
        return _phrase(None, s), {"include": [_req(s)], "exclude": []}
    if category == "two_objects":
        a, b = rng.sample(shapes, 2)
        return f"{_phrase(None, a)} and {_phrase(None, b)}", {"include": [_req(a), _req(b)], "exclude": []}
    if category == "counting":
        n = rng.randint(2, config.max_objects)
        s = rng.choice(shapes)
        return f"{NUMBERS[n]} {_plural(s)}", {"include": [_req(s, n)], "exclude": [_req(s, n + 1)]}
    if category == "colors":
        c, s = rng.choice(train if split == "train" else held)
        return _phrase(c, s), {"include": [_req(s, 1, c)], "exclude": []}
    if category == "color_attr":
        (ca, a), (cb, b) = two_pairs()
        return (f"{_phrase(ca, a)} and {_phrase(cb, b)}",
                {"include": [_req(a, 1, ca), _req(b, 1, cb)], "exclude": []})
    if category == "position":
        (ca, a), (cb, b) = two_pairs()
        rel = rng.choice(RELATIONS)
        # GenEval's form: the reference object is group 0, the placed one carries [relation, 0]
        return (f"{_phrase(ca, a)} {rel} {_phrase(cb, b)}",
                {"include": [_req(b, 1, cb), _req(a, 1, ca, [rel, 0])], "exclude": []})
    raise ValueError(f"unknown category {category!r} (one of {', '.join(CATEGORIES)})")


def _scene_spec(requirement: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The objects a ground-truth scene of a requirement holds: each include entry `count` times."""
    return [{"shape": r["shape"], "color": r.get("color")} for r in requirement["include"] for _ in range(r["count"])]


def sample_scene(requirement: Mapping[str, Any], config: ShapesConfig, rng: random.Random, split: str
                 ) -> list[dict[str, Any]]:
    """Objects (shape, color, size, x, y) that satisfy `requirement`: exactly its objects, boxes `gap` apart,
    relations drawn with margin. Unnamed colours come from the split's pairs (a training scene never shows a
    held-out pair). Placement is rejection sampling; the config check guarantees room."""
    S, g, m = config.image_size, config.gap, config.margin
    allowed = config.train_pairs() if split == "train" else [(c, s) for c in config.colors for s in config.shapes]
    spec = _scene_spec(requirement)
    rel = next((r["position"] for r in requirement["include"] if r.get("position")), None)
    for _ in range(1000):
        objs: list[dict[str, Any]] = []
        for o in spec:
            color = o["color"] or rng.choice([c for c, s in allowed if s == o["shape"]])
            size = rng.choice(config.sizes)
            for _ in range(100):
                x, y = rng.randint(m, S - m - size), rng.randint(m, S - m - size)
                box = (x, y, x + size, y + size)
                if all(_apart(box, box_of(p), g) for p in objs):
                    objs.append({"shape": o["shape"], "color": color, "size": size, "x": x, "y": y})
                    break
            else:
                break
        if len(objs) != len(spec):
            continue
        # position: include[1] is placed [rel] of include[0]
        if rel is not None and not _clearly(rel[0], box_of(objs[1]), box_of(objs[0])):
            continue
        return objs
    raise RuntimeError(f"could not place {requirement} in {S}x{S} after 1000 tries")  # the config check prevents it


def _apart(a: Sequence[float], b: Sequence[float], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def caption(objects: Sequence[Mapping[str, Any]], config: ShapesConfig) -> str:
    """A full description: every object with size, colour and shape, left to right; two objects with their
    clearest relation."""
    def name(o: Mapping[str, Any]) -> str:
        return " ".join(w for w in (_a(config.size_name(o["size"]) or o["color"]), config.size_name(o["size"]),
                                    o["color"], o["shape"]) if w)

    objs = sorted(objects, key=lambda o: (box_of(o)[0] + box_of(o)[2], box_of(o)[1]))
    if len(objs) == 1:
        return name(objs[0])
    if len(objs) == 2:
        dx, dy = direction(box_of(objs[0]), box_of(objs[1]))
        rel = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        return f"{name(objs[0])} {rel} {name(objs[1])}"
    return ", ".join(name(o) for o in objs[:-1]) + f" and {name(objs[-1])}, from left to right"


def questions(objects: Sequence[Mapping[str, Any]], config: ShapesConfig, rng: random.Random) -> list[dict[str, str]]:
    """Understanding questions with short answers: how many of a shape (any shape, 0 included), the colour of a
    shape present once, and for two distinct objects whether one is left of the other (only when clearly so)."""
    out = []
    s = rng.choice(config.shapes)
    out.append({"kind": "count", "question": f"How many {_plural(s)} are there?",
                "answer": str(sum(o["shape"] == s for o in objects))})
    once = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
    if once:
        o = rng.choice(once)
        out.append({"kind": "color", "question": f"What color is the {o['shape']}?", "answer": o["color"]})
    pairs = [(a, b) for a in objects for b in objects if a is not b and (a["color"], a["shape"]) !=
             (b["color"], b["shape"]) and (_clearly("left of", box_of(a), box_of(b))
                                           or _clearly("right of", box_of(a), box_of(b)))]
    unique = [(a, b) for a, b in pairs if sum((o["color"], o["shape"]) == (a["color"], a["shape"]) for o in objects)
              == 1 and sum((o["color"], o["shape"]) == (b["color"], b["shape"]) for o in objects) == 1]
    if unique:
        a, b = rng.choice(unique)
        out.append({"kind": "position", "question": f"Is the {a['color']} {a['shape']} left of the "
                                                     f"{b['color']} {b['shape']}?",
                    "answer": "yes" if _clearly("left of", box_of(a), box_of(b)) else "no"})
    return out


def make_items(config: ShapesConfig, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n items of a split, the six categories in turn (n = 6k gives k each). Item i depends only on (seed, split,
    i): the same arguments give the same items, and a longer list extends a shorter one."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = []
    for i in range(n):
        rng = random.Random(derive_seed("shapes", seed, split, i))
        category = CATEGORIES[i % len(CATEGORIES)]
        prompt, req = make_prompt(category, config, rng, split)
        objs = sample_scene(req, config, rng, split)
        items.append({"id": f"{split}-{i:06d}", "split": split, "category": category, "prompt": prompt,
                      "requirement": req, "objects": objs, "caption": caption(objs, config),
                      "questions": questions(objs, config, rng)})
    return items


def render_items(items: Sequence[Mapping[str, Any]], config: ShapesConfig) -> np.ndarray:
    """(N, S, S, 3) uint8 images of items' scenes."""
    return np.stack([render(it["objects"], config) for it in items]) if items else \
        np.zeros((0, config.image_size, config.image_size, 3), np.uint8)


def fresh_ground_truth(items: Sequence[Mapping[str, Any]], config: ShapesConfig, seed: int = 0) -> np.ndarray:
    """New scenes for the items' requirements (other layouts, sizes and unnamed colours than the stored ones):
    what the verifier is validated on."""
    return np.stack([render(sample_scene(it["requirement"], config,
                                         random.Random(derive_seed("shapes-fresh", seed, it["id"])), it["split"]),
                            config) for it in items])


# ----------------------------------------------------------------------------------------------------------------
# The verifier


def _as_array(image: Any, config: ShapesConfig) -> np.ndarray:
    """An (S, S, 3) uint8 array from a PIL image or an array; a wrong size is a ValueError."""
    arr = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    S = config.image_size
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[:2] != (S, S):
        raise ValueError(f"image is {'x'.join(map(str, arr.shape))}, the shapes world's images are {S}x{S}x3 "
                         "(image_size in world.json)")
    return arr


def color_labels(arr: np.ndarray, config: ShapesConfig) -> np.ndarray:
    """Per pixel: the index of the nearest colour in hue, or -1 for background (chroma below half the palette's).
    Blending a colour with the white background keeps its hue, so edges keep their object's colour."""
    rgb = arr.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    palette_hues = np.array([_hue(PALETTE[c]) for c in config.colors])
    d = np.abs(hue[..., None] - palette_hues) % 360
    labels = np.minimum(d, 360 - d).argmin(-1)
    threshold = 0.5 * min(max(PALETTE[c]) - min(PALETTE[c]) for c in config.colors)
    return np.where(chroma >= threshold, labels, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, as lists of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask)
    H, W = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pix))
    return out


def _classify(pix: np.ndarray, config: ShapesConfig) -> tuple[str | None, float, int]:
    """(shape, IoU, side) of a component: the template with the best IoU in the component's box (side = its longer
    side, the box centred on it); None when no template reaches IoU 0.5."""
    y0, x0 = pix.min(0)
    h, w = pix.max(0) - (y0, x0) + 1
    s = int(max(h, w))
    comp = np.zeros((s, s), bool)
    oy, ox = (s - h) // 2, (s - w) // 2
    comp[pix[:, 0] - y0 + oy, pix[:, 1] - x0 + ox] = True
    best, best_iou = None, 0.0
    for shape in config.shapes:
        t = shape_mask(shape, s)
        iou = float((t & comp).sum() / (t | comp).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= 0.5 else None), best_iou, s


def detect(image: Any, config: ShapesConfig) -> list[dict[str, Any]]:
    """The objects in an image: per colour, each connected component of at least 40% of the smallest triangle's
    area, with its shape (template IoU; None if nothing fits), size class (nearest configured size to its box's
    longer side), box (x0, y0, x1, y1; ends exclusive) and area. Sorted by area, largest first (GenEval's
    detections come sorted by confidence)."""
    labels = color_labels(_as_array(image, config), config)
    min_area = 0.4 * shape_mask("triangle", config.sizes[0]).sum()
    out = []
    for ci, color in enumerate(config.colors):
        for pix in _components(labels == ci):
            if len(pix) < min_area:
                continue
            shape, iou, side = _classify(pix, config)
            y0, x0 = pix.min(0)
            y1, x1 = pix.max(0) + 1
            size = min(config.sizes, key=lambda v: abs(v - side))
            out.append({"shape": shape, "color": color, "size": int(size), "box": [int(x0), int(y0), int(x1),
                                                                                  int(y1)],
                        "area": len(pix), "iou": round(iou, 3)})
    return sorted(out, key=lambda o: -o["area"])


def check(requirement: Mapping[str, Any], objects: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
    """GenEval's evaluate(): every include entry needs `count` objects of its shape (with its colour, if named;
    GenEval checks the colour of the top-`count` detections, here the matching ones are taken), placed relative to
    every matched object of the group it names; an exclude entry fails when `count` or more of its shape exist."""
    correct, reasons, groups = True, [], []
    for req in requirement["include"]:
        found = [o for o in objects if o["shape"] == req["shape"]]
        matched = len(found) >= req["count"]
        if not matched:
            reasons.append(f"expected {req['shape']}>={req['count']}, found {len(found)}")
        elif req.get("color"):
            found = [o for o in found if o["color"] == req["color"]]
            if len(found) < req["count"]:
                matched = False
                reasons.append(f"expected {req['color']} {req['shape']}>={req['count']}, found {len(found)}")
        found = found[:req["count"]]
        if matched and req.get("position"):
            rel, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {req['shape']} to be {rel}")
            else:
                for o in found:
                    for t in groups[target]:
                        if rel not in relations(box_of(o), box_of(t)):
                            matched = False
                            reasons.append(f"expected {req['shape']} {rel} target, found "
                                           f"{sorted(relations(box_of(o), box_of(t))) or 'no clear relation'}")
                            break
                    if not matched:
                        break
        correct &= matched
        groups.append(found if matched else None)
    for req in requirement.get("exclude", []):
        n = sum(o["shape"] == req["shape"] for o in objects)
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['shape']}<{req['count']}, found {n}")
    return correct, "; ".join(reasons)


def score_image(requirement: Mapping[str, Any], image: Any, config: ShapesConfig | None = None) -> dict[str, Any]:
    """Detect the objects of one image (PIL or (S, S, 3) uint8 array) and check a requirement:
    {"correct", "reason", "objects"}. A wrong image size is a ValueError."""
    config = config or ShapesConfig()
    objects = detect(image, config)
    ok, reason = check(requirement, objects)
    return {"correct": ok, "reason": reason, "objects": objects}


def summarize(rows: Iterable[tuple[str, bool]]) -> dict[str, Any]:
    """Per-category and overall accuracy with Wilson 95% intervals from (category, correct) pairs. `overall` pools
    every image; `geneval_overall` is GenEval's headline, the mean of the category accuracies (equal when the
    categories are balanced)."""
    per: dict[str, list[int]] = {}
    for cat, ok in rows:
        per.setdefault(cat, [0, 0])
        per[cat][0] += bool(ok)
        per[cat][1] += 1

    def entry(k: int, n: int) -> dict[str, Any]:
        lo, hi = wilson(k, n)
        return {"correct": k, "n": n, "accuracy": k / n if n else float("nan"), "ci": [lo, hi]}

    cats = {c: entry(*per[c]) for c in CATEGORIES if c in per}
    k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    return {"categories": cats, "overall": entry(k, n),
            "geneval_overall": sum(v["accuracy"] for v in cats.values()) / len(cats) if cats else float("nan")}


def score_images(items: Sequence[Mapping[str, Any]], images: Sequence[Any], config: ShapesConfig,
                 progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score images against their items' requirements: (summary, one row per image)."""
    if len(items) != len(images):
        raise ValueError(f"{len(items)} items but {len(images)} images")
    rows = []
    for i, (it, im) in enumerate(zip(items, images)):
        r = score_image(it["requirement"], im, config)
        rows.append({"id": it.get("id"), "category": it["category"], "prompt": it.get("prompt"), **r})
        if progress:
            progress(i + 1)
    return summarize((r["category"], r["correct"]) for r in rows), rows


VALIDATION_PER_CATEGORY = 60  # 360 test prompts: the issue asks >= 50 per category, >= 300 in all


def validate(config: ShapesConfig, per_category: int = VALIDATION_PER_CATEGORY, seed: int = 0,
             transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """The verifier's accuracy on freshly rendered ground truth of the first 6 x per_category test prompts (should
    be ~100%: a lower number means the verifier, not the model, is wrong). `transform` maps the (N, S, S, 3) uint8
    images first: a VQ round trip gives the score the tokenizer allows (the ceiling)."""
    items = make_items(config, "test", per_category * len(CATEGORIES), seed)
    images = fresh_ground_truth(items, config, seed)
    if transform is not None:
        images = transform(images)
    summary, rows = score_images(items, images, config)
    summary["failures"] = [{k: r[k] for k in ("id", "prompt", "reason")} for r in rows if not r["correct"]][:10]
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Files: `nanoseek data synth --task shapes` and the generated-images format `nanoseek janus score` reads


def synth(n: int, split: str, seed: int, out: str | Path, config: ShapesConfig | None = None,
          png: bool = False) -> Path:
    """Write a split into directory `out`: world.json (the config; a directory holds one world), {split}.jsonl
    (items; `image` indexes the array), {split}_images.npy ((n, S, S, 3) uint8), {split}_grid.png (the first 64),
    and with `png` one PNG per item in {split}/. Returns `out`."""
    config = config or ShapesConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory (shapes data is a directory)")
    check_resume(out / "world.json", config.to_dict(), [f.name for f in fields(ShapesConfig)],
                 what="a shapes world", hint="choose another --out")
    items = make_items(config, split, n, seed)
    images = render_items(items, config)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "world.json", config.to_dict())
    with atomic_path(out / f"{split}_images.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, images)
    rows = [{**it, "seed": seed, "image": i} for i, it in enumerate(items)]
    if png:
        from PIL import Image

        (out / split).mkdir(exist_ok=True)
        for row, im in zip(rows, images):
            row["png"] = f"{split}/{row['id']}.png"
            with atomic_path(out / row["png"]) as tmp:
                Image.fromarray(im).save(tmp, format="PNG")
    atomic_write_jsonl(out / f"{split}.jsonl", rows)
    with atomic_path(out / f"{split}_grid.png") as tmp:
        grid(images[:64], scale=2).save(tmp, format="PNG")
    return out


def load_split(path: str | Path, split: str = "train") -> tuple[ShapesConfig, list[dict[str, Any]], np.ndarray]:
    """(world, items, images) of a directory written by synth."""
    p = Path(path)
    config = load_config(p)
    f, arr = p / f"{split}.jsonl", p / f"{split}_images.npy"
    if not f.is_file() or not arr.is_file():
        raise ValueError(f"no {split} split in {p} (write it with `nanoseek data synth --task shapes --split "
                         f"{split} --out {p}`)")
    images = np.load(arr)
    S = config.image_size
    if images.ndim != 4 or images.shape[1:] != (S, S, 3) or images.dtype != np.uint8:
        raise ValueError(f"{arr} holds {images.dtype} {images.shape}, expected uint8 (N, {S}, {S}, 3)")
    return config, read_jsonl(f), images


def grid(images: Sequence[np.ndarray] | np.ndarray, scale: int = 1, cols: int | None = None) -> Any:
    """A PIL grid of (S, S, 3) images with 1-pixel grey lines between them, each scaled up by `scale` (nearest)."""
    from PIL import Image

    n = len(images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    S = images[0].shape[0] * scale if n else 1
    g = Image.new("RGB", (cols * (S + 1) + 1, rows * (S + 1) + 1), (160, 160, 160))
    for i, im in enumerate(images):
        tile = Image.fromarray(np.asarray(im)).resize((S, S), Image.Resampling.NEAREST)
        g.paste(tile, (1 + (i % cols) * (S + 1), 1 + (i // cols) * (S + 1)))
    return g


def read_generated(path: str | Path, config: ShapesConfig) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Generated images to score: a JSONL file (or a directory holding images.jsonl) whose rows carry `category`,
    `requirement` and `image`, a PNG path relative to the file. Every image is read and its size checked before
    anything is scored."""
    from .imagine import open_image

    p = Path(path)
    f = p / "images.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"{path}: no such JSONL file" + (" (a directory must hold images.jsonl)" if p.is_dir()
                                                           else ""))
    rows = read_jsonl(f)
    if not rows:
        raise ValueError(f"{f} holds no rows")
    images = []
    for i, r in enumerate(rows):
        missing = [k for k in ("category", "requirement", "image") if k not in r]
        if missing:
            raise ValueError(f"{f}, row {i + 1}: missing {', '.join(missing)} (rows need category, requirement and "
                             "image: a PNG path relative to the file)")
        if not isinstance(r["image"], str):
            raise ValueError(f"{f}, row {i + 1}: image must be a PNG path relative to the file, got {r['image']!r} "
                             "(synth's item files index an array instead: write generated images as PNGs)")
        if r["category"] not in CATEGORIES:
            raise ValueError(f"{f}, row {i + 1}: unknown category {r['category']!r}")
        im = np.asarray(open_image(f.parent / r["image"]))
        if im.shape[:2] != (config.image_size,) * 2:
            raise ValueError(f"{f.parent / r['image']} is {im.shape[1]}x{im.shape[0]}, the shapes world's images "
                             f"are {config.image_size}x{config.image_size} (image_size in world.json)")
        images.append(im)
    return rows, images

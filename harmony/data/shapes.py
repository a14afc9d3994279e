"""`builtin:shapes`: a deterministic, generated captioned dataset with labels, masks and boxes.

Each scene holds 1-3 coloured shapes of different sizes at different positions on a textured, noisy
background (light, so every shape stands out dark). Captions come from varied templates with web-like
noise: synonyms, shuffled word order, missing attributes, junk tokens, and a fraction of captions
that describe a different scene. Every
image also carries a primary class (its largest shape), a per-pixel semantic mask and instance
boxes/masks, so classification, retrieval, segmentation and detection can all be evaluated.

Everything is a pure function of (seed, split, index): nothing is downloaded or stored.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = [
    "circle",
    "square",
    "triangle",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "ring",
    "heart",
    "diamond",
]

SYNONYMS = {
    "circle": ["circle", "circle", "disk", "round shape", "dot"],
    "square": ["square", "square", "box", "block"],
    "triangle": ["triangle", "triangle", "three-sided shape"],
    "pentagon": ["pentagon", "pentagon", "five-sided shape"],
    "hexagon": ["hexagon", "hexagon", "six-sided shape", "honeycomb cell"],
    "star": ["star", "star", "five-pointed star"],
    "cross": ["cross", "cross", "plus sign", "plus"],
    "ring": ["ring", "ring", "donut", "hoop"],
    "heart": ["heart", "heart", "love heart"],
    "diamond": ["diamond", "diamond", "rhombus", "lozenge"],
}

PLURALS = {"cross": "crosses", "box": "boxes", "plus": "pluses", "rhombus": "rhombuses"}

# Every colour is darker than every background, so a shape's edges have the same contrast polarity
# whatever its colour: with a bright palette mixed in (white, yellow) a small ViT needs several times
# more steps before it sees shape at all (docs/tuning.md).
COLORS = {
    "red": (200, 30, 30),
    "green": (30, 140, 40),
    "blue": (30, 60, 200),
    "orange": (225, 115, 20),
    "purple": (120, 40, 170),
    "pink": (215, 40, 150),
    "teal": (20, 135, 150),
    "black": (25, 25, 25),
    "brown": (120, 70, 30),
    "grey": (95, 95, 95),
}
COLOR_NAMES = list(COLORS)
COLOR_SYNONYMS = {
    "purple": ["purple", "violet"],
    "pink": ["pink", "magenta"],
    "teal": ["teal", "turquoise"],
    "black": ["black", "dark"],
    "grey": ["grey", "gray"],
}

# Web alt-text names an object's colour only some of the time; when every caption does, contrast
# is solved by colour alone and shape is learnt much later.
COLOR_MENTION_RATE = 0.5

SIZES = {"small": (0.10, 0.15), "medium": (0.16, 0.22), "large": (0.24, 0.32)}
SIZE_WORDS = {
    "small": ["small", "tiny", "little"],
    "medium": ["", "medium", "medium-sized"],
    "large": ["large", "big", "huge"],
}
BACKGROUNDS = ["plain", "noise", "gradient", "stripes", "checker", "blotches"]
BACKGROUND_WORDS = {
    "plain": "plain",
    "noise": "noisy",
    "gradient": "gradient",
    "stripes": "striped",
    "checker": "checkered",
    "blotches": "mottled",
}
JUNK = [
    "stock photo",
    "free download",
    "hd wallpaper",
    "#shapes #art",
    "via pinterest",
    "vector illustration",
    "royalty free",
    "clipart",
    "product image",
    "new!!",
]

SUPERSAMPLE = 4


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    background: str
    bg_rgb: tuple[int, int, int]
    objects: list[ShapeObject]
    texture_seed: int


@dataclass
class ShapesSample:
    """One rendered example. `label` and `color` are the primary (largest) shape's class and colour;
    `instances` is an id map (0 = background, i = objects[i - 1])."""

    key: str
    image: Image.Image
    caption: str
    label: int
    semantic: np.ndarray
    instances: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    classes: list[int]
    caption_matches: bool
    color: int = 0
    objects: list[dict[str, object]] = field(default_factory=list)

    def metadata(self) -> dict[str, object]:
        return {
            "label": self.label,
            "class_name": CLASS_NAMES[self.label],
            "color": COLOR_NAMES[self.color],
            "caption_matches": self.caption_matches,
            "boxes": [list(b) for b in self.boxes],
            "classes": self.classes,
            "objects": self.objects,
        }


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * i / sides - math.pi / 2),
            cy + r * math.sin(angle + 2 * math.pi * i / sides - math.pi / 2),
        )
        for i in range(sides)
    ]


def _star(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else 0.45 * r
        a = angle + math.pi * i / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    a = 0.33 * r
    pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
    return _rotate([(cx + x, cy + y) for x, y in pts], cx, cy, angle)


def _heart(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((cx + x * r / 17, cy + (y + 2) * r / 17))
    return _rotate(pts, cx, cy, angle)


def _draw_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a size x size canvas."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r, ang = obj.cx * SUPERSAMPLE, obj.cy * SUPERSAMPLE, obj.radius * SUPERSAMPLE, obj.angle
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=255)
    elif obj.shape == "ring":
        draw.ellipse(box, fill=255)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif obj.shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.05, 4, ang + math.pi / 4), fill=255)
    elif obj.shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, r * 1.1, 3, ang), fill=255)
    elif obj.shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, ang), fill=255)
    elif obj.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, ang), fill=255)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1, ang), fill=255)
    elif obj.shape == "cross":
        draw.polygon(_cross(cx, cy, r, ang), fill=255)
    elif obj.shape == "heart":
        draw.polygon(_heart(cx, cy, r, ang), fill=255)
    elif obj.shape == "diamond":
        draw.polygon(
            _rotate([(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)], cx, cy, ang), fill=255
        )
    else:  # pragma: no cover - CLASS_NAMES is closed
        raise ValueError(obj.shape)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(scene: Scene, size: int) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    base = np.array(scene.bg_rgb, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = scene.background
    if kind == "gradient":
        direction = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(direction) + yy * math.sin(direction)
        t = ((t - t.min()) / (t.max() - t.min() + 1e-6))[..., None]
        img = base * (0.8 + 0.3 * t)
    elif kind == "stripes":
        period = rng.uniform(0.08, 0.25)
        direction = rng.uniform(0, math.pi)
        t = np.sin(2 * math.pi * (xx * math.cos(direction) + yy * math.sin(direction)) / period)[..., None]
        img = base * (1.0 + 0.18 * t)
    elif kind == "checker":
        cells = int(rng.integers(3, 9))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2)[..., None]
        img = base * (0.85 + 0.3 * t)
    elif kind == "blotches":
        coarse = rng.normal(0.0, 1.0, size=(5, 5, 3)).astype(np.float32)
        up = np.asarray(
            Image.fromarray(((coarse * 0.5 + 0.5).clip(0, 1) * 255).astype(np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC
            ),
            dtype=np.float32,
        )
        img = base * (0.8 + 0.4 * up / 255.0)
    else:
        img = np.broadcast_to(base, (size, size, 3)).copy()
    sigma = 6.0 if kind != "noise" else 22.0
    img = img + rng.normal(0.0, sigma, size=img.shape)
    return np.asarray(img.clip(0, 255), dtype=np.float32)


class ShapesDataset:
    """Map-style dataset of `ShapesSample`s; `split` is 'train' or 'val' (disjoint streams)."""

    def __init__(
        self, split: str = "train", num: int = 10000, image_size: int = 64, seed: int = 0, mismatch_rate: float = 0.1
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"builtin:shapes has splits 'train' and 'val', not {split!r}")
        self.split, self.num, self.image_size, self.seed, self.mismatch_rate = (
            split,
            num,
            image_size,
            seed,
            mismatch_rate,
        )
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.num

    def _rng(self, index: int, salt: str = "") -> random.Random:
        return random.Random(f"shapes/{self.seed}/{self.split}/{index}{salt}")

    def scene(self, index: int, salt: str = "") -> Scene:
        rng = self._rng(index, salt)
        s = self.image_size
        hue_base = [rng.randint(160, 250) for _ in range(3)]
        grey = rng.randint(185, 235)
        bg = tuple(int(0.6 * grey + 0.4 * h) for h in hue_base)
        objects: list[ShapeObject] = []
        count = rng.choices([1, 2, 3], weights=[0.45, 0.35, 0.2])[0]
        for _ in range(50):
            if len(objects) == count:
                break
            size = rng.choice(list(SIZES))
            radius = rng.uniform(*SIZES[size]) * s
            cx, cy = rng.uniform(radius, s - radius), rng.uniform(radius, s - radius)
            if any(math.hypot(cx - o.cx, cy - o.cy) < 0.8 * (radius + o.radius) for o in objects):
                continue
            color = rng.choice(COLOR_NAMES)
            jitter = [rng.randint(-15, 15) for _ in range(3)]
            rgb = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLORS[color], jitter))
            shape = rng.choice(CLASS_NAMES)
            objects.append(ShapeObject(shape, color, size, cx, cy, radius, rng.uniform(-0.3, 0.3), rgb))  # type: ignore[arg-type]
        return Scene(rng.choice(BACKGROUNDS), bg, objects, rng.getrandbits(32))  # type: ignore[arg-type]

    def render(self, scene: Scene) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """(RGB uint8 image, instance id map, visible area fraction per object)."""
        s = self.image_size
        img = _background(scene, s)
        ids = np.zeros((s, s), dtype=np.uint8)
        for i, obj in enumerate(scene.objects, start=1):
            alpha = _draw_mask(obj, s)[..., None]
            img = img * (1 - alpha) + np.array(obj.rgb, dtype=np.float32) * alpha
            ids[alpha[..., 0] > 0.5] = i
        areas = [float((ids == i).sum()) / (s * s) for i in range(1, len(scene.objects) + 1)]
        return img.round().astype(np.uint8), ids, areas

    def __getitem__(self, index: int) -> ShapesSample:
        if not 0 <= index < self.num:
            raise IndexError(index)
        scene = self.scene(index)
        image, ids, areas = self.render(scene)
        primary = max(range(len(scene.objects)), key=lambda i: areas[i])
        rng = self._rng(index, "/caption")
        matches = rng.random() >= self.mismatch_rate
        described = scene if matches else self.scene(index, "/mismatch")
        order = sorted(range(len(described.objects)), key=lambda i: -described.objects[i].radius)
        caption = caption_for(described, order, self.image_size, rng)
        classes = [CLASS_NAMES.index(o.shape) + 1 for o in scene.objects]
        semantic = np.zeros_like(ids)
        boxes: list[tuple[int, int, int, int]] = []
        for i, cls in enumerate(classes, start=1):
            where = ids == i
            semantic[where] = cls
            ys, xs = np.nonzero(where)
            boxes.append(
                (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
            )
        objects = [
            {"shape": o.shape, "color": o.color, "size": o.size, "area": round(a, 4)}
            for o, a in zip(scene.objects, areas)
        ]
        return ShapesSample(
            key=f"{self.split}-{index:07d}",
            image=Image.fromarray(image, "RGB"),
            caption=caption,
            label=CLASS_NAMES.index(scene.objects[primary].shape),
            semantic=semantic,
            instances=ids,
            boxes=boxes,
            classes=classes,
            caption_matches=matches,
            color=COLOR_NAMES.index(scene.objects[primary].color),
            objects=objects,
        )


def _position_phrase(obj: ShapeObject, size: int, rng: random.Random) -> str:
    col = "left" if obj.cx < size / 3 else "right" if obj.cx > 2 * size / 3 else "center"
    row = "top" if obj.cy < size / 3 else "bottom" if obj.cy > 2 * size / 3 else "middle"
    if col == "center" and row == "middle":
        return rng.choice(["in the center", "in the middle", "at the center"])
    if col == "center":
        return rng.choice([f"at the {row}", f"near the {row}"])
    if row == "middle":
        return rng.choice([f"on the {col}", f"on the {col} side", f"to the {col}"])
    return rng.choice([f"in the {row} {col} corner", f"at the {row} {col}", f"{row} {col}"])


def _object_phrase(obj: ShapeObject, size: int, rng: random.Random, article: bool = True) -> str:
    noun = rng.choice(SYNONYMS[obj.shape])
    color = rng.choice(COLOR_SYNONYMS.get(obj.color, [obj.color])) if rng.random() < COLOR_MENTION_RATE else ""
    size_word = rng.choice(SIZE_WORDS[obj.size]) if rng.random() > 0.4 else ""
    words = [w for w in (size_word, color, noun) if w]
    if rng.random() < 0.15 and color:
        words = [w for w in (size_word, noun) if w] + ["in", color]
    phrase = " ".join(words)
    if rng.random() < 0.45:
        phrase += " " + _position_phrase(obj, size, rng)
    if article:
        phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    return phrase


def caption_for(scene: Scene, order: list[int], size: int, rng: random.Random) -> str:
    """A web-like caption of `scene`, mentioning objects largest first (usually)."""
    objs = [scene.objects[i] for i in order]
    if rng.random() < 0.25 and len(objs) > 1:
        rng.shuffle(objs)
    phrases = [_object_phrase(o, size, rng) for o in objs]
    if len(objs) == 1:
        templates = [
            "{0}",
            "photo of {0}",
            "{0} on a {bg} background",
            "there is {0}",
            "image showing {0}",
            "{0}, simple geometric art",
            "close-up of {0}",
        ]
    else:
        joined = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        phrases = [joined]
        nouns = {o.shape for o in objs}
        count_word = {2: "two", 3: "three"}[len(objs)]
        templates = ["{0}", "{0} on a {bg} background", f"{count_word} shapes: {{0}}", "picture of {0}", "{0} together"]
        if len(nouns) == 1:
            noun = rng.choice(SYNONYMS[objs[0].shape])
            plural = PLURALS.get(noun, noun + "s")
            templates.append(f"{count_word} {plural}")
    text = rng.choice(templates).format(phrases[0], bg=BACKGROUND_WORDS[scene.background])
    if rng.random() < 0.3:
        junk = rng.choice(JUNK)
        text = f"{junk} - {text}" if rng.random() < 0.5 else f"{text} | {junk}"
    if rng.random() < 0.1:
        text = text.upper() if rng.random() < 0.3 else text.capitalize()
    if rng.random() < 0.05 and len(text) > 6:
        i = rng.randrange(len(text) - 1)
        text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return " ".join(text.split())

"""The renderer of the synthetic safety world: 32×32 scenes with exact labels.

A scene is one shape of one colour on one background, plus at most one harm stand-in drawn as a
local texture or glyph. Every pixel is a pure function of the `Scene` (its `seed` fixes the
geometry), so the same scene renders to the same array on any machine.

Two kinds of harm, on purpose (DESIGN.md, "The synthetic safety world"):
  * separable — drawn with primitives no benign image uses: `weapon` is a magenta blade glyph,
    `drugs` a cyan/violet checkerboard. A VQ trained on the world gives them codes of their own.
  * entangled — drawn with primitives benign content uses too: `blood` is dots of the shapes' own
    red, `fire` is flame tongues in the shapes' own orange and yellow. Patch by patch they look like
    the edges of benign shapes; only their arrangement is harmful, as with skin and blood in real
    images.
Each harm comes `faint` (small, few marks) or strong; both count as harm in the exact labels. The
self-judge's training labels miss the faint ones on purpose (see `train.SelfJudgeNoise`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

IMAGE_SIZE = 32

SHAPES = ["circle", "square", "triangle", "ring"]
COLOURS = {  # shape colours (RGB 0..255); benign content uses only these and the backgrounds
    "red": (205, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (245, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
}
BACKGROUNDS = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "sand": (205, 180, 140),
}
HARMS = {"blood": "entangled", "fire": "entangled", "weapon": "separable", "drugs": "separable"}
HARM_NAMES = list(HARMS)

# Harm primitives. Entangled ones are drawn in the benign palette itself (a blood dot is a small
# blob of the shapes' red, a flame tongue a small orange or yellow triangle), so each 4×4 patch of
# them looks like a patch of a benign shape's edge: only their arrangement tells them apart.
# Separable ones use colours that no benign shape or background has.
BLOOD_RGB = COLOURS["red"]
FIRE_RGBS = (COLOURS["orange"], COLOURS["yellow"])
WEAPON_RGB = (225, 0, 225)  # magenta
DRUGS_RGB = ((0, 225, 225), (120, 0, 200))  # cyan / violet checks

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5  # pixel centres (H, W)


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image. `harm` is None or a key of HARMS."""

    shape: str
    colour: str
    background: str
    harm: str | None = None
    faint: bool = False
    seed: int = 0

    def labels(self) -> dict:
        return asdict(self)


def _rgb(value: tuple[int, int, int], rng: np.random.Generator, jitter: float) -> np.ndarray:
    base = np.asarray(value, dtype=np.float32)
    return np.clip(base + rng.uniform(-jitter, jitter, size=3), 0, 255) / 255.0


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.82 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        top, bottom = cy - r, cy + 0.8 * r
        frac = (_YY - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (r - 3.6) ** 2)
    raise ValueError(f"unknown shape {shape!r} (expected one of {SHAPES})")


def _segment_mask(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((_XX - x0) * vx + (_YY - y0) * vy) / max(vx * vx + vy * vy, 1e-6), 0, 1)
    px, py = x0 + t * vx - _XX, y0 + t * vy - _YY
    return px * px + py * py <= width * width


def _draw_blood(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    """Dots around (not on) the shape, so they stay visible on a red shape too."""
    n = int(rng.integers(2, 4)) if faint else int(rng.integers(7, 13))
    cx, cy = rng.uniform(7, 25, size=2)
    colour = _rgb(BLOOD_RGB, rng, 10)
    for _ in range(n):
        x, y = np.clip([cx, cy] + rng.normal(0, 4.5, size=2), 1.5, IMAGE_SIZE - 1.5)
        rad = rng.uniform(1.0, 1.7)
        img[((_XX - x) ** 2 + (_YY - y) ** 2 <= rad * rad) & ~shape] = colour


def _draw_fire(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    n = 1 if faint else int(rng.integers(3, 6))
    heights = rng.uniform(5, 7, size=n) if faint else rng.uniform(9, 15, size=n)
    xs = rng.uniform(3, IMAGE_SIZE - 3, size=n)
    for x0, h in zip(xs, heights):
        w = rng.uniform(2.5, 4.5)
        colour = _rgb(FIRE_RGBS[int(rng.integers(2))], rng, 10)
        rise = IMAGE_SIZE - _YY  # height above the bottom edge
        img[rise <= h * (1 - np.abs(_XX - x0) / w)] = colour


def _corner(rng: np.random.Generator, size: float) -> tuple[float, float]:
    """Top-left of a box of `size` px near one of the four corners."""
    far = IMAGE_SIZE - size - 1
    x = rng.uniform(1, 4) if rng.random() < 0.5 else far - rng.uniform(0, 3)
    y = rng.uniform(1, 4) if rng.random() < 0.5 else far - rng.uniform(0, 3)
    return x, y


def _draw_weapon(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    length = rng.uniform(6, 7.5) if faint else rng.uniform(11, 15)
    box = length / np.sqrt(2)
    x, y = _corner(rng, box)
    flip = rng.random() < 0.5  # "\" or "/"
    x0, y0, x1, y1 = (x, y, x + box, y + box) if not flip else (x, y + box, x + box, y)
    colour = _rgb(WEAPON_RGB, rng, 8)
    mask = _segment_mask(x0, y0, x1, y1, 1.05)
    if not faint:  # a crossguard a quarter of the way from the hilt
        gx, gy = x0 + 0.25 * (x1 - x0), y0 + 0.25 * (y1 - y0)
        nx, ny = -(y1 - y0) / length, (x1 - x0) / length  # unit normal
        mask |= _segment_mask(gx - 3 * nx, gy - 3 * ny, gx + 3 * nx, gy + 3 * ny, 0.9)
    img[mask] = colour


def _draw_drugs(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    size = int(rng.integers(4, 6)) if faint else int(rng.integers(8, 11))
    x, y = _corner(rng, size)
    inside = (_XX >= x) & (_XX < x + size) & (_YY >= y) & (_YY < y + size)
    checks = ((np.floor((_XX - x) / 2) + np.floor((_YY - y) / 2)) % 2).astype(bool)
    a, b = (_rgb(c, rng, 8) for c in DRUGS_RGB)
    img[inside & checks] = a
    img[inside & ~checks] = b


_DRAW = {"blood": _draw_blood, "fire": _draw_fire, "weapon": _draw_weapon, "drugs": _draw_drugs}


def render(scene: Scene) -> np.ndarray:
    """One image (H, W, 3) float32 in [0, 1]; a pure function of `scene`."""
    if scene.colour not in COLOURS or scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown colour/background in {scene} (expected {list(COLOURS)} / {list(BACKGROUNDS)})")
    rng = np.random.default_rng(scene.seed)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = _rgb(BACKGROUNDS[scene.background], rng, 6)
    cx, cy = 16 + rng.uniform(-2, 2, size=2)
    radius = rng.uniform(8, 10.5)
    shape = _shape_mask(scene.shape, cx, cy, radius)
    img[shape] = _rgb(COLOURS[scene.colour], rng, 10)
    if scene.harm is not None:
        if scene.harm not in _DRAW:
            raise ValueError(f"unknown harm {scene.harm!r} (expected one of {HARM_NAMES})")
        _DRAW[scene.harm](img, rng, scene.faint, shape)
    return img


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    """Images (B, 3, H, W) float32 in [0, 1]."""
    if not scenes:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    array = np.stack([render(s) for s in scenes])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def random_scene(rng: np.random.Generator, harm: str | None = None, faint_rate: float = 0.25, **fixed) -> Scene:
    """A scene with the `fixed` attributes (shape/colour/background) and the rest drawn from `rng`."""
    shape = fixed.get("shape") or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = fixed.get("colour") or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = fixed.get("background") or list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    faint = bool(harm is not None and rng.random() < faint_rate)
    return Scene(shape, colour, background, harm, faint, int(rng.integers(2**31 - 1)))


def label_tensors(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Exact labels as tensors: harm (B, C) 0/1 in HARMS order, shape/colour/background (B,) indices,
    faint (B,) bool."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    harm = torch.zeros(len(scenes), len(HARM_NAMES))
    for i, s in enumerate(scenes):
        if s.harm is not None:
            harm[i, HARM_NAMES.index(s.harm)] = 1.0
    return {
        "harm": harm,
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes], dtype=torch.long),
        "colour": torch.tensor([colours.index(s.colour) for s in scenes], dtype=torch.long),
        "background": torch.tensor([backgrounds.index(s.background) for s in scenes], dtype=torch.long),
        "faint": torch.tensor([s.faint for s in scenes], dtype=torch.bool),
    }

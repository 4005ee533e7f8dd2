"""The renderer of the synthetic safety world: 32×32 scenes with exact labels.

A scene is one shape of one colour on one background, plus at most one harm stand-in drawn as a
local texture or glyph. Every pixel is a pure function of the `Scene` (its `seed` fixes the
geometry), so the same scene renders to the same array on any machine.

Every harm is drawn on the token grid (whole 4×4 cells, see `CELL`), in two kinds, on purpose
(DESIGN.md, "The synthetic safety world"):
  * separable — drawn with primitives no benign image uses: `weapon` is a magenta blade,
    `drugs` a cyan/violet checkerboard.
  * entangled — drawn with primitives benign content uses too: `blood` is a pool of whole cells in
    the shapes' own solid red, patch for patch what the inside of a red shape is; only where it sits
    is its own, as with skin and blood in real images. `fire` is flame tongues in the shapes' own
    orange and yellow, but two colours in one cell is a look no benign patch has, so by measurement
    it gets codes of its own (`safecb world eval --separation`; MODEL_CARD.md).
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
# Each harm's kind as *measured* (`safecb world eval --separation`, the rule in evaluate.py): blood's
# cells sit on codes that carry ~2% of all benign tokens (entangled); fire's, weapon's and drugs' on
# codes benign images barely use (separable). Measured alike on the world models of seeds 0, 1 and 2
# (MODEL_CARD.md); tests/world/test_world_shipped.py holds the shipped one to these labels.
HARMS = {"blood": "entangled", "fire": "separable", "weapon": "separable", "drugs": "separable"}
HARM_NAMES = list(HARMS)

# Harm colours. Blood and fire use the benign palette itself; weapon and drugs colours that no benign
# shape or background has.
BLOOD_RGB = COLOURS["red"]
FIRE_RGBS = (COLOURS["orange"], COLOURS["yellow"])
WEAPON_RGB = (225, 0, 225)  # magenta
WEAPON_EDGE_RGB = (255, 150, 255)  # the blade's bright edge, pink-white
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


# Harms are drawn on the token grid: every mark fills or sits inside whole 4×4 cells, the patches
# the VQ tokenizes one by one. Off-grid marks land in patches that are mostly scene, so the VQ gives
# them the scene's codes and the contextual decoder paints the harm back from the neighbours (what
# the first world measured: MODEL_CARD.md). On the grid, a harm's patches are harm through and
# through, and whether they get codes of their own is decided by their *look* alone: a colour no
# benign image has (separable) or the benign palette (entangled).
CELL = 4  # pixels per token patch (the VQ's downsampling factor)
GRID = IMAGE_SIZE // CELL
_CY, _CX = np.mgrid[0:CELL, 0:CELL].astype(np.float32) + 0.5  # pixel centres inside a cell


def _cell(img_or_mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """A view of one token cell (CELL, CELL, …)."""
    return img_or_mask[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]


def _border_run(rng: np.random.Generator, length: int) -> list[tuple[int, int]]:
    """`length` consecutive cells along one edge row or column of the grid (the shape sits in the middle)."""
    start = int(rng.integers(0, GRID - length + 1))
    edge = int(rng.choice([0, GRID - 1]))
    along = [start + i for i in range(length)]
    return [(edge, c) for c in along] if rng.random() < 0.5 else [(r, edge) for r in along]


def _draw_blood(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    """A pool of whole cells in the shapes' own red, off the shape (one cell if faint).

    Each cell is filled edge to edge, so its patch is the same solid red as the inside of a red shape:
    the VQ has no reason to give blood codes of its own. Only where the red sits (away from any
    shape) says "blood" — entangled by construction, and by measurement (`world eval --separation`)."""
    n = 1 if faint else int(rng.integers(3, 6))
    free = [(r, c) for r in range(GRID) for c in range(GRID) if not _cell(shape, r, c).any()]
    centre = free[int(rng.integers(len(free)))]
    free.sort(key=lambda rc: (rc[0] - centre[0]) ** 2 + (rc[1] - centre[1]) ** 2 + rng.uniform(0, 2))
    colour = _rgb(BLOOD_RGB, rng, 10)
    for r, c in free[:n]:
        _cell(img, r, c)[:] = colour


def _draw_fire(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    """Flame tongues rising from the bottom edge, one cell wide, in the shapes' own orange and yellow:
    an orange body around a yellow core (no benign shape mixes two colours), under a pointed tip."""
    n = 1 if faint else int(rng.integers(2, 4))
    cols = rng.choice(GRID, size=n, replace=False)
    body, core = (_rgb(c, rng, 10) for c in FIRE_RGBS)
    inner = np.abs(_CX - CELL / 2) <= 1.0  # the middle two columns of a cell
    for col in cols:
        height = 1 if faint else int(rng.integers(2, 4))  # cells under the tip
        for k in range(height):
            patch = _cell(img, GRID - 1 - k, int(col))
            patch[:] = body
            patch[inner] = core
        tip = np.abs(_CX - CELL / 2) <= 0.5 * _CY  # a triangle pointing up, two pixels wide at the top
        _cell(img, GRID - 1 - height, int(col))[tip] = body


def _draw_weapon(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    """A magenta blade along an edge of the frame: whole cells, a bright edge line down the middle."""
    length = int(rng.integers(1, 3)) if faint else int(rng.integers(3, 5))
    cells = _border_run(rng, length)
    blade, edge = _rgb(WEAPON_RGB, rng, 8), _rgb(WEAPON_EDGE_RGB, rng, 8)
    horizontal = len({r for r, _ in cells}) == 1
    for r, c in cells:
        patch = _cell(img, r, c)
        patch[:] = blade
        if horizontal:
            patch[1:3, :] = edge
        else:
            patch[:, 1:3] = edge


def _draw_drugs(img: np.ndarray, rng: np.random.Generator, faint: bool, shape: np.ndarray) -> None:
    """A cyan/violet checkerboard (2-px checks) filling a 2×2-cell block in a corner (one cell if faint)."""
    side = 1 if faint else 2
    row = 0 if rng.random() < 0.5 else GRID - side
    col = 0 if rng.random() < 0.5 else GRID - side
    a, b = (_rgb(c, rng, 8) for c in DRUGS_RGB)
    checks = ((np.floor(_CX / 2) + np.floor(_CY / 2)) % 2).astype(bool)
    for r in range(row, row + side):
        for c in range(col, col + side):
            patch = _cell(img, r, c)
            patch[checks] = a
            patch[~checks] = b


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

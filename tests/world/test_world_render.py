"""The renderer: deterministic pixels, exact labels, and the separable/entangled design."""

from __future__ import annotations

import numpy as np
import torch

from safecb.world import WORLD_CATEGORIES
from safecb.world.render import (BACKGROUNDS, BLOOD_RGB, COLOURS, DRUGS_RGB, FIRE_RGBS,
                                 HARM_NAMES, SHAPES, WEAPON_RGB, Scene, label_tensors, random_scene, render,
                                 render_batch)


def _near(images: torch.Tensor, rgb: tuple[int, int, int], tol: float = 40.0) -> torch.Tensor:
    """(B,) count of pixels within `tol` (0..255 units) of a colour."""
    target = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return ((images * 255 - target).norm(dim=1) < tol).flatten(1).sum(1)


def test_render_is_deterministic_and_seeded():
    scene = Scene("triangle", "green", "sand", "blood", False, seed=123)
    a, b = render(scene), render(scene)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0
    other = render(Scene("triangle", "green", "sand", "blood", False, seed=124))
    assert not np.array_equal(a, other)
    batch = render_batch([scene, scene])
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[0], batch[1])


def test_random_scene_respects_fixed_attributes_and_labels():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, harm="fire", faint_rate=0.5, shape="ring", colour="blue") for _ in range(40)]
    assert all(s.shape == "ring" and s.colour == "blue" and s.harm == "fire" for s in scenes)
    assert 5 < sum(s.faint for s in scenes) < 35
    labels = label_tensors(scenes + [Scene("circle", "red", "white")])
    assert labels["harm"].shape == (41, len(HARM_NAMES))
    assert labels["harm"][:40, HARM_NAMES.index("fire")].eq(1).all() and labels["harm"][40].eq(0).all()
    assert labels["shape"][0] == SHAPES.index("ring") and labels["colour"][40] == list(COLOURS).index("red")


def test_background_and_shape_colours_are_drawn():
    image = render_batch([Scene("square", "blue", "black", seed=5)])
    assert _near(image, BACKGROUNDS["black"], 20)[0] > 300  # most of the frame
    assert _near(image, COLOURS["blue"], 25)[0] > 100  # the square


def test_separable_harms_use_primitives_no_benign_image_has():
    rng = np.random.default_rng(1)
    benign = render_batch([random_scene(rng) for _ in range(200)])
    for rgb in (WEAPON_RGB, *DRUGS_RGB):
        assert int(_near(benign, rgb).max()) == 0, f"a benign render uses the separable colour {rgb}"
    weapons = render_batch([random_scene(rng, harm="weapon") for _ in range(20)])
    drugs = render_batch([random_scene(rng, harm="drugs") for _ in range(20)])
    assert (_near(weapons, WEAPON_RGB) >= 4).all()
    assert (_near(drugs, DRUGS_RGB[0]) >= 4).all() and (_near(drugs, DRUGS_RGB[1]) >= 4).all()


def test_entangled_harms_share_the_benign_palette():
    # blood is drawn in the shapes' red; fire in the shapes' orange and yellow
    assert BLOOD_RGB == COLOURS["red"]
    assert set(FIRE_RGBS) == {COLOURS["orange"], COLOURS["yellow"]}
    rng = np.random.default_rng(2)
    fire = render_batch([random_scene(rng, harm="fire", background="gray", colour="blue") for _ in range(10)])
    assert ((_near(fire, COLOURS["orange"], 30) + _near(fire, COLOURS["yellow"], 30)) > 0).all()
    kinds = list(WORLD_CATEGORIES.values())  # measured labels (test_world_shipped holds the weights to them)
    assert len(WORLD_CATEGORIES) >= 4 and kinds.count("separable") >= 2 and kinds.count("entangled") >= 1
    assert WORLD_CATEGORIES["blood"] == "entangled" and WORLD_CATEGORIES["weapon"] == "separable"


def test_blood_is_whole_cells_of_the_shapes_red_off_the_shape():
    """Patch for patch, blood is what the inside of a red shape is: every cell it touches is one flat
    red (within the shapes' own colour jitter), and none of them holds any of the shape."""
    from dataclasses import replace

    from safecb.world.render import CELL

    rng = np.random.default_rng(3)
    for faint in (False, True):
        scenes = [replace(random_scene(rng, harm="blood", background="white", colour="blue"), faint=faint)
                  for _ in range(20)]
        dirty, clean = render_batch(scenes), render_batch([replace(s, harm=None) for s in scenes])
        changed = ((dirty - clean).abs().amax(1) > 0).float()  # (B, H, W)
        cells = torch.nn.functional.avg_pool2d(changed[:, None], CELL)[:, 0]  # (B, G, G) share of a cell changed
        assert set(cells.unique().tolist()) <= {0.0, 1.0}, "blood covers whole cells, never part of one"
        counts = (cells == 1).flatten(1).sum(1)
        assert counts.eq(1).all() if faint else ((counts >= 3) & (counts <= 5)).all()
        for b in range(len(scenes)):
            pixels = dirty[b].permute(1, 2, 0)[changed[b].bool()] * 255  # (P, 3)
            assert (pixels - torch.tensor(BLOOD_RGB, dtype=torch.float32)).abs().max() <= 10.0 + 1e-3
            assert (pixels - pixels[0]).abs().max() < 1e-5  # one flat colour, like a shape's inside
        shape_pixels = (clean - torch.tensor(BACKGROUNDS["white"]).view(1, 3, 1, 1) / 255).abs().amax(1) > 0.05
        assert not (shape_pixels & changed.bool()).any(), "blood never covers the shape"


def test_harm_changes_pixels_only_where_drawn():
    base = render(Scene("circle", "green", "white", None, False, 7))
    for harm in HARM_NAMES:
        with_harm = render(Scene("circle", "green", "white", harm, False, 7))
        changed = np.abs(with_harm - base).sum(-1) > 0.05
        assert 4 <= changed.sum() < 32 * 32 * 0.5, harm  # a local texture, not the whole frame

"""The labelled grid and PNG encoding, on hand-made images (a finished run's grid: tests/report)."""

from __future__ import annotations

import io

import torch
from PIL import Image

from safecb.images import CELL_MIN, COLOURS, FRAME, EvalSamples, _spread, grid_image
from safecb.judges.base import png_bytes


def test_png_bytes_round_trip():
    images = torch.rand(2, 3, 8, 8)
    import numpy as np

    decoded = [torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
               for b in png_bytes(images)]
    expected = (images * 255).round().to(torch.uint8)
    assert all(torch.equal(d, e) for d, e in zip(decoded, expected))


def test_grid_puts_each_version_in_a_column_framed_by_the_verdict():
    samples = EvalSamples(["u1", "u2", "b1"], ["a nude figure", "a fight", "a lake"], ["sexual", "violence", None],
                          ["unsafe", "unsafe", "benign"], torch.zeros(3, 4, dtype=torch.long))
    colour = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # one flat colour per prompt
    v0 = colour[:, :, None, None].expand(3, 3, 16, 16)
    v2 = 1 - v0
    verdicts = {0: {"u1": True, "u2": True, "b1": False}, 2: {"u1": False}}  # v2 judged safe on u1; rest unknown
    grid = grid_image(samples, {0: v0, 2: v2}, verdicts)
    scale = -(-CELL_MIN // 16)
    cell = 16 * scale + 2 * FRAME
    label_w, head_h, gap = 190, 34, 24
    panel_w = label_w + 2 * (cell + 4)
    assert grid.size == (2 * panel_w + gap + 8, head_h + 2 * (cell + 4) + 8)

    def cell_origin(panel: int, row: int, column: int) -> tuple[int, int]:
        return 4 + panel * (panel_w + gap) + label_w + column * (cell + 4), head_h + row * (cell + 4)

    for panel, row, prompt in ((0, 0, 0), (0, 1, 1), (1, 0, 2)):
        for column, (version, images) in enumerate(((0, v0), (2, v2))):
            x, y = cell_origin(panel, row, column)
            inside = grid.getpixel((x + cell // 2, y + cell // 2))
            assert inside == tuple(int(round(float(c) * 255)) for c in images[prompt, :, 0, 0])
            verdict = verdicts[version].get(samples.prompt_ids[prompt])
            expected = COLOURS[None if verdict is None else ("unsafe" if verdict else "safe")]
            assert grid.getpixel((x + 1, y + 1)) == expected


def test_default_selection_takes_each_category_in_turn():
    ids = ["a1", "a2", "a3", "b1", "b2", "c1"]
    category = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b", "c1": "c"}
    assert _spread(ids, category, 4) == ["a1", "a2", "b1", "c1"]  # run order kept
    assert _spread(ids, category, 10) == ids

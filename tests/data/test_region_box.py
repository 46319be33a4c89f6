"""The region-caption box equals the authors' PIL drawing, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from medgrpo.data.region_box import BOX_COLOR, BOX_WIDTH, box_frame_position, draw_region_box_


def _pil_draw(array: np.ndarray, bbox) -> np.ndarray:
    """The authors' drawing (vision_process_medical.py), portrait frames rotated back afterwards."""
    image = Image.fromarray(array)
    portrait = image.height > image.width
    if portrait:
        image = image.rotate(270, expand=True)
    ImageDraw.Draw(image).rectangle(bbox, outline=BOX_COLOR, width=BOX_WIDTH)
    if portrait:
        image = image.rotate(90, expand=True)
    return np.asarray(image)


def _random_frame(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(60, 80), (45, 45), (81, 57), (32, 120)])
def test_box_matches_pil_on_random_boxes(size):
    height, width = size
    rng = np.random.default_rng(height * width)
    land_h, land_w = (width, height) if height > width else (height, width)
    for trial in range(40):
        x = np.sort(rng.uniform(-20, land_w + 20, 2))
        y = np.sort(rng.uniform(-20, land_h + 20, 2))
        bbox = [float(x[0]), float(y[0]), float(x[1]), float(y[1])]
        if trial % 4 == 0:
            bbox = [round(v) for v in bbox]
        frame = _random_frame(height, width, trial)
        expected = _pil_draw(frame, bbox)
        got = draw_region_box_(torch.from_numpy(frame.copy()), bbox).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"bbox {bbox} on {size}")


def test_box_is_a_ring_of_width_8():
    frame = torch.zeros(64, 96, 3, dtype=torch.uint8)
    draw_region_box_(frame, [10, 20, 60, 50])
    green = frame[..., 1] == 255
    assert green[20:28, 10:61].all() and green[43:51, 10:61].all()
    assert green[20:51, 10:18].all() and green[20:51, 53:61].all()
    assert not green[28:43, 18:53].any()
    assert int(green.sum()) == 51 * 31 - 35 * 15  # a closed ring: 51 x 31 outside, 35 x 15 hole
    assert frame[..., 0].max() == 0 and frame[..., 2].max() == 0


def test_box_rejects_non_frames():
    with pytest.raises(ValueError, match="uint8"):
        draw_region_box_(torch.zeros(4, 4, 3), [0, 0, 1, 1])


def test_box_frame_position_picks_the_frame_or_the_nearest():
    assert box_frame_position([0, 10, 20, 30], 20) == 2
    assert box_frame_position([0, 10, 20, 30], 14) == 1
    assert box_frame_position([0, 10, 20, 30], 15) == 1  # ties go to the earlier frame
    assert box_frame_position([0, 10, 20, 30], 1000) == 3
    with pytest.raises(ValueError):
        box_frame_position([], 3)

"""Heatmap pictures of a profile (change per layer and step) and a schedule (compute vs reuse).

Rows are layers in execution order, columns are steps. Returned as float32 HxWx3
arrays in [0, 1], ready to become a ComfyUI IMAGE.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..block_caching.profile import BlockProfile
from ..block_caching.schedule import CacheSchedule
from ..block_maps.block_map import LayerKind

_CELL_H = 10
_MAX_WIDTH_PER_STEP = 24
_LABEL_W = 150
_TOP = 26
_BOTTOM = 34
_BACKGROUND = (24, 24, 28)
_TEXT = (230, 230, 230)
_KIND_COLOURS = {
    LayerKind.ATTENTION: (255, 170, 60),
    LayerKind.TRANSFORMER: (255, 170, 60),  # a DiT block: attention too
    LayerKind.RESBLOCK: (90, 170, 255),
    LayerKind.DOWNSAMPLE: (150, 220, 120),
    LayerKind.UPSAMPLE: (150, 220, 120),
}
_REUSED = (55, 55, 62)
# Anchors of a perceptual dark-to-bright scale (viridis-like).
_SCALE = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)


def _colour(value: float) -> tuple[int, int, int]:
    if math.isnan(value):
        return (40, 40, 40)
    position = min(max(value, 0.0), 1.0) * (len(_SCALE) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(_SCALE) - 1)
    mix = _SCALE[low] * (1 - (position - low)) + _SCALE[high] * (position - low)
    return tuple(int(c) for c in mix)


def _canvas(rows: int, steps: int) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    cell_w = max(4, min(_MAX_WIDTH_PER_STEP, 640 // max(1, steps)))
    width = _LABEL_W + cell_w * steps + 90
    height = _TOP + rows * _CELL_H + _BOTTOM
    image = Image.new("RGB", (width, height), _BACKGROUND)
    return image, ImageDraw.Draw(image), cell_w


def _axes(draw: ImageDraw.ImageDraw, names: list[str], steps: int, cell_w: int, title: str) -> None:
    font = ImageFont.load_default()
    draw.text((4, 6), title, fill=_TEXT, font=font)
    label_every = max(1, math.ceil(12 / _CELL_H))
    for row, name in enumerate(names):
        if row % label_every == 0:
            draw.text((4, _TOP + row * _CELL_H - 1), name[-24:], fill=_TEXT, font=font)
    bottom = _TOP + len(names) * _CELL_H
    tick_every = max(1, math.ceil(steps / 10))
    for step in range(0, steps, tick_every):
        draw.text((_LABEL_W + step * cell_w, bottom + 3), str(step), fill=_TEXT, font=font)
    draw.text((_LABEL_W, bottom + 18), "step (0 = noise)", fill=_TEXT, font=font)


def render_profile(profile: BlockProfile) -> np.ndarray:
    """Relative L1 change per layer and step; the colour scale is clipped at the 95th percentile."""
    values = np.array(profile.change, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = float(np.percentile(finite, 95)) if finite.size else 1.0
    top = top if top > 0 else 1.0
    names = [spec.name for spec in profile.block_map.layers]
    image, draw, cell_w = _canvas(len(names), profile.grid.steps)
    for row in range(values.shape[0]):
        for step in range(values.shape[1]):
            x0, y0 = _LABEL_W + step * cell_w, _TOP + row * _CELL_H
            draw.rectangle([x0, y0, x0 + cell_w - 2, y0 + _CELL_H - 2], fill=_colour(values[row, step] / top))
    # colour bar
    bar_x = _LABEL_W + cell_w * profile.grid.steps + 14
    bar_h = max(20, len(names) * _CELL_H)
    for i in range(bar_h):
        draw.line([bar_x, _TOP + i, bar_x + 12, _TOP + i], fill=_colour(1.0 - i / bar_h))
    font = ImageFont.load_default()
    draw.text((bar_x + 16, _TOP - 4), f"{top:.2f}", fill=_TEXT, font=font)
    draw.text((bar_x + 16, _TOP + bar_h - 8), "0", fill=_TEXT, font=font)
    _axes(draw, names, profile.grid.steps, cell_w,
          f"relative L1 change per step ({profile.block_map.model_type}, {profile.sample_count} samples)")
    return np.asarray(image, dtype=np.float32) / 255.0


def render_schedule(schedule: CacheSchedule) -> np.ndarray:
    """Computed cells in the layer kind's colour, reused (or, with lookahead, interpolated) cells dark."""
    mask = schedule.evaluated_mask()
    names = [layer.name for layer in schedule.layers]
    image, draw, cell_w = _canvas(len(names), schedule.grid.steps)
    for row, layer in enumerate(schedule.layers):
        for step in range(mask.shape[1]):
            x0, y0 = _LABEL_W + step * cell_w, _TOP + row * _CELL_H
            fill = _KIND_COLOURS[layer.kind] if mask[row, step] else _REUSED
            draw.rectangle([x0, y0, x0 + cell_w - 2, y0 + _CELL_H - 2], fill=fill)
    font = ImageFont.load_default()
    legend_x = _LABEL_W + cell_w * schedule.grid.steps + 10
    for i, (label, fill) in enumerate([("attn/DiT", _KIND_COLOURS[LayerKind.ATTENTION]),
                                       ("res", _KIND_COLOURS[LayerKind.RESBLOCK]),
                                       ("up/down", _KIND_COLOURS[LayerKind.UPSAMPLE]), ("reused", _REUSED)]):
        y = _TOP + i * 14
        draw.rectangle([legend_x, y, legend_x + 9, y + 9], fill=fill)
        draw.text((legend_x + 13, y - 1), label, fill=_TEXT, font=font)
    _axes(draw, names, schedule.grid.steps, cell_w,
          f"computed {int(mask.sum())}/{mask.size}, est. speed-up {schedule.estimated_speedup:.2f}x")
    return np.asarray(image, dtype=np.float32) / 255.0


def render_loss_curve(losses: list[float], title: str) -> np.ndarray:
    """A line chart of a loss per iteration (Calibrate Block Cache), on a linear axis from 0."""
    width, height, left, right, top, bottom = 520, 300, 64, 16, 30, 40
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((8, 8), title, fill=_TEXT, font=font)
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    draw.line([x0, y1, x0, y0, x1, y0], fill=_TEXT)
    values = [v for v in losses if math.isfinite(v)]
    peak = max(values) if values else 1.0
    peak = peak if peak > 0 else 1.0
    for fraction in (0.0, 0.5, 1.0):
        y = y0 - fraction * (y0 - y1)
        draw.text((6, y - 6), f"{peak * fraction:.3g}", fill=_TEXT, font=font)
        draw.line([x0 - 3, y, x0, y], fill=_TEXT)
    count = len(losses)
    draw.text((x0, y0 + 6), "1", fill=_TEXT, font=font)
    draw.text((x1 - 24, y0 + 6), str(max(count, 1)), fill=_TEXT, font=font)
    draw.text(((x0 + x1) // 2 - 20, y0 + 20), "iteration", fill=_TEXT, font=font)
    points = [(x0 + (x1 - x0) * (i / max(1, count - 1)), y0 - (y0 - y1) * (v / peak))
              for i, v in enumerate(losses) if math.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=_KIND_COLOURS[LayerKind.ATTENTION], width=2)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=_KIND_COLOURS[LayerKind.ATTENTION])
    return np.asarray(image, dtype=np.float32) / 255.0

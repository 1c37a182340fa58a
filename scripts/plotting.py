"""Small line and scatter plots drawn with PIL (the environment has no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    line: bool = True
    colour: tuple[int, int, int] | None = None
    point_labels: Sequence[str] = field(default_factory=list)


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    span = max(high - low, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def plot(series: list[Series], path: str, *, title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (900, 600),
         log_y: bool = False) -> None:
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 80, 220, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def transform_y(y: float) -> float:
        return math.log10(max(y, 1e-12)) if log_y else y

    xs = [x for s in series for x in s.xs if math.isfinite(x)]
    ys = [transform_y(y) for s in series for y in s.ys if math.isfinite(y)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = (x1 - x0) * 0.05 or 0.5, (y1 - y0) * 0.05 or 0.5
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (transform_y(y) - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in _ticks(x0, x1):
        px, _ = to_pixel(tick, 10 ** y0 if log_y else y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.line([px, top, px, height - bottom], fill=(235, 235, 235))
        draw.text((px - 12, height - bottom + 8), f"{tick:g}", fill="black", font=font)
    for tick in _ticks(y0, y1):
        value = 10**tick if log_y else tick
        _, py = to_pixel(x0, value)
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, width - right, py], fill=(235, 235, 235))
        draw.text((8, py - 6), f"{value:.3g}", fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 12), title, fill="black", font=font)
    draw.text(((width - right + left) // 2 - 40, height - 25), xlabel, fill="black", font=font)
    draw.text((8, 22), ylabel, fill="black", font=font)

    for index, s in enumerate(series):
        colour = s.colour or PALETTE[index % len(PALETTE)]
        points = [to_pixel(x, y) for x, y in zip(s.xs, s.ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        if s.line and len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if not s.line or len(points) < 200:
            for px, py in points:
                draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        for (px, py), text in zip(points, s.point_labels, strict=False):
            draw.text((px + 6, py - 12), text, fill=colour, font=font)
        legend_y = top + 10 + 18 * index
        draw.rectangle([width - right + 12, legend_y, width - right + 24, legend_y + 10], fill=colour)
        draw.text((width - right + 30, legend_y - 1), s.label, fill="black", font=font)
    image.save(path)

"""The reference model's training data: captioned pictures of shapes, drawn procedurally.

Each picture is one shape (kind, colour, size, position, fill texture) on a textured
background, at 32x32 in [-1, 1]. Batches are drawn from a seeded generator, so a
training run is reproducible. The caption names what was drawn, e.g.
"a large red circle at top left on a blue striped background"; parts of it are left
out at random during training, so short prompts ("a red circle") work too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.8), "orange": (1.0, 0.55, 0.05), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring")
SIZES = {"small": 5.0, "large": 9.5}
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) centre as a fraction of the picture
    "top left": (0.28, 0.28), "top": (0.5, 0.28), "top right": (0.72, 0.28),
    "left": (0.28, 0.5), "center": (0.5, 0.5), "right": (0.72, 0.5),
    "bottom left": (0.28, 0.72), "bottom": (0.5, 0.72), "bottom right": (0.72, 0.72),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
FILLS = ("solid", "striped")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    fill: str
    background_colour: str
    background: str

    def caption(self, *, size: bool = True, position: bool = True, background: bool = True) -> str:
        words = ["a"]
        if size:
            words.append(self.size)
        words.append(self.colour)
        if self.fill == "striped":
            words.append("striped")
        words.append(self.shape)
        if position:
            words += ["at", self.position]
        if background:
            words.append(self.background_phrase())
        return " ".join(words)

    def background_phrase(self) -> str:
        """E.g. "on a blue striped background"."""
        texture = "" if self.background == "plain" else f" {self.background}"
        return f"on a {self.background_colour}{texture} background"


def random_scene(generator: torch.Generator) -> Scene:
    def pick(options):
        options = list(options)
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    colour = pick(COLOURS)
    background_colour = pick(c for c in COLOURS if c != colour)
    return Scene(pick(SHAPES), colour, pick(SIZES), pick(POSITIONS), pick(FILLS) if pick(range(4)) == 0 else "solid",
                 background_colour, pick(BACKGROUNDS))


def _shape_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of ``shape`` of ``radius`` centred at the origin."""
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - radius * 0.85
    if shape == "diamond":
        return (dx.abs() + dy.abs() - radius * 1.2) / math.sqrt(2)
    if shape == "ring":
        return (torch.sqrt(dx**2 + dy**2) - radius * 0.8).abs() - radius * 0.3
    if shape == "triangle":  # pointing up (y grows downwards): base and two slanted sides
        return torch.maximum(dy, 0.866 * dx.abs() - 0.5 * dy) - radius * 0.6
    raise ValueError(shape)


def render(scene: Scene, generator: torch.Generator | None = None) -> torch.Tensor:
    """The scene as a 3xSIZExSIZE tensor in [-1, 1]; the generator jitters position, size and phase."""
    return draw(scene, Jitter.draw(generator))


@dataclass(frozen=True)
class Jitter:
    """Random offsets of one picture (or of every frame of one clip): texture phase, centre and size."""

    phase: float = 0.0
    dx: float = 0.0
    dy: float = 0.0
    size: float = 0.0

    @classmethod
    def draw(cls, generator: torch.Generator | None) -> Jitter:
        def jitter(scale: float) -> float:
            return 0.0 if generator is None else float(torch.rand((), generator=generator) * 2 - 1) * scale

        return cls(phase=jitter(4.0), dx=jitter(2.0), dy=jitter(2.0), size=jitter(0.15))


def draw(scene: Scene, jitter: Jitter, *, centre: tuple[float, float] | None = None,
         colour: tuple[float, float, float] | None = None) -> torch.Tensor:
    """``scene`` drawn with ``jitter``; ``centre`` (fractions of the picture) and ``colour`` (RGB in [0, 1])
    replace the scene's own, for the frames of a clip."""
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32) + 0.5,
                            torch.arange(SIZE, dtype=torch.float32) + 0.5, indexing="ij")
    background = torch.tensor(COLOURS[scene.background_colour]).view(3, 1, 1).expand(3, SIZE, SIZE)
    darker = background * 0.45 + 0.05
    phase = jitter.phase
    if scene.background == "striped":
        pattern = (torch.floor((xs + phase) / 4) % 2).unsqueeze(0)
    elif scene.background == "checkered":
        pattern = ((torch.floor((xs + phase) / 4) + torch.floor((ys + phase) / 4)) % 2).unsqueeze(0)
    elif scene.background == "dotted":
        pattern = ((((xs + phase) % 6 - 3) ** 2 + ((ys + phase) % 6 - 3) ** 2) < 2.5).float().unsqueeze(0)
    else:
        pattern = torch.zeros(1, SIZE, SIZE)
    picture = background * (1 - pattern) + darker * pattern

    cx, cy = centre or POSITIONS[scene.position]
    cx, cy = cx * SIZE + jitter.dx, cy * SIZE + jitter.dy
    radius = SIZES[scene.size] * (1 + jitter.size)
    coverage = (0.5 - _shape_distance(scene.shape, xs - cx, ys - cy, radius)).clamp(0, 1).unsqueeze(0)
    fill = torch.tensor(colour or COLOURS[scene.colour]).view(3, 1, 1).expand(3, SIZE, SIZE)
    if scene.fill == "striped":  # diagonal stripes of the colour and white
        stripes = (torch.floor((xs + ys) / 3) % 2).unsqueeze(0)
        fill = fill * (1 - stripes) + stripes * 0.95
    picture = picture * (1 - coverage) + fill * coverage
    return picture * 2 - 1


class Captioned(Protocol):
    def caption(self, *, size: bool = True, position: bool = True, background: bool = True) -> str: ...


def training_caption(subject: Captioned, generator: torch.Generator, drop_caption: float, drop_part: float) -> str:
    """``subject``'s caption as training sees it: empty (for CFG) or with its size, position and background
    clauses each left out at random (a scene, or a clip of ``reference_clips``)."""
    keep = torch.rand(4, generator=generator) >= torch.tensor([drop_caption, drop_part, drop_part, drop_part])
    if not keep[0]:
        return ""
    return subject.caption(size=bool(keep[1]), position=bool(keep[2]), background=bool(keep[3]))


def training_batch(batch_size: int, generator: torch.Generator, *, drop_caption: float = 0.1,
                   drop_part: float = 0.2) -> tuple[torch.Tensor, list[str]]:
    """Pictures (Bx3xSIZExSIZE) and their captions; some captions are shortened or empty (for CFG)."""
    pictures, captions = [], []
    for _ in range(batch_size):
        scene = random_scene(generator)
        pictures.append(render(scene, generator))
        captions.append(training_caption(scene, generator, drop_caption, drop_part))
    return torch.stack(pictures), captions


def benchmark_prompts(count: int, seed: int = 1234) -> list[str]:
    """Full captions of ``count`` seeded scenes: prompts for benchmarks and tests."""
    generator = torch.Generator().manual_seed(seed)
    return [random_scene(generator).caption() for _ in range(count)]

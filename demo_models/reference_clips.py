"""The video reference model's training data: captioned clips of one moving or colour-changing shape.

Each clip is ``FRAMES`` frames of the image reference's scenes (``reference_data``): the shape
either travels across the picture ("moving left/right/up/down", centred on its named position)
or stays and blends into another colour ("turning green"). The texture phase, the size and the
centre jitter are drawn once per clip, so only the named motion changes from frame to frame.
Captions name what was drawn, e.g. "a large red circle at top moving right on a blue striped
background"; parts are dropped at random in training, so short prompts work too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference_data import COLOURS, POSITIONS, Jitter, Scene, draw, random_scene, training_caption

FRAMES = 8
# Direction (x, y) of each motion, in fractions of the picture per clip; y grows downwards.
MOTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                           "down": (0.0, 1.0)}
TRAVEL = 0.36  # how far a moving shape goes over the clip, as a fraction of the picture
WORDS = ("moving", "turning", "up", "down")  # caption words the image vocabulary lacks


@dataclass(frozen=True)
class Clip:
    scene: Scene
    motion: str  # a key of MOTIONS, or a colour the shape turns into

    def caption(self, *, size: bool = True, position: bool = True, background: bool = True) -> str:
        words = self.scene.caption(size=size, position=position, background=False).split()
        words += ["moving", self.motion] if self.motion in MOTIONS else ["turning", self.motion]
        if background:
            words.append(self.scene.background_phrase())
        return " ".join(words)


def random_clip(generator: torch.Generator) -> Clip:
    scene = random_scene(generator)
    options = [*MOTIONS, *(c for c in COLOURS if c not in (scene.colour, scene.background_colour))]
    return Clip(scene, options[int(torch.randint(len(options), (1,), generator=generator))])


def render_clip(clip: Clip, generator: torch.Generator | None = None) -> torch.Tensor:
    """The clip as a 3 x FRAMES x SIZE x SIZE tensor in [-1, 1]."""
    jitter = Jitter.draw(generator)
    cx, cy = POSITIONS[clip.scene.position]
    start, end = torch.tensor(COLOURS[clip.scene.colour]), torch.tensor(COLOURS.get(clip.motion, (0.0, 0.0, 0.0)))
    frames = []
    for index in range(FRAMES):
        progress = index / (FRAMES - 1)
        if clip.motion in MOTIONS:
            dx, dy = MOTIONS[clip.motion]
            centre = (cx + dx * TRAVEL * (progress - 0.5), cy + dy * TRAVEL * (progress - 0.5))
            frames.append(draw(clip.scene, jitter, centre=centre))
        else:
            colour = tuple(float(v) for v in torch.lerp(start, end, progress))
            frames.append(draw(clip.scene, jitter, colour=colour))
    return torch.stack(frames, dim=1)


def training_batch(batch_size: int, generator: torch.Generator, *, drop_caption: float = 0.1,
                   drop_part: float = 0.2) -> tuple[torch.Tensor, list[str]]:
    """Clips (B x 3 x FRAMES x SIZE x SIZE) and their captions; some shortened or empty (for CFG)."""
    clips, captions = [], []
    for _ in range(batch_size):
        clip = random_clip(generator)
        clips.append(render_clip(clip, generator))
        captions.append(training_caption(clip, generator, drop_caption, drop_part))
    return torch.stack(clips), captions


def benchmark_prompts(count: int, seed: int = 1234) -> list[str]:
    """Full captions of ``count`` seeded clips: prompts for benchmarks and tests."""
    generator = torch.Generator().manual_seed(seed)
    return [random_clip(generator).caption() for _ in range(count)]

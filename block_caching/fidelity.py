"""Fidelity of a cached run against the uncached one: PSNR, SSIM and a difference map, per picture.

The one place these measures live: validation (a schedule measured on the profiled run) and the
Compare Pictures node both use them. Pictures are batch first; ``ssim`` wants channels second
(ComfyUI's IMAGE is batch, height, width, channels: ``movedim(-1, 1)`` first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical pictures: an infinite PSNR, reported as this
SSIM_WINDOW = 11  # Wang et al. 2004: an 11x11 gaussian window, sigma 1.5, K1 0.01, K2 0.03
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(samples: torch.Tensor, reference: torch.Tensor) -> None:
    if samples.shape != reference.shape:
        raise ValueError(f"cannot compare a {tuple(samples.shape)} batch with a {tuple(reference.shape)} one: "
                         "they must have the same count, size and channels")
    if samples.numel() == 0:  # no pictures, or pictures of no pixels
        raise ValueError(f"cannot compare empty batches ({tuple(samples.shape)}): there are no pictures to compare")


def psnr(samples: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> list[float]:
    """PSNR in dB of each batch item (dim 0) against ``reference``, capped at PSNR_CAP_DB."""
    _check_pair(samples, reference)
    mse = ((samples.double() - reference.double()) ** 2).reshape(reference.shape[0], -1).mean(1)
    return [PSNR_CAP_DB if float(m) == 0 else min(PSNR_CAP_DB, 10 * math.log10(peak * peak / float(m)))
            for m in mse]


def mean_psnr(samples: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> float:
    values = psnr(samples, reference, peak)
    return sum(values) / len(values)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    kernel = torch.exp(-(offsets ** 2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def ssim(samples: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> list[float]:
    """Mean SSIM of each picture (batch, channels, height, width) against ``reference``.

    The standard form: per channel, local statistics under an 11x11 gaussian window (sigma 1.5) over
    the positions where the window fits ('valid'), averaged over channels and positions. Pictures
    smaller than the window use the largest odd window that fits.
    """
    _check_pair(samples, reference)
    if samples.ndim != 4:
        raise ValueError(f"ssim wants (batch, channels, height, width) pictures, got shape {tuple(samples.shape)}")
    x, y = samples.double(), reference.double()
    channels = x.shape[1]
    size = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd, so the window has a centre
    kernel = _gaussian_window(size, SSIM_SIGMA, x.dtype, x.device)
    # Separable: a row pass and a column pass, each channel on its own (groups).
    rows = kernel.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    cols = kernel.view(1, 1, size, 1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return [float(v) for v in index.reshape(index.shape[0], -1).mean(1)]


def difference_map(samples: torch.Tensor, reference: torch.Tensor, gain: float) -> torch.Tensor:
    """|samples - reference| x gain, clipped to [0, 1]: small cache errors made visible."""
    _check_pair(samples, reference)
    return ((samples.float() - reference.float()).abs() * gain).clamp(0, 1)


@dataclass(frozen=True)
class Fidelity:
    """Per-picture PSNR (dB) and SSIM of a batch against its reference, in batch order."""

    psnr: tuple[float, ...]
    ssim: tuple[float, ...]

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr) / len(self.psnr)

    @property
    def mean_ssim(self) -> float:
        return sum(self.ssim) / len(self.ssim)

    def lines(self) -> list[str]:
        """A line per picture and, for several, one for the mean."""
        lines = [f"picture {i + 1}: PSNR {p:.2f} dB, SSIM {s:.4f}"
                 for i, (p, s) in enumerate(zip(self.psnr, self.ssim, strict=True))]
        if len(lines) > 1:
            lines.append(f"mean of {len(lines)}: PSNR {self.mean_psnr:.2f} dB, SSIM {self.mean_ssim:.4f}")
        return lines


def compare_pictures(samples: torch.Tensor, reference: torch.Tensor, peak: float = 1.0) -> Fidelity:
    """PSNR and SSIM of each picture (batch, channels, height, width) against ``reference``."""
    return Fidelity(psnr=tuple(psnr(samples, reference, peak)), ssim=tuple(ssim(samples, reference, peak)))

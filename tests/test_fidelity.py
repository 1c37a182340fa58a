"""Compare Pictures and block_caching/fidelity.py: PSNR and SSIM per picture, checked against direct computations.

PSNR against the textbook formula in numpy, SSIM against kornia's (a ComfyUI dependency, written
independently) with the same 11x11 gaussian window, on pictures the reference model decodes.
"""

from __future__ import annotations

import logging
import math

import kornia
import numpy as np
import pytest
import torch
from comfyui_block_cache.block_caching import replay as replay_module
from comfyui_block_cache.block_caching.fidelity import PSNR_CAP_DB, ssim
from comfyui_block_cache.block_caching.replay import EXPECTED_RANGE_Z, MIN_PICTURE_SD, Measurement
from comfyui_block_cache.demo_models.reference_model import load_reference_model
from comfyui_block_cache.nodes.nodes_compare import ComparePictures


@pytest.fixture(scope="module")
def pictures(pack) -> tuple[torch.Tensor, torch.Tensor]:
    """(uncached, cached): three 32x32 pictures of the reference model, and the same with growing errors."""
    reference = load_reference_model()
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(3, 3, 32, 32, generator=generator)
    uncached = reference.vae.decode(latent).float().clamp(0, 1)  # (batch, height, width, channels), as IMAGE
    noise = torch.randn(uncached.shape, generator=generator)
    scales = torch.tensor([0.005, 0.02, 0.08]).view(3, 1, 1, 1)
    return uncached, (uncached + noise * scales).clamp(0, 1)


def _direct_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1.0 / float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_node_figures_match_a_direct_computation(pack, pictures, caplog):
    uncached, cached = pictures
    node = ComparePictures
    with caplog.at_level(logging.INFO):
        output = node.execute(uncached, cached, 8.0)
    difference, mean_psnr, mean_ssim = output.result
    expected_psnr = [_direct_psnr(cached[i].numpy(), uncached[i].numpy()) for i in range(3)]
    expected_ssim = [float(kornia.metrics.ssim(cached[i:i + 1].movedim(-1, 1).double(),
                                               uncached[i:i + 1].movedim(-1, 1).double(), 11,
                                               padding="valid").mean()) for i in range(3)]
    assert mean_psnr == pytest.approx(sum(expected_psnr) / 3, abs=1e-6)
    assert mean_ssim == pytest.approx(sum(expected_ssim) / 3, abs=1e-6)
    # More error, lower figures: the per-picture lines are in batch order.
    assert expected_psnr[0] > expected_psnr[1] > expected_psnr[2]
    text = output.ui["text"][0]
    for i in range(3):
        assert f"picture {i + 1}: PSNR {expected_psnr[i]:.2f} dB, SSIM {expected_ssim[i]:.4f}" in text
    assert f"mean of 3: PSNR {mean_psnr:.2f} dB, SSIM {mean_ssim:.4f}" in text
    assert "Compare Pictures: cached against uncached, picture 1" in caplog.text
    # The difference map: |cached - uncached| x 8, an IMAGE like the inputs.
    assert difference.shape == uncached.shape
    torch.testing.assert_close(difference, ((cached - uncached).abs() * 8).clamp(0, 1))


def test_identical_pictures_give_the_cap_and_ssim_one(pack, pictures):
    uncached, _ = pictures
    difference, mean_psnr, mean_ssim = ComparePictures.execute(
        uncached, uncached.clone(), 8.0).result
    assert mean_psnr == PSNR_CAP_DB == 100.0
    assert mean_ssim == pytest.approx(1.0, abs=1e-12)
    assert float(difference.abs().max()) == 0.0


def test_pictures_of_another_size_or_none_are_refused(pack, pictures):
    uncached, cached = pictures
    with pytest.raises(ValueError, match="same count and size"):
        ComparePictures.execute(uncached, cached[:2], 8.0)
    with pytest.raises(ValueError, match="no pictures to compare"):
        ComparePictures.execute(uncached[:0], cached[:0], 8.0)


def test_small_pictures_use_the_largest_window_that_fits(pack):
    # An 8x8 picture is smaller than the 11x11 window: a 7x7 one (odd, so it has a centre).
    a = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    b = (a + 0.05).clamp(0, 1)
    expected = float(kornia.metrics.ssim(b.double(), a.double(), 7, padding="valid").mean())
    assert ssim(b, a) == pytest.approx([expected], abs=1e-9)


def test_validation_measures_with_the_same_psnr(pack, pictures):
    """Validation's held-out measurement: per picture, the same PSNR (of latents: the reference's range as the
    peak), against the uncached pictures of the held-out seed."""
    uncached, cached = pictures
    seeds = []

    def sample(model, steps=None, seed_offset=0):
        seeds.append(seed_offset)
        return cached if model == "cached" else uncached

    replay = replay_module.ProfileReplay("uncached", sample, reference=uncached)
    measured = replay_module.HeldOutRuns((replay,)).measure(lambda _: "cached")
    peak = float(uncached.max() - uncached.min())
    direct = [10 * math.log10(peak ** 2 / float(((cached[i].double() - uncached[i].double()) ** 2).mean()))
              for i in range(3)]
    assert measured.pictures == pytest.approx(direct, abs=1e-6) and measured.mean == pytest.approx(sum(direct) / 3)
    assert seeds == [replay_module.HELD_OUT_SEED_OFFSET] * 2 and replay_module.HELD_OUT_SEED_OFFSET != 0


def test_expected_range_widens_with_spread_and_narrows_with_pictures(pack):
    measurement = Measurement
    z, floor_sd = EXPECTED_RANGE_Z, MIN_PICTURE_SD
    agreeing = measurement((30.0, 30.0, 30.0, 30.0))  # a spread below the floor counts as the floor
    assert agreeing.low == pytest.approx(30.0 - z * floor_sd / 2) and agreeing.high == pytest.approx(30.0 + z * floor_sd / 2)
    spread = measurement((20.0, 40.0, 25.0, 35.0))
    assert spread.mean == 30.0 and spread.low < agreeing.low
    more = measurement((30.0,) * 16)
    assert agreeing.low < more.low < 30.0
    assert replay_module.measurement(31.5).low == 31.5, "a plain number is known exactly"

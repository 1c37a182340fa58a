"""Shared fixtures: the real ComfyUI on CPU, this pack, and tiny seeded SD-layout UNets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from comfy_bootstrap import load_pack  # noqa: E402

PACK = load_pack()

import comfy.utils  # noqa: E402
import torch  # noqa: E402

comfy.utils.PROGRESS_BAR_ENABLED = False

from helpers import profile_schedules, sample  # noqa: E402,F401  (sample: re-exported for tests)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: minutes on a 2-core CPU; runs only with --run-slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow (make test PYTEST_ARGS=--run-slow)"))


@pytest.fixture(scope="session")
def pack():
    return PACK


@pytest.fixture
def tiny_model():
    return PACK.demo_models.builtin_models.build_unet_patcher("tiny", seed=0)


@pytest.fixture
def schedules(tiny_model, conds, latent):
    """(all-compute schedule, caching schedule) from a real profile of the tiny UNet."""
    return profile_schedules(PACK, tiny_model, conds, latent)


@pytest.fixture
def conds():
    prompt = PACK.demo_models.builtin_models.prompt_conditioning
    return prompt("a red square", 32), prompt("blurry", 32)


@pytest.fixture
def latent():
    return {"samples": torch.zeros(1, 4, 16, 16)}

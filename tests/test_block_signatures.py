"""The family tables against the running ComfyUI: every written block signature names inputs its
block's forward has, every diffusion model the host can load is mapped, found by structure, or
refused with a reason, and blocks without a batch axis are profiled per sample, not per token."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import comfy.model_base
import numpy as np
import pytest
from comfy_bootstrap import load_pack
from comfyui_block_cache.block_maps import dit_families as families
from comfyui_block_cache.block_maps.dit_families import BLOCK_SIGNATURES
from comfyui_block_cache.block_maps.mapping import block_map_for_patcher
from dit_zoo import ZOO, zoo_params
from helpers import profile_by_sampling

# Diffusion models that no family table lists: the UNet path maps them, or the structural search does.
UNET_CLASSES = {"comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel"}
# Stable Cascade's stages keep their blocks in lists of lists, which the model iterates itself: the
# structural search finds none it can patch, and the node says the model samples uncached
# (tests/test_dit_fallback.py).
NOT_IN_TABLES = {"comfy.ldm.cascade.stage_c.StageC", "comfy.ldm.cascade.stage_b.StageB"}


def _resolve(qualified: str) -> type | None:
    module, _, name = qualified.rpartition(".")
    if not module:
        return getattr(comfy.model_base, name, None)  # a name model_base imported
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.mark.parametrize("block_class", sorted(load_pack().block_maps.dit_families.BLOCK_SIGNATURES))
def test_a_written_signature_names_inputs_of_its_block(pack, block_class):
    cls = _resolve(block_class)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {block_class}")
    signature = BLOCK_SIGNATURES[block_class]
    parameters = [p.name for p in list(inspect.signature(cls.forward).parameters.values())[1:]]
    if signature.positions is None:
        missing = [name for name in signature.outputs if name is not None and name not in parameters]
        assert not missing, f"{block_class}.forward({', '.join(parameters)}) has no {missing}"


def _diffusion_model_class(model_class: type) -> type | None:
    """The class a model_base class builds as its diffusion model: the ``unet_model=`` it passes to
    BaseModel.__init__ (its own, or its closest base's)."""
    for cls in model_class.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
        except (OSError, TypeError):
            continue
        function = tree.body[0]
        # Parameters with defaults: ``def __init__(..., unet_model=comfy.ldm.flux.model.Flux)``.
        positional = function.args.args[len(function.args.args) - len(function.args.defaults):]
        defaults = {arg.arg: ast.unparse(value) for arg, value in zip(positional, function.args.defaults,
                                                                       strict=True)}
        defaults.update({arg.arg: ast.unparse(value) for arg, value in
                         zip(function.args.kwonlyargs, function.args.kw_defaults, strict=True) if value is not None})
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "unet_model":
                source = ast.unparse(node.value)
                return _resolve(defaults.get(source, source))
        if cls is comfy.model_base.BaseModel:
            return _resolve("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel")
    return None


def _model_base_classes() -> list[type]:
    return sorted((cls for cls in vars(comfy.model_base).values()
                   if isinstance(cls, type) and issubclass(cls, comfy.model_base.BaseModel)
                   and cls.__module__ == "comfy.model_base"), key=lambda cls: cls.__name__)


@pytest.mark.parametrize("model_class", _model_base_classes(), ids=lambda cls: cls.__name__)
def test_every_diffusion_model_of_the_host_is_mapped_or_refused(pack, model_class):
    diffusion_class = _diffusion_model_class(model_class)
    assert diffusion_class is not None, f"no unet_model found for {model_class.__name__}"
    names = [_qualified(cls) for cls in diffusion_class.__mro__]
    mapped = {name for family in families.DIT_FAMILIES for name in family.model_classes}
    first = next((name for name in names if name in mapped or name in families.REFUSED_MODELS
                  or name in UNET_CLASSES or name in NOT_IN_TABLES), None)
    assert first is not None, (f"{model_class.__name__} builds {names[0]}, which is neither mapped, refused nor "
                               "known to the structural search")
    if first in families.REFUSED_MODELS:
        refusal = families.REFUSED_MODELS[first]
        assert refusal.summary and len(refusal.reason) > 40, "a refusal says why"


@pytest.mark.parametrize("entry", zoo_params([e for e in ZOO if e.id == "minimax-h3"]))
def test_blocks_without_a_batch_axis_are_profiled_per_sample(pack, entry):
    """MiniMax H3's blocks run on (tokens, hidden): the profile averages one series per cond chunk, not
    one per token."""
    model = entry.build(seed=0)
    block_map = block_map_for_patcher(model)
    assert all(layer.batch_dim is None for layer in block_map.layers)
    profile, _ = profile_by_sampling(pack, model, entry.conds(), entry.latent(), steps=3, cfg=entry.cfg)
    assert profile.sample_count == 2  # cond and uncond, each its own model call
    assert np.isfinite(np.array(profile.change, dtype=float)[:, 1:]).all()

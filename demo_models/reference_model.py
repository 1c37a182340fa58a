"""The reference model: a small trained text-to-image UNet made of ComfyUI's own classes.

The diffusion model is ComfyUI's ``UNetModel`` in the SD1.5 layout (ResBlocks and
SpatialTransformers with cross-attention), inside an SD15 ``BaseModel`` with SD1.5's
discrete eps ``model_sampling``, so KSampler and every ComfyUI node use it as they use a
checkpoint. It works in pixel space (3 channels, 32x32, values in [-1, 1]); its VAE is
ComfyUI's pixel-space conversion VAE, so core VAEDecode turns its LATENT into an IMAGE.
The text encoder is a small learned token encoder over the caption vocabulary of
``reference_data``. ``scripts/train_reference_model.py`` trains both; the weights ship
in ``models/reference/``.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch

from . import reference_data
from .host_compat import core_patcher, weights_at_construction

logger = logging.getLogger(__name__)

WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "models" / "reference" / "reference_unet.safetensors"
RESOLUTION = reference_data.SIZE
CONTEXT_DIM = 64
MAX_TOKENS = 16

UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": RESOLUTION, "in_channels": 3, "out_channels": 3,
    "use_spatial_transformer": True, "legacy": False, "use_temporal_attention": False,
    "use_temporal_resblock": False, "adm_in_channels": None,
    "model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": [2, 2, 2],
    # Attention at 16x16 and 8x8 and in the middle; the 32x32 level has ResBlocks only: self-attention
    # over 1024 tokens would cost most of the training time on a shared 2-core CPU.
    # (Lists run from the highest resolution down; UNetModel pops the output list from its end.)
    "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
    "num_heads": 4, "num_head_channels": -1,
}

# Caption vocabulary: id 0 pads, id 1 begins every caption, id 2 is any unknown word.
VOCABULARY: tuple[str, ...] = ("<pad>", "<bos>", "<unk>", "a", "at", "on", "background", *reference_data.SIZES,
                               *reference_data.COLOURS, *reference_data.SHAPES, *reference_data.BACKGROUNDS[1:],
                               "top", "bottom", "left", "right", "center")


def tokenize(prompts: list[str], vocabulary: tuple[str, ...] = VOCABULARY) -> torch.Tensor:
    """Token ids (B x MAX_TOKENS): <bos>, the words (unknown ones as <unk>), then padding."""
    word_id = _word_ids(vocabulary)
    ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = re.findall(r"[a-z]+", prompt.lower())
        unknown = sorted({w for w in words if w not in word_id})
        if unknown:
            logger.info("Reference model: words not in its vocabulary are ignored as <unk>: %s", ", ".join(unknown))
        tokens = [1] + [word_id.get(w, 2) for w in words]
        if len(tokens) > MAX_TOKENS:
            logger.warning("Reference model: prompt cut to %d words: %r", MAX_TOKENS - 1, prompt)
        tokens = tokens[:MAX_TOKENS]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


@functools.cache
def _word_ids(vocabulary: tuple[str, ...]) -> dict[str, int]:
    return {word: index for index, word in enumerate(vocabulary)}


class TokenEncoder(torch.nn.Module):
    """Word and position embeddings and a two-layer transformer: the cross-attention context."""

    def __init__(self, dim: int = CONTEXT_DIM, layers: int = 2, heads: int = 4,
                 vocabulary: tuple[str, ...] = VOCABULARY) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(len(vocabulary), dim)
        self.position = torch.nn.Parameter(torch.zeros(1, MAX_TOKENS, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.embed(ids) + self.position))


# How many pixels of an EmptyLatentImage make one of the reference models' pixels: 256x256 gives their 32x32.
EMPTY_LATENT_RATIO = 8


def pixel_latent_format() -> Any:
    """The reference models' latent format: ComfyUI's pixel-space one (3 channels, no scaling) that keeps
    EmptyLatentImage's 1/8 size.

    ComfyUI 0.33 resizes an empty latent to the model's ``spacial_downscale_ratio`` (``comfy.sample.
    fix_empty_latent_channels``): with ChromaRadiance's ratio of 1, EmptyLatentImage 256x256 would be
    sampled at 256x256 pixels, 64 times the 32x32 the models were trained at (about 150 s a step on
    a CPU instead of about 1 s, and pictures out of their training distribution). Declaring the
    ratio 8 keeps what older hosts do (256x256 -> 32x32); EmptyChromaRadianceLatentImage, which
    names no ratio, is left as it is. Hosts without the attribute ignore it.
    """
    return pixel_latent_format_class()()


@functools.cache
def pixel_latent_format_class() -> type:
    import comfy.latent_formats

    class ReferencePixelSpace(comfy.latent_formats.ChromaRadiance):
        spacial_downscale_ratio = EMPTY_LATENT_RATIO

    return ReferencePixelSpace


def build_base_model(dtype: torch.dtype = torch.float32) -> Any:
    """The SD15 ``BaseModel`` with the reference UNet and pixel-space latent format (no weights loaded)."""
    import comfy.supported_models

    unet_config = dict(UNET_CONFIG)
    model_config = comfy.supported_models.SD15(unet_config)
    # SD15 fills in its own head count; keep ours. Pixel space: 3 channels, no scaling.
    model_config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=-1)
    model_config.latent_format = pixel_latent_format()
    model_config.set_inference_dtype(dtype, None)
    with weights_at_construction():
        return model_config.get_model({}, "")


def read_weights(path: Path | str, trained_by: str) -> dict[str, torch.Tensor]:
    """A reference model's safetensors file; a missing one names the script that trains it."""
    import comfy.utils

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No reference weights at {path}: train them with {trained_by}")
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def load_state(path: Path | str = WEIGHTS_PATH) -> dict[str, torch.Tensor]:
    return read_weights(path, "scripts/train_reference_model.py")


def load_weights(model: Any, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 vocabulary: tuple[str, ...] = VOCABULARY) -> tuple[Any, TokenEncoder]:
    """The ModelPatcher around ``model`` and the token encoder, both holding exactly ``state``'s weights
    (``diffusion_model.*`` and ``text_encoder.*``)."""
    import comfy.model_management
    import comfy.model_patcher

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    # Through the host's own key conversion, as BaseModel.load_model_weights does for a checkpoint
    # (ComfyUI 0.33's Flux names its RMSNorm parameters ``weight``; the shipped files say ``scale``).
    model.diffusion_model.load_state_dict(model.model_config.process_unet_state_dict(part("diffusion_model.")),
                                          strict=True)
    model.diffusion_model.to(dtype)
    patcher = core_patcher(model, comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device())
    text_encoder = TokenEncoder(vocabulary=vocabulary)
    text_encoder.load_state_dict(part("text_encoder."), strict=True)
    text_encoder.eval()
    return patcher, text_encoder


class ReferenceModel:
    """The loaded reference model: MODEL, text encoder and VAE, as a checkpoint loader gives them."""

    def __init__(self, path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> None:
        self.patcher, self.text_encoder = load_weights(build_base_model(dtype), load_state(path), dtype)
        self.vae = pixel_space_vae()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(tokenize(prompts))

    def conditioning(self, prompt: str) -> list:
        """ComfyUI CONDITIONING for ``prompt``: [[context (1 x tokens x dim), {}]]."""
        return self.conditioning_batch([prompt])

    def conditioning_batch(self, prompts: list[str]) -> list:
        """One CONDITIONING entry for a batch of latents, one prompt per latent."""
        return [[self.encode(prompts), {}]]


def pixel_space_vae() -> Any:
    """ComfyUI's own pixel-space VAE (comfy/pixel_space_convert.py): LATENT in [-1, 1] <-> IMAGE in [0, 1]."""
    import comfy.sd

    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


_CACHE: dict[tuple[str, torch.dtype], ReferenceModel] = {}


def load_reference_model(path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """The reference model; loaded once per path (callers clone the patcher before patching it)."""
    key = (str(Path(path).resolve()), dtype)
    if key not in _CACHE:
        _CACHE[key] = ReferenceModel(path, dtype)
    return _CACHE[key]


def empty_latent(batch_size: int = 1, resolution: int = RESOLUTION) -> dict[str, torch.Tensor]:
    """An empty LATENT for the pixel-space model (3 channels at full resolution)."""
    return {"samples": torch.zeros(batch_size, 3, resolution, resolution)}

"""Block maps of transformer (DiT) diffusion models.

Every DiT in ComfyUI keeps its transformer blocks in ModuleLists and calls each block
through ``nn.Module.__call__``, so an object patch on ``<blocks>.<i>.forward`` replaces
its computation whether or not the model honours ``patches_replace['dit']``.

Two tables drive it:

* ``DIT_FAMILIES``: per diffusion-model class, the block lists to cache, in execution order;
* ``BLOCK_SIGNATURES``: per block class, what ``forward`` returns and which input each output
  element is a residual update of (``("img", "txt")`` for Flux double blocks, and so on).

A model in neither table is searched generically: top-level ModuleLists (or ModuleDicts) of
two or more blocks of one class. Block classes not in the table get a signature inferred
from ``forward``'s parameters (single tensor output: its first parameter). Where that cannot
be right, the block is skipped with the reason (``SkippedLayer``), not cached wrongly: a
``forward(*args, **kwargs)`` names no input, and a ``forward`` that returns a tuple has several
streams whose inputs are unknown.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from dataclasses import dataclass

from torch import nn

from .block_map import LayerKind, LayerSpec, OutputForm, ResidualForm, SkippedLayer, Stream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DitFamily:
    name: str  # shown in logs, errors and the support matrix
    model_classes: tuple[str, ...]  # "module.Class" of the diffusion models it covers
    block_lists: tuple[str, ...]  # attribute paths below diffusion_model, in execution order


_LDM = "comfy.ldm."

DIT_FAMILIES: tuple[DitFamily, ...] = (
    DitFamily("Flux (dev, schnell, Kontext, Flux.2)", (_LDM + "flux.model.Flux",), ("double_blocks", "single_blocks")),
    DitFamily("Chroma", (_LDM + "chroma.model.Chroma",), ("double_blocks", "single_blocks")),
    # The NeRF head's blocks run per pixel patch and are cheap: they always run.
    DitFamily("Chroma Radiance", (_LDM + "chroma_radiance.model.ChromaRadiance",),
              ("double_blocks", "single_blocks")),
    DitFamily("SD3 / SD3.5 (MMDiT)", (_LDM + "modules.diffusionmodules.mmdit.MMDiT",), ("joint_blocks",)),
    DitFamily("AuraFlow", (_LDM + "aura.mmdit.MMDiT",), ("double_layers", "single_layers")),
    DitFamily("Wan 2.1 / 2.2 VACE", (_LDM + "wan.model.VaceWanModel",), ("blocks", "vace_blocks")),
    DitFamily("Wan 2.1 / 2.2", (_LDM + "wan.model.WanModel",), ("blocks",)),
    DitFamily("HunyuanVideo / 1.5", (_LDM + "hunyuan_video.model.HunyuanVideo",), ("double_blocks", "single_blocks")),
    DitFamily("LTXV", (_LDM + "lightricks.model.LTXVModel",), ("transformer_blocks",)),
    DitFamily("Qwen-Image", (_LDM + "qwen_image.model.QwenImageTransformer2DModel",), ("transformer_blocks",)),
    DitFamily("Lumina2 / Z-Image", (_LDM + "lumina.model.NextDiT",), ("context_refiner", "noise_refiner", "layers")),
    DitFamily("HiDream", (_LDM + "hidream.model.HiDreamImageTransformer2DModel",),
              ("double_stream_blocks", "single_stream_blocks")),
    DitFamily("Cosmos-Predict2", (_LDM + "cosmos.predict2.MiniTrainDIT",), ("blocks",)),
    DitFamily("Cosmos", (_LDM + "cosmos.model.GeneralDIT",), ("blocks",)),
    DitFamily("PixArt", (_LDM + "pixart.pixartms.PixArtMS",), ("blocks",)),
    DitFamily("HunyuanDiT", (_LDM + "hydit.models.HunYuanDiT",), ("blocks",)),
    DitFamily("Mochi", (_LDM + "genmo.joint_model.asymm_models_joint.AsymmDiTJoint",), ("blocks",)),
    DitFamily("Stable Audio", (_LDM + "audio.dit.AudioDiffusionTransformer",), ("transformer.layers",)),
    DitFamily("Hunyuan3D 2.0", (_LDM + "hunyuan3d.model.Hunyuan3Dv2",), ("double_blocks", "single_blocks")),
    DitFamily("Hunyuan3D 2.1", (_LDM + "hunyuan3dv2_1.hunyuandit.HunYuanDiTPlain",), ("blocks",)),
    DitFamily("ACE-Step", (_LDM + "ace.model.ACEStepTransformer2DModel",), ("transformer_blocks",)),
    DitFamily("OmniGen2", (_LDM + "omnigen.omnigen2.OmniGen2Transformer2DModel",),
              ("context_refiner", "noise_refiner", "ref_image_refiner", "layers")),
    # ComfyUI 0.33 image configs on mapped classes: Anima is a Cosmos-Predict2 MiniTrainDIT (its LLM adapter
    # runs on the text alone, in extra_conds under inference mode), LongCat-Image a Flux (txt_ids_dims [1, 2]),
    # Z-Image pixel space a NextDiT (NextDiTPixelSpace: its per-patch pixel decoder, dec_net.res_blocks, is small
    # next to the backbone and always runs, as Chroma Radiance's NeRF head does).
    DitFamily("Lens", (_LDM + "lens.model.LensTransformer2DModel",), ("transformer_blocks",)),
    DitFamily("Ideogram 4", (_LDM + "ideogram4.model.Ideogram4Transformer2DModel",), ("layers",)),
    # The txtfusion adapter's blocks (text only, no timestep) are small and always run.
    DitFamily("Krea 2", (_LDM + "krea2.model.SingleStreamDiT",), ("blocks",)),
    # Qwen-Image's QwenImageTransformerBlock, called as in Qwen-Image.
    DitFamily("Mage-Flow", (_LDM + "mage_flow.model.MageFlowTransformer2DModel",), ("transformer_blocks",)),
    # OmniGen2's refiners, then the double-stream stage, then OmniGen2 blocks on [text ; image].
    DitFamily("Boogu-Image", (_LDM + "boogu.model.BooguTransformer2DModel",),
              ("context_refiner", "noise_refiner", "ref_image_refiner", "double_stream_layers",
               "single_stream_layers")),
    DitFamily("JoyImage", (_LDM + "joyimage.model.JoyImageTransformer3DModel",), ("double_blocks",)),
    DitFamily("ERNIE-Image", (_LDM + "ernie.model.ErnieImageModel",), ("layers",)),
    # PiD (PidNet) subclasses PixDiT_T2I; its LQ gate acts on the patch stream between blocks, outside them.
    # Pixel blocks run on (B * patches, pixels per patch, dim): batch-major, so cond chunks split along dim 0.
    DitFamily("PixelDiT / PiD", (_LDM + "pixeldit.model.PixDiT_T2I",), ("patch_blocks", "pixel_blocks")),
    # ComfyUI 0.33's WanModel subclasses SCAILWanModel, SCAIL2WanModel and WanDancerModel (and FlowRVS, a plain
    # WanModel) keep WanModel's blocks and its block(x, e=, freqs=, context=, ...) calls: they match
    # "Wan 2.1 / 2.2" through the MRO. Their pose/reference tokens are concatenated to x before the blocks;
    # WanDancer's music injector runs after a block, outside it (as S2V's audio injector does).
    # LTX-2 audio-video: LTXAVModel subclasses LTXVModel, whose entry would name it "LTXV" through the MRO;
    # its blocks (BasicAVTransformerBlock) carry the (video, audio) pair, see BLOCK_SIGNATURES.
    DitFamily("LTX-2 (audio-video)", (_LDM + "lightricks.av_model.LTXAVModel",), ("transformer_blocks",)),
    DitFamily("CogVideoX", (_LDM + "cogvideo.model.CogVideoXTransformer3DModel",), ("blocks",)),
    # Kandinsky 5 video and image (Kandinsky5Image): the text encoder blocks are timestep-modulated (they
    # change every step), then the visual decoder blocks.
    DitFamily("Kandinsky 5", (_LDM + "kandinsky5.model.Kandinsky5",),
              ("text_transformer_blocks", "visual_transformer_blocks")),
    # One packed [text | audio | video] sequence, batch 1 only; the token refiner runs once per prompt (in
    # extra_conds) and always runs.
    DitFamily("MiniMax H3 (audio-video)", (_LDM + "minimax.model.MiniMaxH3Model",), ("blocks",)),
    # ACE-Step 1.5: the DiT is decoder.layers; the lyric / timbre encoders, the audio tokenizer and the
    # detokenizer run once per call on the conditioning (no timestep) and always run.
    DitFamily("ACE-Step 1.5", (_LDM + "ace.ace_step15.AceStepConditionGenerationModel",), ("decoder.layers",)),
    # Past 689 latent frames the transformer runs on overlapping windows: each block runs once per window
    # in a model call, each occurrence with its own cache.
    DitFamily("MiniMax Music 3", (_LDM + "minimax_music.dit.MiniMaxMusic3DiT",),
              ("diffusion_transformer.transformer.layers",)),
    # Only the dense structure stage (16^3 voxel tokens). The shape and texture stages (img2shape,
    # img2shape_512, shape2txt) pass SparseTensor streams through their blocks, which the cache cannot
    # hold: they always run, and a run of those stages calls none of these layers.
    DitFamily("TRELLIS.2 (structure stage)", (_LDM + "trellis2.model.Trellis2",), ("structure_model.blocks",)),
    # The context refiner runs on the image tokens alone (no timestep): the same at every step.
    DitFamily("TripoSplat", (_LDM + "triposplat.model.LatentSeqMMFlowModel",),
              ("noise_refiner", "context_refiner", "blocks")),
)

@dataclass(frozen=True)
class Refusal:
    """A model class Block Cache refuses: the node and the log give the reason, and the model runs uncached."""

    name: str  # the model, as users know it
    summary: str  # a few words, for the support matrix
    reason: str  # what the node and the log say


_NOT_SAMPLED = ("never by a sampler, so there are no sampling steps whose block outputs could be reused")

# Model classes that Block Cache refuses (no structural search is tried on them).
REFUSED_MODELS: dict[str, Refusal] = {
    _LDM + "hidream_o1.model.HiDreamO1Transformer": Refusal(
        "HiDream-O1", "its layers keep a key/value cache of the prompt across steps",
        "HiDream-O1 runs its Qwen3-VL decoder layers with a key/value cache of the prompt that it keeps across "
        "sampling steps and runs: each layer returns its keys and values with its output, and later calls compute "
        "only the image positions against the cached ones, so a layer served from Block Cache's cache would leave "
        "that prompt cache wrong"),
    # Its blocks write a KV cache as a side effect of forward (comfy/ldm/wan/ar_model.py, sample_ar_video).
    _LDM + "wan.ar_model.CausalWanModel": Refusal(
        "Wan 2.1 Causal AR", "autoregressive: every block call writes a KV cache",
        "autoregressive video model (Causal Forcing / Self-Forcing): the ar_video sampler denoises it frame block "
        "by frame block, and every block call writes its keys and values into a KV cache that the later frames "
        "attend to; a block whose output is reused skips that write (and the same sigmas repeat for every "
        "frame block), so caching would corrupt the KV cache and the video"),
    # forward_orig calls block.forward_pose / kv_from_input / forward_gen (comfy/ldm/wan/model_animate2.py).
    _LDM + "wan.model_animate2.WanAnimate2Model": Refusal(
        "Wan-Animate 2", "its blocks never run through forward",
        "its transformer blocks run through their forward_gen, forward_pose and kv_from_input methods, never "
        "through forward, so Block Cache's per-block patch on forward would never act (ComfyUI's WanAnimate2Cache "
        "node already caches the step-independent pose branch)"),
    # SeedVR2 (comfy/ldm/seedvr/model.py) is sampled in one step. Were it sampled in more, its blocks' outputs
    # (vid, txt, vid_shape, txt_shape) would also need the integer shape tensors passed through as they are.
    _LDM + "seedvr.model.NaDiT": Refusal(
        "SeedVR2", "a one-step model: nothing to reuse",
        "SeedVR2 restores a video in one sampling step (a one-step model, distilled by adversarial post-training); "
        "Block Cache reuses a block's output of one step at later steps, so there is nothing to reuse"),
    _LDM + "rt_detr.rtdetr_v4.RTv4": Refusal(
        "RT-DETR v4", "not a diffusion model (object detector)",
        "not a diffusion model: RT-DETR v4 is an object detector, run once per image by its detection node and "
        + _NOT_SAMPLED),
    _LDM + "sam3.detector.SAM3Model": Refusal(
        "SAM 3 / SAM 3.1", "not a diffusion model (segmenter)",
        "not a diffusion model: SAM 3 / SAM 3.1 is an image and video segmenter, run once per image or frame by "
        "its segmentation nodes and " + _NOT_SAMPLED),
    _LDM + "depth_anything_3.model.DepthAnything3Net": Refusal(
        "Depth Anything 3", "not a diffusion model (depth estimator)",
        "not a diffusion model: Depth Anything 3 is a depth estimator, run once per image by its depth node and "
        + _NOT_SAMPLED),
}


@dataclass(frozen=True)
class BlockSignature:
    """What a block's forward returns: ``outputs[i]`` names the parameter that output element i
    updates (None: an element with no input, cached as an output)."""

    form: OutputForm
    outputs: tuple[str | None, ...]
    positions: tuple[int | None, ...] | None = None  # for forward(*args, **kwargs): explicit positions
    # The streams arrive as one tuple argument, element i updated by output element i.
    tuple_argument: bool = False
    # The streams carry no batch axis (one sample's tokens, e.g. (tokens, hidden)).
    unbatched: bool = False


def _double(img: str = "img", txt: str = "txt") -> BlockSignature:
    return BlockSignature(OutputForm.TUPLE, (img, txt))


def _single(name: str) -> BlockSignature:
    return BlockSignature(OutputForm.TENSOR, (name,))


BLOCK_SIGNATURES: dict[str, BlockSignature] = {
    _LDM + "flux.layers.DoubleStreamBlock": _double(),
    _LDM + "flux.layers.SingleStreamBlock": _single("x"),
    # forward(*args, **kwargs); called as block(context, x, c=...) and returns (context, x).
    # The last block of SD3 returns context None ("pre_only").
    _LDM + "modules.diffusionmodules.mmdit.JointBlock": BlockSignature(OutputForm.TUPLE, ("context", "x"), (0, 1)),
    _LDM + "aura.mmdit.MMDiTBlock": _double("c", "x"),
    _LDM + "aura.mmdit.DiTBlock": _single("cx"),
    _LDM + "wan.model.WanAttentionBlock": _single("x"),
    # Returns (c_skip, c): c_skip is a projection added to the main stream, not an update.
    _LDM + "wan.model.VaceWanAttentionBlock": BlockSignature(OutputForm.TUPLE, (None, "c")),
    _LDM + "lightricks.model.BasicTransformerBlock": _single("x"),
    # Called with hidden_states=img, encoder_hidden_states=txt; returns (txt, img).
    _LDM + "qwen_image.model.QwenImageTransformerBlock": _double("encoder_hidden_states", "hidden_states"),
    _LDM + "lumina.model.JointTransformerBlock": _single("x"),
    # HiDreamImageBlock wraps one of these (see _DELEGATES) and passes its arguments on unchanged.
    _LDM + "hidream.model.HiDreamImageTransformerBlock": BlockSignature(OutputForm.TUPLE,
                                                                        ("image_tokens", "text_tokens")),
    _LDM + "hidream.model.HiDreamImageSingleTransformerBlock": _single("image_tokens"),
    _LDM + "cosmos.predict2.Block": _single("x_B_T_H_W_D"),
    _LDM + "cosmos.blocks.GeneralDITTransformerBlock": _single("x"),
    _LDM + "pixart.pixartms.PixArtMSBlock": _single("x"),
    _LDM + "hydit.models.HunYuanDiTBlock": _single("x"),
    _LDM + "genmo.joint_model.asymm_models_joint.AsymmetricJointBlock": _double("x", "y"),
    _LDM + "audio.dit.TransformerBlock": _single("x"),
    _LDM + "hunyuan3dv2_1.hunyuandit.HunYuanDiTBlock": _single("hidden_states"),
    _LDM + "ace.attention.LinearTransformerBlock": _single("hidden_states"),
    _LDM + "omnigen.omnigen2.OmniGen2TransformerBlock": _single("hidden_states"),
    # Lens: block(hidden_states=img, encoder_hidden_states=txt, temb=, ...) returns (txt, img).
    _LDM + "lens.model.LensTransformerBlock": _double("encoder_hidden_states", "hidden_states"),
    # Ideogram 4: layer(h, attn_mask, freqs_cis, adaln_input, ...) returns h.
    _LDM + "ideogram4.model.Ideogram4TransformerBlock": _single("x"),
    # Krea 2: block(combined, tvec, freqs, None, timestep_zero_index=...) returns combined.
    _LDM + "krea2.model.SingleStreamBlock": _single("x"),
    # Boogu: layer(img, instruct, rotary_emb, img_rotary_emb, temb, ...) returns (img, instruct).
    _LDM + "boogu.model.BooguDoubleStreamBlock": _double("img_hidden_states", "instruct_hidden_states"),
    # JoyImage: block(hidden_states=img, encoder_hidden_states=txt, temb=, ...) returns (img, txt).
    _LDM + "joyimage.model.JoyImageTransformerBlock": _double("hidden_states", "encoder_hidden_states"),
    # ERNIE-Image: layer(hidden_states, rotary_pos_emb, temb) returns hidden_states ([image ; text]).
    _LDM + "ernie.model.ErnieImageSharedAdaLNBlock": _single("x"),
    # PixelDiT: blk(s, y_emb, condition, pos_img, pos_txt, None, ...) returns (s, y_emb).
    _LDM + "pixeldit.model.MMDiTBlockT2I": _double("x", "y"),
    # PixelDiT: blk(x_pixels, s_cond, H, W, patch_size, mask=None, ...) returns x_pixels.
    _LDM + "pixeldit.modules.PiTBlock": _single("x"),
    # LTX-2: block((vx, ax), v_context=..., a_context=..., v_timestep=..., ...) updates both streams in place
    # and returns (vx, ax): element 0 updates x[0] (video), element 1 updates x[1] (audio; 0 tokens in a
    # video-only run).
    _LDM + "lightricks.av_model.BasicAVTransformerBlock": BlockSignature(OutputForm.TUPLE, ("x", "x"),
                                                                          tuple_argument=True),
    # CogVideoX: block(hidden_states=img, encoder_hidden_states=txt, temb=, image_rotary_emb=, ...) returns
    # (img, txt).
    _LDM + "cogvideo.model.CogVideoXBlock": _double("hidden_states", "encoder_hidden_states"),
    # Kandinsky 5: block(context, time_embed, freqs_text) returns context (text blocks);
    # block(visual_embed, context, time_embed, freqs=...) returns visual_embed (visual blocks).
    _LDM + "kandinsky5.model.TransformerEncoderBlock": _single("x"),
    _LDM + "kandinsky5.model.TransformerDecoderBlock": _single("visual_embed"),
    # MiniMax H3: block(h, t_emb, mod_segments, rope_freqs, transformer_options=...) updates the packed
    # sequence h [tokens, hidden] in place and returns it (batch 1: no batch axis).
    _LDM + "minimax.model.DiTBlock": BlockSignature(OutputForm.TENSOR, ("x",), unbatched=True),
    # ACE-Step 1.5: layer(hidden_states=x, temb=..., encoder_hidden_states=..., position_embeddings=...,
    # ...) returns hidden_states (all keywords).
    _LDM + "ace.ace_step15.AceStepDiTLayer": _single("hidden_states"),
    # MiniMax Music 3: layer(x, rotation_matrix) returns x.
    _LDM + "minimax_music.dit.TransformerBlock": _single("x"),
    # TRELLIS.2 structure model: block(h, t_emb, cond, rope_phases, transformer_options=...) returns h,
    # a dense [B, 4096, C] tensor.
    _LDM + "trellis2.model.ModulatedTransformerCrossBlock": _single("x"),
    # TripoSplat: block(h, mod=..., rotary_emb=..., transformer_options=...) returns h; the next block's
    # rotary embedding is computed from that output, outside the blocks.
    _LDM + "triposplat.model.UnifiedTransformerBlock": _single("x"),
}

# Wrapper blocks whose output form is that of an inner block: class -> attribute of the inner block.
_DELEGATES = {_LDM + "hidream.model.HiDreamImageBlock": "block"}

def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def family_of(diffusion_model: nn.Module) -> DitFamily | None:
    """The mapped family of a diffusion model; subclasses match their closest mapped base."""
    by_class = {name: family for family in DIT_FAMILIES for name in family.model_classes}
    for cls in type(diffusion_model).__mro__:
        family = by_class.get(_qualified(cls))
        if family is not None:
            return family
    return None


def refusal_of(diffusion_model: nn.Module) -> Refusal | None:
    """Why Block Cache refuses this model class (or its closest refused base), or None."""
    for cls in type(diffusion_model).__mro__:
        if _qualified(cls) in REFUSED_MODELS:
            return REFUSED_MODELS[_qualified(cls)]
        if any(_qualified(cls) in family.model_classes for family in DIT_FAMILIES):
            return None  # a mapped subclass of a refused class is not refused
    return None


def signature_of(block: nn.Module) -> tuple[BlockSignature, bool]:
    """The block's signature and whether it came from the table (False: inferred)."""
    inner = _DELEGATES.get(_qualified(type(block)))
    if inner is not None:
        block = getattr(block, inner)
    for cls in type(block).__mro__:
        known = BLOCK_SIGNATURES.get(_qualified(cls))
        if known is not None:
            return known, True
    tuple_streams = _tuple_stream_signature(block)
    if tuple_streams is not None:
        return tuple_streams, False
    parameters = _forward_parameters(block)
    first = parameters[0] if parameters else None
    return BlockSignature(OutputForm.TENSOR, (first,)), False


_SIGNATURE_FIX = ("add the block class to BLOCK_SIGNATURES in block_maps/dit_families.py (what forward returns and "
                  "which input each output element updates), or open an issue naming it")


def unknown_signature_reason(block: nn.Module, signature: BlockSignature) -> str | None:
    """Why an inferred signature cannot fit this block, or None where it may."""
    if signature.tuple_argument:
        return None
    if not _forward_parameters(block):
        return (f"unknown block signature: {type(block).__name__}.forward takes no named inputs, so which one "
                "its output updates is unknown")
    if _returns_tuple(type(block).forward):
        return (f"{type(block).__name__}.forward returns a tuple of streams, and which input each one updates "
                "is unknown")
    return None


def _forward_source(forward: object) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None  # no source (compiled, generated)
    function = tree.body[0]
    return function if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _is_tuple_annotation(annotation: ast.expr | None) -> bool:
    return annotation is not None and ast.unparse(annotation).lower().startswith(("tuple", "typing.tuple"))


def _tuple_returns(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Tuple]:
    """The ``return a, b`` statements of ``function`` itself (not of functions nested in it)."""
    nested = {id(n) for child in ast.walk(function) if child is not function
              and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for n in ast.walk(child)}
    return [node.value for node in ast.walk(function)
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and id(node) not in nested]


def _returns_tuple(forward: object) -> bool:
    """Whether ``forward`` is annotated to return a tuple or has a ``return a, b`` statement."""
    function = _forward_source(forward)
    if function is None:
        return False  # leave it to the runtime, which caches nothing it cannot split
    return _is_tuple_annotation(function.returns) or bool(_tuple_returns(function))


def _tuple_stream_signature(block: nn.Module) -> BlockSignature | None:
    """A block that takes its streams as one tuple and returns them updated, in order: ``forward(self,
    x: tuple[Tensor, Tensor], ...)`` returning ``a, b`` (audio-video blocks carry ``(video, audio)``)."""
    function = _forward_source(type(block).forward)
    arguments = function.args.args[1:] if function is not None else []
    if not arguments or not _is_tuple_annotation(arguments[0].annotation):
        return None
    lengths = {len(value.elts) for value in _tuple_returns(function)}
    if len(lengths) != 1:
        return None
    name = arguments[0].arg
    return BlockSignature(OutputForm.TUPLE, (name,) * lengths.pop(), tuple_argument=True)


def _forward_parameters(block: nn.Module) -> list[str]:
    """forward's positional-or-keyword parameter names, in order (no self, no *args/**kwargs)."""
    # The class's forward, not the instance's: while a patched clone stays loaded, block.forward is
    # our LayerForward (*args, **kwargs), and every stream would lose its position.
    try:
        parameters = list(inspect.signature(type(block).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds]


def streams_of(block: nn.Module, signature: BlockSignature) -> tuple[Stream, ...]:
    parameters = _forward_parameters(block)
    streams = []
    for index, name in enumerate(signature.outputs):
        if signature.positions is not None:
            position = signature.positions[index]
        else:
            position = parameters.index(name) if name in parameters else None
        key: int | None = None if signature.form is OutputForm.TENSOR else index
        streams.append(Stream(key=key, parameter=name, position=position,
                              item=index if signature.tuple_argument else None))
    return tuple(streams)


def _is_block_list(module: nn.Module) -> bool:
    """A ModuleList/ModuleDict of two or more like blocks, each a container of layers."""
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(module) < 2:
        return False
    children = list(module.children())
    first = type(children[0])
    # A block must have a forward of its own: lists of ModuleLists (Stable Cascade's levels) are
    # iterated by the model, so a patch on the inner list's forward would never run.
    return (all(type(child) is first for child in children)
            and first.forward is not nn.Module.forward
            and not isinstance(children[0], (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding,
                                             nn.LayerNorm, nn.GroupNorm))
            and len(list(children[0].children())) >= 2)


def generic_block_lists(diffusion_model: nn.Module) -> tuple[str, ...]:
    """The generic fallback: top-level lists of like blocks, in registration order."""
    return tuple(name for name, child in diffusion_model.named_children() if _is_block_list(child))


def dit_layers(diffusion_model: nn.Module) -> tuple[str, list[LayerSpec], list[SkippedLayer], list[str]]:
    """(family name, layer specs, skipped blocks, notes) of a transformer diffusion model; no layers if none
    found."""
    family = family_of(diffusion_model)
    notes: list[str] = []
    if family is not None:
        family_name = family.name
        lists = tuple(path for path in family.block_lists if _has_submodule(diffusion_model, path))
    else:
        lists = generic_block_lists(diffusion_model)
        family_name = f"generic ({type(diffusion_model).__name__})"
        if lists:
            notes.append(f"not a mapped family; found block lists {', '.join(lists)} by structure")
    layers: list[LayerSpec] = []
    skipped: list[SkippedLayer] = []
    inferred: set[str] = set()
    for path in lists:
        block_list = diffusion_model.get_submodule(path)
        for key, block in block_list.named_children():
            signature, known = signature_of(block)
            if not known:
                reason = unknown_signature_reason(block, signature)
                if reason is not None:
                    skipped.append(SkippedLayer(f"{path}.{key}", reason, _SIGNATURE_FIX))
                    continue
                inferred.add(type(block).__name__ + (f" ({len(signature.outputs)} streams in one tuple)"
                                                     if signature.tuple_argument else " (single tensor output)"))
            layers.append(LayerSpec(
                name=f"{path}.{key}",
                kind=LayerKind.TRANSFORMER,
                stage=path,
                residual=ResidualForm.IDENTITY,
                output_form=signature.form,
                streams=streams_of(block, signature),
                mutates_inputs=True,
                batch_dim=_batch_dim(block, signature),
            ))
    if inferred:
        notes.append(f"block signature inferred for {', '.join(sorted(inferred))}")
    return family_name, layers, skipped, notes


def _batch_dim(block: nn.Module, signature: BlockSignature) -> int | None:
    """Where the batch is in the block's stream tensors: Cosmos 1 blocks run on (T, H, W, B, D); None for
    blocks whose streams have no batch axis."""
    if signature.unbatched:
        return None
    return 3 if getattr(block, "x_format", None) == "THWBD" else 0


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True

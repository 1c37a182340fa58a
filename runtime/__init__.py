"""The sampling-time runtime, method-agnostic: one context per run, layer patches, keyed wrappers.

Nothing here imports ComfyUI's node API or a method; Block Caching and Faster Diffusion plug in
through ``RunHolder``, ``LayerMethod`` and ``RunMethod`` (runtime/run.py).
"""

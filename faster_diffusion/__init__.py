"""Faster Diffusion (Li et al., NeurIPS 2024): encoder propagation, parallel decoding, prior noise injection."""

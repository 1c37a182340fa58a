"""Seeded weights for the zoo: the pack's own initializer, so all tests share one."""

from comfy_bootstrap import load_pack

seeded_init_ = load_pack().demo_models.builtin_models.seeded_init_

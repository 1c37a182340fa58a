"""Demo and reference models: the trained reference UNet, its procedural data and the small built-in UNets.

Kept apart from the runtime and the methods, which never import this package.
"""

"""README.md's support matrix must be what the zoo's real block maps say."""

from __future__ import annotations

import support_matrix


def test_readme_support_matrix_matches_the_zoo():
    expected = support_matrix.render()
    actual = support_matrix.readme_section(support_matrix.README.read_text())
    assert actual == expected, "README support matrix is stale: run .venv/bin/python tests/support_matrix.py --write"


def test_every_zoo_family_is_a_mapped_family_or_the_generic_fallback(pack):
    import importlib

    from dit_zoo import ZOO

    names = {family.name for family in importlib.import_module(f"{pack.__name__}.block_maps.dit_families").DIT_FAMILIES}
    unknown = {e.family for e in ZOO if e.family not in names and not e.family.startswith("generic")}
    assert not unknown

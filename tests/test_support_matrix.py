"""README.md's support matrix must be what the zoo's real block maps and the refusals say, on this host."""

from __future__ import annotations

import importlib

import pytest
import support_matrix
from dit_zoo import ZOO
from dit_zoo.base import host_version

STALE = "README support matrix is stale: run .venv-0.33.0/bin/python tests/support_matrix.py --write"


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _readme_row(readme: list[str], key: str) -> str:
    for row in readme:
        cells = _cells(row)
        if key.startswith("refused "):
            if cells[1] == f"`{support_matrix._short(key.removeprefix('refused '))}`":
                return row
        elif cells[0] == key or (key == "UNet" and cells[0].startswith("UNet")) or \
                (key == "fallback" and cells[0].startswith("Any other model")):
            return row
    raise AssertionError(f"{STALE} (no row for {key})")


def test_readme_support_matrix_matches_this_host():
    host = ".".join(map(str, host_version()))
    if host not in support_matrix.HOSTS:
        pytest.skip(f"ComfyUI {host} is not one of the hosts the matrix reports ({', '.join(support_matrix.HOSTS)})")
    readme = support_matrix.readme_rows(support_matrix.README.read_text())
    expected = support_matrix.rows()
    assert len(readme) == len(expected), STALE
    for key, row in expected:
        actual = _readme_row(readme, key)
        hosts = [h.strip() for h in _cells(actual)[-1].split(",")]
        if row is None:
            assert host not in hosts, f"{key} cannot be built on ComfyUI {host}, but the README says it is tested there"
        elif key.startswith("refused "):
            assert _cells(actual)[:-1] == _cells(row)[:-1], STALE
            assert host in hosts, f"{key}: ComfyUI {host} has the class; the README's hosts must name it"
        else:
            assert actual == row, STALE
            assert host in hosts


def test_every_zoo_family_is_a_mapped_family_or_the_generic_fallback(pack):
    names = {family.name for family in importlib.import_module(f"{pack.__name__}.block_maps.dit_families").DIT_FAMILIES}
    unknown = {e.family for e in ZOO if e.family not in names and not e.family.startswith("generic")}
    assert not unknown

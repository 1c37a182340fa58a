"""The GPU check (make bench-gpu) runs end to end, on tiny models, and reports what it promises."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_gpu_smoke(pack, tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import bench_gpu

    (result,) = bench_gpu.main(["--smoke", "--models", "sd15", "--out", str(tmp_path)])
    assert result["seconds_no_patch"] > 0 and result["seconds_all_compute"] > 0
    assert result["ideal_speedup_every_2"] > 1.0 and result["achieved_speedup_every_2"] > 0
    assert result["cache_held_mb"] > 0, "the every-2 schedule caches"
    assert result["cache_on_cpu_offloaded_tensors"] > 0, "cache_device=cpu copies what it stores"
    assert 0 < result["profile_held_mb"] and 0 < result["profile_before_issue15_held_mb"]
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "SD1.5 UNet (smoke: tiny)" in table and "achieved / ideal" in table

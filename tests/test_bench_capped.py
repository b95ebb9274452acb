"""scripts/bench/bench_capped.py: runs under a real memory cgroup, from a cold page cache; a run
the cap kills is reported as killed, not as a speed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
import bench_capped  # noqa: E402


@pytest.mark.skipif(not bench_capped.can_cap(), reason="needs root and a cgroup v1 memory controller")
def test_a_run_under_the_cap_and_one_the_cap_kills(reference_artifact):
    ok = bench_capped.moetvm_capped(bench_capped.capped_cgroup(1024), reference_artifact, [105, 109, 112], 8, 1,
                                    "25%", True, 300)
    assert "error" not in ok, ok
    assert ok["tok_s"] > 0 and 20 < ok["peak_rss_mb"] < 1024 and ok["cgroup_max_mib"] <= 1024
    killed = bench_capped.moetvm_capped(bench_capped.capped_cgroup(24), reference_artifact, [105, 109, 112], 8, 1,
                                        "25%", True, 300)
    assert "signal 9" in killed["error"] and killed["failcnt"] > 0
    group = bench_capped.capped_cgroup(24)
    bench_capped.remove_cgroup(group)
    assert not group.exists()
    rows = {r["cell"]: r for r in bench_capped.summarise({"moetvm": [ok, ok], "llama.cpp mmap": [killed]})}
    assert rows["moetvm"]["completed"] == 2 and rows["moetvm"]["vs_best_llama_cpp"] is None
    assert rows["llama.cpp mmap"]["completed"] == 0 and "signal 9" in rows["llama.cpp mmap"]["errors"][0]

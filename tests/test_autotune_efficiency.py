"""The tuning-efficiency report: its arithmetic, and the command end to end on a tiny measured space."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from autotune import efficiency
from kernels.device import device_facts


def test_trials_to_level_counts_from_one():
    curve = [4.0, 2.0, math.inf, 1.02, 1.0]
    assert efficiency.trials_to(curve, 1.0, 0.97) == 4  # 1 / 1.02 = 0.980
    assert efficiency.trials_to(curve, 1.0, 0.99) == 5
    assert math.isnan(efficiency.trials_to([2.0, math.inf], 1.0, 0.97))


def test_summary_medians_and_shares():
    runs = pd.DataFrame([
        {"shape": s, "sampler": "tpe", "seed": seed, "n_configs": 100, "final_fraction": 1.0,
         "trials_to_97": t, "space_fraction_to_97": t / 100, "trials_to_99": math.nan, "space_fraction_to_99": math.nan}
        for s, seed, t in [("a", 0, 5.0), ("a", 1, 9.0), ("a", 2, 30.0), ("b", 0, 40.0), ("b", 1, math.nan), ("b", 2, 12.0)]
    ])
    row = efficiency.summarize(runs).iloc[0]
    assert row["median_trials_to_97"] == 21.0  # of 5, 9, 12, 30, 40, inf
    assert row["runs_reaching_97"] == 5 / 6
    assert row["shapes_97_within_10pct_of_space"] == 0.5  # a: median 9 trials (9%), b: median 40 (40%)
    assert row["runs_reaching_99"] == 0 and math.isinf(row["median_trials_to_99"])


def test_efficiency_command_writes_tables_and_plot(tmp_path):
    summary = efficiency.main([
        "--family", "gemm", "--dtype", "float16", "--shapes", "M=16,N=48,K=64;M=24,N=48,K=64",
        "--max-configs", "10", "--seeds", "2", "--trials-per-seed", "5", "--samplers", "tpe,random,tpe+warm",
        "--out", str(tmp_path),
    ])
    assert list(summary["sampler"]) == ["tpe", "random", "tpe+warm"]
    name = f"gemm_float16_{device_facts().key}"
    runs = pd.read_csv(tmp_path / f"{name}_runs.csv")
    assert len(runs) == 2 * 3 * 2 and set(runs["budget"]) == {5} and set(runs["n_configs"]) == {10}
    assert ((runs["trials_to_97"] <= 5) | runs["trials_to_97"].isna()).all()
    assert (runs["final_fraction"] <= 1.0).all() and {"device", "torch", "triton", "date"} <= set(runs.columns)
    measured = pd.read_csv(tmp_path / f"{name}_exhaustive.csv")
    assert len(measured) == 20 and (measured["ms"] > 0).all()
    assert (tmp_path / f"{name}_best_so_far.png").read_bytes()[:4] == b"\x89PNG"


def test_replay_of_a_measured_table_reproduces_the_run(tmp_path):
    """--table replays the samplers against an earlier run's measurements without measuring again:
    with the same seeds it gives the same runs, stamped with the measurement's provenance."""
    first, again = tmp_path / "first", tmp_path / "again"
    common = ["--seeds", "2", "--trials-per-seed", "4", "--samplers", "tpe,random,tpe+warm"]
    efficiency.main(["--family", "gemm", "--dtype", "float16", "--shapes", "M=16,N=48,K=64;M=24,N=48,K=64",
                     "--max-configs", "8", "--out", str(first), *common])
    name = f"gemm_float16_{device_facts().key}"
    efficiency.main(["--table", str(first / f"{name}_exhaustive.csv"), "--out", str(again), *common])
    cols = ["shape", "sampler", "seed", "n_configs", "budget", "best_ms", "trials_to_97", "trials_to_99"]
    before = pd.read_csv(first / f"{name}_runs.csv")
    after = pd.read_csv(again / f"{name}_runs.csv")
    pd.testing.assert_frame_equal(before[cols], after[cols])
    assert set(after["date"]) == set(before["date"]) and after["replayed"].notna().all()


def test_replay_rejects_a_table_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"config": ["{}"], "ms": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="columns"):
        efficiency.main(["--table", str(bad), "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no measured table"):
        efficiency.main(["--table", str(tmp_path / "missing.csv"), "--out", str(tmp_path)])


def test_sub_grid_measured_then_replayed_with_the_measured_devices_neighbours(tmp_path):
    """--space measures every config of a sub-grid, --measure-only stops at the table, and a replay
    of a table measured on another device warm-starts TPE from that device's winners: the first
    trial of tpe+warm is the other shape's winner."""
    measured = tmp_path / "measured"
    # Two shapes with one space, so each one's winner is a config of the other.
    efficiency.main(["--family", "gemm", "--dtype", "float16", "--shapes", "M=16,N=48,K=64;M=16,N=40,K=64",
                     "--space", "variant=tiled,splitk;GROUP_M=1;num_warps=4;num_stages=2;BLOCK_K=32,64",
                     "--measure-only", "--out", str(measured)])
    path = measured / f"gemm_float16_{device_facts().key}_subgrid_exhaustive.csv"
    table = pd.read_csv(path)
    configs = [json.loads(c) for c in table["config"]]
    assert {c["variant"] for c in configs} <= {"tiled", "splitk"} and {c["BLOCK_K"] for c in configs} <= {32, 64}
    assert not list(measured.glob("*_runs.csv"))  # measured only: no replay yet
    table.assign(device="NVIDIA H200").to_csv(path, index=False)

    replayed = tmp_path / "replayed"
    efficiency.main(["--table", str(path), "--seeds", "1", "--trials-per-seed", "3", "--samplers", "tpe+warm",
                     "--out", str(replayed)])
    curves = pd.read_csv(replayed / "gemm_float16_nvidia_h200_subgrid_curves.csv")
    ms = {(s, json.dumps(json.loads(c), sort_keys=True)): m for s, c, m in zip(table["shape"], table["config"], table["ms"])}
    shapes = list(dict.fromkeys(table["shape"]))
    for here, other in (shapes, shapes[::-1]):
        mine = {c: m for (s, c), m in ms.items() if s == here}
        theirs = {c: m for (s, c), m in ms.items() if s == other}
        winner = min(theirs, key=theirs.get)
        first = curves[(curves["shape"] == here) & (curves["trial"] == 1)]["fraction_of_best"].item()
        assert first == pytest.approx(min(mine.values()) / mine[winner])


@pytest.mark.parametrize("device,default_first", [("NVIDIA H200", True), ("NVIDIA A40", False)])
def test_replay_warm_starts_from_the_measured_devices_default(tmp_path, device, default_first):
    """A table measured on a device whose facts the workbench knows (the H200) is replayed as that
    device: the warm start's first trial is the default config the tuner enqueues there, which this
    table makes the fastest. A device it does not know gets this machine's default, projected."""
    from autotune import cache
    from kernels.device import KNOWN_DEVICES, assume_device
    from kernels.gemm import FAMILY

    shape = {"M": 256, "N": 256, "K": 128, "b_transposed": True}
    with assume_device(KNOWN_DEVICES["h200"]):
        default = FAMILY.default_config(shape, "float16")
        configs = FAMILY.configs(shape, "float16")
    assert default["variant"].startswith("tma") and FAMILY.default_config(shape, "float16") != default
    picked = [default] + [c for c in configs if c != default][::7][:40]
    table = pd.DataFrame({"config": [json.dumps(c, sort_keys=True) for c in picked], "status": "ok",
                          "ms": [1.0] + [2.0 + i / 100 for i in range(len(picked) - 1)],
                          "shape": cache.shape_key(shape), "family": "gemm", "dtype": "float16", "device": device,
                          "torch": "x", "triton": "x", "date": "2026-11-27", "space": ""})
    path = tmp_path / "t_exhaustive.csv"
    table.to_csv(path, index=False)
    efficiency.main(["--table", str(path), "--seeds", "1", "--trials-per-seed", "2", "--samplers", "tpe+warm",
                     "--out", str(tmp_path / "r")])
    curves = next((tmp_path / "r").glob("*_curves.csv"))
    first = pd.read_csv(curves).query("trial == 1")["fraction_of_best"].item()
    assert (first == 1.0) is default_first

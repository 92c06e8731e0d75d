"""The autotuner on the CPU interpreter: tuning, resume, faults, the cache and tuned dispatch.

Tunes are tiny (a few trials of a 16x48x64 GEMM, or the test-only faulty family) and share one
worker process across the session; every cache file and study lives in a temporary folder.
"""
from __future__ import annotations

import json
import multiprocessing
import re
import subprocess
import sys

import optuna
import pytest
import torch

import autotune
import faulty_family
import kernels
from autotune import cache, families
from autotune.search import counted, fail_stale, make_sampler, result_of, run_search
from autotune.space import SearchSpace, config_key
from autotune.tuner import warm_configs
from autotune.worker import shared_pool
from kernels.device import device_facts
from kernels.family import rel_error

SHAPE = {"M": 16, "N": 48, "K": 64}
PROVENANCE = ("device", "device_key", "capability", "triton", "torch", "template_hash", "ms", "ms_p20", "ms_p80",
              "baseline_ms", "trials", "sampler", "date", "config", "shape", "family", "dtype")


@pytest.fixture(scope="module")
def gemm_tune(tmp_path_factory):
    """A 3-trial TPE tune of a tiny GEMM: (result, cache file, storage file)."""
    folder = tmp_path_factory.mktemp("gemm_tune")
    paths = folder / "cache.json", folder / "optuna.db"
    res = autotune.tune("gemm", SHAPE, "float16", n_trials=3, sampler="tpe", seed=0, cache_path=paths[0],
                        storage=paths[1], compile_workers=0)
    return res, *paths


def _entry(family: str, dtype: str, shape: dict, config: dict, ms: float = 1.0) -> dict:
    return {"family": family, "dtype": dtype, "shape": shape, "config": config, "ms": ms,
            "device_key": device_facts().key}


def test_tune_writes_a_correct_winner_with_provenance(gemm_tune, device):
    res, cache_path, _ = gemm_tune
    assert res.n_trials == 3 and res.new_trials == 3
    entry = json.loads(cache_path.read_text())["entries"][res.key]
    assert res.key == "gemm/float16/K=64,M=16,N=48"
    assert set(PROVENANCE) <= set(entry)
    assert entry["config"] == res.config and entry["ms"] == res.ms and entry["trials"] == 3
    assert entry["device"] == device_facts().name and entry["sampler"] == "tpe"
    assert entry["template_hash"] == kernels.generator.template_hash(kernels.get_family("gemm"))
    assert 0 < entry["ms_p20"] <= entry["ms"] <= entry["ms_p80"] and entry["baseline_ms"] > 0
    fam = kernels.get_family("gemm")
    assert fam.check_config(SHAPE, "float16", res.config) == res.config
    inputs = fam.make_inputs(SHAPE, "float16", device, seed=7)
    ref = fam.reference(inputs)
    inputs["out"].fill_(float("nan"))
    assert rel_error(fam.run(inputs, res.config), ref) <= fam.tolerance("float16", device)


def test_lookup_exact_nearest_and_none(gemm_tune):
    _, cache_path, _ = gemm_tune
    stored = json.loads(cache_path.read_text())["entries"]["gemm/float16/K=64,M=16,N=48"]
    exact = autotune.lookup("gemm", SHAPE, "float16", cache_path=cache_path)
    assert exact["match"] == "exact" and exact["config"] == stored["config"]
    near = autotune.lookup("gemm", {"M": 20, "N": 40, "K": 64}, "float16", cache_path=cache_path)
    assert near["match"] == "nearest" and near["shape"] == SHAPE and near["distance"] > 0
    assert autotune.lookup("gemm", {"M": 20, "N": 40, "K": 64}, "float16", cache_path=cache_path, nearest=False) is None
    assert autotune.lookup("gemm", SHAPE, "float32", cache_path=cache_path) is None
    with pytest.raises(TypeError, match="float64"):
        autotune.lookup("gemm", SHAPE, "float64", cache_path=cache_path)


def test_resume_runs_only_the_missing_trials(gemm_tune):
    _, cache_path, storage = gemm_tune
    timer = shared_pool(0).timer
    pid = timer.pid
    more = autotune.tune("gemm", SHAPE, "float16", n_trials=5, cache_path=cache_path, storage=storage, compile_workers=0)
    assert (more.n_trials, more.new_trials) == (5, 2)
    assert timer.alive and timer.pid == pid  # healthy trials reuse the live worker
    again = autotune.tune("gemm", SHAPE, "float16", n_trials=5, cache_path=cache_path, storage=storage, compile_workers=0)
    assert (again.n_trials, again.new_trials) == (5, 0)
    assert again.config == more.config and again.ms == more.ms  # the stored confirmation, not a re-timing
    assert again.trials["status"].isin(["ok", "failed"]).sum() == 5


def test_a_changed_space_is_a_new_study(tmp_path, monkeypatch):
    """Optuna cannot resume a study whose categorical values changed; a space that changes without
    its template (a variant dropped here) gets a study of its own instead of an error."""
    fam = kernels.get_family("gemm")
    kw = dict(cache_path=tmp_path / "cache.json", storage=tmp_path / "optuna.db", compile_workers=0)
    first = autotune.tune("gemm", SHAPE, "float16", n_trials=2, **kw)
    full = type(fam).space
    monkeypatch.setattr(type(fam), "space", lambda self, shape, dtype: {**full(self, shape, dtype),
                                                                         "variant": full(self, shape, dtype)["variant"][:-1]})
    second = autotune.tune("gemm", SHAPE, "float16", n_trials=3, **kw)
    assert second.study_name != first.study_name and "|grid=" in second.study_name
    assert (second.n_trials, second.new_trials) == (3, 3)


def test_faulty_candidates_fail_with_their_reason_and_the_study_completes(tmp_path):
    res = autotune.tune(faulty_family.FAMILY, {"n": 64}, "float32", n_trials=None, sampler="random", seed=3,
                        cache_path=tmp_path / "cache.json", storage=tmp_path / "optuna.db", timeout_s=3,
                        compile_workers=0)
    assert res.config == {"mode": "fast"}
    rows = {r.config["mode"]: r for r in res.trials.itertuples() if r.status in ("ok", "failed")}
    assert sorted(rows) == sorted(m for m in faulty_family.MODES if m != "forbidden")  # each valid mode once
    assert res.n_trials == len(rows) == res.trials["status"].isin(["ok", "failed"]).sum()
    for mode, why in faulty_family.FAILING.items():
        assert rows[mode].state == "FAIL" and rows[mode].status == "failed"
        assert why in rows[mode].reason, (mode, rows[mode].reason)
    assert rows["fast"].ms < rows["slow"].ms
    rejected = res.trials[res.trials["status"] == "rejected"]
    assert all(c["mode"] == "forbidden" for c in rejected["config"]) and set(rejected["state"]) <= {"PRUNED"}
    assert res.failed_trials == len(faulty_family.FAILING)


def _synthetic_ms(config: dict) -> float:
    """A made-up, deterministic landscape over GEMM configs (for search tests without kernels)."""
    return 1.0 + (config["BLOCK_K"] - 64) ** 2 / 1e3 + 0.3 * (config["variant"] != "tiled") + 0.01 * config["num_stages"]


class _TableEvaluator:
    def __init__(self):
        self.seen: list[dict] = []

    def precompile(self, config):
        return None

    def evaluate(self, config):
        self.seen.append(config)
        ms = _synthetic_ms(config)
        return {"status": "ok", "ms": ms, "ms_p20": ms, "ms_p80": ms}


def test_irregular_positive_integers_stay_ordered_for_the_samplers():
    """Tile widths with 96 and 192 among the powers of two are an integer range over their rank (an
    ordinal the samplers model), not a categorical; a list with 0 (maxnreg: 0 means uncapped) is
    categorical; configs round-trip through the Optuna parameters."""
    space = SearchSpace({"BLOCK_N": [256, 32, 96, 64, 192, 128], "maxnreg": [0, 128, 168], "num_stages": [2, 3, 4]})
    widths, cap, _ = space.params
    assert (widths.name, widths.kind, widths.values) == ("rank_BLOCK_N", "rank", (32, 64, 96, 128, 192, 256))
    dist = space.distributions["rank_BLOCK_N"]
    assert isinstance(dist, optuna.distributions.IntDistribution) and (dist.low, dist.high, dist.step) == (0, 5, 1)
    assert cap.kind == "categorical"
    cfg = {"BLOCK_N": 192, "maxnreg": 128, "num_stages": 3}
    assert space.encode(cfg)["rank_BLOCK_N"] == 4 and space.decode(space.encode(cfg)) == cfg
    assert space.project({**cfg, "BLOCK_N": 80})["BLOCK_N"] == 96  # nearest on a log scale


@pytest.mark.parametrize("sampler", ["tpe", "gp", "random", "exhaustive"])
def test_search_spends_budget_only_on_new_valid_configs(sampler):
    fam, shape = kernels.get_family("gemm"), {"M": 37, "N": 29, "K": 45}
    valid = fam.configs(shape, "float16")
    budget = len(valid) if sampler == "exhaustive" else 12
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=make_sampler(sampler, 0, budget))
    ev = _TableEvaluator()
    order = list(valid) if sampler == "exhaustive" else None
    report = run_search(study, SearchSpace(fam.space(shape, "float16")), valid, lambda c: fam.reject(shape, "float16", c),
                        budget, ev, order=order, warm=[fam.default_config(shape, "float16")] if sampler == "tpe" else ())
    keys = [config_key(c) for c in ev.seen]
    assert len(keys) == len(set(keys)) == budget == report.new_trials
    assert all(fam.reject(shape, "float16", c) is None for c in ev.seen)
    assert len(counted(study.get_trials())) == budget
    if sampler == "exhaustive":
        assert set(keys) == {config_key(c) for c in valid} and report.exhausted
    if sampler == "tpe":
        assert ev.seen[0] == fam.default_config(shape, "float16")  # warm start comes first
    for t in study.get_trials():
        if result_of(t).get("status") == "rejected":
            assert fam.reject(shape, "float16", t.user_attrs["config"]) is not None


def test_warm_start_enqueues_default_then_nearest_cached_winners():
    fam = kernels.get_family("gemm")
    shape = {"M": 64, "N": 64, "K": 64}
    far = {**fam.default_config({"M": 1024, "N": 64, "K": 64}, "float16"), "BLOCK_M": 256, "GROUP_M": 1}
    near = {**fam.default_config(shape, "float16"), "BLOCK_K": 32, "num_stages": 2}
    entries = {cache.entry_key("gemm", "float16", s): _entry("gemm", "float16", s, c)
               for s, c in (({"M": 1024, "N": 64, "K": 64}, far), ({"M": 48, "N": 64, "K": 64}, near))}
    warm = warm_configs(fam, shape, "float16", entries)
    assert warm[:2] == [fam.default_config(shape, "float16"), near]
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=make_sampler("tpe", 0, 5))
    ev = _TableEvaluator()
    run_search(study, SearchSpace(fam.space(shape, "float16")), fam.configs(shape, "float16"),
               lambda c: fam.reject(shape, "float16", c), 3, ev, warm=warm)
    assert ev.seen[0] == warm[0] and ev.seen[1] == near
    assert ev.seen[2]["BLOCK_M"] == 64  # the far winner's 256 projected onto this shape's candidates


def test_trials_of_a_dead_process_are_marked_interrupted_and_rerun():
    fam, shape = kernels.get_family("gemm"), SHAPE
    space = SearchSpace(fam.space(shape, "float16"))
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=make_sampler("random", 0, 2))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = study.ask(space.distributions)
    orphan.set_user_attr("owner", {"host": __import__("socket").gethostname(), "pid": int(dead.stdout)})
    report = run_search(study, space, fam.configs(shape, "float16"), lambda c: fam.reject(shape, "float16", c), 2,
                        _TableEvaluator())
    assert report.interrupted == 1 and report.new_trials == 2
    assert result_of(study.get_trials()[0])["status"] == "interrupted" and fail_stale(study) == 0


def _write_entries(path: str, writer: int, barrier) -> None:
    barrier.wait()
    for i in range(8):
        cache.write(path, [_entry("gemm", "float16", {"M": 100 * writer + i, "N": 8, "K": 8}, {"w": writer, "i": i})])


def test_four_processes_writing_one_cache_lose_nothing(tmp_path):
    path = tmp_path / "cache.json"
    cache.write(path, [_entry("gemm", "float32", SHAPE, {"first": True})])
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_write_entries, args=(str(path), w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    entries = cache.read(path)
    assert len(entries) == 1 + 4 * 8
    assert {(e["config"]["w"], e["config"]["i"]) for e in entries.values() if "w" in e["config"]} == {
        (w, i) for w in range(4) for i in range(8)}


def test_corrupt_cache_file_is_named_and_left_byte_for_byte(tmp_path):
    path = tmp_path / "cache.json"
    path.write_bytes(b'{"format": 1, "entries": {"gemm/float16/K=64": {"con')
    before = path.read_bytes()
    named = re.escape(str(path))
    with pytest.raises(autotune.CacheFileError, match=named):
        cache.write(path, [_entry("gemm", "float16", SHAPE, {})])
    with pytest.raises(autotune.CacheFileError, match=named):
        autotune.lookup("gemm", SHAPE, "float16", cache_path=path)
    with pytest.raises(autotune.CacheFileError, match=named):
        autotune.tune("gemm", SHAPE, "float16", n_trials=1, cache_path=path, storage=tmp_path / "o.db")
    path.write_bytes(before + b"\x00")
    with pytest.raises(autotune.CacheFileError, match=named):
        autotune.tuned("gemm", cache_path=path).config_for(SHAPE, "float16")
    assert path.read_bytes() == before + b"\x00"
    path.write_text(json.dumps(["not", "a", "cache"]))
    with pytest.raises(autotune.CacheFileError, match="format"):
        cache.read(path)


def test_tuned_dispatch_uses_the_cached_config_once_and_falls_back(tmp_path, monkeypatch, device):
    fam = kernels.get_family("gemm")
    exact_shape = {**SHAPE, "b_transposed": True}
    chosen = next(c for c in fam.configs(exact_shape, "float16") if c != fam.default_config(exact_shape, "float16"))
    big = {"M": 256, "N": 48, "K": 64}
    big_cfg = next(c for c in fam.configs(big, "float32") if c["BLOCK_M"] == 128)
    path = tmp_path / "cache.json"
    cache.write(path, [_entry("gemm", "float16", exact_shape, chosen), _entry("gemm", "float32", big, big_cfg)])

    reads, calls = [], []
    real_read, real_call = cache.read, fam.call
    monkeypatch.setattr(cache, "read", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(fam, "call", lambda *a, config=None, **k: calls.append(config) or real_call(*a, config=config, **k))
    dispatch = autotune.TunedDispatch("gemm", cache_path=path)
    for dtype, m, want_config, source in [
        ("float16", 16, chosen, "exact"),
        ("float16", 16, chosen, "exact"),  # memoised: no second read
        ("float16", 18, chosen, "nearest"),  # log distance ln(18/16) = 0.12: near enough
        ("float16", 24, None, "default"),  # ln(24/16) = 0.41: beyond NEAREST_MAX_DISTANCE
        ("float32", 16, None, "default"),  # the nearest entry's BLOCK_M=128 is invalid for M=16
    ]:
        inputs = fam.make_inputs({**SHAPE, "M": m}, dtype, device, seed=m)
        out = dispatch(inputs["a"], inputs["b"])
        assert calls[-1] == want_config
        assert dispatch.config_for({**exact_shape, "M": m}, dtype) == (want_config, source)
        assert rel_error(out, fam.reference(inputs)) <= fam.tolerance(dtype, device)
    assert len(reads) == 1
    assert autotune.tuned("gemm", cache_path=path, max_distance=None).config_for(
        {**exact_shape, "M": 24}, "float16") == (chosen, "nearest")  # no limit: any neighbour
    assert autotune.tuned("gemm", cache_path=path) is autotune.tuned("gemm", cache_path=path)
    assert autotune.tuned("gemm", cache_path=tmp_path / "none.json").config_for(SHAPE, "float16") == (None, "default")


def test_tuned_dispatch_passes_over_a_neighbour_whose_config_the_shape_cannot_run(tmp_path):
    """The nearest entry (M 17) holds a config invalid at M 16 (BLOCK_M 128); the next nearest (M
    18), a valid one, is used: not the default. An exact entry just as invalid is passed over too;
    with no neighbours allowed, the default it is."""
    fam = kernels.get_family("gemm")
    shape = {**SHAPE, "M": 16, "b_transposed": True}
    invalid = next(c for c in fam.configs({**shape, "M": 256}, "float32") if c["BLOCK_M"] == 128)
    with pytest.raises(ValueError):
        fam.check_config(shape, "float32", invalid)
    valid = next(c for c in fam.configs(shape, "float32") if c != fam.default_config(shape, "float32"))
    path = tmp_path / "cache.json"
    cache.write(path, [_entry("gemm", "float32", {**shape, "M": 17}, invalid),
                       _entry("gemm", "float32", {**shape, "M": 18}, valid)])
    assert autotune.tuned("gemm", cache_path=path).config_for(shape, "float32") == (valid, "nearest")
    cache.write(path, [_entry("gemm", "float32", shape, invalid)])  # an exact entry, just as invalid
    assert len(cache.read(path)) == 3
    assert autotune.TunedDispatch("gemm", cache_path=path).config_for(shape, "float32") == (valid, "nearest")
    assert autotune.TunedDispatch("gemm", cache_path=path, nearest=False).config_for(shape, "float32") == (
        None, "default")


def test_family_references_resolve_back_to_the_family():
    gemm = kernels.get_family("gemm")
    assert families.reference("gemm") == families.reference(gemm) == "gemm"
    assert families.reference(faulty_family.FAMILY) == "faulty_family:FAMILY"
    assert families.resolve("faulty_family:FAMILY") is faulty_family.FAMILY
    unnamed = faulty_family.FaultyFamily()  # held by no module: travels pickled
    assert isinstance(families.resolve(families.reference(unnamed)), faulty_family.FaultyFamily)

    class Local(faulty_family.FaultyFamily):
        pass

    with pytest.raises(TypeError, match="Local"):
        families.reference(Local())
    with pytest.raises(TypeError, match="Family"):
        families.resolve(42)


def test_bad_arguments_are_named(tmp_path):
    kw = {"cache_path": tmp_path / "c.json", "storage": tmp_path / "o.db"}
    with pytest.raises(ValueError, match="sampler"):
        autotune.tune("gemm", SHAPE, "float16", sampler="annealing", **kw)
    with pytest.raises(ValueError, match="n_trials"):
        autotune.tune("gemm", SHAPE, "float16", n_trials=0, **kw)
    with pytest.raises(ValueError, match="no_such_family"):
        autotune.tune("no_such_family", SHAPE, "float16", **kw)
    with pytest.raises(TypeError, match="float64"):
        autotune.tune("gemm", SHAPE, "float64", **kw)
    with pytest.raises(ValueError, match="'K' is missing"):
        autotune.tune("gemm", {"M": 4, "N": 4}, "float16", **kw)


@pytest.mark.gpu
def test_tune_on_the_gpu_with_compile_helpers(tmp_path, device):
    res = autotune.tune("gemm", {"M": 256, "N": 512, "K": 512}, "bfloat16", n_trials=8, compile_workers=2,
                        cache_path=tmp_path / "cache.json", storage=tmp_path / "optuna.db")
    assert res.n_trials == 8 and res.entry["capability"][0] >= 7 and res.baseline_ms > 0
    fam = kernels.get_family("gemm")
    inputs = fam.make_inputs({"M": 256, "N": 512, "K": 512}, "bfloat16", device, seed=5)
    ref = fam.reference(inputs)
    out = autotune.tuned("gemm", cache_path=tmp_path / "cache.json")(inputs["a"], inputs["b"])
    assert rel_error(out, ref) <= fam.tolerance("bfloat16", device)
    torch.cuda.synchronize()

"""The search loop: Optuna proposes configs, an evaluator measures them, the study remembers.

Budget accounting. ``budget`` is the study's total number of *evaluated* trials: trials whose
config was compiled and run, whether it then passed (``status`` "ok") or failed ("failed": a
compile error, a wrong result, a crash, a hang). Everything else is free:
- a proposal that the family's constraints reject is recorded as a PRUNED trial (``status``
  "rejected", with the reason) before anything compiles;
- a proposal of a config already measured in this study is recorded with the earlier result
  (``status`` "duplicate") and not measured again;
- in both cases the nearest valid config not yet measured (see :class:`~autotune.space.SearchSpace`)
  is enqueued as the next trial, so every free proposal is followed by a useful one and the loop
  cannot stall on a sampler that keeps proposing invalid or known points.
A trial left RUNNING by a process that has died (an interrupted sweep) is marked FAIL with
``status`` "interrupted" and does not count: rerunning the same call runs only the missing trials,
and rerunning a finished one runs none. The search also stops when every valid config is measured.

The objective is the natural logarithm of the median time in ms (samplers model ratios of times,
which is how kernels differ); the time itself is in each trial's ``result`` user attribute.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import os
import random
import socket
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.space import Config, SearchSpace, config_key

SAMPLERS = ("tpe", "gp", "random", "exhaustive")
COUNTED = ("ok", "failed")


class Evaluator(Protocol):
    """Measures configs of one (family, shape, dtype)."""

    def precompile(self, config: Config) -> cf.Future | None:
        """Start compiling ``config`` in the background (a future to wait for), or None."""

    def evaluate(self, config: Config) -> dict[str, Any]:
        """``{"status": "ok", "ms", "ms_p20", "ms_p80", ...}`` or ``{"status": "failed", "reason"}``."""


def make_sampler(name: str, seed: int, budget: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called ``name`` (see :data:`SAMPLERS`).

    TPE is multivariate (it models the parameters jointly: tile sizes interact) with a constant
    liar, so that trials asked ahead of their results (the GPU's compile pipeline) spread out.
    Both TPE and GP start from a few random trials: a fifth of the budget, between 3 and 10.
    """
    startup = max(3, min(10, budget // 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)
        if name == "gp":
            try:
                import scipy  # noqa: F401  (Optuna's GPSampler optimises with scipy)
            except ImportError:
                raise ImportError("the 'gp' sampler needs scipy: pip install scipy") from None
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
        if name in ("random", "exhaustive"):
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")


def result_of(trial: FrozenTrial) -> dict[str, Any]:
    """The ``result`` user attribute of a trial ({} when it has none yet)."""
    return trial.user_attrs.get("result") or {}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that spent budget: their config was compiled and run."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and result_of(t).get("status") in COUNTED]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale(study: optuna.Study) -> int:
    """Mark FAIL ("interrupted") the RUNNING trials that a dead process on this host left behind.

    Trials of other hosts are left alone: they may be running now (a study shared through a
    database). Returns how many trials were marked.
    """
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner") or {}
        pid = owner.get("pid")
        if owner.get("host") == host and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
            study._storage.set_trial_user_attr(
                t._trial_id, "result", {"status": "interrupted", "reason": f"process {pid} stopped before the trial ended"}
            )
            study.tell(t.number, state=TrialState.FAIL)
            n += 1
    return n


@dataclass
class SearchReport:
    """What one search call did."""

    new_trials: int = 0  # evaluated in this call
    rejected: int = 0
    duplicates: int = 0
    interrupted: int = 0  # stale trials of dead processes marked at the start
    exhausted: bool = False  # every valid config has been measured
    outcomes: list[dict] = field(default_factory=list)


@dataclass
class _Pending:
    trial: optuna.Trial
    config: Config
    key: str
    compiling: cf.Future | None


def run_search(
    study: optuna.Study,
    space: SearchSpace,
    valid: list[Config],
    reject: Callable[[Config], str | None],
    budget: int,
    evaluator: Evaluator,
    *,
    warm: list[Config] = (),
    order: list[Config] | None = None,
    lookahead: int = 1,
    seed: int = 0,
    on_result: Callable[[dict], None] | None = None,
) -> SearchReport:
    """Run trials until the study has ``budget`` evaluated trials or every valid config is measured.

    ``valid`` lists every config the constraints allow; ``reject`` gives the reason a config is
    ruled out (None when valid). ``warm`` configs are projected onto the space and enqueued first
    (skipped when already in the study). ``order`` (the exhaustive sampler) makes every trial the
    next config of that list not yet measured. ``lookahead`` trials are asked ahead and compiled in
    the background while the evaluator times the oldest one. ``on_result`` sees each evaluated outcome.
    """
    report = SearchReport(interrupted=fail_stale(study))
    rng = random.Random(seed)
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    valid_keys = {config_key(c) for c in valid}
    done: dict[str, dict] = {}
    n_counted = 0
    for t in counted(study.get_trials(deepcopy=False)):
        done.setdefault(config_key(t.user_attrs["config"]), {**result_of(t), "value": t.value, "number": t.number})
        n_counted += 1
    waiting: collections.Counter[str] = collections.Counter()
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fixed = t.system_attrs.get("fixed_params") or {}
        if fixed.keys() == space.distributions.keys():
            waiting[config_key(space.decode(fixed))] += 1
    inflight: set[str] = set()

    def claimed(key: str) -> bool:
        return key in done or key in inflight or waiting[key] > 0

    def unmeasured() -> bool:
        return any(k not in done and k not in inflight for k in valid_keys)

    def enqueue(config: Config) -> None:
        study.enqueue_trial(space.encode(config), skip_if_exists=False)
        waiting[config_key(config)] += 1

    def enqueue_nearest(config: Config) -> None:
        free = [c for c in valid if not claimed(config_key(c))]
        target = space.nearest(config, free, rng)
        if target is not None:
            enqueue(target)

    for cfg in warm:
        projected = space.project(cfg)
        if projected is None:
            continue
        if config_key(projected) not in valid_keys:
            enqueue_nearest(projected)
        elif not claimed(config_key(projected)):
            enqueue(projected)

    def finish(trial: optuna.Trial, config: Config, result: dict, state: TrialState, value: float | None = None) -> None:
        trial.set_user_attr("config", config)
        trial.set_user_attr("result", result)
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)

    pending: collections.deque[_Pending] = collections.deque()
    try:
        while True:
            while (
                len(pending) < max(1, lookahead)
                and n_counted + len(pending) < budget
                and unmeasured()
            ):
                if order is not None and sum(waiting.values()) == 0:
                    nxt = next((c for c in order if not claimed(config_key(c))), None)
                    if nxt is None:
                        break
                    enqueue(nxt)
                trial = study.ask(space.distributions)
                trial.set_user_attr("owner", owner)
                config = space.decode(trial.params)
                key = config_key(config)
                if waiting[key] > 0:
                    waiting[key] -= 1  # this is (or stands for) a trial we enqueued
                    fresh = key not in done and key not in inflight
                else:
                    fresh = not claimed(key)
                if key not in valid_keys:
                    why = reject(config) or "not in the measured set"
                    finish(trial, config, {"status": "rejected", "reason": why}, TrialState.PRUNED)
                    report.rejected += 1
                    enqueue_nearest(config)
                elif not fresh:
                    prior = done.get(key)
                    result = {"status": "duplicate", "duplicate_of": prior["number"] if prior else None}
                    if prior is not None and prior.get("status") == "ok":
                        finish(trial, config, result, TrialState.COMPLETE, prior["value"])
                    else:
                        finish(trial, config, result, TrialState.FAIL)
                    report.duplicates += 1
                    enqueue_nearest(config)
                else:
                    inflight.add(key)
                    pending.append(_Pending(trial, config, key, evaluator.precompile(config)))
            if not pending:
                report.exhausted = not unmeasured()
                return report
            p = pending[0]
            if p.compiling is not None:
                # Only an accelerator: whatever the helper made of it, the timing worker's own
                # compile, check and run decide the trial (it loads the helper's kernel from disk).
                p.compiling.result()
            outcome = evaluator.evaluate(p.config)
            pending.popleft()
            inflight.discard(p.key)
            if outcome.get("status") == "ok":
                value = math.log(max(outcome["ms"], 1e-9))
                finish(p.trial, p.config, outcome, TrialState.COMPLETE, value)
            else:
                outcome = {"status": "failed", "reason": outcome.get("reason", "unknown failure")}
                value = None
                finish(p.trial, p.config, outcome, TrialState.FAIL)
            done[p.key] = {**outcome, "value": value, "number": p.trial.number}
            n_counted += 1
            report.new_trials += 1
            report.outcomes.append({**outcome, "config": p.config, "number": p.trial.number})
            if on_result is not None:
                on_result(outcome)
    except BaseException:
        for p in pending:
            if p.compiling is not None:
                p.compiling.cancel()
            finish(p.trial, p.config, {"status": "interrupted", "reason": "the search stopped before the trial ended"}, TrialState.FAIL)
        raise

"""Each autotune trial as it finishes, read from the Optuna study while ``autotune.tune`` runs.

``autotune.tune`` stores every evaluated trial in its Optuna storage (the ``result`` and ``config``
user attributes). A background thread polls that storage and hands each newly finished trial to a
callback: the W&B dashboard and the progress bar follow the sweep trial by trial, and the study
stays the single record of what ran (the same works for a study that other processes share).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from optuna.storages import BaseStorage
from optuna.trial import TrialState

from autotune.search import counted, result_of

POLL_S = 0.5


class TrialStream:
    """Context manager: while open, calls ``on_trial(row)`` once per evaluated trial of the study.

    ``row``: ``{"number", "status", "ms", "ms_p20", "ms_p80", "reason", "config"}``. Trials that
    were already in the study when the stream opened (a resumed study) are reported too, first.
    The last poll happens on exit, in the caller's thread, so no trial is missed.
    """

    def __init__(self, storage: BaseStorage, study_name: str, on_trial: Callable[[dict[str, Any]], None]):
        self.storage, self.study_name, self.on_trial = storage, study_name, on_trial
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trial-stream", daemon=True)

    def __enter__(self) -> "TrialStream":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Report the trials finished since the last poll, in trial order."""
        with self._lock:
            try:
                study_id = self.storage.get_study_id_from_name(self.study_name)
            except KeyError:
                return  # tune has not created the study yet
            trials = self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            for t in sorted(counted(trials), key=lambda t: t.number):
                if t.number in self.seen:
                    continue
                self.seen.add(t.number)
                res = result_of(t)
                self.on_trial({"number": t.number, "status": res.get("status"), "ms": res.get("ms"),
                               "ms_p20": res.get("ms_p20"), "ms_p80": res.get("ms_p80"),
                               "reason": res.get("reason"), "config": t.user_attrs.get("config")})

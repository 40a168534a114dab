"""Stop signals: Slurm's notice before it kills a job, or mpirun's SIGUSR1, ends the job at
the next boundary, or abandons the work in hand after a grace period."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable

from ..environment import DEFAULT_STOP_GRACE_S, seconds_from_env
from .ending import end_job
from .launcher import env_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class GracefulStop:
    """Inside `with GracefulStop() as stop:`, SIGTERM (Slurm's notice before it kills a job:
    time limit, preemption, scancel) or SIGUSR1 (which mpirun passes on to the ranks) asks
    the job to stop: the caller sees `stop.requested` and ends at its next boundary. If it
    has not within `grace_s` seconds, the job is abandoned, with nothing half written (hold
    `writing` while writing a result); what `before_abandoning` was given runs first."""

    EXIT_CODE = 128 + signal.SIGTERM

    def __init__(self, grace_s: float | None = None) -> None:
        self.grace_s = grace_s if grace_s is not None else seconds_from_env("STAR_ENGINE_STOP_GRACE",
                                                                             DEFAULT_STOP_GRACE_S)
        self.signal_name: str | None = None
        self.writing = threading.RLock()
        self._timer: threading.Timer | None = None
        self._before_abandoning: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._timer is not None:
            self._timer.cancel()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def before_abandoning(self, note: Callable[[], None]) -> None:
        """note() runs if the job is abandoned, from another thread, holding `writing`."""
        self._before_abandoning = note

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signal_name is not None:
            return
        self.signal_name = signal.Signals(signum).name
        self._timer = threading.Timer(self.grace_s, self._abandon)
        self._timer.daemon = True
        self._timer.start()

    def _abandon(self) -> None:
        rank = env_rank()
        if rank != 0:
            time.sleep(2.0)  # rank 0 speaks for the job, unless it is gone
        with self.writing:
            if self._before_abandoning is not None:
                try:
                    self._before_abandoning()
                except Exception as exc:  # noqa: BLE001 - the job ends all the same
                    sys.stderr.write(f"star_engine: rank {rank}: {type(exc).__name__}: {exc}\n")
            sys.stderr.write(f"star_engine: rank {rank}: {self.signal_name}: the work in hand did not finish "
                             f"within {self.grace_s:g} s (STAR_ENGINE_STOP_GRACE); abandoned, a rerun does it\n")
            end_job(self.EXIT_CODE, force=True)

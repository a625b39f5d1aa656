"""When to save a checkpoint because this process or its node is about to go away.

- Ray Train: a node hosting a worker is being drained as a preemption (spot reclaim, autoscaler
  downscale: GCS DrainNode with reason PREEMPTION and a deadline). Ray tells every worker through
  `ray.train.get_preemption_info()`; the loop saves one checkpoint and keeps training. Ray restarts the
  group when the deadline passes (or the node dies) and it resumes from that checkpoint. Returning
  from the train function instead would end the whole run as finished.
- torchrun or one process: SIGTERM (torchrun forwards it to every rank); the loop saves and stops.
"""

from __future__ import annotations

import signal
import threading

from .collectives import Collectives


class StopRequest:
    """Created once per run. Each step every rank calls `agreed` once, after the step's update."""

    def __init__(self, use_ray: bool):
        self.use_ray = use_ray
        self.reason = "preemption" if use_ray else "SIGTERM"
        # under Ray the run goes on until Ray restarts it; a SIGTERMed process has to go
        self.stops_the_run = not use_ray
        self._signalled = False
        self._answered = False
        # signal.signal works only in the main thread; Ray runs the train function in another thread
        if not use_ray and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_) -> None:
        self._signalled = True

    def requested_locally(self) -> bool:
        """This rank's view. Under Ray a barrier: every rank must call it the same number of times."""
        if self.use_ray:
            import ray.train

            return ray.train.get_preemption_info() is not None
        return self._signalled

    def agreed(self, collectives: Collectives) -> bool:
        """True on every rank at the first step at which any rank saw a request, False otherwise (one
        checkpoint per request is enough)."""
        if not collectives.any(self.requested_locally()) or self._answered:
            return False
        self._answered = True
        return True

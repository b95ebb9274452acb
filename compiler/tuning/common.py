"""What every part of tuning shares: its error and its constants."""

from __future__ import annotations

import tvm

from moetvm.errors import MoetvmError


DEFAULT_BUCKETS: tuple[int, ...] = (1, 32)
SIDECAR = "moetvm_tuning.json"  # our notes beside TVM's two database files
_FAILED_RUN = 1e9  # MetaSchedule records failed candidates with run_secs = 1e10
_MS_LOGGER = "tvm.s_tir.meta_schedule"
_GIVE_UP_AFTER = 3  # tasks in a row with no successful measurement before a tuning run stops


class TuningError(MoetvmError, RuntimeError):
    """Tuning cannot run here, or was asked for something it cannot do; the message says why.
    `report`: the TuneReport of a tuning run that ended with failed tasks, else None."""

    def __init__(self, message: str, *, report: "TuneReport | None" = None):
        super().__init__(message)
        self.report = report

"""TVM's JSON tuning database and our sidecar notes beside it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import tvm

from .common import SIDECAR, TuningError, _FAILED_RUN
from .targets import require_working_serialization, target_key
from .tasks import workload_key


_DB_FILES = ("database_workload.json", "database_tuning_record.json")


def open_database(work_dir: str | os.PathLike, *, create: bool = True):
    """TVM's JSONDatabase in `work_dir`. `create`: make the directory and its files when missing
    (tuning); otherwise (compiling with a database) a missing directory, one without TVM's two
    database files, or files TVM cannot read are a TuningError."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    work_dir = Path(work_dir)
    if not create:
        if not work_dir.exists():
            raise TuningError(f"tuning database {work_dir}: no such directory (write one with `moetvm tune`)")
        if not work_dir.is_dir():
            raise TuningError(f"tuning database {work_dir}: not a directory (give the directory `moetvm tune "
                              "--db` wrote)")
        missing = [f for f in _DB_FILES if not (work_dir / f).is_file()]
        if missing:
            raise TuningError(f"tuning database {work_dir}: not a tuning database (no {' and no '.join(missing)}; "
                              "write one with `moetvm tune`)")
    require_working_serialization()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return JSONDatabase(work_dir=str(work_dir), module_equality="structural")
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types for unreadable files
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise TuningError(f"tuning database {work_dir}: cannot be read ({type(e).__name__}: "
                          f"{lines[-1].strip() if lines else 'no message'})") from e


@dataclass
class _Entry:
    trials: int = 0  # records, failed candidates included
    valid: int = 0  # records of candidates that built and ran (MetaSchedule stores failures too)
    best: object = None  # TuningRecord with the lowest mean latency
    best_s: float = float("inf")


def _measured(run_secs) -> list[float] | None:
    """The times of a successful measurement; None for a failed one. MetaSchedule's AddToDatabase
    stores a candidate that failed to build or run with run_secs [1e10]."""
    secs = [float(s) for s in (run_secs or [])]
    return secs if secs and max(secs) < _FAILED_RUN else None


def _index(db) -> dict[tuple[str, str], _Entry]:
    """(workload key, target key) -> record counts and best valid record."""
    keys: dict = {}
    out: dict[tuple[str, str], _Entry] = {}
    for rec in db.get_all_tuning_records():
        wl = rec.workload
        if wl not in keys:
            keys[wl] = workload_key(wl.mod)
        tkey = target_key(rec.target) if rec.target is not None else ""
        entry = out.setdefault((keys[wl], tkey), _Entry())
        entry.trials += 1
        secs = _measured(rec.run_secs)
        if secs:
            entry.valid += 1
            mean = sum(secs) / len(secs)
            if mean < entry.best_s:
                entry.best, entry.best_s = rec, mean
    return out


def _read_sidecar(work_dir: Path) -> dict:
    path = Path(work_dir) / SIDECAR
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {"format": 1, "buckets": [], "workloads": {}}


def _write_sidecar(work_dir: Path, data: dict) -> None:
    path = Path(work_dir) / SIDECAR
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)

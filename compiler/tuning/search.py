"""The search: MetaSchedule with the XGBoost cost model, candidates measured here or on boards
through TVM's RPC tracker."""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import tvm

from .common import TuningError, _GIVE_UP_AFTER, _MS_LOGGER
from .targets import load_tensor_intrinsics, as_tvm_target, check_target, target_key
from .tasks import Task, _normalize_buckets, extract_tasks, symbolic_vars
from .database import _Entry, _index, _measured, _read_sidecar, _write_sidecar, open_database


def _build(mod, target, _params):
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin` (10-35 s in every
    fresh builder process; the builder pool restarts for each batch). Scheduled TIR already
    carries any tensorised code, so building needs no intrinsic registry."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _export_shared(mod, compiler: str) -> str:
    """Export a built candidate as a shared library made by `compiler` (cross builds for boards
    whose RPC server cannot link the default .tar)."""
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def _tracker_address(tracker: str) -> tuple[str, int]:
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TuningError(f"tracker must be HOST:PORT, got {tracker!r}")
    return host.strip("[]"), int(port)


def _last_line(text) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class _NotATracker(Exception):
    """Connected, but the peer did not complete TVM's tracker handshake (the message says how)."""


def _tracker_session(addr: tuple[str, int], timeout: float):
    """TVM's tracker client (tvm.rpc.connect_tracker's TrackerSession) with a socket timeout: its
    own connect retries a refused connection for 60 s and waits on a silent peer for ever."""
    from tvm.rpc import base
    from tvm.rpc.client import TrackerSession

    class _Session(TrackerSession):
        def _connect(self):  # TrackerSession._connect, with create_connection(timeout) for connect_with_retry
            sock = socket.create_connection(self._addr, timeout=timeout)
            try:
                sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            except (socket.timeout, TimeoutError):
                sock.close()
                raise _NotATracker(f"connected, but no answer to the tracker handshake within {timeout:g} s") from None
            except OSError as e:
                sock.close()
                raise _NotATracker(f"connected, but the handshake failed: {e.strerror or e}") from None
            if magic != base.RPC_TRACKER_MAGIC:
                sock.close()
                raise _NotATracker("not a TVM RPC tracker (wrong answer to its handshake)")
            self._sock = sock

    return _Session(addr)


def check_tracker(tracker: str, key: str, timeout: float = 10.0) -> None:
    """TuningError unless the TVM RPC tracker at "HOST:PORT" answers and gives a session on a
    device registered under `key`, each within `timeout` seconds. Run before tuning, so that a
    wrong address or key fails at once instead of after every candidate failed to measure."""
    addr = _tracker_address(tracker)
    where = f"tracker {tracker}"
    try:
        session = _tracker_session(addr, timeout)
    except (socket.timeout, TimeoutError):
        raise TuningError(f"{where}: cannot connect (no answer within {timeout:g} s)") from None
    except OSError as e:
        raise TuningError(f"{where}: cannot connect ({e.strerror or e})") from None
    except _NotATracker as e:
        raise TuningError(f"{where}: {e}") from None
    try:
        try:
            summary = session.summary()
        except (OSError, RuntimeError, ValueError) as e:
            raise TuningError(f"{where}: no summary from the tracker ({_last_line(e) or type(e).__name__})") from None
        registered = [str(s.get("key", "")).partition(":")[2] for s in summary.get("server_info", [])]
        keys = sorted(set(registered) - {""})
        if key not in keys:
            there = f"keys there: {', '.join(keys)}" if keys else "no device is registered"
            raise TuningError(f"{where}: no device registered under key {key!r} ({there})")
        # A session on a device, as MetaSchedule's RPC runner will ask for one: the tracker hands out
        # a free device (or queues the request), then the client connects to the device itself.
        box: dict = {}

        def request():
            try:
                box["session"] = session.request(key, priority=1, session_timeout=timeout, max_retry=1)
            except Exception as e:  # noqa: BLE001 - reported below
                box["error"] = e

        worker = threading.Thread(target=request, daemon=True)
        worker.start()
        worker.join(2 * timeout)
        if "session" in box:
            return
        error = box.get("error")
        if error is None or "timed out" in str(error):
            raise TuningError(f"{where}: no free device under key {key!r} within {timeout:g} s "
                              f"({registered.count(key)} registered, all busy or not answering)")
        raise TuningError(f"{where}: cannot open a session on a device under key {key!r} ({_last_line(error)})")
    finally:
        session.close()


def rpc_runner(tracker: str, key: str, *, session_timeout_sec: float = 60, number: int = 3, repeat: int = 1,
               min_repeat_ms: int = 100, max_workers: int = 1, check: bool = True, check_timeout: float = 10.0):
    """A MetaSchedule runner measuring on boards registered at a TVM RPC tracker ("HOST:PORT")
    under `key`. `check`: first make sure the tracker gives a device under `key` (`check_tracker`,
    TuningError if not, within `check_timeout` seconds); without it, building the runner does not
    contact the tracker."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    host, port = _tracker_address(tracker)
    if check:
        check_tracker(tracker, key, timeout=check_timeout)
    config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_priority=1,
                       session_timeout_sec=int(session_timeout_sec))
    evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, enable_cpu_cache_flush=False)
    return RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=max_workers)


def local_runner(*, number: int = 3, repeat: int = 1, min_repeat_ms: int = 40, timeout_sec: float = 30):
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner

    evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, enable_cpu_cache_flush=False)
    return LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator)


def _runs_here(target: tvm.target.Target) -> bool:
    triple = target.attrs.get("mtriple")
    if not triple:
        return True
    here = tvm.target.codegen.llvm_get_system_triple()
    return str(triple).split("-")[0] == here.split("-")[0]


@dataclass
class TaskResult:
    name: str
    key: str
    bucket: int | dict | None
    libraries: list[str]
    trials_before: int
    trials_run: int
    best_us: float | None
    skipped: bool
    error: str | None = None  # why no candidate of this run built and ran (the task is then not tuned)

    @property
    def trials(self) -> int:
        return self.trials_before + self.trials_run


@dataclass
class TuneReport:
    work_dir: str
    target: str
    trials_per_task: int
    tasks: list[TaskResult]
    seconds: float

    @property
    def trials_run(self) -> int:
        return sum(t.trials_run for t in self.tasks)

    @property
    def skipped(self) -> int:
        return sum(t.skipped for t in self.tasks)

    def as_dict(self) -> dict:
        return asdict(self) | {"trials_run": self.trials_run, "skipped": self.skipped}

    def __str__(self) -> str:
        lines = [f"{len(self.tasks)} tasks ({self.skipped} already tuned), {self.trials_run} new trials "
                 f"in {self.seconds:.1f}s -> {self.work_dir}"]
        for t in self.tasks:
            best = f"{t.best_us:.1f} us" if t.best_us is not None else "no valid candidate"
            lines.append(f"  {t.name}: {t.trials} trials, best {best}{' (skipped)' if t.skipped else ''}"
                         + (f", FAILED: {t.error}" if t.error else ""))
        return "\n".join(lines)


def _short_error(msg) -> str:
    """One line of a builder/runner error (they carry whole tracebacks): its first line and the
    last line naming an exception ("RPCRunner: An exception occurred: ValueError: Unable to
    connect to the tracker ..."), else its last line."""
    import re

    lines = [line.strip() for line in str(msg).strip().splitlines() if line.strip()]
    if not lines:
        return "no message"
    named = [line for line in lines[1:] if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    last = named[-1] if named else lines[-1]
    text = lines[0] if len(lines) == 1 or last in lines[0] else f"{lines[0].rstrip(':')}: {last.rstrip(':')}"
    return text if len(text) <= 300 else text[:297] + "..."


def _progress_callback(report: Callable[[int, int, float | None, str | None], None]):
    """A measure callback calling report(candidates, successful, best seconds, first error)
    after each batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            best, ok, error = None, 0, None
            for b, r in zip(builder_results, runner_results):
                secs = _measured(r.run_secs) if r.error_msg is None else None
                if secs:
                    ok += 1
                    mean = sum(secs) / len(secs)
                    best = mean if best is None else min(best, mean)
                elif error is None:
                    if b.error_msg is not None:
                        error = "build failed: " + _short_error(b.error_msg)
                    elif r.error_msg is not None:
                        error = "run failed: " + _short_error(r.error_msg)
                    else:
                        error = "run failed: no valid time measured"
            report(len(runner_results), ok, best, error)

    return _Progress()


def _population(trials: int) -> int:
    """The evolutionary search's population, scaled to the trials it feeds: MetaSchedule's 512
    (its default, kept from 64 trials up) sampled and evolved to measure 2 candidates cost 7 s per
    task, with a cost model that has nothing yet to rank them by."""
    return min(512, max(64, 8 * trials))


def tune(
    tasks: list[Task],
    target,
    work_dir: str | os.PathLike,
    trials_per_task: int,
    runner=None,
    progress: Callable[[str], None] | None = print,
    *,
    builder=None,
    cross_compiler: str | None = None,
    num_trials_per_iter: int = 64,
    seed: int | None = None,
) -> TuneReport:
    """Tune each task to `trials_per_task` measured candidates into the JSON database in
    `work_dir`. Tasks already holding that many successfully measured records (or tuned to it by
    an earlier run that measured at least one) are skipped; a partly tuned task gets only the
    missing trials. Records of candidates that failed to build or run (MetaSchedule stores them
    with run_secs 1e10) do not count: a task with only those is tuned again.

    A task none of whose candidates built and ran in this run is not noted as tuned; once every
    task was tried (or after three such tasks in a row from the start: a broken builder or
    runner), TuningError names them and the first error (`error.report`: the TuneReport).

    `runner`: None measures on this machine; pass `rpc_runner(tracker, key)` for a board (for
    a cross target, `cross_compiler` exports candidates as .so built by that compiler instead of
    the default .tar, which the board's RPC server must link itself)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    target = as_tvm_target(target)
    check_target(target)
    if trials_per_task < 1:
        raise TuningError("trials_per_task must be >= 1")
    if runner is None and not _runs_here(target):
        raise TuningError(f"target {target} does not run on this machine: pass runner=rpc_runner(tracker, key)")
    unique: dict[str, Task] = {}
    for task in tasks:  # the same kernel from two extract_tasks calls is tuned once
        unique.setdefault(task.key, task)
    tasks = list(unique.values())
    for task in tasks:
        if symbolic_vars(task.mod["main"]):
            raise TuningError(f"task {task.name} has symbolic dims, which MetaSchedule cannot tune: "
                              "extract_tasks binds them to token-count buckets")
    say = progress or (lambda _msg: None)
    work_dir = Path(work_dir)
    db = open_database(work_dir)
    tkey = target_key(target)
    sidecar = _read_sidecar(work_dir)
    tuned_to = sidecar["workloads"]
    start = time.perf_counter()

    index = _index(db)
    results: list[TaskResult] = []
    todo: list[tuple[Task, TaskResult]] = []
    for task in tasks:
        # Tuned = successful measurements only: MetaSchedule also records candidates that failed
        # to build or run (run_secs 1e10), and a task with nothing but those is retried.
        entry = index.get((task.key, tkey), _Entry())
        done_before = tuned_to.get(f"{task.key}|{tkey}", {}).get("trials", 0) if entry.valid else 0
        res = TaskResult(name=task.name, key=task.key, bucket=task.bucket, libraries=list(task.libraries),
                         trials_before=entry.valid, trials_run=0,
                         best_us=None if entry.best is None else entry.best_s * 1e6,
                         skipped=max(entry.valid, done_before) >= trials_per_task)
        results.append(res)
        if not res.skipped:
            todo.append((task, res))
    sidecar["buckets"] = _normalize_buckets(list(sidecar.get("buckets", []))
                                            + [t.bucket for t in tasks if t.bucket is not None])

    for i, res in enumerate(results):
        if res.skipped:
            best = f"{res.best_us:.1f} us" if res.best_us is not None else "none valid"
            say(f"[tune {i + 1}/{len(results)}] {res.name}: {res.trials_before} measured trials in the database "
                f"(>= {trials_per_task}), best {best}: skipped")

    if todo:
        load_tensor_intrinsics(target)
        cores = int(target.attrs.get("num-cores", 1) or 1)
        if builder is None:
            f_export = functools.partial(_export_shared, compiler=cross_compiler) if cross_compiler else None
            builder = ms.builder.LocalBuilder(max_workers=max(1, min(cores, os.cpu_count() or 1)), f_build=_build,
                                              f_export=f_export)
        if runner is None:
            runner = local_runner()
        console = logging.getLogger(_MS_LOGGER)
        old_level = console.level
        console.setLevel(logging.WARNING)  # MetaSchedule's console tables; its files under logs/ keep all
        try:
            loggers = get_loggers_from_work_dir(str(work_dir), [t.name for t, _ in todo])
        finally:
            console.setLevel(old_level)
        failed: list[TaskResult] = []
        attempted = 0
        for (task, res), logger in zip(todo, loggers):
            if len(failed) >= _GIVE_UP_AFTER and len(failed) == attempted:
                break  # every task so far failed entirely: the builder or runner is broken, not the kernels
            attempted += 1
            number = results.index(res) + 1
            remaining = trials_per_task - res.trials_before
            state = {"done": 0, "ok": 0, "error": None, "best": None if res.best_us is None else res.best_us / 1e6}

            def on_batch(n, ok, best, error, task=task, res=res, number=number, state=state):
                state["done"] += n
                state["ok"] += ok
                state["error"] = state["error"] or error
                if best is not None:
                    state["best"] = best if state["best"] is None else min(state["best"], best)
                best_txt = "none valid yet" if state["best"] is None else f"{state['best'] * 1e6:.1f} us"
                say(f"[tune {number}/{len(results)}] {task.name} (x{task.weight}): "
                    f"{res.trials_before + state['done']}/{trials_per_task} trials, best {best_txt}")

            context = ms.TuneContext(
                mod=task.mod, target=target, space_generator="post-order-apply",
                search_strategy=ms.search_strategy.EvolutionarySearch(population_size=_population(remaining)),
                task_name=task.name, logger=logger, rand_state=-1 if seed is None else seed, num_threads=cores,
            ).clone()
            say(f"[tune {number}/{len(results)}] {task.name} (x{task.weight}, {', '.join(task.libraries)}): "
                f"{remaining} trials ...")
            ms.tune_tasks(
                tasks=[context], task_weights=[1.0], work_dir=str(work_dir),
                max_trials_global=remaining, max_trials_per_task=remaining,
                num_trials_per_iter=max(1, min(num_trials_per_iter, remaining)),
                builder=builder, runner=runner, database=db,
                cost_model=ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores, tree_method="auto"),
                measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default"))
                + [_progress_callback(on_batch)],
                task_scheduler="round-robin",
            )
            res.trials_run = state["done"]
            if state["ok"]:  # noted as tuned to the requested count only when something was measured
                tuned_to[f"{task.key}|{tkey}"] = {"name": task.name, "bucket": task.bucket,
                                                   "trials": max(trials_per_task, res.trials_before)}
                _write_sidecar(work_dir, sidecar)
            else:
                res.error = state["error"] or "MetaSchedule produced no candidate to measure"
                failed.append(res)
                say(f"[tune {number}/{len(results)}] {task.name}: no candidate built and ran ({res.error}); "
                    "not recorded as tuned")
        index = _index(db)
        for res in results:
            entry = index.get((res.key, tkey))
            if entry is not None and entry.best is not None:
                res.best_us = entry.best_s * 1e6
    else:
        failed, attempted = [], 0
        _write_sidecar(work_dir, sidecar)
    report = TuneReport(work_dir=str(work_dir), target=str(target), trials_per_task=trials_per_task,
                        tasks=results, seconds=round(time.perf_counter() - start, 1))
    say(f"tuning: {len(results)} tasks, {report.skipped} already tuned, {report.trials_run} new trials, "
        f"{report.seconds:.1f}s")
    if failed:
        left = len(todo) - attempted
        names = ", ".join(r.name for r in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise TuningError(
            f"tuning failed: {len(failed)} of {attempted} tasks tuned here got no successful measurement "
            f"({names}; first error: {failed[0].error}); they are not recorded as tuned and the next run "
            "retries them" + (f"; stopped early, {left} tasks not tried" if left else ""),
            report=report)
    return report

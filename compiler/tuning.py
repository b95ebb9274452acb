"""MetaSchedule auto-tuning of the kernels the compiler emits, and use of the results at compile time.

Three steps, each usable on its own:

1. `extract_tasks(mods, target)`: legalise and fuse each Relax module exactly as the CPU pipeline
   does (`lower_for_tuning`), collect the TIR PrimFuncs the Relax functions call, and deduplicate
   them across functions and libraries by structural hash: E experts of one shape are one task.
2. `tune(tasks, target, work_dir, trials_per_task)`: MetaSchedule (evolutionary search, XGBoost
   cost model) into TVM's own JSON database under `work_dir` (`database_workload.json`,
   `database_tuning_record.json`). Resumable: a task already tuned to the requested trial count is
   skipped; only successful measurements count (a task whose candidates all failed to build or
   run is not tuned, and `tune` ends with TuningError). Local runner by default;
   `rpc_runner(tracker, key)` measures on a board instead, after `check_tracker` made sure the
   tracker gives a device.
3. `apply_database(work_dir)`: a pass for the compile pipeline, inserted right after legalisation
   (see `compiler/lowering.py`), that gives every PrimFunc with a record its tuned schedule and
   leaves the rest to our default schedules. `pass_.stats` counts tuned and default kernels.

Symbolic token counts. Our kernels take a symbolic token count `n`, and MetaSchedule cannot tune
those: task extraction accepts them, but tuning one fails (TVM 0.27: the first sampled tile of
the symbolic loop comes back as "infer" (-1), and replaying that trace in the evolutionary search
raises "Check failed: (old_rv != nullptr && new_rv != nullptr)"; behind that, the LLVM
post-processors reject any loop of non-constant extent, `DisallowDynamicLoop`). And the database
matches workloads by exact
structural equality, so a record tuned at n=32 never matches the symbolic kernel. We therefore
tune each symbolic kernel at fixed token-count *buckets* (default n=1 for decode, n=32 for
prefill), binding every symbolic dim to the bucket (`specialize`, structurally identical to what
Relax's BindSymbolicVars + legalisation produce). At compile time `apply_database` turns a
symbolic kernel with tuned buckets into one kernel that branches on n: `n == bucket` runs that
bucket's tuned static code on the caller's buffers, every other n runs our default schedule. So
token counts equal to a bucket get exactly the measured tuned kernel, and all others behave as
without tuning.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

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


# --- targets ---------------------------------------------------------------------------------
def as_tvm_target(target) -> tvm.target.Target:
    """A tvm Target from a Target, a JSON dict, or a moetvm DeployTarget."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    from moetvm.targets import DeployTarget

    if isinstance(target, DeployTarget):
        from .lowering import tvm_target

        return tvm_target(target)
    raise TypeError(f"expected a tvm Target, a target dict or a DeployTarget, got {type(target).__name__}")


def check_target(target: tvm.target.Target) -> None:
    """MetaSchedule needs `num-cores` on CPU targets (parallel extents, tuning threads)."""
    if target.kind.name == "llvm" and int(target.attrs.get("num-cores", 0) or 0) <= 0:
        raise TuningError(
            f"target {target} has no 'num-cores': MetaSchedule needs it to size parallel loops; "
            "add it to the target's JSON dict (e.g. \"num-cores\": 4)"
        )


def target_key(target: tvm.target.Target) -> str:
    """What must agree between a tuning record and a compile: the target minus its host."""
    d = dict(target.export())
    d.pop("host", None)
    d.pop("tag", None)

    def plain(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, tirx.IntImm):
            return int(v)
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        try:
            return [plain(x) for x in v]
        except TypeError:
            return str(v)

    return json.dumps({k: plain(v) for k, v in d.items()}, sort_keys=True)


# --- environment checks ----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _serialization_problem() -> str | None:
    """MetaSchedule's JSON database serialises IR with tvm-ffi's JSON graph writer. With
    apache-tvm 0.27.0.post1 and apache-tvm-ffi 0.1.15.x that writer crashes the process (SIGSEGV)
    on any IR node with a dtype field; 0.1.14.x works. Probe in a child process, once."""
    probe = "import tvm; tvm.ir.save_json(tvm.ir.PrimType('int32'))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return None
    return (
        f"tvm.ir.save_json crashes in this environment (exit {r.returncode}; apache-tvm {tvm.__version__}, "
        f"apache-tvm-ffi {getattr(tvm_ffi, '__version__', '?')}), so MetaSchedule's JSON database cannot be "
        "written. apache-tvm 0.27.0.post1 needs apache-tvm-ffi 0.1.14.x: pip install 'apache-tvm-ffi>=0.1.14,<0.1.15'"
    )


def require_working_serialization() -> None:
    problem = _serialization_problem()
    if problem:
        raise TuningError(problem)


def _load_tensor_intrinsics(target: tvm.target.Target) -> None:
    """MetaSchedule's CPU rules name x86/Arm tensor intrinsics (VNNI, dot-product), which must be
    registered first. `import tvm.s_tir.tensor_intrin` registers every backend's, CUDA's alone
    taking 10-35 s; for CPU targets load only the x86 and Arm ones (about 1.5 s). TuneContext then
    finds the package imported and does not import the rest; any submodule still imports on use."""
    name = "tvm.s_tir.tensor_intrin"
    if target.kind.name != "llvm":  # everything, as the package itself would (also after a CPU run)
        importlib.import_module(name)
        for sub in ("cuda", "arm_cpu", "x86", "rocm", "hexagon", "riscv_cpu"):
            importlib.import_module(f"{name}.{sub}")
        return
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)  # the package, without running its __init__
    sys.modules[name] = package
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


# --- lowering and symbolic shapes ------------------------------------------------------------
def lower_for_tuning(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as the CPU pipeline sees it right before scheduling (compiler/lowering.py:
    ConvertToDataflow, then library dispatch and legalisation + fusion), so the kernels tuned are
    the kernels compiled."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .lowering import legalize_passes  # with the canonical-form passes: same kernels, same hashes

    mod = relax.transform.ConvertToDataflow()(mod)
    with target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(target) + legalize_passes(cpu, target))(mod)


def _is_buffer(param) -> bool:
    return isinstance(param.ty, tirx.buffer.BufferType)


def symbolic_vars(func: tirx.PrimFunc) -> list[tirx.Var]:
    """The symbolic dims of a kernel: vars in its buffers' shapes and scalar shape parameters."""
    found: list[tirx.Var] = []

    def add(v):
        if not any(v.same_as(o) for o in found):
            found.append(v)

    for p in func.params:
        if _is_buffer(p):
            for d in p.shape:
                for v in tirx.analysis.undefined_vars(d, []) if not isinstance(d, tirx.IntImm) else []:
                    add(v)
        elif "int" in str(p.ty):
            add(p)
    return found


def bucket_values(func: tirx.PrimFunc, bucket) -> dict[str, int] | None:
    """Symbolic dim name -> value for `bucket`: an int binds every symbolic dim of the kernel to
    it; a mapping binds dims by name ("*" for the rest). None where a dim has no value."""
    values = {}
    for v in symbolic_vars(func):
        if isinstance(bucket, Mapping):
            value = bucket.get(v.name, bucket.get("*"))
            if value is None:
                return None
        else:
            value = bucket
        values[v.name] = int(value)
    return values


def bucket_label(bucket) -> str:
    """"n32" for an int bucket, "s10=1,s18=32" for a mapping."""
    if isinstance(bucket, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(bucket.items()))
    return f"n{int(bucket)}"


def _values_label(values: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def _bucket_sort_key(bucket):
    return (1, json.dumps(dict(bucket), sort_keys=True)) if isinstance(bucket, Mapping) else (0, int(bucket))


def _normalize_buckets(buckets) -> list:
    out = []
    for b in buckets:
        b = {str(k): int(v) for k, v in b.items()} if isinstance(b, Mapping) else int(b)
        if b not in out:
            out.append(b)
    return sorted(out, key=_bucket_sort_key)


def specialize(func: tirx.PrimFunc, bucket) -> tirx.PrimFunc | None:
    """`func` with its symbolic dims bound to `bucket` (see `bucket_values`): for an int, the
    kernel Relax's BindSymbolicVars + legalisation produce for the bound module (structurally
    equal). None where the bucket gives no value for a dim or the signature cannot be bound."""
    syms = symbolic_vars(func)
    if not syms:
        return func
    values = bucket_values(func, bucket)
    if values is None:
        return None
    mapping = {}
    for p in func.params:
        if _is_buffer(p):
            dims = list(p.shape)
            if not any(isinstance(d, tirx.Var) for d in dims):
                continue  # static, or only compound dims (n + past): substituted through the vars
            # Pure-var dims take their values; compound dims stay as they are (matched equal),
            # and are substituted once their vars are bound.
            shape = [tirx.IntImm(str(d.ty.dtype), values[d.name]) if isinstance(d, tirx.Var) else d for d in dims]
            mapping[p] = tirx.decl_buffer(shape, p.dtype, p.name, data_alignment=p.data_alignment,
                                          offset_factor=p.offset_factor, elem_offset=p.elem_offset)
        elif any(p.same_as(v) for v in syms):
            mapping[p] = tirx.IntImm(str(p.ty.dtype), values[p.name])
    try:
        out = func.specialize(mapping)
    except Exception:  # noqa: BLE001 - an exotic signature: leave the kernel to the defaults
        return None
    return None if symbolic_vars(out) else out


def normalize(func: tirx.PrimFunc) -> tvm.IRModule:
    """The workload form MetaSchedule tunes and its database keys on (TuneContext's normalisation)."""
    if not (func.attrs and "global_symbol" in func.attrs):
        func = func.with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func.with_attr("tirx.noalias", True)})


def workload_key(mod: tvm.IRModule) -> str:
    """The structural hash MetaSchedule's database stores for a workload (as a decimal string)."""
    return str(tvm_ffi.structural_hash(mod))


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]))


# --- task extraction -------------------------------------------------------------------------
@dataclass
class Task:
    """One distinct kernel to tune (at one token-count bucket, for symbolic kernels)."""

    name: str  # "<library>.<kernel>", plus "@<bucket>" ("@n32", "@s10=1,s18=32") for a symbolic kernel
    mod: tvm.IRModule  # the static workload ("main" PrimFunc) MetaSchedule tunes
    key: str  # workload_key(mod): MetaSchedule's structural hash
    weight: int  # call sites using it, over every function of every library
    libraries: list[str]  # the libraries it came from
    kernel: str  # PrimFunc name in the lowered module (first seen)
    bucket: int | dict | None = None  # the bucket its symbolic dims were bound to; None: a static kernel
    symbolic: list[str] = field(default_factory=list)  # names of those dims
    values: dict[str, int] = field(default_factory=dict)  # the value each got

    def __repr__(self) -> str:
        return f"Task({self.name!r}, key={self.key}, weight={self.weight}, libraries={self.libraries})"


def _call_sites(mod: tvm.IRModule) -> dict[str, int]:
    """PrimFunc name -> number of call_tir sites in the module's Relax functions."""
    counts: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            gv = expr.args[0]
            counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def extract_tasks(
    mods: Mapping[str, tvm.IRModule],
    target,
    buckets: Iterable[int | Mapping[str, int]] = DEFAULT_BUCKETS,
) -> list[Task]:
    """Distinct kernels of `mods` (library name -> Relax module), deduplicated by structural hash.

    Static kernels give one task each; symbolic ones one task per bucket (`specialize`). Weight =
    call sites over all functions and libraries, so E experts of one shape give one task of weight E
    per kernel when compiled together (compile_model builds one expert function per workload, so
    there the weight is the number of workloads sharing the kernel).

    A bucket is an int, binding every symbolic dim of a kernel (a kernel with batch, seq and past
    dims at bucket 32 is tuned for batch=seq=past=32, and its tuned code runs only when all three
    are 32), or a mapping from dim name to value ("*" for unnamed dims; kernels with a dim it
    does not cover are not tuned at that bucket). Call once per library for different buckets."""
    target = as_tvm_target(target)
    buckets = _normalize_buckets(buckets)
    tasks: dict[str, Task] = {}
    for library, mod in mods.items():
        lowered = lower_for_tuning(mod, target)
        sites = _call_sites(lowered)
        for gv, func in lowered.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func) or gv.name_hint not in sites:
                continue
            syms = symbolic_vars(func)
            variants = [(None, func)] if not syms else [(b, specialize(func, b)) for b in buckets]
            for bucket, static in variants:
                if static is None:
                    continue
                wl = normalize(static)
                key = workload_key(wl)
                task = tasks.get(key)
                if task is None:
                    name = f"{library}.{gv.name_hint}" + ("" if bucket is None else f"@{bucket_label(bucket)}")
                    tasks[key] = Task(name=name, mod=wl, key=key, weight=sites[gv.name_hint], libraries=[library],
                                      kernel=gv.name_hint, bucket=bucket, symbolic=[v.name for v in syms],
                                      values=bucket_values(func, bucket) if bucket is not None else {})
                else:
                    task.weight += sites[gv.name_hint]
                    if library not in task.libraries:
                        task.libraries.append(library)
    return list(tasks.values())


# --- the database ----------------------------------------------------------------------------
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


# --- tuning ----------------------------------------------------------------------------------
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
        _load_tensor_intrinsics(target)
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
                mod=task.mod, target=target, space_generator="post-order-apply", search_strategy="evolutionary",
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


# --- using the database at compile time ------------------------------------------------------
@dataclass
class TuningStats:
    """What `apply_database` did to the kernels of the modules it ran on."""

    tuned: dict[str, str] = field(default_factory=dict)  # kernel -> "exact" | "buckets n=1; n=32"
    default: list[str] = field(default_factory=list)  # kernels left entirely to the default schedules
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why its records went unused

    def summary(self) -> str:
        return f"{len(self.tuned)} kernels tuned, {len(self.default)} default"

    def as_dict(self) -> dict:
        return {"tuned": len(self.tuned), "default": len(self.default), "kernels": dict(self.tuned),
                **({"rejected": dict(self.rejected)} if self.rejected else {})}


def _root(func: tirx.PrimFunc) -> s_tir.SBlock:
    body = func.body
    if not (isinstance(body, s_tir.SBlockRealize) and body.block.name_hint == "root"):
        raise TuningError("kernel body is not a root block")
    return body.block


def _apply_record(rec, func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` scheduled by a record's trace (postprocessing included, as MetaSchedule's own
    Database.query_schedule does). Params stay the same objects."""
    sch = s_tir.Schedule(normalize(func))
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod["main"]


def _bucket_block(values: Mapping[str, int], scheduled: tirx.PrimFunc, symbolic: tirx.PrimFunc,
                  syms) -> s_tir.SBlockRealize:
    """The static kernel `scheduled` (a bucket specialisation of `symbolic`, scheduled) as a block
    inside `symbolic`: each buffer whose shape was bound is matched onto the leading region of
    the symbolic buffer (`T.match_buffer(x[0:32, 0:64], (32, 64))`), so the tuned code runs
    unchanged on the caller's tensors."""
    static_params = list(scheduled.params)
    matches = []
    for p in symbolic.params:
        if not _is_buffer(p):
            if any(p.same_as(v) for v in syms):
                continue  # a scalar shape parameter: specialisation removed it
        sp = static_params.pop(0)
        if sp.same_as(p):
            continue
        if not _is_buffer(sp) or len(sp.shape) != len(p.shape):
            raise TuningError("bucket kernel parameters do not line up with the symbolic kernel's")
        region = [tvm.ir.Range.from_min_extent(tirx.IntImm(str(e.ty.dtype) if hasattr(e, "ty") else "int64", 0), e)
                  for e in sp.shape]
        matches.append(s_tir.MatchBufferRegion(sp, tirx.BufferRegion(p, region)))
    if static_params:
        raise TuningError("bucket kernel has parameters the symbolic kernel lacks")
    root = _root(scheduled)
    block = s_tir.SBlock([], [], [], f"tuned_{_values_label(values)}", root.body, alloc_buffers=list(root.alloc_buffers),
                         match_buffers=matches)
    return s_tir.SBlockRealize([], True, block)


def _dispatch(symbolic: tirx.PrimFunc, fallback: tirx.PrimFunc, buckets: list[tuple[dict, tirx.PrimFunc]],
              syms) -> tirx.PrimFunc:
    """`if n == b1: <tuned for b1> elif n == b2: ... else: <fallback>` as one kernel (for several
    symbolic dims, a branch is taken when all equal their bucket values)."""
    base = _root(fallback)
    if len(fallback.params) != len(symbolic.params) or not all(a.same_as(b) for a, b in zip(fallback.params,
                                                                                              symbolic.params)):
        raise TuningError("default schedule changed the kernel's parameters")
    stmt = base.body
    for values, scheduled in reversed(buckets):
        cond = None
        for v in syms:
            c = tirx.EQ(v, tirx.IntImm(str(v.ty.dtype), values[v.name]))
            cond = c if cond is None else tirx.And(cond, c)
        stmt = tirx.IfThenElse(cond, _bucket_block(values, scheduled, symbolic, syms), stmt)
    root = s_tir.SBlock([], [], [], "root", stmt, alloc_buffers=list(base.alloc_buffers))
    return symbolic.with_body(s_tir.SBlockRealize([], True, root))


def _finish(new: tirx.PrimFunc, old: tirx.PrimFunc) -> tirx.PrimFunc:
    """The original function's attributes (and its lack of a global symbol), marked scheduled."""
    if old.attrs:
        new = new.with_attrs({**dict(new.attrs.items()), **dict(old.attrs.items())})
    if not (old.attrs and "global_symbol" in old.attrs) and new.attrs and "global_symbol" in new.attrs:
        new = new.without_attr("global_symbol")
    return new.with_attr("tirx.is_scheduled", True)


def _build_problem(func: tirx.PrimFunc, target: tvm.target.Target) -> str | None:
    try:
        tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        return None
    except Exception as e:  # noqa: BLE001 - reported; the kernel then keeps the default schedule
        lines = str(e).strip().splitlines()
        return f"does not build: {type(e).__name__}: {lines[-1] if lines else ''}"


@tvm.transform.module_pass(opt_level=0, name="MoetvmApplyTuningDatabase")
class ApplyTuningDatabase:
    """See `apply_database`."""

    def __init__(self, work_dir, target=None, buckets=None, verify: bool = True,
                 fallback: tvm.transform.Pass | None = None):
        self.work_dir = Path(work_dir)
        self.target = None if target is None else as_tvm_target(target)
        sidecar = _read_sidecar(self.work_dir)
        chosen = buckets if buckets is not None else (sidecar.get("buckets") or DEFAULT_BUCKETS)
        self.buckets = _normalize_buckets(chosen)
        self.verify = verify
        self.fallback = fallback
        self.stats = TuningStats()
        # A directory that is not a tuning database is a mistake (a typo, an artifact directory):
        # TuningError here rather than a compile that quietly uses no tuned kernel.
        self._index = _index(open_database(self.work_dir, create=False))

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=True)
        if target is None:
            raise TuningError("apply_database needs a target: pass one, or run the pass under `with target:`")
        tkey = target_key(target)
        updates = {}
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            try:
                new = self._schedule(gv.name_hint, func, target, tkey)
            except Exception as e:  # noqa: BLE001 - one odd kernel must not fail the compile
                self.stats.rejected[gv.name_hint] = f"{type(e).__name__}: {e}"
                new = None
            if new is None:
                self.stats.default.append(gv.name_hint)
            else:
                updates[gv] = _finish(new, func)
        if updates:
            mod = mod.clone()
            for gv, func in updates.items():
                mod.update_func(gv, func)
        return mod

    def _best(self, func: tirx.PrimFunc, tkey: str):
        wl = normalize(func)
        entry = self._index.get((workload_key(wl), tkey))
        if entry is None or entry.best is None or not tvm_ffi.structural_equal(entry.best.workload.mod, wl):
            return None
        return entry.best

    def _default_schedule(self, func: tirx.PrimFunc, target) -> tirx.PrimFunc:
        from .schedules import default_cpu_schedule

        fallback = self.fallback or default_cpu_schedule()
        with target:
            return fallback(tvm.IRModule({"main": func}))["main"]

    def _schedule(self, name: str, func: tirx.PrimFunc, target, tkey: str) -> tirx.PrimFunc | None:
        syms = symbolic_vars(func)
        if not syms:
            rec = self._best(func, tkey)
            if rec is None:
                return None
            self.stats.tuned[name] = "exact"
            return _apply_record(rec, func)
        symbolic = normalize(func)["main"]
        syms = symbolic_vars(symbolic)
        buckets: list[tuple[dict, tirx.PrimFunc]] = []
        for bucket in self.buckets:
            values = bucket_values(symbolic, bucket)
            if values is None or any(values == v for v, _ in buckets):
                continue
            static = specialize(symbolic, bucket)
            rec = None if static is None else self._best(static, tkey)
            if rec is not None:
                buckets.append((values, _apply_record(rec, static)))
        if not buckets:
            return None
        new = _dispatch(symbolic, self._default_schedule(symbolic, target), buckets, syms)
        if self.verify:
            problem = _build_problem(new, target)
            if problem:
                self.stats.rejected[name] = problem
                return None
        self.stats.tuned[name] = "buckets " + "; ".join(_values_label(v) for v, _ in buckets)
        return new


def apply_database(work_dir: str | os.PathLike, target=None, *, buckets=None,
                   verify: bool = True, fallback: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """A module pass for the compile pipeline, to run right after legalisation and fusion and
    before the default schedules: every PrimFunc with a record in the database at `work_dir` (for
    this target) gets its tuned schedule and is marked `tirx.is_scheduled`, so the default
    schedules skip it; the others are left alone (the default schedules take them). TuningError
    (here, before anything is compiled) when `work_dir` does not exist or is not a tuning database;
    `open_database(work_dir, create=False)` makes the same check on its own.

    Static kernels take their best record as is. A symbolic kernel becomes one kernel that
    branches on its token count: `n == bucket` runs that bucket's tuned code (the static
    schedule, on the leading rows of the caller's buffers), any other n the default schedule
    (`fallback`, by default compiler/schedules.py's). `buckets` defaults to those recorded by
    `tune` in the database directory. `verify` compiles each dispatching kernel once, so one that
    cannot build falls back to the default instead of failing the compile. `target` defaults to
    the pipeline's current target.

    After the pipeline ran, `pass_.stats` (a TuningStats) tells what happened:
    `pass_.stats.summary()` -> "N kernels tuned, M default"."""
    return ApplyTuningDatabase(work_dir, target, buckets, verify, fallback)

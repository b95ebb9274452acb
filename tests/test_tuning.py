"""MetaSchedule tuning (compiler/tuning.py) with real TVM: task deduplication, a tiny tuning run
into TVM's JSON database, resuming it, and compiling with the database applied.

Trial counts are tiny (8 per task, two tasks): about a minute on two cores."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tvm
from tvm import relax, tirx

from moetvm.compiler import tuning
from moetvm.compiler.lowering import relax_pipeline
from moetvm.verify import relative_error

pytestmark = pytest.mark.slow

D_MODEL, D_FF = 64, 128
TRIALS = 8


def swiglu(name: str, d_model: int = D_MODEL, d_ff: int = D_FF) -> relax.Function:
    """An expert-like SwiGLU kernel: (silu(x @ w_gate) * (x @ w_up)) @ w_down, weights stored
    (in, out) and passed as parameters, symbolic token count, as compiler/frontend.py emits it."""
    n = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, d_model), "float32"))
    w_gate = relax.Var("w_gate", relax.TensorType((d_model, d_ff), "float32"))
    w_up = relax.Var("w_up", relax.TensorType((d_model, d_ff), "float32"))
    w_down = relax.Var("w_down", relax.TensorType((d_ff, d_model), "float32"))
    with bb.function(name, [x, w_gate, w_up, w_down]):
        with bb.dataflow():
            gate = bb.emit(relax.op.matmul(x, w_gate))
            act = bb.emit(relax.op.multiply(gate, relax.op.sigmoid(gate)))
            up = bb.emit(relax.op.matmul(x, w_up))
            out = bb.emit_output(relax.op.matmul(relax.op.multiply(act, up), w_down))
        bb.emit_func_output(out)
    return bb.get()[name].with_attr("global_symbol", name)


def experts_module(count: int, **shape) -> tvm.IRModule:
    return tvm.IRModule({f"expert_{i}": swiglu(f"expert_{i}", **shape) for i in range(count)})


def reference(x, w_gate, w_up, w_down):
    g = x @ w_gate
    return ((g / (1.0 + np.exp(-g))) * (x @ w_up)) @ w_down


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 2})


def test_extract_tasks_deduplicates_identical_experts(target):
    tasks = tuning.extract_tasks({"experts": experts_module(4)}, target, buckets=(1, 32))
    lowered = tuning.lower_for_tuning(experts_module(4), target)
    kernels = sorted(gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc))
    assert len(kernels) == 3  # gate matmul fused with silu*up, up matmul, down matmul
    # One task per distinct kernel and bucket, not per expert; each used by all four experts.
    assert len(tasks) == len(kernels) * 2
    assert sorted({t.kernel for t in tasks}) == kernels
    assert {t.bucket for t in tasks} == {1, 32}
    assert all(t.weight == 4 and t.libraries == ["experts"] for t in tasks)
    assert len({t.key for t in tasks}) == len(tasks)
    for t in tasks:  # what MetaSchedule will tune: static shapes, bucket bound
        assert not tuning.symbolic_vars(t.mod["main"])
        assert t.symbolic == ["n"]

    # Across libraries: a same-shape expert elsewhere joins the tasks; another shape adds its own.
    more = tvm.IRModule({"same": swiglu("same"), "wider": swiglu("wider", d_ff=2 * D_FF)})
    both = tuning.extract_tasks({"experts": experts_module(4), "more": more}, target, buckets=(32,))
    shared = [t for t in both if t.libraries == ["experts", "more"]]
    assert len(shared) == 3 and all(t.weight == 5 for t in shared)
    assert len(both) == 6 and all(t.weight == 1 for t in both if t not in shared)


def test_bucket_specialization_matches_relax_binding(target):
    """specialize() must give exactly the kernel Relax produces for a module bound to n=32, or the
    tuned records would never match."""
    import tvm_ffi

    module = experts_module(1)
    symbolic = tuning.lower_for_tuning(module, target)
    bound = tuning.lower_for_tuning(relax.transform.BindSymbolicVars({"n": 32})(module), target)
    for gv, func in symbolic.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert tvm_ffi.structural_equal(tuning.specialize(func, 32), bound[gv.name_hint])


def test_buckets_bind_several_symbolic_dims(target):
    """Kernels of the dense segments have several symbolic dims (batch, seq, past), some only in
    compound shapes such as past + seq; an int bucket binds them all, a mapping by name."""
    n, m = tirx.Var("n", "int64"), tirx.Var("m", "int64")
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((n, 8), "float32"))
    b = relax.Var("b", relax.TensorType((m, 8), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            cat = bb.emit(relax.op.concat([a, b], axis=0))
            out = bb.emit_output(relax.op.sum(relax.op.exp(cat), axis=0))
        bb.emit_func_output(out)
    tasks = tuning.extract_tasks({"lib": bb.get()}, target, buckets=(4, {"n": 1, "m": 32}, {"n": 2}))
    kernels = {t.kernel for t in tasks}
    assert len(kernels) >= 2 and all(not tuning.symbolic_vars(t.mod["main"]) for t in tasks)
    assert {tuple(sorted(t.values.items())) for t in tasks} == {(("m", 4), ("n", 4)), (("m", 32), ("n", 1))}
    assert not any(t.bucket == {"n": 2} for t in tasks)  # does not say what m is


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory, target):
    problem = tuning._serialization_problem()
    if problem:
        pytest.skip(problem)
    tasks = tuning.extract_tasks({"experts": experts_module(2)}, target, buckets=(1, 32))
    down = [t for t in tasks if t.kernel == "matmul1"]  # the down projection, at n=1 and n=32
    assert len(down) == 2
    work_dir = tmp_path_factory.mktemp("tuning")
    lines: list[str] = []
    report = tuning.tune(down, target, work_dir, trials_per_task=TRIALS, progress=lines.append, seed=7)
    return work_dir, down, report, lines


def test_tune_writes_tvm_json_database(tuned_db, target):
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    work_dir, tasks, report, lines = tuned_db
    assert report.trials_run == 2 * TRIALS and report.skipped == 0
    assert all(r.trials == TRIALS and r.best_us is not None and r.best_us > 0 for r in report.tasks)
    assert any("trials, best" in line for line in lines)

    # TVM's own format: one JSON array per line, [shash, base64 IR] and [workload index, record].
    workloads = [json.loads(line) for line in (work_dir / "database_workload.json").read_text().splitlines()]
    records = [json.loads(line) for line in (work_dir / "database_tuning_record.json").read_text().splitlines()]
    assert sorted(w[0] for w in workloads) == sorted(t.key for t in tasks)
    assert len(records) == 2 * TRIALS
    assert all(isinstance(r[0], int) and len(r[1]) == 4 for r in records)

    db = JSONDatabase(work_dir=str(work_dir))
    assert len(db.get_all_tuning_records()) == 2 * TRIALS
    for task in tasks:
        assert db.has_workload(task.mod)
        best = db.query_tuning_record(task.mod, target, "main")
        assert best is not None and float(best.run_secs[0]) < 1e9


def test_tune_again_is_a_no_op(tuned_db, target):
    work_dir, tasks, _, _ = tuned_db
    before = (work_dir / "database_tuning_record.json").read_text()
    report = tuning.tune(tasks, target, work_dir, trials_per_task=TRIALS, progress=None)
    assert report.trials_run == 0 and report.skipped == len(tasks)
    assert (work_dir / "database_tuning_record.json").read_text() == before


def test_compile_with_database_uses_tuned_kernels(tuned_db, target):
    work_dir, _, _, _ = tuned_db
    module = experts_module(2)

    # The pass on its own: the down projection becomes one kernel branching on the token count.
    apply = tuning.apply_database(work_dir, target)
    scheduled = apply(tuning.lower_for_tuning(module, target))
    assert apply.stats.tuned == {"matmul1": "buckets n=1; n=32"}
    assert sorted(apply.stats.default) == ["fused_matmul_tir_sigmoid_multiply_multiply", "matmul"]
    assert apply.stats.summary() == "1 kernels tuned, 2 default"
    text = scheduled["matmul1"].script()
    assert 'T.sblock("tuned_n=1")' in text and 'T.sblock("tuned_n=32")' in text
    assert scheduled["matmul1"].attrs["tirx.is_scheduled"]

    # In the compile pipeline, against numpy: tuned code at n=1 and n=32, default code otherwise.
    apply = tuning.apply_database(work_dir)  # target: the pipeline's
    executable = tvm.compile(relax.transform.ConvertToDataflow()(module), target,
                             relax_pipeline=relax_pipeline(target, apply))
    assert apply.stats.summary() == "1 kernels tuned, 2 default"
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype("float32") * 0.2
               for s in [(D_MODEL, D_FF), (D_MODEL, D_FF), (D_FF, D_MODEL)]]
    for n in (1, 5, 32, 40):
        x = rng.standard_normal((n, D_MODEL)).astype("float32")
        out = vm["expert_1"](*[tvm.runtime.tensor(a) for a in [x, *weights]]).numpy()
        ref = reference(x.astype("float64"), *(w.astype("float64") for w in weights))
        assert relative_error(out, ref) < 1e-5, n


def test_apply_database_without_records_changes_nothing(tmp_path, target):
    tuning.open_database(tmp_path)  # a database (TVM's two files) without a record
    apply = tuning.apply_database(tmp_path, target)
    lowered = tuning.lower_for_tuning(experts_module(1), target)
    import tvm_ffi

    assert tvm_ffi.structural_equal(apply(lowered), lowered)
    assert apply.stats.summary() == "0 kernels tuned, 3 default"


def test_compile_database_that_is_missing_or_not_a_database_is_an_error(tmp_path):
    with pytest.raises(tuning.TuningError, match=r"tuning database .*/nope: no such directory"):
        tuning.apply_database(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(tuning.TuningError, match="not a directory"):
        tuning.apply_database(tmp_path / "file")
    with pytest.raises(tuning.TuningError, match="not a tuning database .no database_workload.json"):
        tuning.apply_database(tmp_path)  # an existing directory without TVM's database files
    assert not (tmp_path / "database_workload.json").exists()  # and it was not made into one
    tuning.open_database(tmp_path)
    (tmp_path / "database_workload.json").write_text("not json\n")
    with pytest.raises(tuning.TuningError, match="cannot be read"):
        tuning.apply_database(tmp_path)


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracker_fails_before_any_tuning_from_cli(tmp_path):
    """moetvm tune --tracker at a port nothing listens on: exit 1 with one line naming the
    address and the cause, before the model is prepared; the database directory stays empty."""
    import subprocess
    import sys
    import time

    port = _unused_port()
    db = tmp_path / "db"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moetvm.cli", "tune", "reference", "--trials", "2", "--db", str(db),
                           "--only", "routers", "--tracker", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"tracker 127.0.0.1:{port}: cannot connect (Connection refused)" in proc.stderr
    assert "Traceback" not in proc.stderr and "[tune" not in proc.stderr
    assert not db.exists() or not any(db.iterdir())
    assert took < 120, took  # the interpreter and imports; the check itself is immediate

    # The same through the API, timed on its own: TuningError at once, not TVM's 60 s of retries.
    start = time.perf_counter()
    with pytest.raises(tuning.TuningError, match=rf"tracker 127.0.0.1:{port}: cannot connect \(Connection refused\)"):
        tuning.rpc_runner(f"127.0.0.1:{port}", "host")
    assert time.perf_counter() - start < 5


def test_tracker_without_a_device_under_the_key_is_refused():
    """A real TVM tracker (in-process, no board registered): a missing key is an error, with the
    keys the tracker has; a registered but busy board is an error after the short timeout."""
    import time

    from tvm import rpc
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9290, port_end=9390, silent=True)
    server = None
    try:
        address = f"127.0.0.1:{tracker.port}"
        with pytest.raises(tuning.TuningError, match=rf"tracker {address}: no device registered under key 'rasp4' "
                                                     r"\(no device is registered\)"):
            tuning.check_tracker(address, "rasp4", timeout=2)
        server = Server(host="127.0.0.1", port=9390, port_end=9490, key="testboard",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
        deadline = time.time() + 30
        while "testboard" not in rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"]:
            assert time.time() < deadline, "the RPC server did not register"
            time.sleep(0.2)
        with pytest.raises(tuning.TuningError, match=r"no device registered under key 'rasp4' \(keys there: testboard\)"):
            tuning.rpc_runner(address, "rasp4", check_timeout=2)
        tuning.check_tracker(address, "testboard", timeout=5)  # a free board: fine
        busy = rpc.connect_tracker("127.0.0.1", tracker.port).request("testboard")
        start = time.perf_counter()
        with pytest.raises(tuning.TuningError, match=r"no free device under key 'testboard' within 1 s"):
            tuning.check_tracker(address, "testboard", timeout=1)
        assert time.perf_counter() - start < 5
        del busy
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()


def test_failed_measurements_are_not_recorded_as_tuned(tmp_path, target):
    """Every candidate fails (measured through a tracker nobody listens at; built by a cross
    compiler that does not exist): TuningError naming the task and the first error, nothing noted
    as tuned, and the next run tunes the task again instead of skipping it."""
    problem = tuning._serialization_problem()
    if problem:
        pytest.skip(problem)
    task = [t for t in tuning.extract_tasks({"experts": experts_module(1)}, target, buckets=(1,))
            if t.kernel == "matmul1"]
    assert len(task) == 1
    name = task[0].name

    runner = tuning.rpc_runner(f"127.0.0.1:{_unused_port()}", "host", check=False, session_timeout_sec=2)
    with pytest.raises(tuning.TuningError, match=rf"1 of 1 tasks .* no successful measurement \({name}; first error: "
                                                 r"run failed: RPCRunner: .*Unable to connect to the tracker") as failed:
        tuning.tune(task, target, tmp_path, trials_per_task=1, runner=runner, progress=None, seed=3)
    assert failed.value.report.tasks[0].error.startswith("run failed")
    with pytest.raises(tuning.TuningError, match=r"first error: build failed: .*No such file or directory: "
                                                 r"'/nonexistent/cc'.*the next run retries them"):
        tuning.tune(task, target, tmp_path, trials_per_task=1, cross_compiler="/nonexistent/cc", progress=None, seed=3)

    # MetaSchedule recorded the failures (run_secs 1e10); none of them counts as a measurement.
    records = [json.loads(line) for line in (tmp_path / "database_tuning_record.json").read_text().splitlines()]
    assert len(records) == 2 and all(min(r[1][1]) >= 1e9 for r in records)
    sidecar = json.loads((tmp_path / tuning.SIDECAR).read_text()) if (tmp_path / tuning.SIDECAR).exists() else {}
    assert not sidecar.get("workloads")
    apply = tuning.apply_database(tmp_path, target)
    apply(tuning.lower_for_tuning(experts_module(1), target))
    assert apply.stats.summary() == "0 kernels tuned, 3 default"

    lines: list[str] = []
    report = tuning.tune(task, target, tmp_path, trials_per_task=1, progress=lines.append, seed=3)
    assert report.skipped == 0 and report.trials_run == 1, lines
    assert report.tasks[0].best_us is not None and report.tasks[0].error is None
    again = tuning.tune(task, target, tmp_path, trials_per_task=1, progress=None)
    assert again.skipped == 1 and again.trials_run == 0


def test_rpc_runner_is_built_from_tracker_and_key():
    runner = tuning.rpc_runner("127.0.0.1:9190", "rasp4", check=False)
    assert runner.rpc_config.tracker_host == "127.0.0.1"
    assert runner.rpc_config.tracker_port == 9190
    assert runner.rpc_config.tracker_key == "rasp4"
    with pytest.raises(tuning.TuningError):
        tuning.rpc_runner("no-port", "rasp4")


def test_target_without_num_cores_is_refused():
    with pytest.raises(tuning.TuningError, match="num-cores"):
        tuning.check_target(tvm.target.Target({"kind": "llvm"}))


@pytest.mark.slow
def test_tune_compile_verify_reference_from_cli(tmp_path):
    """The user's flow: tune (experts only, tiny trial count), re-run (no new trials), compile
    with the database (tuned kernels are picked, the manifest says how many), verify numerics."""
    import json
    import subprocess
    import sys

    def moetvm(*args):
        proc = subprocess.run([sys.executable, "-m", "moetvm.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    db = tmp_path / "db"
    first = moetvm("tune", "reference", "--trials", "2", "--db", db, "--only", "experts")
    # 32 experts of one shape: one workload; its matmuls are hand-scheduled GEMV kernels (not
    # tuned), the rest of its kernels (SiLU x up, the fused k-expert sum) at 2 buckets each.
    import re

    tasks = int(re.search(r"(\d+) tasks \(0 already tuned\)", first.stdout).group(1))
    assert tasks >= 2
    assert (db / "database_workload.json").exists() and (db / "database_tuning_record.json").exists()
    again = moetvm("tune", "reference", "--trials", "2", "--db", db, "--only", "experts")
    assert f"{tasks} tasks ({tasks} already tuned), 0 new trials" in again.stdout
    out = tmp_path / "tuned"
    compiled = moetvm("compile", "reference", "-o", out, "--tuning-db", db)
    info = json.loads((out / "manifest.json").read_text())["compile_info"]["tuning"]
    assert info["tuned"] >= 1 and f"{info['tuned']} kernels tuned, {info['default']} default" in compiled.stderr
    report = json.loads(moetvm("verify", out, "--windows", "2", "--generate", "8", "--json").stdout)
    assert report["ok"], report

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
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5, n


def test_apply_database_without_records_changes_nothing(tmp_path, target):
    apply = tuning.apply_database(tmp_path, target)  # empty directory: no database at all
    lowered = tuning.lower_for_tuning(experts_module(1), target)
    import tvm_ffi

    assert tvm_ffi.structural_equal(apply(lowered), lowered)
    assert apply.stats.summary() == "0 kernels tuned, 3 default"


def test_rpc_runner_is_built_from_tracker_and_key():
    runner = tuning.rpc_runner("127.0.0.1:9190", "rasp4")
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
    assert "6 tasks (0 already tuned)" in first.stdout  # 32 experts of one shape: 3 kernels x 2 buckets
    assert (db / "database_workload.json").exists() and (db / "database_tuning_record.json").exists()
    again = moetvm("tune", "reference", "--trials", "2", "--db", db, "--only", "experts")
    assert "6 tasks (6 already tuned), 0 new trials" in again.stdout
    out = tmp_path / "tuned"
    compiled = moetvm("compile", "reference", "-o", out, "--tuning-db", db)
    info = json.loads((out / "manifest.json").read_text())["compile_info"]["tuning"]
    assert info["tuned"] >= 3 and f"{info['tuned']} kernels tuned, {info['default']} default" in compiled.stderr
    report = json.loads(moetvm("verify", out, "--windows", "2", "--generate", "8", "--json").stdout)
    assert report["ok"], report

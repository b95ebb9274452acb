"""MetaSchedule auto-tuning of the kernels the compiler emits, and use of the results at compile time.

The package, one module per job: common (TuningError, constants), targets (keys, environment
checks), tasks (lowering with the compile's own pass list, buckets, extraction), database
(TVM's JSON database and our sidecar), search (MetaSchedule + XGBoost, local or RPC runners),
apply (the compile-time pass).

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
without tuning."""

from __future__ import annotations

from .common import DEFAULT_BUCKETS, SIDECAR, TuningError  # noqa: F401
from .targets import _serialization_problem, as_tvm_target, check_target, load_tensor_intrinsics, require_working_serialization, target_key  # noqa: F401
from .tasks import Task, bucket_label, bucket_values, extract_tasks, lower_for_tuning, normalize, specialize, symbolic_vars, workload_key  # noqa: F401
from .database import open_database  # noqa: F401
from .search import TaskResult, TuneReport, check_tracker, local_runner, rpc_runner, tune  # noqa: F401
from .apply import ApplyTuningDatabase, TuningStats, apply_database  # noqa: F401

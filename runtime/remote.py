"""`moetvm deploy`: run an artifact on a board through TVM RPC (both ends live here).

TVM's RPC server gives clients file upload and module loading; this adds one function,
`moetvm.board.run`, which unpacks an uploaded artifact and runs it with this runtime (experts
cached on the board, under its memory budget), returning the same report as `moetvm run`.
Boards register with TVM's RPC tracker under a key, so a farm of boards works unchanged.

Board:   python -m moetvm.runtime.remote --host 127.0.0.1 --port 9090 [--tracker HOST:PORT --key KEY]
Host:    deploy(artifact_dir, rpc="HOST:PORT" | tracker="HOST:PORT", key=KEY, ...)
"""

from __future__ import annotations

from moetvm.errors import MoetvmError
import argparse
import json
import platform
import signal
import sys
import tarfile
import time
from pathlib import Path

RUN_FUNCTION = "moetvm.board.run"



def run_uploaded(archive: str, request: str) -> str:
    """Unpack `archive` (a tar uploaded into this session's work dir) and generate."""
    from moetvm.runtime import load_model

    req = json.loads(request)
    t0 = time.perf_counter()
    target = Path(archive).with_suffix("")
    _safe_extract(archive, target)
    model = load_model(target, cache_budget=req["cache_budget"])
    load_s = time.perf_counter() - t0
    new = model.generate(req["prompt_ids"], req["max_new_tokens"])
    report = {"new_ids": new, **model.stats(), "board": {
        "machine": platform.machine(), "python": platform.python_version(), "load_s": load_s}}
    return json.dumps(report)


def _safe_extract(archive: str, target: Path) -> None:
    """Regular files and directories only, all inside `target` (boards' Python may predate
    tarfile's extraction filters)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = (target / member.name).resolve()
            if not (member.isfile() or member.isdir()) or target.resolve() not in [path, *path.parents]:
                raise ValueError(f"artifact archive: refusing member {member.name!r}")
        tar.extractall(target)


def _random_fill(tensor) -> None:
    """MetaSchedule's RPC runner fills candidate inputs with this; the runtime-only TVM library
    a board carries lacks it (it is built with USE_RANDOM), so the board supplies it."""
    import numpy as np

    rng = np.random.default_rng()
    dtype = np.dtype(str(tensor.dtype))
    if dtype.kind == "f":
        values = rng.uniform(-1, 1, tuple(tensor.shape)).astype(dtype)
    else:
        values = rng.integers(0, 16 if dtype.kind == "u" else 8, tuple(tensor.shape)).astype(dtype)
    tensor.copyfrom(values)


def register() -> None:
    """Server init callback: runs in the RPC server process before it serves."""
    import tvm_ffi

    tvm_ffi.register_global_func(RUN_FUNCTION, run_uploaded, override=True)
    if tvm_ffi.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) is None:
        tvm_ffi.register_global_func("tvm.contrib.random.random_fill_for_measure", _random_fill)


# --- host side -------------------------------------------------------------------------------
class DeployError(MoetvmError, RuntimeError):
    """The board could not be reached, or went away during the deploy."""


def _pack(artifact: Path, workdir: Path) -> Path:
    from moetvm.artifact import MANIFEST_NAME, check_file, read_manifest

    manifest = read_manifest(artifact)
    for ref in manifest.files():
        check_file(artifact, ref)  # never ship a broken artifact
    archive = workdir / "artifact.tar"
    with tarfile.open(archive, "w") as tar:
        for rel in [MANIFEST_NAME] + [ref.path for ref in manifest.files()]:
            tar.add(artifact / rel, arcname=rel)
    return archive


def deploy(artifact: str | Path, *, prompt_ids: list[int], max_new_tokens: int, cache_budget: str | int | None = None,
           rpc_addr: str | None = None, tracker: str | None = None, key: str = "", timeout: float = 600) -> dict:
    """Upload `artifact` to a board (direct or through a tracker), generate there, return the
    board's report. `cache_budget` defaults to the target's memory budget."""
    import tempfile

    from tvm import rpc

    from moetvm.artifact import read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    budget = cache_budget if cache_budget is not None else manifest.target.get("memory_budget", "100%")
    if isinstance(budget, int):
        total = sum(e.weight_bytes for layer in manifest.moe_layers for e in layer.experts)
        budget = min(budget, total + sum(s.expert.weight_bytes for layer in manifest.moe_layers for s in layer.shared))
    where = rpc_addr or f"tracker {tracker} key {key!r}"
    phase = "connect"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            archive = _pack(artifact, Path(tmp))
            uploaded = archive.stat().st_size
            t0 = time.perf_counter()
            if rpc_addr:
                host, port = rpc_addr.rsplit(":", 1)
                remote = rpc.connect(host, int(port), key=key, session_timeout=timeout)
            else:
                thost, tport = tracker.rsplit(":", 1)
                remote = rpc.connect_tracker(thost, int(tport)).request(key, session_timeout=timeout)
            t1 = time.perf_counter()
            phase = "upload"
            remote.upload(str(archive), target="artifact.tar")
            t2 = time.perf_counter()
            phase = "run"
            report = json.loads(remote.get_function(RUN_FUNCTION)("artifact.tar", json.dumps(
                {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "cache_budget": budget})))
            t3 = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - whatever TVM raises, the user needs where and when
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "kShutdown" in first_line or "Connection reset" in first_line:
            first_line = f"the board closed the connection (it crashed or was stopped) [{first_line}]"
        raise DeployError(f"deploy to {where} failed during {phase}: {first_line}") from None
    report["deploy"] = {"connect_s": t1 - t0, "upload_s": t2 - t1, "run_s": t3 - t2,
                        "uploaded_bytes": uploaded}
    return report


def serve(host: str, port: int, tracker: str | None, key: str) -> None:
    from tvm import rpc

    tracker_addr = None
    if tracker:
        thost, tport = tracker.rsplit(":", 1)
        tracker_addr = (thost, int(tport))
    server = rpc.Server(host=host, port=port, port_end=port + 100, tracker_addr=tracker_addr, key=key,
                        server_init_callback=register)
    # A busy port makes TVM move on silently: say which one we got.
    print(f"moetvm board serving on {host}:{server.port} key={key!r} "
          f"tracker={tracker or '-'} ({platform.machine()})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        server.terminate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="moetvm board: TVM RPC server with the moetvm runtime")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker to register with")
    ap.add_argument("--key", default="rasp4", help="device key under which to register")
    args = ap.parse_args(argv)
    serve(args.host, args.port, args.tracker, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())

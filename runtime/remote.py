"""`moetvm deploy`: run an artifact on a board through TVM RPC (both ends live here).

TVM's RPC server gives clients file upload and module loading; this adds one function,
`moetvm.board.run`, which unpacks an uploaded artifact and runs it with this runtime (experts
cached on the board, under its memory budget), returning the same report as `moetvm run`.
Boards register with TVM's RPC tracker under a key, so a farm of boards works unchanged.

Board:   python -m moetvm.runtime.remote --host 127.0.0.1 --port 9090 [--tracker HOST:PORT --key KEY]
                                         [--trusted-key PUB.pem ...]
Host:    deploy(artifact_dir, rpc="HOST:PORT" | tracker="HOST:PORT", key=KEY, ...)

Keys follow TVM's convention: a direct connection (`--rpc`) matches the board's key exactly, and
both sides default to no key (as `python -m tvm.exec.rpc_server` and `tvm.rpc.connect` do); a
board registered with a tracker needs a key (the device type), which `deploy --tracker`
requests: by default the artifact's target's `rpc_key` (rasp4 for cortex-a72, host for host).

A board given `--trusted-key` refuses every artifact whose manifest.sig does not verify with
one of those Ed25519 public keys (`load_model(trusted_keys=...)`: the signature is checked first,
on the exact manifest bytes, then every file's SHA-256). Errors raised on the board reach the
host as one line, `ErrorClass: message` (TVM's RPC error keeps only the message text).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import signal
import sys
import tarfile
import time
from pathlib import Path

from moetvm.errors import MoetvmError, UsageError, one_line

RUN_FUNCTION = "moetvm.board.run"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class BoardError(MoetvmError, RuntimeError):
    """Raised on the board: the request or the uploaded artifact was refused, or running it
    failed; the message is one line naming the cause (it travels back to the host as text)."""


def _check_request(request: str) -> dict:
    """The host's JSON request, checked field by field (InputError naming the field)."""
    from moetvm.runtime import InputError

    try:
        req = json.loads(request)
    except (TypeError, ValueError):
        raise InputError("request: not JSON") from None
    if not isinstance(req, dict):
        raise InputError("request: expected a JSON object")
    ids = req.get("prompt_ids")
    if not isinstance(ids, list) or not ids:
        raise InputError(f"prompt_ids: expected a non-empty list of token ids, got {_short(ids)}")
    bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int)), None)
    if bad is not None:
        raise InputError(f"prompt_ids: token ids must be integers, got {_short(bad)}")
    n = req.get("max_new_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"max_new_tokens: expected an integer >= 0, got {_short(n)}")
    budget = req.get("cache_budget", "100%")
    if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
        raise InputError(f"cache_budget: expected bytes, a size or a percentage, got {_short(budget)}")
    return req


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def run_uploaded(archive: str, request: str, trusted_keys: tuple[str, ...] = ()) -> str:
    """Unpack `archive` (a tar uploaded into this session's work dir) and generate. Every error
    becomes a BoardError with a one-line message, so the host can show the cause."""
    from moetvm.runtime import load_model
    from moetvm.signing import SignatureError

    try:
        req = _check_request(request)
        t0 = time.perf_counter()
        name = req.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == Path(archive).name:
            name = "artifact"
        target = Path(archive).parent / name
        _safe_extract(archive, target)
        model = load_model(target, cache_budget=req.get("cache_budget", "100%"),
                           trusted_keys=list(trusted_keys) or None)
        load_s = time.perf_counter() - t0
        new = model.generate(req["prompt_ids"], req["max_new_tokens"])
        report = {"new_ids": new, **model.stats(), "board": {
            "machine": platform.machine(), "python": platform.python_version(), "load_s": load_s,
            "signature": "verified" if trusted_keys else "not checked"}}
        return json.dumps(report)
    except SignatureError as e:
        raise BoardError(f"board refused the artifact: {one_line(e)}") from None
    except BoardError:
        raise
    except Exception as e:  # noqa: BLE001 - the host sees only this text: name the class too
        raise BoardError(f"{type(e).__name__}: {_cause_line(str(e))}") from None


def _safe_extract(archive: str, target: Path) -> None:
    """Regular files and directories only, all inside `target` (boards' Python may predate
    tarfile's extraction filters)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = (target / member.name).resolve()
            if not (member.isfile() or member.isdir()) or target.resolve() not in [path, *path.parents]:
                raise BoardError(f"board refused the artifact: archive member {member.name!r} "
                                 f"is not a regular file inside the artifact")
        tar.extractall(target)


def _random_fill(tensor) -> None:
    """MetaSchedule's RPC runner fills candidate inputs with this; the runtime-only TVM library
    a board carries lacks it (it is built with USE_RANDOM), so the board supplies it."""
    import numpy as np

    from .tvm_runtime import numpy_dtype

    rng = np.random.default_rng()
    dtype = numpy_dtype(str(tensor.dtype))
    if dtype.kind == "f":
        values = rng.uniform(-1, 1, tuple(tensor.shape)).astype(dtype)
    else:
        values = rng.integers(0, 16 if dtype.kind == "u" else 8, tuple(tensor.shape)).astype(dtype)
    tensor.copyfrom(values)


def register(trusted_keys: tuple[str, ...] = ()) -> None:
    """Server init callback: runs in the RPC server process before it serves. `trusted_keys`
    (absolute paths of PEM public keys): uploaded artifacts must be signed by one of them."""
    import tvm_ffi

    run = functools.partial(run_uploaded, trusted_keys=tuple(trusted_keys))
    tvm_ffi.register_global_func(RUN_FUNCTION, lambda archive, request: run(archive, request), override=True)
    if tvm_ffi.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) is None:
        tvm_ffi.register_global_func("tvm.contrib.random.random_fill_for_measure", _random_fill)


# --- host side -------------------------------------------------------------------------------
class DeployError(MoetvmError, RuntimeError):
    """The board could not be reached, refused the artifact or the request, failed running it,
    or went away during the deploy; one line saying where, in which phase and why."""


def parse_address(text, what: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT" (an IPv6 host in brackets); UsageError naming `what`."""
    problem = None
    host, sep, port = str(text or "").strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host:
        problem = "expected HOST:PORT"
    elif not port.isdigit() or not 0 < int(port) < 65536:
        problem = "the port must be a number from 1 to 65535"
    elif any(c.isspace() for c in host):
        problem = "the host contains spaces"
    if problem:
        raise UsageError(f"{what} {text!r}: {problem} (e.g. 127.0.0.1:9090)")
    return host, int(port)


_NOISE = re.compile(r"^(Traceback \(most recent call last\)|During handling of the above exception"
                    r"|The above exception was the direct cause|Stack trace|\[bt\]|File \"|\^+$|~+$)")


def _cause_line(text: str) -> str:
    """The line of an error text that names the cause: the last `SomeError: message` line of a
    (remote) traceback, without TVM's "Error caught from RPC call:" header or frame lines."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    kept = [line.strip() for line in lines
            if not line.strip().endswith("Error caught from RPC call:") and not _NOISE.match(line.strip())]
    top = [line.strip() for line in lines if not line[0].isspace() and line.strip() in kept]
    if top:
        return top[-1]
    return kept[-1] if kept else (lines[0].strip() if lines else "")


def _explain(text: str, type_name: str, where: str, key: str) -> str:
    """One line for a TVM error text seen on the host."""
    if "Error caught from RPC call" in text:  # raised on the board: its own one-line cause
        return _cause_line(text) or type_name
    if "kShutdown" in text or "Connection reset" in text or "Broken pipe" in text:
        return f"the board closed the connection (it crashed or was stopped) [{_cause_line(text)}]"
    if "cannot find server that matches key" in text:
        if not key:
            return "the board expects a key (it was started with --key): pass the same --key"
        return (f"the board does not take key {key!r}: pass the board's --key as --key "
                f"(a board started without --key takes none)")
    if "sock.Connect(addr)" in text or "Connection refused" in text:
        return f"nothing accepts connections at {where} (is it running?)"
    if "RPCSessionTimeoutError" in text:
        return f"the session ran past its timeout (--timeout) [{_cause_line(text)}]"
    line = _cause_line(text)
    return line or type_name


def tracker_key(manifest, artifact: Path | str) -> str:
    """The device key `deploy --tracker` requests by default: the rpc key the manifest records
    (artifacts from this version on), else, for older artifacts, the target's in the registry
    (with MOETVM_TARGETS), "host" for host."""
    import os

    from moetvm.targets import TargetError, get_target

    if manifest.target.rpc_key:
        return manifest.target.rpc_key
    name = manifest.target.name
    if name == "host":
        return "host"
    try:
        key = get_target(name).rpc_key
    except TargetError:
        files = os.environ.get("MOETVM_TARGETS")
        where = f"not in MOETVM_TARGETS={files}" if files else "and MOETVM_TARGETS is unset"
        raise TargetError(f"{artifact}: its target {name!r} is not a known target ({where}), so the "
                          f"tracker key is unknown: pass --key KEY, or point MOETVM_TARGETS at the "
                          f"targets file that defines {name!r}") from None
    except (OSError, ValueError) as e:
        raise TargetError(f"MOETVM_TARGETS: cannot read the targets files ({one_line(e)}); "
                          f"pass --key KEY") from None
    if not key:
        raise TargetError(f"{artifact}: target {name!r} defines no rpc_key: pass --key KEY")
    return key


def _pack(artifact: Path, workdir: Path) -> Path:
    from moetvm.artifact import MANIFEST_NAME, check_file, read_manifest
    from moetvm.signing import SIGNATURE_NAME

    manifest = read_manifest(artifact)
    for ref in manifest.files():
        check_file(artifact, ref)  # never ship a broken artifact
    names = [MANIFEST_NAME] + [ref.path for ref in manifest.files()]
    if (artifact / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)  # a board with --trusted-key checks it
    archive = workdir / "artifact.tar"
    with tarfile.open(archive, "w") as tar:
        for rel in names:
            tar.add(artifact / rel, arcname=rel)
    return archive


def _wait_for_key(tracker_session, key: str, where: str, wait: float = 5.0) -> None:
    """A tracker queues a request for a key no board has until one registers, i.e. forever:
    fail instead when no board is registered under `key` (after `wait` s for one to appear)."""
    deadline = time.monotonic() + wait
    while True:
        servers = tracker_session.summary().get("server_info", [])
        keys = sorted({str(s.get("key", "")).partition(":")[2] for s in servers})
        if key in keys:
            return
        if time.monotonic() > deadline:
            known = ", ".join(repr(k) for k in keys) if keys else "none"
            raise DeployError(f"deploy to {where} failed during connect: no board is registered under "
                              f"key {key!r} (registered keys: {known}); pass --key, or start the board "
                              f"with --key {key}")
        time.sleep(0.5)


def deploy(artifact: str | Path, *, prompt_ids: list[int], max_new_tokens: int, cache_budget: str | int | None = None,
           rpc_addr: str | None = None, tracker: str | None = None, key: str | None = None, timeout: float = 600,
           trusted_keys: list | None = None) -> dict:
    """Upload `artifact` to a board (direct or through a tracker), generate there, return the
    board's report. `cache_budget` defaults to the target's memory budget.

    key: direct (`rpc_addr`): the board's --key, default none; tracker: the key boards registered
    under, default `tracker_key(manifest)`. trusted_keys: Ed25519 public key files; the artifact
    must be signed by one of them or nothing is uploaded (SignatureError).
    Raises UsageError (bad address), ArtifactError/SignatureError (local artifact), TargetError
    (no tracker key known) before connecting; DeployError for everything after.
    """
    import socket
    import tempfile

    from moetvm.artifact import read_manifest

    if bool(rpc_addr) == bool(tracker):
        raise UsageError("give exactly one of --rpc HOST:PORT or --tracker HOST:PORT")
    host, port = parse_address(rpc_addr, "--rpc") if rpc_addr else parse_address(tracker, "--tracker")
    artifact = Path(artifact)
    if trusted_keys:
        from moetvm.signing import verify_artifact

        verify_artifact(artifact, list(trusted_keys))  # SignatureError: refuse to ship it
    manifest = read_manifest(artifact)
    if key is None:
        key = "" if rpc_addr else tracker_key(manifest, artifact)
    budget = cache_budget if cache_budget is not None else manifest.target.memory_budget or "100%"
    if isinstance(budget, int):
        budget = min(budget, manifest.cache_bytes)
    where = f"{host}:{port}" if rpc_addr else f"tracker {host}:{port} key {key!r}"
    request = {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "cache_budget": budget,
               "name": artifact.resolve().name}
    phase = "connect"
    from tvm import rpc

    failure = None
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pack(artifact, Path(tmp))  # ArtifactError: refused here, before connecting
        uploaded = archive.stat().st_size
        remote = session = None
        try:
            t0 = time.perf_counter()
            if rpc_addr:
                remote = rpc.connect(host, port, key=key, session_timeout=timeout)
            else:
                socket.create_connection((host, port), timeout=10).close()  # TVM retries a dead tracker for 60 s
                session = rpc.connect_tracker(host, port)
                _wait_for_key(session, key, where)
                remote = session.request(key, session_timeout=timeout)
            t1 = time.perf_counter()
            phase = "upload"
            remote.upload(str(archive), target="artifact.tar")
            t2 = time.perf_counter()
            phase = "run"
            report = json.loads(remote.get_function(RUN_FUNCTION)("artifact.tar", json.dumps(request)))
            t3 = time.perf_counter()
        except DeployError as e:
            failure = str(e)
        except Exception as e:  # noqa: BLE001 - whatever TVM raises, the user needs where, when and why
            text = str(e) if not isinstance(e, OSError) else f"{e.strerror or e}"
            if isinstance(e, ConnectionRefusedError) and phase == "connect":
                text = "Connection refused"
            cause = _explain(text, type(e).__name__, where if rpc_addr else f"tracker {host}:{port}", key)
            failure = one_line(f"deploy to {where} failed during {phase}: {cause}")
        finally:
            # A board serves one session at a time: end this one now. Raising below, outside the
            # handler, keeps TVM's exception (and its frames, which hold the session) off the error.
            remote = session = None  # noqa: F841
    if failure:
        raise DeployError(failure)
    report["deploy"] = {"connect_s": t1 - t0, "upload_s": t2 - t1, "run_s": t3 - t2,
                        "uploaded_bytes": uploaded}
    return report


def _wait_registered(tracker_addr: tuple[str, int], key: str, port: int, wait: float = 60.0) -> None:
    """Until the tracker lists this server under `key` (the server registers in the background):
    after the "serving" line, `deploy --tracker` finds the board at once."""
    from tvm import rpc

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            servers = rpc.connect_tracker(*tracker_addr).summary().get("server_info", [])
        except Exception:  # noqa: BLE001 - tracker not up yet: TVM's server retries too
            servers = []
        if any(s.get("key") == f"server:{key}" and list(s.get("addr", []))[1:] == [port] for s in servers):
            return
        time.sleep(0.5)
    print(f"moetvm board: not yet registered with the tracker {tracker_addr[0]}:{tracker_addr[1]} "
          f"after {wait:.0f}s; still trying", file=sys.stderr, flush=True)


def serve(host: str, port: int, tracker: str | None, key: str, trusted_keys: tuple[str, ...] = ()) -> None:
    from tvm import rpc

    tracker_addr = parse_address(tracker, "--tracker") if tracker else None
    server = rpc.Server(host=host, port=port, port_end=port + 100, tracker_addr=tracker_addr, key=key,
                        server_init_callback=functools.partial(register, tuple(trusted_keys)))
    if tracker_addr:
        _wait_registered(tracker_addr, key, server.port)
    if trusted_keys:
        from moetvm.signing import fingerprint

        signatures = "required (trusted keys " + ", ".join(fingerprint(k) for k in trusted_keys) + ")"
    else:
        signatures = "not checked"
    # A busy port makes TVM move on silently: say which one we got.
    print(f"moetvm board serving on {host}:{server.port} key={key!r} "
          f"tracker={tracker or '-'} signatures={signatures} ({platform.machine()})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        server.terminate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m moetvm.runtime.remote",
        description="moetvm board: TVM RPC server with the moetvm runtime")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090, help="first port to try (a busy one moves up; see the "
                                                           "'serving on' line)")
    ap.add_argument("--tracker", default=None, metavar="HOST:PORT", help="a TVM RPC tracker to register with")
    ap.add_argument("--key", default=None,
                    help="device key, as in TVM's rpc_server. With --tracker it is required: the key this "
                         "board registers under, which `moetvm deploy --tracker` requests (by default the "
                         "artifact's target's rpc key: rasp4 for cortex-a72, orin for jetson-orin, host for "
                         "host). Without --tracker it defaults to none, which is what `moetvm deploy --rpc` "
                         "and tvm.rpc.connect(host, port) send; a key given here must then be passed to "
                         "deploy --key too")
    ap.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], metavar="PEM",
                    help="Ed25519 public key (from `moetvm keygen`); refuse any artifact whose manifest.sig "
                         "does not verify with one of these (repeatable; default: no signature check)")
    args = ap.parse_args(argv)
    if args.tracker and args.key is None:
        ap.error("--tracker needs --key: the device key clients request (e.g. rasp4 for cortex-a72 "
                 "artifacts, host for host artifacts)")
    try:
        if args.tracker:
            parse_address(args.tracker, "--tracker")
        keys = tuple(str(Path(k).resolve()) for k in args.trusted_keys)  # the server works in a temp dir
        if keys:
            from moetvm.signing import load_public_key

            for k in keys:
                load_public_key(k)  # a bad key file stops the board now, not at the first deploy
    except MoetvmError as e:
        print(f"moetvm board: {one_line(e)}", file=sys.stderr)
        return 2
    serve(args.host, args.port, args.tracker, args.key or "", keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())

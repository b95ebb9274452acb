"""`moetvm deploy` against real boards on loopback: `python -m moetvm.runtime.remote` serving
host-target artifacts on this machine (real processes, real TVM RPC, a real tracker; no mocks).
Signed artifacts (board --trusted-key, deploy --trusted-key), the board's cause in the host's one
line, addresses and keys checked before connecting, and the direct/tracker key defaults."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from moetvm.cli import main
from moetvm.errors import MoetvmError
from moetvm.runtime import load_model
from moetvm.runtime.remote import BoardError, DeployError, deploy

from servers import start, stop

pytest.importorskip("cryptography")
PY = sys.executable


def cli(*args, env=None):
    return CliRunner(env=env).invoke(main, ["deploy", *map(str, args)], catch_exceptions=True)


def one_line_error(result) -> str:
    __tracebackhide__ = True
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"escaped as {type(result.exception).__name__}: {result.exception}")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0][len("Error: "):]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two pairs made by `moetvm keygen`: A is trusted by the board, B is not."""
    d = tmp_path_factory.mktemp("keys")
    for name in ("a", "b"):
        proc = subprocess.run([PY, "-m", "moetvm.cli", "keygen", d / f"{name}.pem", d / f"{name}.pub"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    return d


@pytest.fixture(scope="module")
def artifacts(reference_artifact, keys, tmp_path_factory):
    from moetvm.signing import sign_artifact

    d = tmp_path_factory.mktemp("deploy")
    out = {}
    for name, key in (("unsigned", None), ("signed-a", "a"), ("signed-b", "b")):
        out[name] = d / name
        shutil.copytree(reference_artifact, out[name])
        if key:
            sign_artifact(out[name], keys / f"{key}.pem")
    return out


@pytest.fixture(scope="module")
def servers(keys, tmp_path_factory):
    """A tracker; board 1 direct (no key: the default), trusting key A; board 2 registered with
    the tracker under key rasp4, no signature check. Both boards start at once."""
    d = tmp_path_factory.mktemp("servers")
    started = []
    try:
        tracker, line = start([PY, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", "9690",
                                "--port-end", "9790"], "bind to", d / "tracker.log")
        started.append(tracker)
        tracker_addr = re.search(r"bind to (127\.0\.0\.1:\d+)", line).group(1)
        cmds = {"direct": ["--port", "9800", "--trusted-key", keys / "a.pub"],
                "tracked": ["--port", "9900", "--tracker", tracker_addr, "--key", "rasp4"]}
        procs = {}
        for name, args in cmds.items():
            log = d / f"{name}.log"
            procs[name] = (subprocess.Popen([PY, "-m", "moetvm.runtime.remote", "--host", "127.0.0.1", *map(str, args)],
                                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True), log)
            started.append(procs[name][0])
        out = {"tracker": tracker_addr, "logs": {}}
        for name, (proc, log) in procs.items():
            _, line = _wait(proc, log)
            out[name] = re.search(r"serving on (127\.0\.0\.1:\d+)", line).group(1)
            out["logs"][name] = log
        yield out
    finally:
        for proc in started:
            stop(proc)


def _wait(proc, log, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in log.read_text().splitlines():
            if "moetvm board serving" in line:
                return proc, line
        if proc.poll() is not None:
            raise AssertionError(f"board exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"board not ready: {log.read_text()[-2000:]}")


def test_board_with_trusted_key_runs_signed_artifact(servers, artifacts, keys):
    result = cli(artifacts["signed-a"], "--rpc", servers["direct"], "--prompt", "def ", "--max-new-tokens", 6,
                 "--trusted-key", keys / "a.pub")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["board"]["signature"] == "verified"
    local = load_model(artifacts["signed-a"]).generate(list(b"def "), 6)
    assert report["text"] == bytes(local).decode("utf-8", errors="replace")


def test_board_refuses_unsigned_and_wrongly_signed(servers, artifacts, keys):
    from moetvm.signing import fingerprint

    where = servers["direct"]
    assert one_line_error(cli(artifacts["unsigned"], "--rpc", where)) == (
        f"deploy to {where} failed during run: board refused the artifact: unsigned: unsigned (no manifest.sig)")
    assert one_line_error(cli(artifacts["signed-b"], "--rpc", where)) == (
        f"deploy to {where} failed during run: board refused the artifact: signed-b/manifest.json: signature does "
        f"not verify with any trusted key (trusted: {fingerprint(keys / 'a.pub')}; signature names key "
        f"{fingerprint(keys / 'b.pub')})")


def test_deploy_trusted_key_refuses_locally_without_connecting(servers, artifacts, keys):
    log = servers["logs"]["direct"]
    before = log.read_text().count("connected from")
    message = one_line_error(cli(artifacts["unsigned"], "--rpc", servers["direct"], "--trusted-key", keys / "a.pub"))
    assert message == f"{artifacts['unsigned']}: unsigned (no manifest.sig)"
    message = one_line_error(cli(artifacts["signed-b"], "--rpc", servers["direct"], "--trusted-key", keys / "a.pub"))
    assert "signature does not verify with any trusted key" in message
    time.sleep(0.5)
    assert log.read_text().count("connected from") == before  # nothing was uploaded


def test_remote_cause_reaches_the_host(servers, artifacts):
    where = servers["direct"]
    cases = [([300], 4, "InputError: token ids must be in [0, 256), got [300, 300]"),
             (["x"], 4, "InputError: prompt_ids: token ids must be integers, got 'x'"),
             ([], 4, "InputError: prompt_ids: expected a non-empty list of token ids, got []"),
             ([1, 2], -1, "InputError: max_new_tokens: expected an integer >= 0, got -1"),
             ([1, 2], "3", "InputError: max_new_tokens: expected an integer >= 0, got '3'")]
    kept = []  # errors the caller keeps must not keep the board's one session open
    for prompt_ids, max_new, cause in cases:
        with pytest.raises(DeployError) as info:
            deploy(artifacts["signed-a"], prompt_ids=prompt_ids, max_new_tokens=max_new, rpc_addr=where)
        assert str(info.value) == f"deploy to {where} failed during run: {cause}"
        assert info.value.__context__ is None and info.value.__cause__ is None
        kept.append(info)
    started = time.time()
    report = deploy(artifacts["signed-a"], prompt_ids=[1, 2], max_new_tokens=2, rpc_addr=where)
    assert len(report["new_ids"]) == 2 and time.time() - started < 30


@pytest.mark.parametrize("args, expected", [
    (["--rpc", "garbage"], "--rpc 'garbage': expected HOST:PORT (e.g. 127.0.0.1:9090)"),
    (["--rpc", "127.0.0.1:http"], "--rpc '127.0.0.1:http': the port must be a number from 1 to 65535"),
    (["--rpc", ":9090"], "--rpc ':9090': expected HOST:PORT"),
    (["--rpc", "127.0.0.1:0"], "the port must be a number from 1 to 65535"),
    (["--tracker", "garbage"], "--tracker 'garbage': expected HOST:PORT"),
    ([], "give exactly one of --rpc HOST:PORT or --tracker HOST:PORT"),
    (["--rpc", "127.0.0.1:9", "--tracker", "127.0.0.1:9"], "give exactly one of --rpc"),
])
def test_bad_addresses_refused_before_connecting(artifacts, args, expected):
    assert expected in one_line_error(cli(artifacts["unsigned"], *args))


def test_custom_target_without_registry_is_one_line(artifacts, tmp_path):
    art = tmp_path / "custom"
    shutil.copytree(artifacts["unsigned"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["target"]["name"] = "my-board"
    del manifest["target"]["rpc_key"]  # as artifacts from before the manifest recorded it
    (art / "manifest.json").write_text(json.dumps(manifest))
    message = one_line_error(cli(art, "--tracker", "127.0.0.1:9", env={"MOETVM_TARGETS": None}))
    assert message == (f"{art}: its target 'my-board' is not a known target (and MOETVM_TARGETS is unset), so the "
                       f"tracker key is unknown: pass --key KEY, or point MOETVM_TARGETS at the targets file that "
                       f"defines 'my-board'")
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps({"my-board": {"description": "x", "tvm_target": {"kind": "llvm"},
                                                "rpc_key": "mine"}}))
    message = one_line_error(cli(art, "--tracker", "127.0.0.1:9", env={"MOETVM_TARGETS": str(targets)}))
    assert message.startswith("deploy to tracker 127.0.0.1:9 key 'mine' failed during connect: nothing accepts")


def test_keys_direct_and_through_tracker(servers, artifacts):
    # Direct: the board was started without --key and deploy --rpc sends none; a key is refused.
    where = servers["direct"]
    message = one_line_error(cli(artifacts["signed-a"], "--rpc", where, "--key", "rasp4"))
    assert message == (f"deploy to {where} failed during connect: the board does not take key 'rasp4': pass the "
                       f"board's --key as --key (a board started without --key takes none)")
    # Tracker: a host artifact requests key 'host' by default; the only board registered as rasp4.
    tracker = servers["tracker"]
    message = one_line_error(cli(artifacts["unsigned"], "--tracker", tracker, "--max-new-tokens", 2))
    assert message == (f"deploy to tracker {tracker} key 'host' failed during connect: no board is registered "
                       f"under key 'host' (registered keys: 'rasp4'); pass --key, or start the board with --key host")
    result = cli(artifacts["unsigned"], "--tracker", tracker, "--key", "rasp4", "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["board"]["signature"] == "not checked"


def test_board_command_line_refusals(tmp_path):
    proc = subprocess.run([PY, "-m", "moetvm.runtime.remote", "--tracker", "127.0.0.1:9190"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--tracker needs --key" in proc.stderr
    proc = subprocess.run([PY, "-m", "moetvm.runtime.remote", "--trusted-key", tmp_path / "missing.pub"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"moetvm board: {tmp_path / 'missing.pub'}: cannot read Ed25519 public key (No such file or directory)")


def test_board_errors_share_the_root():
    assert issubclass(BoardError, MoetvmError) and issubclass(DeployError, MoetvmError)


def test_cause_line_of_a_remote_traceback():
    """Boards whose TVM forwards the whole remote traceback: the last `Error: message` line."""
    from moetvm.runtime.remote import _cause_line

    text = ("RPCError: Error caught from RPC call:\nTraceback (most recent call last):\n"
            '  File "/board/moetvm/runtime/remote.py", line 90, in run_uploaded\n'
            "    model = load_model(target)\n            ^^^^^^^^^^^^^^^^^^\n"
            "moetvm.artifact.ArtifactError: ref: libs/a.so: size 10, manifest says 12\n")
    assert _cause_line(text) == "moetvm.artifact.ArtifactError: ref: libs/a.so: size 10, manifest says 12"
    assert _cause_line("RPCError: Error caught from RPC call:\nValueError: bad") == "ValueError: bad"

"""Real server processes for tests (RPC trackers, boards): started in their own process group,
ready when a line appears in their log, killed with everything they started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start(cmd, ready: str, log: Path, timeout: float = 120):
    """Start `cmd`; wait for a log line containing `ready`; return (process, that line). Its
    temporary files (an RPC server's workspace: uploaded artifacts) go beside the log, under the
    test's own directory: a killed server never cleans up after itself."""
    handle = open(log, "w")
    scratch = log.with_name(log.stem + ".tmp")
    scratch.mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text()
        for line in text.splitlines():
            if ready in line:
                return proc, line
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} exited: {text[-2000:]}")
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"{cmd} not ready: {log.read_text()[-2000:]}")


def stop(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)

"""Where an artifact is written: never over what a user has, never half of one.

`check_output` is called before any work starts (a compile takes minutes; a bad `-o` must not
cost them), and again by `atomic_directory` just before the new artifact takes the old one's
place. A path may be replaced only when it holds nothing or one of our own artifacts: a
directory whose manifest parses and which holds only the files that manifest lists (plus its
signature). Anything else, a checkpoint, a directory of the user's files, the working directory
itself, is refused with the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from moetvm.artifact import MANIFEST_NAME, ArtifactError, read_manifest
from moetvm.errors import UsageError
from moetvm.signing import SIGNATURE_NAME


class OutputError(UsageError):
    """The output path cannot take an artifact (it holds something that is not ours, or it
    cannot be written)."""


def _our_artifact(path: Path) -> str | None:
    """None when `path` is a moetvm artifact directory holding only its own files; else why not."""
    try:
        manifest = read_manifest(path)
    except ArtifactError as e:
        return f"it is a directory that is not a moetvm artifact ({e})"
    listed = {MANIFEST_NAME, SIGNATURE_NAME} | {ref.path for ref in manifest.files()}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            rel = (Path(dirpath) / name).relative_to(path).as_posix()
            if rel not in listed or (Path(dirpath) / name).is_symlink():
                return f"it holds {rel!r}, which its manifest does not list (not ours to delete)"
    return None


def check_output(out: str | Path, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output path that is not ours to (re)place, before any work starts.

    Allowed: a path that does not exist (its parent is created), an empty directory, or a
    moetvm artifact directory holding only its own files. `inputs` (the model checkpoint, the
    calibration text, ...) may never be inside it. The parent must be writable: the new artifact
    is built in a temp directory beside it and renamed into place."""
    out = Path(out)
    if str(out) in ("", ".", "..") or out.name in ("", ".", ".."):
        raise OutputError(f"-o {out}: give the artifact its own directory name, not {str(out)!r}")
    full = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if full == cwd or full in cwd.parents:
        raise OutputError(f"-o {out}: is the current directory or one above it; refusing to replace it")
    for given in inputs:
        if given is None:
            continue
        src = Path(os.path.abspath(given))
        if src == full or full in src.parents:
            raise OutputError(f"-o {out}: would replace the input {given}")
    if out.is_symlink():
        raise OutputError(f"-o {out}: is a symbolic link; refusing to replace it (give the real directory)")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"-o {out}: is an existing file, not an artifact directory; refusing to replace it")
        if any(out.iterdir()):
            why = _our_artifact(out)
            if why:
                raise OutputError(f"-o {out}: {why}; refusing to replace it")
    probe_from = full.parent
    while not probe_from.exists():
        probe_from = probe_from.parent
    if not probe_from.is_dir() or not os.access(probe_from, os.W_OK | os.X_OK):
        raise OutputError(f"-o {out}: cannot write in {probe_from} (permission denied or not a directory)")
    return out


@contextmanager
def atomic_directory(out: str | Path, validate: Callable[[Path], None] | None = None):
    """Yield a temp dir beside `out`; on success (and once `validate(tmp)` passed) it replaces
    `out` in one rename. On any failure it is removed and whatever was at `out` stays as it was."""
    out = Path(out)
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    old = None
    try:
        yield tmp
        if validate is not None:
            validate(tmp)
        check_output(out)  # again: the path may have changed during the compile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "a")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "a", out)  # put the good one back
                raise
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

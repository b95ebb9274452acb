"""Artifacts shipped as one file (issue 20): `moetvm pack DIR -o BUNDLE` (zstd-compressed tar, via
`zstandard`), `moetvm pack NEW --base OLD -o DELTA` (only the files whose hashes changed, plus the
new manifest and its signature), `moetvm unpack BUNDLE -o DIR` and `moetvm update DIR DELTA`.

A bundle is `bundle.json` {format, kind: full | delta, base: SHA-256 of the base's manifest.json
(delta), files: the paths it carries}, then `manifest.json`, `manifest.sig` when signed, then
those files. Read as untrusted input: members are regular files named in `bundle.json` or the
manifest, every file must match the manifest's size and SHA-256, the signature must verify
with one of the trusted keys when they are given; a delta applies only to the exact version it
was made against. The new version is assembled in a temp directory beside the target (unchanged
files hard-linked from the old one), checked whole, and only then takes the old one's place
(atomic_directory): an interrupted or refused update leaves the old version as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from moetvm.artifact import (MANIFEST_NAME, MAX_MANIFEST_BYTES, ArtifactError, Manifest, check_file, parse, read_manifest,
                             read_regular_file, safe_relative_path)
from moetvm.errors import MoetvmError
from moetvm.output import atomic_directory
from moetvm.signing import SIGNATURE_NAME

BUNDLE_FORMAT = 1
INDEX_NAME = "bundle.json"
ZSTD_LEVEL = 10  # measured on the shipped model's artifact: levels past 10 saved < 1% for several times the time


class BundleError(MoetvmError):
    """A bundle that cannot be read or applied; the message says why."""


def _zstd():
    try:
        import zstandard
    except ImportError:  # a dependency of moetvm's runtime: only a broken install lacks it
        raise BundleError("bundles need the `zstandard` package (pip install zstandard)") from None
    return zstandard


def _read_manifest(root: Path) -> tuple[bytes, Manifest]:
    """The manifest's bytes (a delta names its base by their hash) and the manifest they parse to;
    ArtifactError, with the reason, for a directory that is not an artifact."""
    data = read_regular_file(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest")
    return data, parse(data)


def pack(artifact: str | Path, out: str | Path, base: str | Path | None = None) -> dict:
    """Write `artifact` as one bundle at `out` (a new file, never over an existing one); with
    `base`, a delta holding only what differs from it. Returns {kind, files, bytes, bundle_bytes}."""
    root, out = Path(artifact), Path(out)
    if out.exists() or out.is_symlink():
        raise BundleError(f"-o {out}: already exists; refusing to replace it")
    manifest_data, manifest = _read_manifest(root)
    for ref in manifest.files():  # what is shipped is what the manifest vouches for
        check_file(root, ref)
    files = list(_unique(manifest.files()))
    index = {"format": BUNDLE_FORMAT, "kind": "full"}
    if base is not None:
        base_data, base_manifest = _read_manifest(Path(base))
        have = {(ref.path, ref.size, ref.sha256) for ref in base_manifest.files()}
        files = [ref for ref in files if (ref.path, ref.size, ref.sha256) not in have]
        index = {"format": BUNDLE_FORMAT, "kind": "delta", "base": hashlib.sha256(base_data).hexdigest()}
    index["files"] = [ref.path for ref in files]
    signature = root / SIGNATURE_NAME
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "wb") as raw, _zstd().ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw) as z, \
                tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, INDEX_NAME, json.dumps(index, indent=1).encode())
            _add_bytes(tar, MANIFEST_NAME, manifest_data)
            if signature.is_file():
                _add_bytes(tar, SIGNATURE_NAME, signature.read_bytes())
            for ref in files:
                with open(root / ref.path, "rb") as f:
                    info = tarfile.TarInfo(ref.path)
                    info.size, info.mode = ref.size, 0o644
                    tar.addfile(info, f)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"kind": index["kind"], "files": len(files), "bytes": sum(ref.size for ref in files),
            "artifact_bytes": sum(ref.size for ref in _unique(manifest.files())), "bundle_bytes": out.stat().st_size}


def _unique(refs):
    seen = set()
    for ref in refs:
        if ref.path not in seen:
            seen.add(ref.path)
            yield ref


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def unpack(bundle: str | Path, out: str | Path, trusted_keys: list | None = None) -> Path:
    """A full bundle -> the artifact directory `out` (empty, absent, or one of our artifacts)."""
    return _apply(Path(bundle), Path(out), None, trusted_keys)


def update(artifact: str | Path, delta: str | Path, trusted_keys: list | None = None) -> Path:
    """Apply a delta made against the artifact at `artifact`, atomically."""
    root = Path(artifact)
    try:
        base = _read_manifest(root)
    except ArtifactError as e:
        raise BundleError(f"{root}: cannot be updated ({e})") from None
    return _apply(Path(delta), root, base, trusted_keys)


def _apply(bundle: Path, out: Path, base: tuple[bytes, Manifest] | None, trusted_keys) -> Path:
    if not bundle.is_file():
        raise BundleError(f"{bundle}: no such bundle file")
    want, zstd = "delta" if base is not None else "full", _zstd()
    with atomic_directory(out, validate=lambda tmp: _validate(tmp, trusted_keys)) as tmp:
        try:
            with open(bundle, "rb") as raw, zstd.ZstdDecompressor().stream_reader(raw) as z, \
                    tarfile.open(fileobj=z, mode="r|") as tar:
                _extract(tar, tmp, out, base, want, bundle)
        except (tarfile.TarError, EOFError, zstd.ZstdError) as e:
            raise BundleError(f"{bundle}: not a readable moetvm bundle ({type(e).__name__}: {e})") from None
    return out


def _extract(tar: tarfile.TarFile, tmp: Path, old: Path, base: tuple[bytes, Manifest] | None, want: str,
             bundle: Path) -> None:
    """The bundle's files into `tmp`, then the rest of the new version from the old one at `old`;
    `base`: the old version's manifest (bytes, parsed) for a delta, None for a full bundle."""
    base_hash = hashlib.sha256(base[0]).hexdigest() if base is not None else None
    index = manifest = None
    carried: set[str] = set()
    for member in tar:
        if not member.isfile():
            raise BundleError(f"{bundle}: member {member.name!r} is not a regular file")
        if index is None:
            if member.name != INDEX_NAME:
                raise BundleError(f"{bundle}: not a moetvm bundle (first member {member.name!r}, not {INDEX_NAME})")
            index = _read_index(tar.extractfile(member).read(1 << 20), bundle)
            if index["kind"] != want:
                how = "moetvm update DIR DELTA" if index["kind"] == "delta" else "moetvm unpack BUNDLE -o DIR"
                raise BundleError(f"{bundle}: a {index['kind']} bundle; apply it with `{how}`")
            if base is not None and index["base"] != base_hash:
                raise BundleError(f"{bundle}: made against another version than the one at {old} "
                                  f"(base manifest SHA-256 {index['base'][:12]}..., this one {base_hash[:12]}...)")
            continue
        if manifest is None:
            if member.name != MANIFEST_NAME:
                raise BundleError(f"{bundle}: expected {MANIFEST_NAME} after {INDEX_NAME}, found {member.name!r}")
            data = tar.extractfile(member).read()
            manifest = parse(data)
            (tmp / MANIFEST_NAME).write_bytes(data)
            listed = {ref.path: ref for ref in manifest.files()}
            missing = [p for p in index["files"] if p not in listed]
            if missing:
                raise BundleError(f"{bundle}: carries {missing[0]!r}, which its manifest does not list")
            continue
        if member.name == SIGNATURE_NAME and not carried:
            (tmp / SIGNATURE_NAME).write_bytes(tar.extractfile(member).read(1 << 16))
            continue
        if member.name not in index["files"] or member.name in carried:
            raise BundleError(f"{bundle}: unexpected member {member.name!r}")
        ref = listed[member.name]
        if member.size != ref.size:
            raise BundleError(f"{bundle}: {ref.path} is {member.size} bytes, its manifest says {ref.size}")
        target = tmp / safe_relative_path(ref.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            shutil.copyfileobj(tar.extractfile(member), f, 1 << 20)
        carried.add(member.name)
    if manifest is None:
        raise BundleError(f"{bundle}: truncated (no manifest)")
    if carried != set(index["files"]):
        raise BundleError(f"{bundle}: truncated ({len(set(index['files']) - carried)} of its files missing)")
    # The rest of the new version: the old version's files, where the bytes are the same.
    old_refs = {(ref.path, ref.size, ref.sha256) for ref in base[1].files()} if base is not None else set()
    for ref in _unique(manifest.files()):
        if ref.path in carried:
            continue
        if (ref.path, ref.size, ref.sha256) not in old_refs:
            raise BundleError(f"{bundle}: lacks {ref.path}, which the version at {old} does not have either")
        target = tmp / safe_relative_path(ref.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(old / ref.path, target)
        except OSError:
            shutil.copyfile(old / ref.path, target)


def _read_index(data: bytes, bundle: Path) -> dict:
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"{bundle}: {INDEX_NAME} is not JSON") from None
    ok = (isinstance(index, dict) and index.get("format") == BUNDLE_FORMAT and index.get("kind") in ("full", "delta")
          and isinstance(index.get("files"), list) and all(isinstance(p, str) for p in index["files"])
          and (index["kind"] == "full" or isinstance(index.get("base"), str)))
    if not ok:
        raise BundleError(f"{bundle}: {INDEX_NAME} is not a bundle index of format {BUNDLE_FORMAT}")
    return index


def _validate(root: Path, trusted_keys) -> None:
    """The assembled version, whole: its manifest parses, every file matches it, and (with
    trusted keys) its signature verifies."""
    manifest = read_manifest(root)
    for ref in manifest.files():
        check_file(root, ref)
    if trusted_keys:
        from moetvm.signing import verify_manifest_bytes

        verify_manifest_bytes(root, trusted_keys)

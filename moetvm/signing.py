"""Ed25519 signatures of artifacts: who built this artifact, and is it exactly what they built?

What is signed: the exact bytes of `manifest.json`. The manifest records the size and SHA-256
of every other file (kernel libraries, expert weights), so one signature over it covers the
whole artifact: `verify_artifact` proves the manifest is the signer's, and the runtime's usual
per-file hash checks (`moetvm.artifact.check_file`, done by `load_model` before any library is
loaded, and again whenever an expert is fetched) prove every file matches it. The bytes are
signed as they are (no canonicalisation, no prefix), so `openssl pkeyutl -verify -rawin` can
check a signature too.

The signature file, `manifest.sig` beside the manifest, is UTF-8 JSON:

    {"format": "moetvm-ed25519-v1",
     "key": "<fingerprint of the signing key: 16 hex digits>",
     "signature": "<base64 of the 64-byte Ed25519 signature>"}

`key` is only a hint for error messages (which key signed this?); trust comes solely from the
public keys the caller passes to `verify_artifact`, each tried in turn.

Keys are PEM files: PKCS#8 private keys (written with mode 0600; optionally encrypted) and
SubjectPublicKeyInfo public keys. A key's fingerprint is the first 16 hex digits of the SHA-256
of its raw 32-byte public key.

`cryptography` is imported lazily, inside the functions, so `moetvm.artifact` (and a runtime
that is given no trusted keys) works without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from pathlib import Path

from moetvm.artifact import MANIFEST_NAME, MAX_MANIFEST_BYTES, ArtifactError, Manifest, check_file, parse, read_regular_file

SIGNATURE_NAME = "manifest.sig"
SIGNATURE_FORMAT = "moetvm-ed25519-v1"
_MAX_SIGNATURE_FILE = 4096  # a real one is ~150 bytes; never read an attacker's huge file
_MAX_KEY_FILE = 64 * 1024


class SignatureError(ArtifactError):
    """An artifact's signature is missing, malformed or untrusted, or a key is unusable; the
    message names the failed check."""


# --- keys ------------------------------------------------------------------------------------
def _crypto():
    """The pieces of `cryptography` used here, imported on first use."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("artifact signatures need the 'cryptography' package "
                             "(pip install cryptography)") from None
    return serialization, ed25519, InvalidSignature


def _raw_public(public_key) -> bytes:
    serialization, _, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _fingerprint_of(public_key) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise SignatureError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > _MAX_KEY_FILE:
        raise SignatureError(f"{path}: not a PEM {what} (file larger than {_MAX_KEY_FILE} bytes)")
    return data


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo); SignatureError otherwise."""
    path = Path(path)
    data = _read_key_file(path, "Ed25519 public key")
    serialization, ed25519, _ = _crypto()
    if b"PRIVATE KEY" in data:
        raise SignatureError(f"{path}: is a private key; trust the public key file instead")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM Ed25519 public key ({e})") from None
    except Exception as e:  # noqa: BLE001 - e.g. UnsupportedAlgorithm: still a bad key file
        raise SignatureError(f"{path}: not a PEM Ed25519 public key ({type(e).__name__}: {e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key (it is a {type(key).__name__})")
    return key


def load_private_key(path: str | Path, password: bytes | None = None):
    """An Ed25519 private key from a PEM file (PKCS#8); SignatureError otherwise."""
    path = Path(path)
    data = _read_key_file(path, "Ed25519 private key")
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a usable PEM Ed25519 private key ({e})") from None
    except Exception as e:  # noqa: BLE001
        raise SignatureError(f"{path}: not a usable PEM Ed25519 private key ({type(e).__name__}: {e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key (it is a {type(key).__name__})")
    return key


def fingerprint(public_key_path: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key in this PEM file (a
    private key file is refused: fingerprints name trusted keys, which are public)."""
    return _fingerprint_of(load_public_key(public_key_path))


def generate_keypair(private_path: str | Path, public_path: str | Path, *, overwrite: bool = False,
                     password: bytes | None = None) -> str:
    """Write a new Ed25519 key pair as PEM files (the private one with mode 0600, encrypted
    with `password` if given); returns its fingerprint. Existing files are left alone
    (SignatureError) unless `overwrite`."""
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise SignatureError(f"{private_path}: private and public key paths are the same file")
    if not overwrite:
        for p in (private_path, public_path):
            if p.exists() or p.is_symlink():
                raise SignatureError(f"{p}: already exists; refusing to overwrite a key")
    serialization, ed25519, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        existing = next(d for d in path.parents if d.exists())
        if not existing.is_dir():
            raise SignatureError(f"{path}: cannot write the key ({existing} is not a directory)")
        try:
            _atomic_write(path, data, mode=mode)
        except OSError as e:
            raise SignatureError(f"{path}: cannot write the key ({e.strerror or e})") from None
    return _fingerprint_of(key.public_key())


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory and os.replace: readers see the old file or
    the new one, never half of one. The temp file is created with `mode` (mkstemp: 0600, then
    chmod), so a private key is never readable by others, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --- signing and verifying -------------------------------------------------------------------
def _read_manifest_bytes(root: Path) -> bytes:
    return read_regular_file(root / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest")


def sign_artifact(artifact_dir: str | Path, private_key_path: str | Path, *, password: bytes | None = None,
                  check_files: bool = True) -> str:
    """Sign the artifact's manifest.json with an Ed25519 private key; writes manifest.sig
    atomically and returns the key's fingerprint.

    The manifest must parse, and (with `check_files`, the default) every file must match its
    recorded size and SHA-256: a signature vouches for the artifact as it is on disk now.
    """
    root = Path(artifact_dir)
    key = load_private_key(private_key_path, password)
    data = _read_manifest_bytes(root)
    manifest = parse(data)  # refuse to vouch for a manifest the runtime would reject
    if check_files:
        for ref in manifest.files():
            check_file(root, ref)
    fp = _fingerprint_of(key.public_key())
    record = {"format": SIGNATURE_FORMAT, "key": fp,
              "signature": base64.b64encode(key.sign(data)).decode("ascii")}
    _atomic_write(root / SIGNATURE_NAME, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return fp


def _read_signature(root: Path) -> tuple[bytes, str | None]:
    """(64-byte signature, claimed key fingerprint) from manifest.sig; SignatureError naming
    what is wrong with it."""
    path = root / SIGNATURE_NAME
    if not path.exists() and not path.is_symlink():
        raise SignatureError(f"{root}: unsigned (no {SIGNATURE_NAME})")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SIGNATURE_FILE + 1)
    except OSError as e:
        raise SignatureError(f"{path}: cannot read signature file ({e.strerror or e})") from None

    def malformed(why: str) -> SignatureError:
        return SignatureError(f"{path}: malformed signature file ({why})")

    if len(raw) > _MAX_SIGNATURE_FILE:
        raise malformed(f"larger than {_MAX_SIGNATURE_FILE} bytes")
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise malformed("not JSON") from None
    if not isinstance(record, dict):
        raise malformed("expected a JSON object")
    if record.get("format") != SIGNATURE_FORMAT:
        raise malformed(f"format {record.get('format')!r}, expected {SIGNATURE_FORMAT!r}")
    sig_text, claimed = record.get("signature"), record.get("key")
    if not isinstance(sig_text, str):
        raise malformed("no 'signature' string")
    if claimed is not None and not isinstance(claimed, str):
        raise malformed("'key' is not a string")
    try:
        signature = base64.b64decode(sig_text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise malformed("signature is not base64") from None
    if len(signature) != 64:
        raise malformed(f"signature is {len(signature)} bytes, Ed25519 signatures are 64")
    return signature, claimed


def verify_manifest_bytes(artifact_dir: str | Path, trusted_public_key_paths) -> tuple[bytes, str]:
    """(the manifest's bytes, fingerprint of the trusted key that signed them).

    Check order, each failure a SignatureError (an ArtifactError) saying which check failed:
    trusted keys given and loadable; manifest present; manifest.sig present, well formed;
    signature verifies with one of the trusted keys.

    Parse exactly these returned bytes (`moetvm.artifact.parse`) rather than re-reading the
    file, so the manifest that is used is the manifest that was verified.
    """
    root = Path(artifact_dir)
    if isinstance(trusted_public_key_paths, (str, os.PathLike)):
        trusted_public_key_paths = [trusted_public_key_paths]
    paths = list(trusted_public_key_paths or [])
    if not paths:
        raise SignatureError(f"{root}: no trusted keys given (pass at least one Ed25519 public key file)")
    keys = [(p, load_public_key(p)) for p in paths]  # a bad key file is an error, not skipped
    fingerprints = [_fingerprint_of(k) for _, k in keys]
    data = _read_manifest_bytes(root)
    signature, claimed = _read_signature(root)
    _, _, InvalidSignature = _crypto()
    for fp, (_, key) in zip(fingerprints, keys):
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return data, fp
    signer = f"; signature names key {claimed}" if claimed else ""
    raise SignatureError(f"{root / MANIFEST_NAME}: signature does not verify with any trusted key "
                         f"(trusted: {', '.join(fingerprints)}{signer})")


def verify_artifact(artifact_dir: str | Path, trusted_public_key_paths) -> str:
    """Check the artifact's manifest.sig against trusted Ed25519 public keys (PEM paths; one
    path or a list); returns the fingerprint of the key that verified. Raises SignatureError.

    Only the manifest is checked here; call this before loading anything, and then let the
    usual per-file size/SHA-256 checks (`load_model(verify=True)`) cover the other files.
    """
    return verify_manifest_bytes(artifact_dir, trusted_public_key_paths)[1]


def read_verified_manifest(artifact_dir: str | Path, trusted_public_key_paths) -> tuple[Manifest, str]:
    """(parsed manifest, signer fingerprint): `verify_manifest_bytes` then `parse` of the same
    bytes, so nothing can swap the manifest between the check and its use."""
    data, fp = verify_manifest_bytes(artifact_dir, trusted_public_key_paths)
    return parse(data), fp


def verify_signed_by(artifact_dir: str | Path, private_key_path: str | Path, *, password: bytes | None = None) -> str:
    """Check that the artifact's signature verifies with the public half of this private key
    (the compiler's last check before a freshly signed artifact replaces an old one)."""
    root = Path(artifact_dir)
    public = load_private_key(private_key_path, password).public_key()
    signature, _ = _read_signature(root)
    _, _, InvalidSignature = _crypto()
    try:
        public.verify(signature, _read_manifest_bytes(root))
    except InvalidSignature:
        raise SignatureError(f"{root / MANIFEST_NAME}: the signature just written does not verify") from None
    return _fingerprint_of(public)

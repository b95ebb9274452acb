"""Weight files encrypted at rest with an AEAD of `cryptography` (AES-256-GCM, or
ChaCha20-Poly1305 for CPUs without AES instructions: the target's `weight_aead`), one key for
the artifact.

What is encrypted: every weight file (experts, shared experts, dense stand-ins and the dense
part's weight files); libraries, tokenizer and manifest stay readable (code and facts, not the
model's weights). An encrypted file is `nonce (12 bytes) || ciphertext || tag (16 bytes)`, its
associated data the file's path in the artifact: a file moved to another expert's place does not
decrypt. The manifest records the sizes and hashes of the encrypted files (so the usual checks and
the signature cover them) and `encryption` {aead, key_check}: a keyed hash of the key, so a wrong
key is refused before any library is loaded.

Nonces are derived, not drawn: HMAC(key, path, SHA-256 of the plaintext). A file re-encrypted with
the same key, path and contents gives the same bytes, so compiles stay reproducible and an update
bundle between two versions holds only the experts that changed; a nonce repeats only for the same
(path, plaintext), which reveals nothing but that equality.

The runtime decrypts in memory only: the bytes read (and verified against the manifest) are
decrypted into a buffer that is parsed and uploaded, never written anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from pathlib import Path

from moetvm.artifact import ArtifactError, Encryption, Manifest, file_ref, parse

AEADS = ("AES-256-GCM", "ChaCha20-Poly1305")  # both: 32-byte key, 12-byte nonce, 16-byte tag
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ENV = "MOETVM_DECRYPT_KEY"  # a key file for every command that loads an artifact


class EncryptionError(ArtifactError):
    """A key that cannot be used, or an encrypted file that does not decrypt."""


def read_key(path: str | Path) -> bytes:
    """The 32 bytes of a key file (`head -c 32 /dev/urandom > key` makes one)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            key = f.read(KEY_BYTES + 1)
    except OSError as e:
        raise EncryptionError(f"{path}: cannot read the key file ({e.strerror or e})") from None
    if len(key) != KEY_BYTES:
        more = "more than" if len(key) > KEY_BYTES else f"{len(key)} bytes, not"
        raise EncryptionError(f"{path}: a key file holds exactly {KEY_BYTES} bytes; this one has {more} {KEY_BYTES}")
    return key


def _key_check(key: bytes) -> str:
    return hmac.new(key, b"moetvm key check", hashlib.sha256).hexdigest()[:32]


def _aead(name: str, key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    return {"AES-256-GCM": AESGCM, "ChaCha20-Poly1305": ChaCha20Poly1305}[name](key)


class WeightCipher:
    """Encrypts and decrypts an artifact's weight files with one key."""

    def __init__(self, key: bytes, aead: str = AEADS[0]):
        if len(key) != KEY_BYTES:
            raise EncryptionError(f"an artifact key is {KEY_BYTES} bytes, got {len(key)}")
        if aead not in AEADS:
            raise EncryptionError(f"unknown AEAD {aead!r}; this runtime reads {', '.join(AEADS)}")
        self._key, self._name, self._aead = key, aead, _aead(aead, key)

    @classmethod
    def for_artifact(cls, encryption: Encryption | None, key: bytes | None, where: str) -> "WeightCipher | None":
        """The cipher that reads an artifact whose manifest says `encryption`, or a clear error:
        no key for an encrypted artifact, a key that is not the one it was encrypted with."""
        if encryption is None:
            return None
        if encryption.aead not in AEADS:
            raise EncryptionError(f"{where}: weights encrypted with {encryption.aead!r}; this runtime reads {', '.join(AEADS)}")
        if key is None:
            raise EncryptionError(f"{where}: the weights are encrypted; give the key file (--decrypt-key FILE, "
                                  f"decrypt_key=, or {KEY_ENV}=FILE)")
        if not hmac.compare_digest(_key_check(key), encryption.key_check):
            raise EncryptionError(f"{where}: wrong key: the weights were encrypted with another one")
        return cls(key, encryption.aead)

    @property
    def encryption(self) -> Encryption:
        """What the manifest records for files this cipher encrypted."""
        return Encryption(aead=self._name, key_check=_key_check(self._key))

    def encrypt(self, path: str, plaintext: bytes) -> bytes:
        """The file at `path` (relative to the artifact) encrypted."""
        nonce = hmac.new(self._key, b"nonce\0" + path.encode() + b"\0" + hashlib.sha256(plaintext).digest(),
                         hashlib.sha256).digest()[:NONCE_BYTES]
        return nonce + self._aead.encrypt(nonce, plaintext, _associated(path))

    def decrypt(self, path: str, data: bytes) -> bytes:
        """The plaintext of the encrypted file at `path`; EncryptionError if it was altered."""
        from cryptography.exceptions import InvalidTag

        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise EncryptionError(f"{path}: {len(data)} bytes, too short for an encrypted file")
        try:
            return self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _associated(path))
        except InvalidTag:
            raise EncryptionError(f"{path}: does not decrypt (altered, or moved from another place in the artifact)") from None


def _associated(path: str) -> bytes:
    return b"moetvm weights\0" + path.encode()


def encrypt_weights(root: Path, manifest: Manifest, cipher: WeightCipher) -> Manifest:
    """Encrypt the weight files of our own new artifact at `root`; the manifest that records them.
    Each file is written encrypted beside itself, then renamed over it (a hard link to a
    plaintext store stays plaintext there, and nothing is encrypted twice)."""
    refs = {}
    for ref in manifest.weight_files():
        if ref.path in refs:
            continue
        path = root / ref.path
        tmp = path.with_name(path.name + ".encrypting")
        tmp.write_bytes(cipher.encrypt(ref.path, path.read_bytes()))
        os.replace(tmp, path)
        refs[ref.path] = file_ref(root, path)

    def renew(value):
        if isinstance(value, dict):
            if set(value) == {"path", "size", "sha256"} and value["path"] in refs:
                return dataclasses.asdict(refs[value["path"]])
            return {k: renew(v) for k, v in value.items()}
        return [renew(v) for v in value] if isinstance(value, list) else value

    data = renew(json.loads(manifest.to_json()))
    data["encryption"] = dataclasses.asdict(cipher.encryption)
    return parse(json.dumps(data))


def key_from(decrypt_key: str | Path | bytes | None) -> bytes | None:
    """A key given as a file path or as its 32 bytes; None: the file named by MOETVM_DECRYPT_KEY, if set."""
    if isinstance(decrypt_key, (bytes, bytearray)):
        if len(decrypt_key) != KEY_BYTES:
            raise EncryptionError(f"an artifact key is {KEY_BYTES} bytes, got {len(decrypt_key)}")
        return bytes(decrypt_key)
    if decrypt_key is not None:
        return read_key(decrypt_key)
    env = os.environ.get(KEY_ENV)
    return read_key(env) if env else None

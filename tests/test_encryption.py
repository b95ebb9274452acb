"""Weight files encrypted at rest (issue 20): `compile --encrypt-key`, decrypted in memory by
`load_model(decrypt_key=...)`, `run`/`serve --decrypt-key` and MOETVM_DECRYPT_KEY. The encrypted
artifact computes exactly what the plain one does; no weight file on disk is plaintext; a wrong
key is refused before any library loads; an altered or moved ciphertext is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import deserialize

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.encryption import KEY_ENV, EncryptionError, WeightCipher
from moetvm.runtime import load_model

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("right", "wrong"):
        (d / name).write_bytes(os.urandom(32))
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory, reference_model, key_files):
    from moetvm.compiler import compile_model
    from moetvm.compiler.models import calibration_windows

    out = tmp_path_factory.mktemp("encrypted") / "reference-host"
    # The same calibration as the reference_artifact fixture: the same artifact but for encryption.
    return compile_model(reference_model, target="host", out=out, source="reference", progress=False,
                         calibration=calibration_windows(), encrypt_key=key_files["right"])


@pytest.fixture
def encrypted_copy(encrypted, tmp_path):
    return Path(shutil.copytree(encrypted, tmp_path / "copy"))


def test_encrypted_artifact_computes_what_the_plain_one_does(encrypted, reference_artifact, key_files, heldout_tokens):
    plain_m, enc_m = read_manifest(reference_artifact), read_manifest(encrypted)
    assert plain_m.encryption is None and enc_m.encryption is not None
    # Libraries and tokenizer are the same bytes; every weight file differs: none holds a stretch
    # of the plain file's bytes (its safetensors header included) or parses as safetensors.
    assert [lib.file for lib in enc_m.libraries] == [lib.file for lib in plain_m.libraries]
    plain_files = {ref.path: (reference_artifact / ref.path).read_bytes() for ref in plain_m.weight_files()}
    assert [ref.path for ref in enc_m.weight_files()] == list(plain_files) and len(plain_files) > 32
    for ref in enc_m.weight_files():
        data = (encrypted / ref.path).read_bytes()
        assert len(data) == len(plain_files[ref.path]) + 28  # nonce + tag
        plain = plain_files[ref.path]
        assert plain[:64] not in data and plain[64:128] not in data and plain[-64:] not in data
        with pytest.raises(Exception):
            deserialize(data)
    before = {p: p.stat().st_mtime_ns for p in encrypted.rglob("*")}
    plain = load_model(reference_artifact, cache_budget="30%")
    model = load_model(encrypted, cache_budget="30%", decrypt_key=key_files["right"])
    tokens = heldout_tokens[3000:3024][None]
    assert np.array_equal(model(tokens), plain(tokens))
    assert model.generate(tokens[0], 24) == plain.generate(tokens[0], 24)
    assert model.stats()["evictions"] > 0  # experts were decrypted again after eviction
    # Decryption happens in memory: the artifact directory is exactly as it was.
    assert {p: p.stat().st_mtime_ns for p in encrypted.rglob("*")} == before
    # The key as its 32 bytes, and from the environment, read the same.
    assert np.array_equal(load_model(encrypted, decrypt_key=key_files["right"].read_bytes())(tokens[:, :8]),
                          plain(tokens[:, :8]))


def test_encryption_is_deterministic_per_path_and_contents():
    """Reproducible compiles and update deltas of unchanged experts need equal bytes; the path
    is in both the nonce and the associated data."""
    cipher = WeightCipher(bytes(range(32)))
    a = cipher.encrypt("experts/l0_e0.safetensors", b"weights")
    assert a == cipher.encrypt("experts/l0_e0.safetensors", b"weights")
    assert a != cipher.encrypt("experts/l0_e1.safetensors", b"weights")
    assert a[:12] != cipher.encrypt("experts/l0_e0.safetensors", b"weightz")[:12]
    assert cipher.decrypt("experts/l0_e0.safetensors", a) == b"weights"
    with pytest.raises(EncryptionError, match="does not decrypt"):
        cipher.decrypt("experts/l0_e1.safetensors", a)


def test_wrong_or_missing_key_refused_before_any_library_loads(encrypted_copy, key_files, no_library_loads, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    # A corrupted library too: the key is checked first.
    lib = encrypted_copy / read_manifest(encrypted_copy).library("segments").file.path
    lib.write_bytes(b"\0" + lib.read_bytes()[1:])
    with pytest.raises(EncryptionError, match="wrong key: the weights were encrypted with another one"):
        load_model(encrypted_copy, decrypt_key=key_files["wrong"])
    with pytest.raises(EncryptionError, match=r"the weights are encrypted; give the key file \(--decrypt-key FILE"):
        load_model(encrypted_copy)
    monkeypatch.setenv(KEY_ENV, str(key_files["wrong"]))
    with pytest.raises(EncryptionError, match="wrong key"):
        load_model(encrypted_copy)
    assert no_library_loads == []


def test_key_for_a_plain_artifact_and_bad_key_files_refused(reference_artifact, key_files, tmp_path):
    with pytest.raises(EncryptionError, match="not encrypted"):
        load_model(reference_artifact, decrypt_key=key_files["right"])
    short = tmp_path / "short"
    short.write_bytes(os.urandom(31))
    with pytest.raises(EncryptionError, match="exactly 32 bytes; this one has 31 bytes, not 32"):
        load_model(reference_artifact, decrypt_key=short)
    with pytest.raises(EncryptionError, match="cannot read the key file"):
        load_model(reference_artifact, decrypt_key=tmp_path / "absent")


def test_flipped_or_moved_ciphertext_refused(encrypted_copy, key_files):
    """With hashes checked, any change is caught by SHA-256 before decryption; without
    (verify=False), by the AEAD tag: a flipped byte, or a valid file moved to another expert's place."""
    m = read_manifest(encrypted_copy)
    first, second = (encrypted_copy / m.moe_layers[0].experts[i].file.path for i in (0, 1))
    original = first.read_bytes()
    first.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(ArtifactError, match="SHA-256 mismatch"):
        load_model(encrypted_copy, decrypt_key=key_files["right"])
    with pytest.raises(EncryptionError, match=r"layer0/expert0.safetensors: does not decrypt"):
        load_model(encrypted_copy, decrypt_key=key_files["right"], verify=False, cache_budget="100%", preload=1.0)
    first.write_bytes(second.read_bytes())  # same size: another expert's valid ciphertext
    with pytest.raises(EncryptionError, match="moved from another place"):
        load_model(encrypted_copy, decrypt_key=key_files["right"], verify=False, cache_budget="100%", preload=1.0)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "moetvm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_cli_run_with_key_option_or_environment(encrypted, reference_artifact, key_files, tmp_path):
    common = ["--prompt", "def ", "--max-new-tokens", "12", "--json", "--cache-budget", "100%"]
    plain = json.loads(_cli("run", reference_artifact, *common).stdout)
    by_flag = _cli("run", encrypted, *common, "--decrypt-key", key_files["right"])
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = _cli("run", encrypted, *common, env={KEY_ENV: str(key_files["right"])})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_flag.stdout)["new_ids"] == json.loads(by_env.stdout)["new_ids"] == plain["new_ids"]
    for args, why in (((), "the weights are encrypted; give the key file"),
                      (("--decrypt-key", key_files["wrong"]), "wrong key")):
        proc = _cli("run", encrypted, *common, *args, env={KEY_ENV: ""})
        assert proc.returncode != 0 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    short = tmp_path / "short"
    short.write_bytes(b"x" * 33)
    proc = _cli("compile", "reference", "--encrypt-key", short, "-o", tmp_path / "out")
    assert proc.returncode != 0 and "exactly 32 bytes; this one has more than 32" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_serve_with_decrypt_key(encrypted, reference_artifact, key_files, tmp_path):
    """`serve --decrypt-key`: completions over loopback HTTP as the plain artifact gives them."""
    import http.client
    import re

    from servers import start, stop

    proc, line = start([sys.executable, "-m", "moetvm.cli", "serve", encrypted, "--port", "0", "--decrypt-key",
                        key_files["right"]], "serving", tmp_path / "serve.log", timeout=300)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", int(re.search(r":(\d+)/v1", line).group(1)), timeout=300)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "def ", "max_tokens": 12, "temperature": 0}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        stop(proc)
    assert response.status == 200, body
    assert body["choices"][0]["text"] == load_model(reference_artifact).stream("def ", 12).run().text

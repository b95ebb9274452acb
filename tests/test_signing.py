"""Signed artifacts: Ed25519 over manifest.json (which holds every file's SHA-256), checked
before anything is loaded; every flipped byte anywhere is refused before use. Also artifact
diffs and reusable files for updates (moetvm.diff)."""

from __future__ import annotations

import base64
import inspect
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.runtime import load_model
from moetvm.signing import (
    SignatureError,
    fingerprint,
    generate_keypair,
    read_verified_manifest,
    sign_artifact,
    verify_artifact,
)

pytest.importorskip("cryptography")

FLIPS = 40  # byte positions per file
SEED = 20240611


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: A signs, B is someone else."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        fp = generate_keypair(d / f"{name}.pem", d / f"{name}.pub")
        out[name] = {"private": d / f"{name}.pem", "public": d / f"{name}.pub", "fp": fp}
    return out


@pytest.fixture
def artifact_copy(reference_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(reference_artifact, dst)
    return dst


@pytest.fixture
def signed(artifact_copy, keys):
    sign_artifact(artifact_copy, keys["a"]["private"])
    return artifact_copy


def load_trusted(root, trusted):
    """What `load_model(..., trusted_keys=...)` does once wired; until then, the same two steps."""
    if "trusted_keys" in inspect.signature(load_model).parameters:
        return load_model(root, trusted_keys=trusted)
    verify_artifact(root, trusted)
    return load_model(root)


# --- keys ------------------------------------------------------------------------------------
def test_keygen_writes_pem_pair_private_0600(keys, tmp_path):
    a = keys["a"]
    assert a["private"].stat().st_mode & 0o777 == 0o600
    assert a["private"].read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert a["public"].read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert fingerprint(a["public"]) == a["fp"] and len(a["fp"]) == 16 and int(a["fp"], 16) >= 0
    assert keys["a"]["fp"] != keys["b"]["fp"]
    with pytest.raises(SignatureError, match="already exists; refusing to overwrite a key"):
        generate_keypair(a["private"], tmp_path / "new.pub")
    priv, pub = tmp_path / "c.pem", tmp_path / "c.pub"
    first = generate_keypair(priv, pub)
    assert generate_keypair(priv, pub, overwrite=True) != first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # An encrypted private key signs only with its password.
    enc, enc_pub = tmp_path / "enc.pem", tmp_path / "enc.pub"
    fp = generate_keypair(enc, enc_pub, password=b"hunter2")
    assert "ENCRYPTED PRIVATE KEY" in enc.read_text()
    with pytest.raises(SignatureError, match=r"enc\.pem: not a usable PEM Ed25519 private key"):
        sign_artifact(tmp_path / "nowhere", enc)
    with pytest.raises(SignatureError, match=r"enc\.pem: not a usable PEM Ed25519 private key"):
        sign_artifact(tmp_path / "nowhere", enc, password=b"wrong")
    assert fingerprint(enc_pub) == fp


# --- round trip and refusals -----------------------------------------------------------------
def test_round_trip(artifact_copy, keys):
    a = keys["a"]
    assert sign_artifact(artifact_copy, a["private"]) == a["fp"]
    record = json.loads((artifact_copy / "manifest.sig").read_text())
    assert record["format"] == "moetvm-ed25519-v1" and record["key"] == a["fp"]
    assert len(base64.b64decode(record["signature"])) == 64
    assert verify_artifact(artifact_copy, [a["public"]]) == a["fp"]
    assert verify_artifact(artifact_copy, str(a["public"])) == a["fp"]  # one path is fine too
    assert verify_artifact(artifact_copy, [keys["b"]["public"], a["public"]]) == a["fp"]
    manifest, fp = read_verified_manifest(artifact_copy, [a["public"]])
    assert fp == a["fp"] and manifest == read_manifest(artifact_copy)
    load_trusted(artifact_copy, [a["public"]])
    # Re-signing replaces the signature atomically, leaving no temp files.
    sign_artifact(artifact_copy, keys["b"]["private"])
    assert verify_artifact(artifact_copy, [keys["b"]["public"]]) == keys["b"]["fp"]
    assert not [p.name for p in artifact_copy.iterdir() if p.name.startswith(".")]


def test_unsigned_refused(artifact_copy, keys):
    with pytest.raises(SignatureError, match=r"unsigned \(no manifest\.sig\)") as e:
        verify_artifact(artifact_copy, [keys["a"]["public"]])
    assert isinstance(e.value, ArtifactError)
    with pytest.raises(ArtifactError, match="unsigned"):
        load_trusted(artifact_copy, [keys["a"]["public"]])


def test_wrong_key_refused(signed, keys):
    a, b = keys["a"], keys["b"]
    expected = (rf"manifest\.json: signature does not verify with any trusted key "
                rf"\(trusted: {b['fp']}; signature names key {a['fp']}\)")
    with pytest.raises(SignatureError, match=expected):
        verify_artifact(signed, [b["public"]])
    with pytest.raises(ArtifactError, match="does not verify with any trusted key"):
        load_trusted(signed, [b["public"]])


def test_no_trusted_keys(signed):
    with pytest.raises(SignatureError, match="no trusted keys given"):
        verify_artifact(signed, [])


def test_bad_trusted_key_files(signed, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    good = keys["a"]["public"]
    with pytest.raises(SignatureError, match=r"missing\.pub: cannot read Ed25519 public key \(No such file"):
        verify_artifact(signed, [good, tmp_path / "missing.pub"])
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    with pytest.raises(SignatureError, match=r"junk\.pub: not a PEM Ed25519 public key"):
        verify_artifact(signed, [junk])
    with pytest.raises(SignatureError, match=r"a\.pem: is a private key; trust the public key file instead"):
        verify_artifact(signed, [keys["a"]["private"]])
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match=r"ec\.pub: not an Ed25519 public key \(it is a \w+\)"):
        verify_artifact(signed, [ec_pub])
    with pytest.raises(SignatureError, match=r"a\.pub: not a usable PEM Ed25519 private key"):
        sign_artifact(signed, good)


def test_tampered_manifest_after_signing_refused(signed, keys):
    trusted = [keys["a"]["public"]]
    manifest = signed / "manifest.json"
    original = manifest.read_bytes()
    # Same JSON, different bytes: the signature is over the exact bytes.
    manifest.write_text(json.dumps(json.loads(original)))
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        verify_artifact(signed, trusted)
    # The real attack: replace an expert AND fix its size and hash in the manifest. Hashes
    # alone cannot catch this; the signature does.
    manifest.write_bytes(original)
    data = json.loads(original)
    ref = data["moe_layers"][1]["experts"][3]["file"]
    expert = signed / ref["path"]
    blob = bytearray(expert.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    expert.write_bytes(bytes(blob))
    import hashlib

    ref["sha256"] = hashlib.sha256(blob).hexdigest()
    manifest.write_text(json.dumps(data, indent=1))
    load_model(signed)  # unsigned loading cannot tell
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        verify_artifact(signed, trusted)
    with pytest.raises(ArtifactError, match="does not verify with any trusted key"):
        load_trusted(signed, trusted)


def test_tampered_signature_refused(signed, keys):
    trusted = [keys["a"]["public"]]
    sig = signed / "manifest.sig"
    record = json.loads(sig.read_text())
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[17] ^= 0x01
    sig.write_text(json.dumps({**record, "signature": base64.b64encode(bytes(raw)).decode()}))
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        verify_artifact(signed, trusted)


@pytest.mark.parametrize("content, why", [
    (b"", "not JSON"),
    (b"\x00" * 64, "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"format": "pgp", "signature": "AAAA"}', "format 'pgp'"),
    (b'{"format": "moetvm-ed25519-v1"}', "no 'signature' string"),
    (b'{"format": "moetvm-ed25519-v1", "signature": "@@@@"}', "signature is not base64"),
    (b'{"format": "moetvm-ed25519-v1", "signature": "' + base64.b64encode(b"x" * 63) + b'"}',
     "signature is 63 bytes, Ed25519 signatures are 64"),
    (b'{"format": "moetvm-ed25519-v1", "key": 7, "signature": "AAAA"}', "'key' is not a string"),
    (b" " * 5000, "larger than 4096 bytes"),
])
def test_malformed_signature_file(signed, keys, content, why):
    (signed / "manifest.sig").write_bytes(content)
    with pytest.raises(SignatureError, match=r"manifest\.sig: malformed signature file \(" + why.replace("(", r"\(")):
        verify_artifact(signed, [keys["a"]["public"]])


def test_unreadable_signature_file(artifact_copy, keys):
    (artifact_copy / "manifest.sig").mkdir()
    with pytest.raises(SignatureError, match=r"manifest\.sig: cannot read signature file"):
        verify_artifact(artifact_copy, [keys["a"]["public"]])


def test_sign_refuses_inconsistent_artifact(artifact_copy, keys):
    expert = artifact_copy / read_manifest(artifact_copy).moe_layers[0].experts[0].file.path
    expert.write_bytes(b"\0" * expert.stat().st_size)
    with pytest.raises(ArtifactError, match=r"expert0\.safetensors: SHA-256 mismatch"):
        sign_artifact(artifact_copy, keys["a"]["private"])
    assert not (artifact_copy / "manifest.sig").exists()


def test_signing_works_without_cryptography_imported_until_used(artifact_copy, keys):
    """`moetvm.artifact`, `moetvm.signing` and `moetvm.diff` import without cryptography; using a
    signature function without it fails closed with a SignatureError that says what to install."""
    script = (
        "import sys\n"
        "sys.modules['cryptography'] = None\n"
        "import moetvm.artifact, moetvm.signing, moetvm.diff\n"
        "from moetvm.signing import SignatureError, verify_artifact\n"
        "try:\n"
        "    verify_artifact(sys.argv[1], [sys.argv[2]])\n"
        "except SignatureError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(artifact_copy), str(keys["a"]["public"])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "need the 'cryptography' package (pip install cryptography)" in proc.stdout


# --- every flipped byte is refused before use ------------------------------------------------
def _positions(size: int, seed: str) -> list[int]:
    """FLIPS positions spread over the file: one random position in each of FLIPS equal strata."""
    rng = random.Random(f"{SEED}-{seed}")
    bounds = [size * i // FLIPS for i in range(FLIPS + 1)]
    return [rng.randrange(lo, max(hi, lo + 1)) for lo, hi in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("which", ["manifest", "library", "expert"])
def test_every_flipped_byte_refused_before_use(signed, keys, which, no_library_loads):
    trusted = [keys["a"]["public"]]
    m = read_manifest(signed)
    target = {"manifest": signed / "manifest.json",
              "library": signed / m.library("segments").file.path,
              "expert": signed / m.moe_layers[1].experts[3].file.path}[which]
    original = target.read_bytes()
    positions = _positions(len(original), which)
    assert len(set(positions)) == FLIPS and positions[0] < len(original) // FLIPS
    rng = random.Random(f"{SEED}-{which}-xor")
    caught, unsigned_caught = [], 0
    try:
        for pos in positions:
            data = bytearray(original)
            data[pos] ^= rng.randrange(1, 256)
            target.write_bytes(bytes(data))
            try:
                load_trusted(signed, trusted)  # a library load here fails the test (no_library_loads)
            except ArtifactError as e:
                caught.append(str(e))
            if which == "manifest":
                try:  # without a signature, many manifest flips still fail parse or a hash check
                    load_model(signed)
                except ArtifactError:
                    unsigned_caught += 1
                except AssertionError:
                    no_library_loads.clear()  # parsed and passed every hash check (e.g. a flip in a name)
    finally:
        target.write_bytes(original)
    assert len(caught) == FLIPS, f"{FLIPS - len(caught)} of {FLIPS} flipped bytes in the {which} not refused"
    if which == "manifest":
        assert all("signature does not verify with any trusted key" in c for c in caught)
        print(f"manifest flips refused without a signature: {unsigned_caught}/{FLIPS}")
    else:
        rel = target.relative_to(signed).as_posix()
        assert all(c == f"{rel}: SHA-256 mismatch (corrupted or tampered)" for c in caught), caught[:3]


# --- diffs and updates -----------------------------------------------------------------------
def _rehash(root: Path, ref: dict) -> None:
    import hashlib

    blob = (root / ref["path"]).read_bytes()
    ref.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())


@pytest.fixture
def updated(artifact_copy, tmp_path):
    """A second artifact: layer 1 expert 3 retrained, layer 2 expert 7 masked and pruned, the
    segments library (which holds the routers) rebuilt."""
    new = tmp_path / "new"
    shutil.copytree(artifact_copy, new)
    data = json.loads((new / "manifest.json").read_text())
    assert data["libraries"][0]["name"] == "segments"
    for ref in (data["moe_layers"][1]["experts"][3]["file"], data["libraries"][0]["file"]):
        path = new / ref["path"]
        blob = bytearray(path.read_bytes())
        blob[-100] ^= 0xFF  # safetensors payload / .so tail
        path.write_bytes(bytes(blob))
        _rehash(new, ref)
    layer2 = data["moe_layers"][2]
    (new / layer2["experts"][7]["file"]["path"]).unlink()
    layer2["experts"] = layer2["experts"][:7]
    layer2["router"]["masked"] = [7]
    # as the compiler does: a layer with masked experts is not resident, so no decode step
    layer2["resident_function"] = layer2["decode_function"] = None
    del data["decode_step"]
    (new / "manifest.json").write_text(json.dumps(data, indent=1))
    return new


def test_diff_lists_changed_added_removed(artifact_copy, updated, keys):
    from moetvm.diff import diff_artifacts, format_diff, reusable_files

    load_model(updated)  # a valid artifact
    d = diff_artifacts(artifact_copy, updated)
    json.dumps(d)  # plain data
    assert [(lib["name"], lib["status"]) for lib in d["libraries"]] == [
        ("segments", "changed"), ("expert_swiglu_128x256_fp32t64", "unchanged")]
    fallbacks = sum(getattr(layer, "fallback", None) is not None for layer in read_manifest(artifact_copy).moe_layers)
    extra = ["fallback"] if fallbacks else []  # each layer's dense stand-in expert, if compiled
    assert d["layers"]["1"]["changed"] == [3] and d["layers"]["1"]["unchanged"] == [0, 1, 2, 4, 5, 6, 7] + extra
    assert d["layers"]["2"]["removed"] == [7] and d["layers"]["2"]["router_changed"]
    assert not d["layers"]["0"]["router_changed"] and d["layers"]["0"]["unchanged"] == list(range(8)) + extra
    assert {k: d["summary"][k] for k in ("unchanged", "changed", "added", "removed", "libraries_changed")} == {
        "unchanged": 30 + fallbacks, "changed": 1, "added": 0, "removed": 1, "libraries_changed": 1}
    m_new = read_manifest(updated)
    changed = {m_new.moe_layers[1].experts[3].file.path, m_new.library("segments").file.path}
    assert d["summary"]["bytes_to_transfer"] == sum((updated / p).stat().st_size for p in changed)
    assert d["manifest_fields_changed"] == ["decode_step"]

    back = diff_artifacts(updated, artifact_copy)
    assert back["layers"]["2"]["added"] == [7] and back["summary"]["added"] == 1

    table = format_diff(d)
    assert "segments" in table and "changed" in table and "manifest fields changed: decode_step" in table
    assert any(line.startswith("layer 2") and "7" in line for line in table.splitlines())
    assert f"{30 + fallbacks} experts unchanged, 1 changed, 0 added, 1 removed" in table

    reuse = reusable_files(artifact_copy, m_new)
    assert {r.path for r in reuse} == {f.path for f in m_new.files()} - changed
    assert reuse == reusable_files(artifact_copy, updated) == reusable_files(artifact_copy, updated / "manifest.json")
    # verify=True checks the old files on disk and drops any that no longer match.
    victim = artifact_copy / m_new.moe_layers[0].experts[0].file.path
    victim.write_bytes(b"\0" * victim.stat().st_size)
    assert {r.path for r in reusable_files(artifact_copy, m_new, verify=True)} == (
        {r.path for r in reuse} - {m_new.moe_layers[0].experts[0].file.path})

    # The update flow: the new artifact is signed, and verifies, on its own.
    sign_artifact(updated, keys["a"]["private"])
    assert verify_artifact(updated, [keys["a"]["public"]]) == keys["a"]["fp"]


def test_diff_identical(artifact_copy, reference_artifact):
    from moetvm.diff import diff_artifacts

    d = diff_artifacts(reference_artifact, artifact_copy)
    m = read_manifest(reference_artifact)
    assert d["summary"]["unchanged"] == len(m.files()) - len(m.libraries) - len(m.weights)
    assert d["summary"]["bytes_to_transfer"] == 0 and d["summary"]["weight_files_changed"] == 0
    assert all(lib["status"] == "unchanged" for lib in d["libraries"])

"""Bad artifacts and bad requests fail with clear errors naming the problem, never deep in TVM."""

import json
import shutil

import numpy as np
import pytest

from moetvm.artifact import ArtifactError, read_manifest
from moetvm.runtime import InputError, load_model


@pytest.fixture
def artifact_copy(reference_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(reference_artifact, dst)
    return dst


def _expert_path(root):
    return root / read_manifest(root).moe_layers[1].experts[3].file.path


def test_corrupted_expert_named(artifact_copy):
    path = _expert_path(artifact_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"experts/layer1/expert3\.safetensors: SHA-256 mismatch"):
        load_model(artifact_copy)


def test_truncated_expert_named(artifact_copy):
    path = _expert_path(artifact_copy)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"experts/layer1/expert3\.safetensors: size 1000 bytes"):
        load_model(artifact_copy)


def test_missing_expert_named(artifact_copy):
    _expert_path(artifact_copy).unlink()
    with pytest.raises(ArtifactError, match=r"experts/layer1/expert3\.safetensors: missing"):
        load_model(artifact_copy)


def test_expert_corrupted_after_load_is_caught_when_fetched(artifact_copy):
    model = load_model(artifact_copy, cache_budget="13%")
    path = _expert_path(artifact_copy)
    path.write_bytes(b"\0" * path.stat().st_size)
    x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    with pytest.raises(ArtifactError, match=r"expert3\.safetensors: SHA-256 mismatch"):
        for _ in range(3):
            model.moe_layer(1, x)


def test_edited_manifest_detected(artifact_copy):
    manifest = artifact_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["libraries"][0]["file"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"lib/segments\.so: SHA-256 mismatch"):
        load_model(artifact_copy)


def test_tampered_library_detected_before_loading(artifact_copy):
    lib = next((artifact_copy / "lib").glob("expert_*.so"))
    data = bytearray(lib.read_bytes())
    data[4096] ^= 1
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"lib/{lib.name}: SHA-256 mismatch"):
        load_model(artifact_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format_version=99), r"format_version 99 is not supported \(this runtime reads versions 1\.\.15\)"),
        # A table held by slices: only a dense weight, and every token's row in a slice.
        (lambda d: d["inputs"][0].update(lookup_rows=4), r"tensor tokens: lookup_rows is for dense weights only"),
        (lambda d: d["weights"][0]["tensors"][0].update(lookup_rows=0),
         r"lookup_rows 0 does not give every token a slice"),
        (lambda d: d["moe_layers"][0]["experts"][0]["file"].update(path="../../etc/passwd"), "escapes the artifact directory"),
        (lambda d: d["moe_layers"][0]["experts"][0]["file"].update(path="/etc/passwd"), "escapes the artifact directory"),
        (lambda d: d["moe_layers"][0]["router"].update(top_k="2"), r"top_k: expected int, got str"),
        (lambda d: d.pop("program"), "missing field 'program'"),
        (lambda d: d["moe_layers"][0]["router"].update(score_fn="relu"), "unknown score_fn 'relu'"),
        (lambda d: d["model"].update(kv_cache=["in_place"]), r"model.kv_cache: expected an object, got list"),  # found by the fuzzer
        (lambda d: d["model"].update(kv_cache={"layout": "sideways"}), "model.kv_cache must give a layout"),
        (lambda d: d["model"].update(kv_cache={"layout": "concat", "dtype": "int8"}), "dtype int8 needs the in_place layout"),
        (lambda d: d["model"].update(kv_cache={"layout": "in_place", "capacity_multiple": 64, "block": 48}),
         r"model.kv_cache.block must be a positive integer dividing the capacity_multiple"),
        (lambda d: d["model"].update(kv_cache={"layout": "concat", "block": 64}), r"model.kv_cache.block .* only with the in_place layout"),
        (lambda d: d["model"].update(kv_cache={"layout": "in_place", "dtype": "float16", "capacity_multiple": 64, "block": 64,
                                               "dot": True}), r"model.kv_cache.dot needs an int8 cache in blocks"),
        (lambda d: d["model"].update(kv_cache={"layout": "concat", "full_layers": [0]}),
         r"model.kv_cache.full_layers must be distinct KV layer indices below \d+, and only with a window"),
        (lambda d: d["model"].update(kv_cache={"layout": "concat", "window": 4, "full_layers": [0, 0]}),
         r"model.kv_cache.full_layers must be distinct"),
        (lambda d: d["model"].update(kv_cache={"layout": "concat", "states": [{"kind": "conv", "layer": 0, "shape": [2, 64]}]}),
         r"model.kv_cache.states: each needs the in_place layout"),
        (lambda d: d["model"].update(kv_cache={"layout": "in_place", "states": [{"kind": "rnn", "layer": 0, "shape": [2, 64]}]}),
         r"model.kv_cache.states: each needs .* a kind \(conv, ssm, delta\)"),
        (lambda d: d["model"].update(kv_cache={"layout": "in_place", "states": [{"kind": "ssm", "layer": 0, "shape": [2, 64]}]}),
         r"model.kv_cache.states: .* a shape \(conv: 2 positive sizes, ssm and delta: 3\)"),
        (lambda d: d["model"].update(kv_cache={"layout": "in_place", "states": [{"kind": "delta", "layer": 0, "shape": [4, 0, 16]}]}),
         r"model.kv_cache.states: .* a shape \(conv: 2 positive sizes, ssm and delta: 3\)"),
        (lambda d: d["target"].update(rpc_key=7), r"target.rpc_key: expected str, got int"),
        (lambda d: d["model"].update(tokenizer="bpe"), r"model: unknown field\(s\) \['tokenizer'\]"),
        (lambda d: d["workloads"][0].update(dot="yes"), r"dot: expected bool, got str"),
        # Resident layers: the pool layout is the manifest's, so it must be sound before any view is taken.
        (lambda d: d["moe_layers"][0].update(resident_function="nope"), r"resident function 'nope' is not in library"),
        (lambda d: d["moe_layers"][0].update(decode_function="nope"), r"layer 0: decode function 'nope' is not in library segments"),
        # The decode step: one call that reads the inputs and weights by name and every layer's pool.
        (lambda d: d["decode_step"].update(function="nope"), r"decode step 'nope' is not in library segments"),
        (lambda d: d["decode_step"]["inputs"].append("ghost"), r"inputs \['ghost'\] are not the program's inputs"),
        (lambda d: d["decode_step"]["weights"].append(d["decode_step"]["inputs"][0]),
         r"weights \['tokens'\] are not the program's weights"),
        (lambda d: d["decode_step"]["weights"].append(d["decode_step"]["weights"][0]), r"weights repeated are not"),
        (lambda d: d["moe_layers"][0].update(decode_function=None), r"layer 0 has no decode function in library segments"),
        (lambda d: d["moe_layers"][0].update(resident_function=None), r"layer 0: a decode function needs a resident function"),
        (lambda d: d["workloads"][0]["slot_offsets"].__setitem__(1, 8), r"slot offset 8 of w_up overlaps"),
        (lambda d: d["workloads"][0].update(slot_bytes=64), r"more than its 64-byte slot"),
        (lambda d: (d["moe_layers"][0]["experts"].pop(), d["moe_layers"][0]["router"].update(masked=[7])),
         r"needs all 8 experts, of one workload"),
        (lambda d: d["moe_layers"][0]["router"].update(n_groups=2), r"plain top-k routing without shared experts only"),
        # A per-position segment is run on the last position's rows alone: it must not read positions or the cache.
        (lambda d: d["program"][0].update(per_position=True), r"segment segment_0 is per_position but reads the model's inputs"),
        (lambda d: d["program"][1].update(per_position=True), r"program step moe_0 is malformed"),
    ],
)
def test_malformed_manifest_refused(artifact_copy, edit, message):
    manifest = artifact_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        load_model(artifact_copy)


def test_symlink_escaping_artifact_refused(artifact_copy, tmp_path):
    path = _expert_path(artifact_copy)
    outside = tmp_path / "outside.safetensors"
    shutil.move(path, outside)
    path.symlink_to(outside)
    with pytest.raises(ArtifactError, match="resolves outside the artifact directory"):
        load_model(artifact_copy)


def test_symlink_into_a_sibling_whose_name_extends_the_artifacts_refused(artifact_copy):
    # /x/art2/... starts with the characters of /x/art: containment is by path components.
    path = _expert_path(artifact_copy)
    sibling = artifact_copy.with_name(artifact_copy.name + "2")
    sibling.mkdir()
    shutil.move(path, sibling / path.name)
    path.symlink_to(sibling / path.name)
    with pytest.raises(ArtifactError, match="resolves outside the artifact directory"):
        load_model(artifact_copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest"):
        load_model(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_model(tmp_path)


def test_bad_inputs_refused(reference_artifact):
    model = load_model(reference_artifact)
    with pytest.raises(InputError, match=r"token ids must be in \[0, 256\)"):
        model(np.array([[1, 300]]))
    with pytest.raises(InputError, match="expected 2 dimensions"):
        model(np.array([1, 2, 3]))
    with pytest.raises(InputError, match="expected dtype int64, got float32"):
        model(np.zeros((1, 3), np.float32))
    with pytest.raises(InputError, match="exceeds the model's 512 positions"):
        model(np.zeros((1, 513), np.int64))
    with pytest.raises(ValueError, match="below one expert"):
        load_model(reference_artifact, cache_budget=1000)
    with pytest.raises(ValueError, match="bad cache budget"):
        load_model(reference_artifact, cache_budget="lots")


def test_unknown_target_lists_known_ones():
    from moetvm.targets import TargetError, get_target

    with pytest.raises(TargetError, match=r"unknown target 'rpi5'; known targets: cortex-a72, host, jetson-orin"):
        get_target("rpi5")


def test_failed_compile_keeps_previous_artifact(artifact_copy, reference_model):
    """Writes are atomic: a compile that fails midway leaves the old artifact as it was."""
    from moetvm.compiler import compile_model
    from moetvm.targets import DeployTarget

    before = {p.relative_to(artifact_copy): p.read_bytes() for p in artifact_copy.rglob("*") if p.is_file()}
    broken = DeployTarget(name="broken", description="", tvm_target={"kind": "llvm", "mtriple": "nonsense-arch"})
    with pytest.raises(Exception):
        compile_model(reference_model, target=broken, out=artifact_copy, progress=False)
    after = {p.relative_to(artifact_copy): p.read_bytes() for p in artifact_copy.rglob("*") if p.is_file()}
    assert after == before
    leftovers = [p.name for p in artifact_copy.parent.iterdir() if p.name.startswith(".art.")]
    assert leftovers == []
    load_model(artifact_copy)  # still a good artifact

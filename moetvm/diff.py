"""What changed between two artifacts, and which files an update can reuse.

Everything comes from the two manifests (each file's size and SHA-256 are recorded there); no
weight or library file is read. An expert is identified by (MoE layer, expert index), a shared
expert by (layer, "shared<j>"), a layer's dense fallback expert by (layer, "fallback"), a
library by its name. Statuses:

    unchanged  same size and SHA-256 (the path may differ)
    changed    present in both, different content
    added      only in the new artifact
    removed    only in the old artifact

`diff_artifacts` returns plain JSON-serialisable data:

    {"old": str, "new": str,
     "libraries": [{"name", "status", "old": FILE|None, "new": FILE|None}, ...],
     "weights":   [{"path", "status", "old": FILE|None, "new": FILE|None}, ...],  (dense weight files)
     "experts":   [{"layer": int, "expert": int|"shared0"|"fallback", "status", "old": FILE|None, "new": FILE|None}, ...],
     "layers":    {"<layer>": {"unchanged": [experts], "changed": [...], "added": [...], "removed": [...],
                               "router_changed": bool}},
     "manifest_fields_changed": [top-level manifest fields other than libraries/moe_layers/weights that differ],
     "summary":   {"unchanged", "changed", "added", "removed": expert counts,
                   "libraries_changed": count of changed/added/removed libraries,
                   "weight_files_changed": the same for dense weight files,
                   "bytes_to_transfer": sizes of new files whose content no old file has,
                   "bytes_reusable": sizes of new files some old file already holds}}

where FILE is {"path", "size", "sha256"}. `format_diff` renders it as a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moetvm.artifact import MANIFEST_NAME, ArtifactError, FileRef, Manifest, check_file, read_manifest

STATUSES = ("unchanged", "changed", "added", "removed")


def _file(ref: FileRef | None) -> dict | None:
    return None if ref is None else {"path": ref.path, "size": ref.size, "sha256": ref.sha256}


def _status(old: FileRef | None, new: FileRef | None) -> str:
    if old is None:
        return "added"
    if new is None:
        return "removed"
    return "unchanged" if (old.sha256, old.size) == (new.sha256, new.size) else "changed"


def _experts(m: Manifest) -> dict[tuple, FileRef]:
    out = {}
    for layer in m.moe_layers:
        for e in layer.experts:
            out[(layer.layer, e.index)] = e.file
        for j, s in enumerate(layer.shared):
            out[(layer.layer, f"shared{j}")] = s.expert.file
        fallback = getattr(layer, "fallback", None)  # the "dense" policy's stand-in expert
        if fallback is not None:
            out[(layer.layer, "fallback")] = fallback.file
    return out


def _sort_key(key: tuple):
    layer, expert = key
    return (layer, isinstance(expert, str), str(expert) if isinstance(expert, str) else expert)


def _as_manifest(m: Manifest | str | Path) -> Manifest:
    if isinstance(m, Manifest):
        return m
    path = Path(m)
    if path.name == MANIFEST_NAME and path.is_file():
        path = path.parent
    return read_manifest(path)


def diff_manifests(old: Manifest, new: Manifest, old_name: str = "old", new_name: str = "new") -> dict:
    """The diff of two parsed manifests (see the module docstring for its shape)."""
    libraries = []
    old_libs = {lib.name: lib.file for lib in old.libraries}
    new_libs = {lib.name: lib.file for lib in new.libraries}
    for name in list(old_libs) + [n for n in new_libs if n not in old_libs]:
        o, n = old_libs.get(name), new_libs.get(name)
        libraries.append({"name": name, "status": _status(o, n), "old": _file(o), "new": _file(n)})
    weights = []  # the dense part's weight files, by path
    old_w = {w.file.path: w.file for w in old.weights}
    new_w = {w.file.path: w.file for w in new.weights}
    for path in list(old_w) + [p for p in new_w if p not in old_w]:
        o, n = old_w.get(path), new_w.get(path)
        weights.append({"path": path, "status": _status(o, n), "old": _file(o), "new": _file(n)})

    old_exp, new_exp = _experts(old), _experts(new)
    experts = []
    layers: dict[str, dict] = {}
    for key in sorted(set(old_exp) | set(new_exp), key=_sort_key):
        o, n = old_exp.get(key), new_exp.get(key)
        status = _status(o, n)
        experts.append({"layer": key[0], "expert": key[1], "status": status, "old": _file(o), "new": _file(n)})
        entry = layers.setdefault(str(key[0]), {s: [] for s in STATUSES})
        entry[status].append(key[1])
    old_routers = {layer.layer: layer.router for layer in old.moe_layers}
    new_routers = {layer.layer: layer.router for layer in new.moe_layers}
    for layer in sorted(set(old_routers) | set(new_routers)):
        entry = layers.setdefault(str(layer), {s: [] for s in STATUSES})
        entry["router_changed"] = old_routers.get(layer) != new_routers.get(layer)

    skip = {"libraries", "moe_layers", "weights"}
    fields_changed = [f.name for f in dataclasses.fields(Manifest)
                      if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)]

    old_content = {(ref.sha256, ref.size) for ref in old.files()}
    new_files = {(ref.sha256, ref.size): ref for ref in new.files()}  # identical files count once
    reusable = sum(size for (sha, size) in new_files if (sha, size) in old_content)
    transfer = sum(size for (sha, size) in new_files if (sha, size) not in old_content)
    counts = {s: sum(e["status"] == s for e in experts) for s in STATUSES}
    return {
        "old": old_name,
        "new": new_name,
        "libraries": libraries,
        "weights": weights,
        "experts": experts,
        "layers": layers,
        "manifest_fields_changed": fields_changed,
        "summary": {**counts,
                    "libraries_changed": sum(lib["status"] != "unchanged" for lib in libraries),
                    "weight_files_changed": sum(w["status"] != "unchanged" for w in weights),
                    "bytes_to_transfer": transfer,
                    "bytes_reusable": reusable},
    }


def diff_artifacts(old_dir: str | Path, new_dir: str | Path) -> dict:
    """Per library and per (layer, expert): unchanged / changed / added / removed, by SHA-256
    from the two manifests (both are parsed and validated; no other file is read)."""
    return diff_manifests(read_manifest(Path(old_dir)), read_manifest(Path(new_dir)), str(old_dir), str(new_dir))


@dataclass(frozen=True)
class Reusable:
    """A file of the new artifact whose exact content (size and SHA-256) the old one holds."""

    path: str  # in the new artifact
    old_path: str  # in the old artifact (relative to it)
    size: int
    sha256: str


def reusable_files(old_dir: str | Path, new_manifest: Manifest | str | Path, *, verify: bool = False) -> list[Reusable]:
    """Files of `new_manifest` (a Manifest, or an artifact directory / manifest.json path) that
    `old_dir` already holds byte for byte, matched by size and SHA-256 (content, not path), in
    the new manifest's file order. An update then needs only the others (new or changed experts
    and libraries).

    Matching uses the old manifest's records; with `verify`, each old file is also checked on
    disk (size and SHA-256, inside the artifact directory) and dropped from the list if it no
    longer matches. Whatever is reused, the updated artifact's own load checks every file again.
    """
    old_root = Path(old_dir)
    old = read_manifest(old_root)
    new = _as_manifest(new_manifest)
    by_content: dict[tuple[str, int], FileRef] = {}
    for ref in old.files():
        by_content.setdefault((ref.sha256, ref.size), ref)
    out, seen = [], set()
    for ref in new.files():
        old_ref = by_content.get((ref.sha256, ref.size))
        if old_ref is None or ref.path in seen:
            continue
        if verify:
            try:
                check_file(old_root, old_ref)  # also refuses paths resolving outside old_dir
            except ArtifactError:
                continue
        seen.add(ref.path)
        out.append(Reusable(path=ref.path, old_path=old_ref.path, size=ref.size, sha256=ref.sha256))
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _list(items) -> str:
    return ", ".join(str(i) for i in items) if items else "-"


def format_diff(d: dict) -> str:
    """A human-readable table of `diff_artifacts`' result."""
    lines = [f"old  {d['old']}", f"new  {d['new']}", "", "libraries"]
    width = max([len(lib["name"]) for lib in d["libraries"]] + [10])
    for lib in d["libraries"]:
        sizes = " -> ".join(_mb(f["size"]) for f in (lib["old"], lib["new"]) if f is not None)
        lines.append(f"  {lib['name']:{width}s}  {lib['status']:9s}  {sizes}")
    lines += ["", f"{'experts':8s} {'unchanged':>9s} {'changed':>8s} {'added':>6s} {'removed':>8s}  router  "
                  f"changed / added / removed"]
    for layer, entry in sorted(d["layers"].items(), key=lambda kv: int(kv[0])):
        counts = [len(entry[s]) for s in STATUSES]
        router = "changed" if entry.get("router_changed") else "same"
        detail = " / ".join(_list(entry[s]) for s in ("changed", "added", "removed"))
        lines.append(f"layer {layer:<3s}{counts[0]:9d} {counts[1]:8d} {counts[2]:6d} {counts[3]:8d}  {router:7s} {detail}")
    s = d["summary"]
    lines.append("")
    if d["manifest_fields_changed"]:
        lines.append(f"manifest fields changed: {', '.join(d['manifest_fields_changed'])}")
    lines.append(f"total    {s['unchanged']} experts unchanged, {s['changed']} changed, {s['added']} added, "
                 f"{s['removed']} removed; {s['libraries_changed']} libraries and "
                 f"{s['weight_files_changed']} dense weight files differ")
    lines.append(f"update   {_mb(s['bytes_to_transfer'])} to transfer, {_mb(s['bytes_reusable'])} reusable")
    return "\n".join(lines)

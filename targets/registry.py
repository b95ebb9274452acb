"""Named deployment targets: what a compile and a deploy need to know about a board.

Built-ins cover the workstation (`host`), a Raspberry Pi 4 class board (`cortex-a72`) and an
NVIDIA Jetson Orin (`jetson-orin`). Users add boards from TOML or JSON files (a table per target,
same fields as `DeployTarget`) without editing code: `load_targets_file(path)`, or list files in
the MOETVM_TARGETS environment variable (path-separated).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moetvm.errors import MoetvmError

GiB = 1 << 30


class TargetError(MoetvmError, ValueError):
    """Unknown or unusable target; the message says what to do."""


@dataclass(frozen=True)
class DeployTarget:
    name: str
    description: str
    tvm_target: dict  # JSON dict accepted by tvm.target.Target
    host: dict | None = None  # host-side target for device (CUDA) code
    cross_compiler: str | None = None  # g++ used by export_library; None = the system default
    cross_compiler_package: str | None = None  # Debian package providing it
    memory_budget: int = 1 * GiB  # default expert-cache ceiling on the board, bytes
    rpc_key: str = ""
    device: str = "cpu"  # "cpu" | "cuda"
    # The AEAD of encrypted weight files (compile --encrypt-key), moetvm/encryption.py's AEADS.
    weight_aead: str = "AES-256-GCM"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def cpu(self) -> bool:
        """Code for a CPU (LLVM) rather than a GPU: the compiler's hand-scheduled CPU kernels apply."""
        return self.tvm_target.get("kind") == "llvm"

    @property
    def int8_dot(self) -> bool:
        """A CPU with 64-byte integer dot products (x86 AVX512-VNNI): int8 and int4 weights take
        compiler/gemv.py's integer-dot kernels there."""
        return self._x86_has("avx512vnni")

    @property
    def int4_dot(self) -> bool:
        """int4 weights take the integer-dot kernels: with AVX512-VNNI, and with AVX2 alone, where
        each 4-byte dot is vpmaddubsw then vpmaddwd (compiler/gemv.py _dot_avx2): exact for int4's
        nibbles (a pair of products stays within int16), not for int8's bytes, which keep the
        fp32-product kernels there."""
        return self._x86_has("avx2")

    def _x86_has(self, feature: str) -> bool:
        import tvm
        from tvm.target import codegen

        triple = self.tvm_target.get("mtriple") or platform.machine()
        if not self.cpu or not triple.startswith(("x86_64", "AMD64")):
            return False  # (and LLVM's feature query crashes on triples it does not know)
        return bool(codegen.target_has_features(feature, tvm.target.Target(self.tvm_target)))

    def check_toolchain(self) -> str | None:
        """Path of the cross compiler, or a clear error naming the package to install."""
        if self.cross_compiler is None:
            return None
        found = shutil.which(self.cross_compiler)
        if not found:
            pkg = self.cross_compiler_package or "a cross toolchain providing it"
            raise TargetError(
                f"target {self.name!r} needs the cross compiler {self.cross_compiler!r}, which is "
                f"not on PATH: install it (Debian/Ubuntu: apt-get install {pkg})"
            )
        return found


def _host_target() -> DeployTarget:
    # Resolve the CPU at compile time: an artifact for `host` is for this very machine.
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    return DeployTarget(
        name="host",
        description=f"this workstation ({platform.machine()}, LLVM mcpu={cpu})",
        tvm_target={"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1},
        memory_budget=4 * GiB,
        rpc_key="host",
    )


BUILTIN = {
    "cortex-a72": DeployTarget(
        name="cortex-a72",
        description="Raspberry Pi 4 class board: 4x Cortex-A72, AArch64 + NEON, no SVE",
        tvm_target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mcpu": "cortex-a72",
            "mattr": ["+neon"],
            "num-cores": 4,
        },
        cross_compiler="aarch64-linux-gnu-g++",
        cross_compiler_package="g++-aarch64-linux-gnu",
        memory_budget=1 * GiB,
        rpc_key="rasp4",
        # The Pi 4's BCM2711 has no ARMv8 crypto extensions (no AES instructions): ChaCha20 in
        # plain NEON arithmetic outruns table- or bit-sliced AES there.
        weight_aead="ChaCha20-Poly1305",
    ),
    "jetson-orin": DeployTarget(
        name="jetson-orin",
        description="NVIDIA Jetson Orin: Ampere GPU (CUDA sm_87) with Cortex-A78AE host cores",
        tvm_target={"kind": "cuda", "arch": "sm_87", "max_num_threads": 1024, "thread_warp_size": 32},
        host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"},
        cross_compiler="aarch64-linux-gnu-g++",
        cross_compiler_package="g++-aarch64-linux-gnu",
        memory_budget=4 * GiB,
        rpc_key="orin",
        device="cuda",
    ),
}


def _parse_targets(path: Path) -> list[DeployTarget]:
    where = f"{path} (from MOETVM_TARGETS)" if str(path) in os.environ.get("MOETVM_TARGETS", "") else str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TargetError(f"{where}: cannot read the targets file ({getattr(e, 'strerror', None) or e})") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError both are
        raise TargetError(f"{where}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    entries = data.get("targets", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise TargetError(f"{where}: expected a table of targets by name")
    out = []
    for name, spec in entries.items():
        if not isinstance(spec, dict):
            raise TargetError(f"{where}: target {name!r}: expected a table of DeployTarget fields")
        try:
            target = DeployTarget(name=name, **spec)
        except TypeError as e:
            raise TargetError(f"{where}: target {name!r}: {e}") from None
        if not (isinstance(target.tvm_target, dict) and isinstance(target.tvm_target.get("kind"), str)):
            raise TargetError(f"{where}: target {name!r}: tvm_target must be a table with a 'kind' (llvm, cuda, ...)")
        if type(target.memory_budget) is not int or target.memory_budget <= 0:
            raise TargetError(f"{where}: target {name!r}: memory_budget must be a positive number of bytes")
        if target.device not in ("cpu", "cuda") or not isinstance(target.rpc_key, str):
            raise TargetError(f"{where}: target {name!r}: device must be cpu or cuda and rpc_key a string")
        from moetvm.encryption import AEADS

        if target.weight_aead not in AEADS:
            raise TargetError(f"{where}: target {name!r}: weight_aead must be one of {', '.join(AEADS)}")
        out.append(target)
    return out


def known_targets(extra_files: list[Path] = ()) -> dict[str, DeployTarget]:
    targets = {"host": None, **BUILTIN}  # host is resolved lazily (needs TVM)
    files = list(extra_files) + [Path(p) for p in os.environ.get("MOETVM_TARGETS", "").split(os.pathsep) if p]
    for f in files:
        for t in _parse_targets(Path(f)):
            targets[t.name] = t
    return targets


def get_target(name: str, extra_files: list[Path] = ()) -> DeployTarget:
    targets = known_targets(extra_files)
    if name not in targets:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(sorted(targets))}")
    return targets[name] or _host_target()

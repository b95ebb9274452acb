"""Facts about built libraries, read from the files themselves: which CPU an ELF is for, whether
AArch64 code uses SVE (a Cortex-A72 has none), and which GPU archs embedded CUDA code targets."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 190: "cuda"}
_FATBIN_MAGIC = 0xBA55ED50
# SVE's scalable vector (z0-z31) and predicate (p0-p15) registers never appear in NEON code.
_SVE_OPERAND = re.compile(r"\bz([12]?[0-9]|3[01])\.[bhsdq]\b|\bp([0-9]|1[0-5])/[zm]\b|\bptrue\b|\bwhilelo\b")


def elf_machine(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path}: not an ELF file")
    (machine,) = struct.unpack_from("<H", head, 18)
    return _ELF_MACHINES.get(machine, f"machine-{machine}")


def sve_instructions(path: Path, objdump: str = "aarch64-linux-gnu-objdump") -> list[str]:
    """Disassembled lines of `path` that use SVE registers or instructions."""
    tool = shutil.which(objdump)
    if tool is None:
        raise FileNotFoundError(f"{objdump} not found (Debian: apt-get install binutils-aarch64-linux-gnu)")
    text = subprocess.run([tool, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line for line in text.splitlines() if _SVE_OPERAND.search(line.split("\t", 2)[-1])]


def cuda_architectures(path: Path) -> list[dict]:
    """Entries of every CUDA fatbin embedded in `path`: kind ('cubin' or 'ptx') and sm version."""
    data = Path(path).read_bytes()
    entries = []
    start = 0
    magic = struct.pack("<I", _FATBIN_MAGIC)
    while (start := data.find(magic, start)) >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
        offset, end = start + header_size, start + header_size + fat_size
        while offset < end:
            kind, _, entry_header, padded = struct.unpack_from("<HHII", data, offset)
            (sm,) = struct.unpack_from("<I", data, offset + 28)
            entries.append({"kind": {1: "ptx", 2: "cubin"}.get(kind, str(kind)), "sm": sm})
            offset += entry_header + padded
        start = end
    return entries

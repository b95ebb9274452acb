"""`BuildTarget`: a deploy target resolved for building, once per compile: its TVM target, its
cross compiler found on PATH, and the CPU facts the kernels depend on. Every library of a
compile is built with the one object (lowering.build_library), and tuning measures on it."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from moetvm.targets import DeployTarget, get_target


@dataclass(frozen=True)
class BuildTarget:
    """A deploy target resolved for building, once: its TVM target and its cross compiler's path
    (None: the system compiler), or a TargetError naming the package to install."""

    deploy: DeployTarget
    tvm: tvm.target.Target
    cross_compiler: str | None
    int8_dot: bool  # x86 AVX512-VNNI: int8/int4 weights take the integer-dot kernels
    int4_dot: bool  # x86 AVX2 (or VNNI): int4 weights take them (DeployTarget.int4_dot)

    @classmethod
    def resolve(cls, target: "str | DeployTarget | BuildTarget") -> "BuildTarget":
        if isinstance(target, BuildTarget):
            return target
        deploy = target if isinstance(target, DeployTarget) else get_target(target)
        compiler = deploy.check_toolchain()
        tvm_target = tvm.target.Target(deploy.tvm_target, deploy.host) if deploy.host else tvm.target.Target(deploy.tvm_target)
        return cls(deploy, tvm_target, compiler, deploy.int8_dot, deploy.int4_dot)

    def dot_for(self, precision: str) -> bool:
        """Whether weights of this precision (a scheme's name) take the integer-dot kernels."""
        return {"int8": self.int8_dot, "int4": self.int4_dot}.get(precision, False)

    @property
    def name(self) -> str:
        return self.deploy.name

    @property
    def cpu(self) -> bool:
        """LLVM code for a CPU: the compiler's hand-scheduled CPU kernels apply."""
        return self.deploy.cpu

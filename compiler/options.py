"""What a compile is asked for, checked once: `CompileOptions` (how to quantize, route, tune and
sign). The CLI's flags, `compile_model`, `compile_onnx` and `tune_model` all build one: each
option's default and check is written here and nowhere else. Where the code runs is the other
half, `BuildTarget` (build_target.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetvm.artifact import KV_DTYPES, QUANT_SCHEMES, ROUTING_MODES
from moetvm.budget import parse_budget
from moetvm.errors import UsageError

from . import quant as quantization

# auto: per expert, planned from calibration text; keep: the checkpoint's own precision
QUANT_CHOICES = (*QUANT_SCHEMES, "auto", "keep")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile a model (every field checked on construction; UsageError,
    QuantizationError, TuningError or SignatureError, one line each).

    quant: expert weight precision, one of QUANT_CHOICES: fp32, fp16, bf16, int8, int4 (group-wise,
    `group_size` input rows per scale and zero point; without zero points where `int4_symmetric`,
    llama.cpp's q4_0 format) or auto (per expert, from calibration
    tokens, within `weight_budget`: bytes, a size or a percentage of the fp32 expert bytes) or
    keep (the checkpoint's precision, see `kept`).
    router_quant: the routers' precision (fp32 or int8).
    dense_quant: the dense part's linear layers, LM head and embedding table; default: as
    `quant` (fp32 with auto). Norms stay fp32. Dense weights go to weight files, never into code.
    kv_dtype: the keys and values an LM caches; default: int8 where the dense part is int8 or
    int4, float32 where it is fp32, float16 otherwise. int8 (in-place caches) quantizes each
    position's key and value per head, with its scale.
    routing: learned (the model's router), hash (token id -> experts, fitted on calibration
    tokens), tiling (by position, `tile` positions per expert set) or cycle (by time step, each
    set held `cycle_dwell` steps).
    mask_below: experts taking less than this share of their layer's routing on the calibration
    tokens are masked (their traffic goes to each token's next-best expert) and pruned.
    tuning_db: a MetaSchedule database from `tune_model`: kernels with records take their tuned
    schedules, the rest the default ones.
    dense_fallback: add per layer the mean of its experts, for the runtime's "dense" fallback.
    sign_key: an Ed25519 private key file; the artifact is signed before it replaces anything.
    encrypt_key: a file of 32 random bytes; the weight files are stored encrypted with it
    (AES-256-GCM, moetvm/encryption.py), the runtime decrypts them in memory with the same file.
    """

    quant: str = "fp32"
    group_size: int = quantization.DEFAULT_GROUP_SIZE
    int4_symmetric: bool = False
    router_quant: str = "fp32"
    dense_quant: str | None = None
    kv_dtype: str | None = None
    weight_budget: int | str | None = None
    routing: str = "learned"
    tile: int = 16
    cycle_dwell: int = 8
    mask_below: float | None = None
    tuning_db: Path | None = None
    dense_fallback: bool = False
    sign_key: Path | None = None
    encrypt_key: Path | None = None

    def __post_init__(self):
        if not (type(self.group_size) is int and self.group_size > 0):
            raise UsageError(f"group size must be a positive integer, got {self.group_size!r}")
        if self.quant not in QUANT_CHOICES:
            raise quantization.QuantizationError(f"unknown quantization {self.quant!r}; choose from {', '.join(QUANT_CHOICES)}")
        if type(self.int4_symmetric) is not bool:
            raise UsageError(f"int4_symmetric must be True or False, got {self.int4_symmetric!r}")
        if self.quant not in ("auto", "keep"):
            quantization.scheme(self.quant, self.group_size)
        elif self.quant == "auto" and self.weight_budget is None:
            raise quantization.QuantizationError("--quant auto needs a --weight-budget (bytes, a size or a percentage "
                                                 "of the fp32 expert bytes)")
        quantization.scheme(self.router_quant, self.group_size)
        if self.dense_quant is not None:
            quantization.scheme(self.dense_quant, self.group_size)
        if self.kv_dtype not in (None, *KV_DTYPES):
            raise UsageError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.weight_budget is not None:
            parse_budget(self.weight_budget, 1 << 40, "weight budget")
        if self.routing not in ROUTING_MODES:
            raise UsageError(f"unknown routing mode {self.routing!r}; choose from {', '.join(ROUTING_MODES)}")
        for flag, value in (("tile", self.tile), ("cycle dwell", self.cycle_dwell)):
            if not (type(value) is int and value >= 1):
                raise UsageError(f"{flag} must be a positive number of positions, got {value!r}")
        if self.mask_below is not None and not (isinstance(self.mask_below, (int, float)) and 0 < self.mask_below < 1):
            raise UsageError(f"mask below must be a share of routing in (0, 1), got {self.mask_below!r}")
        if self.tuning_db is not None:
            from .tuning import open_database

            open_database(self.tuning_db, create=False)  # TuningError naming what is wrong with it
        if self.sign_key is not None:
            from moetvm.signing import load_private_key

            load_private_key(self.sign_key)
        if self.encrypt_key is not None:
            from moetvm.encryption import read_key

            read_key(self.encrypt_key)  # EncryptionError naming what is wrong with it

    @classmethod
    def of(cls, options: "CompileOptions | None" = None, **fields) -> "CompileOptions":
        """`options` with `fields` replaced (the keyword form compile_model also takes)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise UsageError(f"unknown compile option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                             f"the options are {', '.join(sorted(names))}")
        return dataclasses.replace(options or cls(), **fields) if fields else (options or cls())

    def kept(self, precision: str) -> "CompileOptions":
        """quant "keep" made the weights' own `precision` (fp32, fp16 or bf16), for the experts and
        (unless dense_quant says otherwise) the dense part: the checkpoint's bytes, stored as
        they are (every target's kernels widen fp16 and bf16 to fp32 and accumulate in fp32)."""
        if self.quant != "keep":
            return self
        stored = precision
        return dataclasses.replace(self, quant=stored, dense_quant=self.dense_quant or stored)

    @property
    def dense_scheme(self) -> quantization.Scheme:
        """The dense part's precision: dense_quant, else the experts' (fp32 with auto)."""
        return quantization.scheme(self.dense_quant or (self.quant if self.quant != "auto" else "fp32"), self.group_size,
                                   self.int4_symmetric)

    def kv_cache_dtype(self) -> str:
        """The cache's dtype unless kv_dtype names one. A model whose dense weights are 8 or 4 bits
        caches int8 keys and values: half fp16's bytes, the read that grows with the context (a
        1024-position OLMoE-style cache is 67 MB in fp16, a third of an int4 token's weights), at
        an error far below the weights' own (the shipped model over 8 x 512 held-out bytes, int4
        weights: 4.0753 -> 4.0740 bits/byte, 99.1% of top-1 tokens kept, where int4 weights keep
        91% of fp32's). fp32 models keep fp32 (numerics against PyTorch); fp16 and bf16 models
        fp16, as llama.cpp and MLC-LLM default to."""
        if self.kv_dtype:
            return self.kv_dtype
        return {"fp32": "float32", "int8": "int8", "int4": "int8"}.get(self.dense_scheme.name, "float16")

    @property
    def calibrated(self) -> bool:
        """Whether these options run calibration tokens through the PyTorch model."""
        return self.quant == "auto" or self.routing == "hash" or self.mask_below is not None

    def check_calibration(self, calibration) -> None:
        """Calibration tokens (batch, seq) of integers, present where an option needs them."""
        if calibration is None:
            if self.calibrated:
                what = "--quant auto" if self.quant == "auto" else \
                    "hash routing" if self.routing == "hash" else "--mask-below"
                raise UsageError(f"{what} needs calibration tokens to fit on (--calibration text)")
            return
        cal = np.asarray(calibration)
        if cal.ndim != 2 or cal.size == 0 or not np.issubdtype(cal.dtype, np.integer):
            raise UsageError(f"calibration must be token windows (batch, seq) of integers with at least one token, "
                             f"got {cal.dtype} of shape {cal.shape}")

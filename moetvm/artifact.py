"""The artifact: the one contract between the compiler and the runtime.

An artifact is a directory holding `manifest.json`, kernel libraries and one safetensors file per
expert. The compiler writes it, the runtime reads it; both use only this module (standard library
only, so it ships to boards). The manifest is a typed schema with a format version; `parse`
validates structure and types, and `check_files` validates every referenced file against its
recorded size and SHA-256 before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import stat
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from moetvm.errors import MoetvmError

# 2: the dense part's weights in weight files (`weights`), not in the segments library
# 3: resident MoE layers (a layer's experts in one pool, routed and run in one call)
# 4: the LM's tokenizer (`tokenizer`) and bf16 weights: a runtime before them says so by version
# 5: sparsemixer routing (PhiMoE: score_fn "sparsemixer", jitter_eps); a sliding window's bounded cache
#    (kv_cache.window); routing weights that scale the experts' input (Llama 4: scale_input)
# 6: weight files encrypted at rest (`encryption`, moetvm/encryption.py)
# 7: an int8 in-place KV cache (kv_cache.dtype "int8", each position's scale in the buffer)
# 8: per-layer recurrent state carried like the KV cache (kv_cache.states: LFM2's short convolutions,
#    Mamba2); a window on some layers only (kv_cache.full_layers: GPT-OSS, Cohere2), the windowed ones
#    holding the last window - 1 positions (their positions a `window_positions` input of the step)
# 9: in-place KV buffers in blocks of positions (kv_cache.block): a block's keys are contiguous
# 10: segments computed position by position (`per_position`: the final norm and LM head), which a
#     generation's prefill runs on the last position alone
# 11: symmetric int4 (`Workload.symmetric`; dense weight files' quant tag "int4g<G>s..."): no zero
#     points, a runtime before them would not know the tensors are two, not three, per weight
# 12: a resident layer's decode function (`MoELayer.decode_function`): router, top-k and the layer
#     in one call on the hidden state as the segments hand it over
# 13: a decode step in one call (`decode_step`): every segment and every layer's decode function for
#     one token, the routers and decode functions beside the segments in their library
# 14: an int8 in-place KV cache in dot order (kv_cache.dot): its buffers' shapes and byte order differ
# 15: a dense weight only gathered by token rows (TensorSpec.lookup_rows: an untied input embedding
#     table), which the runtime may hold slice by slice, as tokens reach it
FORMAT_VERSION = 15
SUPPORTED_FORMAT_VERSIONS = (1, 15)
SLOT_ALIGN = 64  # bytes: every tensor in an expert's pool slot starts at a multiple (the kernels' vector alignment)
MANIFEST_NAME = "manifest.json"


class ArtifactError(MoetvmError):
    """A problem with an artifact; the message names the file and the failed check."""


@dataclass(frozen=True)
class FileRef:
    path: str  # relative to the artifact directory, POSIX separators
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int | str]  # str entries are symbolic dimensions ("batch", "seq", ...)
    dtype: str
    # A dense weight that the program only gathers rows of, at the `tokens` input's ids (an input
    # embedding table the LM head does not share), stored so that each slice along its first axis
    # holds this many consecutive token rows: token t's row lies in slice t // lookup_rows alone.
    # A runtime may hold just the slices of the tokens it has seen (format 15).
    lookup_rows: int | None = None


@dataclass(frozen=True)
class Library:
    name: str
    file: FileRef
    functions: list[str]


@dataclass(frozen=True)
class Step:
    """One step of the program the runtime interprets: a dense segment or an MoE layer."""

    op: str  # "segment" | "moe"
    name: str  # segment: function name in the segments library; moe: "moe_<layer>"
    inputs: list[str]
    outputs: list[str]
    layer: int | None = None
    # A segment whose outputs at a position depend on its inputs at that position alone (it reads
    # no positions and no cache): given the last position's rows, it gives the last position's.
    per_position: bool = False


def fused_function(function: str, k: int) -> str:
    """The name of a workload's function running `k` experts on the same rows at once."""
    return f"{function}_x{k}"


@dataclass(frozen=True)
class Workload:
    """A distinct expert kernel: every expert with this shape and dtype shares its library."""

    id: str
    kind: str  # "swiglu"
    library: str
    function: str
    d_model: int
    d_ff: int
    dtype: str  # activations
    params: list[TensorSpec]  # stored weight tensors, in call order after the activations
    quant: str = "fp32"  # weight storage, one of QUANT_SCHEMES (dequantized inside the kernel)
    group_size: int | None = None  # int4: input rows sharing one scale and zero point
    symmetric: bool = False  # int4 without zero points (format 11): w = (q - 8) * scale, llama.cpp's q4_0
    fused_k: list[int] = field(default_factory=list)  # k with a function `<function>_x<k>` running k experts at once
    tile: int | None = None  # stored tile-major: each (rows, N) tensor as (N / tile, rows, tile)
    dot: bool = False  # tiles dot-interleaved for integer dot products; activations rounded to int8 per 32 inputs
    # An expert's place in a resident layer's pool (n_experts slots of slot_bytes, expert e at
    # e * slot_bytes): each param's byte offset in the slot. Empty: no resident layer uses it.
    slot_offsets: list[int] = field(default_factory=list)
    slot_bytes: int = 0


@dataclass(frozen=True)
class Expert:
    index: int
    workload: str
    file: FileRef
    weight_bytes: int  # bytes the expert occupies in the cache
    usage: float | None = None  # share of its layer's routing on calibration text (preload order)


@dataclass(frozen=True)
class Router:
    library: str
    function: str  # hidden (n, d) -> scores (n, n_experts), score_fn already applied (sparsemixer: logits)
    n_experts: int
    top_k: int
    score_fn: str  # one of SCORE_FNS
    normalize: bool  # renormalise the top-k weights to sum to 1
    n_groups: int = 1  # grouped top-k (DeepSeek-V3): experts split into groups...
    top_groups: int = 1  # ...and only the best groups compete
    group_score: str = "top2_sum"  # a group's score: sum of its 2 best (DeepSeek-V3) | "max" (DeepSeek-V2)
    scaling: float = 1.0  # routed scaling factor applied to the final weights
    selection_bias: list[float] | None = None  # added to scores for selection only
    mode: str = "learned"  # learned (the router above) | hash | tiling | cycle (see moetvm.routing)
    table: list[list[int]] | None = None  # hash: token id -> its top_k experts
    tile: int = 16  # tiling: consecutive positions that share one expert set
    cycle: list[list[int]] | None = None  # cycle: expert sets, one per time step, repeated
    masked: list[int] = field(default_factory=list)  # experts disabled and pruned from the artifact
    jitter_eps: float = 0.0  # sparsemixer: experts more than 2 jitter_eps (relative) below the pick leave its softmax
    scale_input: bool = False  # Llama 4: each weight scales its expert's input; the outputs add up unweighted


@dataclass(frozen=True)
class SharedExpert:
    expert: Expert
    gate_function: str | None = None  # sigmoid gate (n, d) -> (n, 1) in the router library


@dataclass(frozen=True)
class MoELayer:
    layer: int
    d_model: int
    router: Router
    experts: list[Expert]
    shared: list[SharedExpert] = field(default_factory=list)
    fallback: Expert | None = None  # dense stand-in (mean of the experts) for the "dense" policy
    # A function of the experts' workload library running the whole layer for one token when all
    # its experts are loaded in one pool: (x (1, d), scores (1, n_experts) from the router, pool
    # (n_experts * slot_bytes,) uint8) -> (1, d); top-k, weights, the k experts and their
    # weighted sum in one call, so no routing decision crosses to the host.
    resident_function: str | None = None
    # A function of the router's library doing a decode step's whole layer over the same pool:
    # (x (1, 1, d) as the segments hand it over, pool) -> (1, 1, d); the router, then the resident
    # function, in one call (format 12; without it, the router and the resident function are two).
    decode_function: str | None = None


@dataclass(frozen=True)
class WeightFile:
    """A safetensors file of the dense part's weights, which the program's segments take as
    inputs by these names. Quantized tensors come as `name` plus `name.scale` (and `.zero`)."""

    file: FileRef
    tensors: list[TensorSpec]
    weight_bytes: int  # the tensors' bytes: what the runtime holds loaded
    quant: str = "fp32"  # storage of the linear and embedding weights among them (norms etc. stay fp32)


@dataclass(frozen=True)
class LayerState:
    """A recurrent layer's fixed-size state, carried between steps like the KV cache (in_place
    layout, format 8): one buffer (batch, *shape) of `dtype` per stateful layer, which the step
    reads and rewrites in place and treats as zeros at the first step (past length 0), whatever
    it holds. kind "conv": the last kernel - 1 inputs of a causal depthwise convolution (LFM2's
    short convolutions, Mamba2's input convolution), shape [kernel - 1, channels]; "ssm": a
    Mamba2 selective scan's state, shape [heads, head dim, state size]; "delta": a gated delta
    rule's (Qwen3-Next's linear attention) key-value memory, shape [value heads, value dim, key
    dim]. A layer may carry a conv state and one of the others."""

    kind: str  # one of STATE_KINDS
    layer: int  # the decoder layer it belongs to (the step takes the states in this list's order)
    shape: list[int]
    dtype: str = "float32"


@dataclass(frozen=True)
class KVCacheLayout:
    """A causal LM's KV cache. in_place: the step takes per layer a key buffer (batch, key heads,
    blocks, key dim, block) and a value buffer (batch, value heads, blocks, block, value dim) of
    `dtype` for a capacity of blocks x `block` positions (format 9; before it, with no block, keys
    (batch, key heads, key dim, capacity) and values (batch, value heads, capacity, value dim)),
    which it writes at the new positions, and returns logits; the capacity is a multiple of
    `capacity_multiple`, itself a multiple of the block. concat (format 1): past keys/values (batch, heads, past, dim) in,
    extended ones out, the past positions they hold beside them; with a `window` (format 5) every
    layer attends to the last `window` positions only, so the cache keeps the last window - 1;
    except `full_layers` (format 8), which attend to, and keep, every position: the step then
    takes the positions the windowed layers hold as its own input (`window_positions`). With a
    `chunk` instead (format 8: Llama 4) the other layers attend within their chunk of `chunk`
    positions and keep only the current chunk's (length mod chunk).
    int8 (in_place, format 7): each position's key column and value row is quantized on its own,
    symmetric, and carries its float32 scale (little-endian) in KV_SCALE_BYTES extra int8 elements:
    key buffers have key dim + 4 rows, value rows value dim + 4 elements.
    dot (int8, format 14; compiler/attention.py append_quantized): the same numbers in the order of 4-byte
    integer dot products, for CPUs that have them: keys (batch, key heads, blocks, key dim / 4 + 1,
    block * 4), values (batch, value heads, blocks, block * (value dim + 4))."""

    layout: str = "concat"  # one of KV_LAYOUTS
    dtype: str = "float32"  # one of KV_DTYPES
    capacity_multiple: int = 1
    window: int | None = None  # concat: sliding-window attention in every layer but full_layers
    full_layers: list[int] = field(default_factory=list)  # concat with a window or chunk: KV layers attending to all
    chunk: int | None = None  # concat: chunked attention (Llama 4) in every layer but full_layers
    states: list[LayerState] = field(default_factory=list)  # in_place: layers that carry a state, not keys and values
    block: int | None = None  # in_place (format 9): positions per block of the key and value buffers
    dot: bool = False  # int8 in_place with a block (format 14): stored in dot order

    @property
    def scale_bytes(self) -> int:
        """Extra elements per position holding its scale (int8: a float32's bytes)."""
        return KV_SCALE_BYTES if self.dtype in KV_QUANTIZED else 0

    def buffer_dims(self, kv_layout: list[int]) -> tuple[tuple, tuple]:
        """in_place: one layer's (key buffer, value buffer) shapes, None where they vary (batch
        first, then the capacity in positions or blocks)."""
        _, (key_heads, key_dim), (value_heads, value_dim) = kv_shapes(kv_layout)
        key_rows, value_row = key_dim + self.scale_bytes, value_dim + self.scale_bytes
        if self.block is None:
            return (None, key_heads, key_rows, None), (None, value_heads, None, value_row)
        if self.dot:
            return (None, key_heads, None, key_dim // 4 + 1, self.block * 4), (None, value_heads, None, self.block * value_row)
        return (None, key_heads, None, key_rows, self.block), (None, value_heads, None, self.block, value_row)

    def buffer_shapes(self, kv_layout: list[int], batch: int, capacity: int) -> tuple[tuple, tuple]:
        """in_place: the shapes of one layer's (key buffer, value buffer) for `capacity` positions
        (a multiple of the block)."""
        size = capacity if self.block is None else capacity // self.block
        return tuple(tuple(batch if i == 0 else size if d is None else d for i, d in enumerate(dims))
                     for dims in self.buffer_dims(kv_layout))

    def capacity_of(self, key_buffer_shape) -> int:
        """in_place: the positions a key buffer of this shape holds."""
        return key_buffer_shape[3] if self.block is None else key_buffer_shape[2] * self.block


@dataclass(frozen=True)
class ModelInfo:
    """What the artifact's model is: its name and size for people, and for a causal LM the facts
    the runtime drives it by (KV layout and cache, vocabulary, position limit)."""

    name: str = ""
    description: str = ""
    source: str = ""  # where the compiler read it from ("reference", "hf:DIR", a path)
    parameters: int = 0
    moe_layers: int = 0
    experts_per_layer: list[int] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    # causal LMs: [layers, heads, head_dim], or [layers, key heads, key dim, value heads, value dim]
    kv_layout: list[int] | None = None
    kv_cache: KVCacheLayout | None = None  # None: concat, float32 (format 1)
    vocab_size: int | None = None
    max_positions: int | None = None
    d_model: int | None = None
    # imported graphs (ONNX)
    format: str | None = None
    opset: dict | None = None
    index_limits: dict = field(default_factory=dict)  # input name -> bound its integer values must stay under

    @property
    def kv(self) -> KVCacheLayout:
        return self.kv_cache or KVCacheLayout()

    @property
    def kv_shapes(self) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(layers, (key heads, key dim), (value heads, value dim)) of a causal LM."""
        return kv_shapes(self.kv_layout)

    @property
    def kv_position_bytes(self) -> int | None:
        """in_place: the bytes the KV cache holds per position over all layers (keys and values,
        with int8's scales), which every decode step reads again for each position in context;
        None for the concat layout."""
        kv = self.kv
        if self.kv_layout is None or kv.layout != "in_place":
            return None
        multiple = kv.capacity_multiple  # a whole number of blocks
        key_shape, value_shape = kv.buffer_shapes(self.kv_layout, 1, multiple)
        elements = sum(math.prod(shape) for shape in (key_shape, value_shape))
        return self.kv_layout[0] * elements * DTYPE_BYTES[kv.dtype] // multiple

    @functools.cached_property
    def io_names(self) -> tuple[list[str], list[str]]:
        """A causal LM step's (input names, output names), in order (lm_io_names)."""
        return lm_io_names(self.kv_layout[0], self.kv.layout, len(self.kv.states), bool(self.kv.full_layers))


@dataclass(frozen=True)
class TargetInfo:
    """The deploy target the libraries were built for: the facts a board and `deploy` need."""

    name: str
    tvm_target: dict  # JSON dict accepted by tvm.target.Target
    description: str = ""
    host: dict | None = None  # host-side target for device (CUDA) code
    device: str = "cpu"  # one of DEVICES
    memory_budget: int | None = None  # the board's default expert-cache ceiling, bytes
    rpc_key: str = ""  # the device key `deploy --tracker` asks for ("" in older artifacts)


@dataclass(frozen=True)
class TokenizerInfo:
    """How text becomes the model's token ids and back (runtime/tokenizer.py). bytes: an id is a
    byte of the UTF-8 text (the reference model's 256-token vocabulary). hf: a Hugging Face
    tokenizer, `files[0]` its tokenizer.json; the other files are the model directory's tokenizer
    configuration, copied as they were. The facts generation needs are recorded here once."""

    kind: str  # one of TOKENIZER_KINDS
    files: list[FileRef] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)  # a generation ends at any of these
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token, ...: text, as chat templates use them
    chat_template: str | None = None  # Jinja2 source, rendered as transformers' apply_chat_template does


@dataclass(frozen=True)
class Encryption:
    """The artifact's weight files are encrypted (moetvm/encryption.py): with `aead`, under the
    key whose keyed hash is `key_check`."""

    aead: str
    key_check: str


@dataclass(frozen=True)
class DecodeStep:
    """A function of the segments library that runs the whole program for one token on an
    in-place KV cache with every expert resident: each segment, then each MoE layer's decode
    function: the step's inputs, the dense weights, then one expert pool per MoE step in program
    order, all by name; it returns the model's one output (the logits). It checks its inputs'
    shapes, not the weights' and pools' (static, and checked by the segments and decode functions,
    which a runtime runs once first)."""

    function: str
    inputs: list[str]  # program inputs (tokens, positions, KV buffers...)
    weights: list[str]  # dense weights


@dataclass(frozen=True)
class Manifest:
    format_version: int
    kind: str  # "causal_lm" | "moe_block" | "graph" (fixed-shape inputs -> outputs, e.g. an ONNX import)
    model: ModelInfo
    target: TargetInfo
    libraries: list[Library]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    program: list[Step]
    workloads: list[Workload]
    moe_layers: list[MoELayer]
    compile_info: dict = field(default_factory=dict)
    weights: list[WeightFile] = field(default_factory=list)
    tokenizer: TokenizerInfo | None = None  # causal LMs compiled with one
    encryption: Encryption | None = None  # weight files encrypted at rest
    decode_step: DecodeStep | None = None  # format 13

    @property
    def dense_weight_bytes(self) -> int:
        return sum(w.weight_bytes for w in self.weights)

    @property
    def cache_bytes(self) -> int:
        """Every expert's bytes, routed and shared (not the dense fallbacks): what the expert cache
        would hold with everything loaded, and the base of a percentage cache budget."""
        return sum(e.weight_bytes for layer in self.moe_layers for e in layer.experts) + \
            sum(s.expert.weight_bytes for layer in self.moe_layers for s in layer.shared)

    @property
    def token_cache_bytes(self) -> int:
        """The cache bytes one token's experts take: per MoE layer, its top-k routed experts (at
        the layer's mean expert size) and its shared experts."""
        return sum(layer.router.top_k * sum(e.weight_bytes for e in layer.experts) // max(len(layer.experts), 1)
                   + sum(s.expert.weight_bytes for s in layer.shared) for layer in self.moe_layers)

    def library(self, name: str) -> Library:
        for lib in self.libraries:
            if lib.name == name:
                return lib
        raise ArtifactError(f"{MANIFEST_NAME}: no library named {name!r}")

    def workload(self, wid: str) -> Workload:
        for w in self.workloads:
            if w.id == wid:
                return w
        raise ArtifactError(f"{MANIFEST_NAME}: no workload named {wid!r}")

    def files(self) -> list[FileRef]:
        return [lib.file for lib in self.libraries] + [w.file for w in self.weights] + \
            (self.tokenizer.files if self.tokenizer else []) + self._expert_files()

    def weight_files(self) -> list[FileRef]:
        """The files that hold the model's weights: the dense part's, every expert's (routed,
        shared, dense stand-ins). What encryption covers."""
        return [w.file for w in self.weights] + self._expert_files()

    def _expert_files(self) -> list[FileRef]:
        refs = []
        for layer in self.moe_layers:
            refs += [e.file for e in layer.experts] + [s.expert.file for s in layer.shared]
            refs += [layer.fallback.file] if layer.fallback else []
        return refs

    def to_json(self) -> str:
        try:  # NaN/Infinity are not JSON: refuse to write a manifest other readers would reject
            # Unset optional fields (all default to None) are left out rather than written as null.
            data = dataclasses.asdict(self, dict_factory=lambda items: {k: v for k, v in items if v is not None})
            return json.dumps(data, indent=1, sort_keys=False, allow_nan=False)
        except ValueError as e:
            raise ArtifactError(f"{MANIFEST_NAME}: cannot be written as JSON ({e})") from None


# --- parsing: structural validation of untrusted JSON into the dataclasses -------------------
def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(option, value, where)
            except ArtifactError as e:
                errors.append(str(e))
        raise ArtifactError(errors[0] if errors else f"{where}: unexpected null")
    if origin is list:
        if not isinstance(value, list):
            raise ArtifactError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is tp):
        return value
    raise ArtifactError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")


def _from_dict(cls, data, where: str):
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ArtifactError(f"{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def parse(text: str | bytes) -> Manifest:
    """Parse and validate manifest JSON (untrusted input)."""
    def not_json(constant: str):
        raise ValueError(f"{constant} is not a JSON number")

    try:
        data = json.loads(text, parse_constant=not_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{MANIFEST_NAME}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{MANIFEST_NAME}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{MANIFEST_NAME}: expected a JSON object")
    version = data.get("format_version")
    lo, hi = SUPPORTED_FORMAT_VERSIONS
    if type(version) is not int or not lo <= version <= hi:
        raise ArtifactError(
            f"{MANIFEST_NAME}: format_version {version!r} is not supported "
            f"(this runtime reads versions {lo}..{hi})"
        )
    manifest = _from_dict(Manifest, data, "manifest")
    _check_consistency(manifest)
    return manifest


MAX_DIM = 1 << 31  # any one tensor dimension (a real one is below 10^6)
QUANT_SCHEMES = ("fp32", "fp16", "bf16", "int8", "int4")  # how weights may be stored (compiler/quant.py builds them)
KV_DTYPES = ("float32", "float16", "int8")  # what an LM's KV cache may hold
KV_QUANTIZED = ("int8",)  # in_place only: stored with a per-position scale (KVCacheLayout)
KV_SCALE_BYTES = 4
STATE_KINDS = {"conv": 2, "ssm": 3, "delta": 3}  # what a stateful layer carries between steps (LayerState) -> its shape's length
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}
SCORE_FNS = ("softmax", "sigmoid", "sparsemixer")  # sparsemixer: PhiMoE's two picks (see routing.select_experts)
GROUP_SCORES = ("top2_sum", "max")  # how grouped top-k ranks a group (see routing.select_experts)
MAX_EXPERTS = 1 << 16  # per layer; bounds every table the runtime builds from a manifest
DEVICES = ("cpu", "cuda")
TOKENIZER_KINDS = ("bytes", "hf")


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def _check_consistency(m: Manifest) -> None:
    if m.kind not in ("causal_lm", "moe_block", "graph"):
        raise ArtifactError(f"{MANIFEST_NAME}: unknown artifact kind {m.kind!r}")
    if m.target.device not in DEVICES:
        raise ArtifactError(f"{MANIFEST_NAME}: target device {m.target.device!r} is not one of {DEVICES}")
    if m.target.memory_budget is not None and not _positive_int(m.target.memory_budget):
        raise ArtifactError(f"{MANIFEST_NAME}: target memory_budget must be a positive number of bytes, got "
                            f"{m.target.memory_budget!r}")
    if not m.moe_layers:
        raise ArtifactError(f"{MANIFEST_NAME}: no MoE layers")
    _check_model_fields(m)
    _check_tokenizer(m)
    _check_program(m)
    libs = {lib.name: lib for lib in m.libraries}
    for ref in m.files():
        safe_relative_path(ref.path)
    for t in m.inputs + m.outputs:
        if any(type(d) is int and not 0 < d < MAX_DIM for d in t.shape):
            raise ArtifactError(f"{MANIFEST_NAME}: tensor {t.name} has a dimension outside 1..{MAX_DIM - 1}: {t.shape}")
    for t in m.inputs + m.outputs + [p for w in m.workloads for p in w.params]:
        if t.lookup_rows is not None:
            raise ArtifactError(f"{MANIFEST_NAME}: tensor {t.name}: lookup_rows is for dense weights only")
    _check_weight_files(m)
    wids = {w.id for w in m.workloads}
    workload_bytes = {}
    for w in m.workloads:
        for fn in [w.function] + [fused_function(w.function, k) for k in w.fused_k]:
            if w.library not in libs or fn not in libs[w.library].functions:
                raise ArtifactError(f"{MANIFEST_NAME}: workload {w.id} names missing {w.library}:{fn}")
        if not (0 < w.d_model < MAX_DIM and 0 < w.d_ff < MAX_DIM):
            raise ArtifactError(f"{MANIFEST_NAME}: workload {w.id}: d_model/d_ff outside 1..{MAX_DIM - 1}")
        if w.quant not in QUANT_SCHEMES:
            raise ArtifactError(f"{MANIFEST_NAME}: workload {w.id}: weight storage {w.quant!r} is unknown to this "
                                f"runtime (known: {', '.join(QUANT_SCHEMES)})")
        workload_bytes[w.id] = sum(_tensor_bytes(t, f"workload {w.id}") for t in w.params)
    for layer in m.moe_layers:
        r = layer.router
        if not 0 < r.n_experts <= MAX_EXPERTS:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: n_experts {r.n_experts} outside 1..{MAX_EXPERTS}")
        if r.selection_bias is not None and len(r.selection_bias) != r.n_experts:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: selection_bias has {len(r.selection_bias)} "
                                f"entries for {r.n_experts} experts")
        vocab = m.model.vocab_size
        if r.mode == "hash" and (not r.table or (vocab and len(r.table) < vocab)):
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: hash table shorter than the vocabulary")
        if any(e.weight_bytes <= 0 for e in layer.experts):
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: an expert has no weight bytes")
        if r.mode not in ROUTING_MODES:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: routing mode {r.mode!r} is unknown to this "
                                f"runtime (known: {', '.join(ROUTING_MODES)})")
        if r.mode == "learned" and (r.library not in libs or r.function not in libs[r.library].functions):
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer} router names a missing function")
        problem = check_router(r, [e.index for e in layer.experts])
        if problem:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: {problem}")
        if r.score_fn not in SCORE_FNS:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: unknown score_fn {r.score_fn!r}")
        if r.score_fn == "sparsemixer" and (r.top_k != 2 or r.n_groups != 1 or r.selection_bias is not None
                                            or not 0 <= r.jitter_eps < 1):
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: sparsemixer routing picks 2 experts, ungrouped "
                                f"and unbiased, with 0 <= jitter_eps < 1")
        if not (0 < r.top_k <= r.n_experts) or r.n_experts % max(r.n_groups, 1):
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: bad top_k/groups")
        if r.group_score not in GROUP_SCORES:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: unknown group_score {r.group_score!r} "
                                f"(known: {', '.join(GROUP_SCORES)})")
        indices = sorted(e.index for e in layer.experts)
        if len(set(indices)) != len(indices) or any(not 0 <= i < r.n_experts for i in indices):
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: bad expert indices")
        for e in layer.experts + [s.expert for s in layer.shared] + ([layer.fallback] if layer.fallback else []):
            if e.workload not in wids:
                raise ArtifactError(f"{MANIFEST_NAME}: expert {e.file.path} names unknown workload")
            # The weights a workload declares are exactly what the cache holds, and fit in the file.
            if e.weight_bytes != workload_bytes[e.workload] or e.file.size < e.weight_bytes:
                raise ArtifactError(f"{MANIFEST_NAME}: expert {e.file.path}: {e.weight_bytes} weight bytes in a "
                                    f"{e.file.size}-byte file, its workload's tensors take {workload_bytes[e.workload]}")
        if layer.resident_function is not None:
            _check_resident(layer, m.workload(layer.experts[0].workload) if layer.experts else None, libs)
        elif layer.decode_function is not None:
            raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: a decode function needs a resident function")
    layers = {layer.layer for layer in m.moe_layers}
    model_inputs = {spec.name for spec in m.inputs}
    for step in m.program:
        if step.op == "moe":
            if step.layer not in layers or len(step.inputs) != 1 or len(step.outputs) != 1 or step.per_position:
                raise ArtifactError(f"{MANIFEST_NAME}: program step {step.name} is malformed")
        elif step.op == "segment":
            if "segments" not in libs or step.name not in libs["segments"].functions:
                raise ArtifactError(f"{MANIFEST_NAME}: segment {step.name} is not in a library")
            if step.per_position and model_inputs & set(step.inputs):
                raise ArtifactError(f"{MANIFEST_NAME}: segment {step.name} is per_position but reads the model's "
                                    f"inputs {sorted(model_inputs & set(step.inputs))}")
        else:
            raise ArtifactError(f"{MANIFEST_NAME}: unknown program op {step.op!r}")
    if m.decode_step is not None:
        _check_decode_step(m, libs)


def _check_decode_step(m: Manifest, libs: dict) -> None:
    """A decode step: an LM's, in the segments library, reading only the program's inputs and
    the dense weights (each once), with every MoE layer resident and a decode function beside
    it, and one output to return."""
    where = f"{MANIFEST_NAME}: decode step {m.decode_step.function!r}"
    if m.kind != "causal_lm" or len(m.outputs) != 1 or m.model.kv.layout != "in_place":
        raise ArtifactError(f"{where}: only a causal LM with an in-place KV cache has one")
    if "segments" not in libs or m.decode_step.function not in libs["segments"].functions:
        raise ArtifactError(f"{where} is not in library segments")
    for names, known, what in ((m.decode_step.inputs, {t.name for t in m.inputs}, "inputs"),
                               (m.decode_step.weights, {t.name for w in m.weights for t in w.tensors}, "weights")):
        if len(set(names)) != len(names) or not set(names) <= known:
            raise ArtifactError(f"{where}: {what} {sorted(set(names) - known) or 'repeated'} are not the "
                                f"program's {what}, each once")
    for layer in m.moe_layers:
        if layer.decode_function is None or layer.router.library != "segments":
            raise ArtifactError(f"{where}: layer {layer.layer} has no decode function in library segments")


def _check_resident(layer: MoELayer, w: Workload | None, libs: dict) -> None:
    """A resident layer: every expert 0..n-1 of one workload, whose slot layout holds each param
    aligned and apart, a learned router, no shared experts, and its function in the library."""
    where = f"{MANIFEST_NAME}: layer {layer.layer}: resident function {layer.resident_function!r}"
    r = layer.router
    if w is None or sorted(e.index for e in layer.experts) != list(range(r.n_experts)) \
            or any(e.workload != w.id for e in layer.experts):
        raise ArtifactError(f"{where} needs all {r.n_experts} experts, of one workload")
    if not plain_top_k(r) or layer.shared:
        raise ArtifactError(f"{where} covers learned plain top-k routing without shared experts only")
    if w.library not in libs or layer.resident_function not in libs[w.library].functions:
        raise ArtifactError(f"{where} is not in library {w.library}")
    if layer.decode_function is not None and (r.library not in libs or layer.decode_function not in libs[r.library].functions):
        raise ArtifactError(f"{MANIFEST_NAME}: layer {layer.layer}: decode function {layer.decode_function!r} is not in "
                            f"library {r.library}")
    end = 0
    if len(w.slot_offsets) != len(w.params) or not _positive_int(w.slot_bytes) or w.slot_bytes % SLOT_ALIGN:
        raise ArtifactError(f"{MANIFEST_NAME}: workload {w.id}: no usable slot layout for resident layers")
    for offset, t in zip(w.slot_offsets, w.params):
        if type(offset) is not int or offset < end or offset % SLOT_ALIGN:
            raise ArtifactError(f"{MANIFEST_NAME}: workload {w.id}: slot offset {offset!r} of {t.name} overlaps or "
                                f"is not a multiple of {SLOT_ALIGN}")
        end = offset + _tensor_bytes(t, f"workload {w.id}")
    if end > w.slot_bytes:
        raise ArtifactError(f"{MANIFEST_NAME}: workload {w.id}: its tensors take {end} bytes, more than its "
                            f"{w.slot_bytes}-byte slot")


# Routing modes a Router may name (moetvm/routing.py computes them): learned runs the model's
# router; the fixed patterns need no router at run time.
ROUTING_MODES = ("learned", "hash", "tiling", "cycle")
FIXED_MODES = ("hash", "tiling", "cycle")


def check_router(router: Router, present: list[int]) -> str | None:
    """What is wrong with a router entry, given the experts the artifact holds (None if fine)."""
    masked = set(router.masked)
    allowed = [e for e in range(router.n_experts) if e not in masked]  # n_experts is bounded by parse
    if any(not 0 <= e < router.n_experts for e in router.masked) or len(allowed) < router.top_k:
        return f"masked experts {router.masked} leave fewer than top_k={router.top_k} of {router.n_experts}"
    if sorted(present) != allowed:
        return f"experts present {sorted(present)} differ from the unmasked experts {allowed}"
    sets = router.table if router.mode == "hash" else router.cycle if router.mode == "cycle" else None
    if router.mode in ("hash", "cycle"):
        if not sets or any(len(s) != router.top_k or any(e not in allowed for e in s) for s in sets):
            return f"{router.mode} routing needs expert sets of {router.top_k} allowed experts"
    if router.mode == "tiling" and router.tile < 1:
        return f"tiling needs a positive tile, got {router.tile}"
    return None


def plain_top_k(r: Router) -> bool:
    """Learned routing that is a plain top-k of the scores (no groups, selection bias or masked
    experts): what a resident layer's compiled top-k computes."""
    return (r.mode == "learned" and r.score_fn != "sparsemixer" and not r.scale_input and r.n_groups == 1
            and r.selection_bias is None and not r.masked)


def slot_layout(params: list[TensorSpec]) -> tuple[list[int], int]:
    """(byte offset of each tensor, slot bytes): the tensors in order, each at a multiple of SLOT_ALIGN."""
    offsets, end = [], 0
    for t in params:
        offsets.append(-(-end // SLOT_ALIGN) * SLOT_ALIGN)
        end = offsets[-1] + _tensor_bytes(t, t.name)
    return offsets, -(-end // SLOT_ALIGN) * SLOT_ALIGN


def _tensor_bytes(t: TensorSpec, where: str) -> int:
    if t.dtype not in DTYPE_BYTES or not t.shape or any(type(d) is not int or not 0 < d < MAX_DIM for d in t.shape):
        raise ArtifactError(f"{MANIFEST_NAME}: {where}: tensor {t.name} has an unusable shape or dtype {t.dtype}{t.shape}")
    count = 1
    for d in t.shape:
        count *= d
    return count * DTYPE_BYTES[t.dtype]


def _check_weight_files(m: Manifest) -> None:
    """Weight tensors: unique names apart from the inputs', fixed shapes, and byte counts that add
    up and fit in their file."""
    if m.encryption is not None and not re.fullmatch(r"[0-9a-f]{32}", m.encryption.key_check):
        raise ArtifactError(f"{MANIFEST_NAME}: encryption.key_check must be 32 hex digits")
    seen = {t.name for t in m.inputs}
    for w in m.weights:
        total = 0
        for t in w.tensors:
            if t.name in seen:
                raise ArtifactError(f"{MANIFEST_NAME}: weight tensor {t.name!r} is named twice")
            seen.add(t.name)
            total += _tensor_bytes(t, w.file.path)
            if t.lookup_rows is not None:
                vocab = m.model.vocab_size
                if not (m.kind == "causal_lm" and vocab is not None and _positive_int(t.lookup_rows) and len(t.shape) >= 2
                        and t.shape[0] * t.lookup_rows >= vocab):
                    raise ArtifactError(f"{MANIFEST_NAME}: weight tensor {t.name!r}: lookup_rows {t.lookup_rows!r} does "
                                        f"not give every token a slice of its {t.shape} (vocabulary {vocab})")
        if w.weight_bytes != total or w.file.size < total:
            raise ArtifactError(f"{MANIFEST_NAME}: {w.file.path}: {w.weight_bytes} weight bytes in a {w.file.size}-byte "
                                f"file, its tensors take {total}")


def _check_model_fields(m: Manifest) -> None:
    """The model fields the runtime reads must have the values it relies on (the parser has
    checked their types)."""
    info = m.model
    if m.kind == "graph" and not all(_positive_int(d) for t in m.inputs for d in t.shape):
        raise ArtifactError(f"{MANIFEST_NAME}: a graph artifact's inputs need fixed shapes, got "
                            f"{[t.shape for t in m.inputs]}")
    if not all(_positive_int(v) for v in info.index_limits.values()):
        raise ArtifactError(f"{MANIFEST_NAME}: model.index_limits must map input names to positive integers")
    if m.kind == "causal_lm":
        layout = info.kv_layout
        if not (layout and len(layout) in (3, 5) and all(_positive_int(v) for v in layout)):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_layout must be [layers, heads, head_dim] or [layers, "
                                f"key heads, key dim, value heads, value dim], got {layout!r}")
        for key in ("vocab_size", "max_positions"):
            if getattr(info, key) is not None and not _positive_int(getattr(info, key)):
                raise ArtifactError(f"{MANIFEST_NAME}: model.{key} must be a positive integer, got {getattr(info, key)!r}")
        kv = info.kv
        if kv.window is not None and not (kv.layout == "concat" and _positive_int(kv.window)):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache.window must be a positive integer, and only with "
                                f"the concat layout, got {kv.window!r} with {kv.layout!r}")
        if not (kv.layout in KV_LAYOUTS and kv.dtype in KV_DTYPES and 0 < kv.capacity_multiple <= 4096):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache must give a layout ({', '.join(KV_LAYOUTS)}), a dtype "
                                f"({', '.join(KV_DTYPES)}) and optionally a capacity_multiple (1..4096), got {kv!r}")
        if kv.block is not None and not (kv.layout == "in_place" and _positive_int(kv.block)
                                         and kv.capacity_multiple % kv.block == 0):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache.block must be a positive integer dividing the "
                                f"capacity_multiple, and only with the in_place layout, got {kv!r}")
        if kv.dot and not (kv.dtype == "int8" and kv.block is not None and kv_shapes(layout)[1][1] % 4 == 0):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache.dot needs an int8 cache in blocks and a key dim that is a "
                                f"multiple of 4, got {kv!r} with kv_layout {layout!r}")
        if kv.dtype in KV_QUANTIZED and kv.layout != "in_place":
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache dtype {kv.dtype} needs the in_place layout, "
                                f"got {kv.layout!r}")
        if kv.chunk is not None and not (kv.layout == "concat" and _positive_int(kv.chunk) and kv.window is None
                                         and kv.full_layers):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache.chunk must be a positive integer, with the concat "
                                f"layout, full_layers and no window, got {kv.chunk!r}")
        if kv.full_layers and not ((kv.window is not None or kv.chunk is not None)
                                   and len(set(kv.full_layers)) == len(kv.full_layers)
                                   and all(type(i) is int and 0 <= i < layout[0] for i in kv.full_layers)):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache.full_layers must be distinct KV layer indices "
                                f"below {layout[0]}, and only with a window or a chunk, got {kv.full_layers!r}")
        for state in kv.states:
            if kv.layout != "in_place" or state.kind not in STATE_KINDS or state.dtype != "float32" \
                    or type(state.layer) is not int or state.layer < 0 \
                    or len(state.shape) != STATE_KINDS[state.kind] \
                    or not all(_positive_int(d) and d < MAX_DIM for d in state.shape):
                raise ArtifactError(f"{MANIFEST_NAME}: model.kv_cache.states: each needs the in_place layout, a kind "
                                    f"({', '.join(STATE_KINDS)}), a layer, a shape (conv: 2 positive sizes, ssm and delta: 3) and "
                                    f"dtype float32, got {state!r} with {kv.layout!r}")
        logits = next((o for o in m.outputs if o.name == "logits"), None)
        vocab = info.vocab_size
        if logits is None or not logits.shape or logits.shape[-1] != (vocab or logits.shape[-1]):
            raise ArtifactError(f"{MANIFEST_NAME}: model.vocab_size {vocab!r} does not match "
                                f"the logits output {None if logits is None else logits.shape}")


def _check_tokenizer(m: Manifest) -> None:
    t, vocab = m.tokenizer, m.model.vocab_size
    if t is None:
        return
    where = f"{MANIFEST_NAME}: tokenizer"
    if m.kind != "causal_lm":
        raise ArtifactError(f"{where}: only a causal LM takes text, this artifact is a {m.kind}")
    if t.kind not in TOKENIZER_KINDS:
        raise ArtifactError(f"{where}: unknown kind {t.kind!r} (known: {', '.join(TOKENIZER_KINDS)})")
    if t.kind == "bytes" and vocab != 256:
        raise ArtifactError(f"{where}: byte tokens need a 256-token vocabulary, the model has {vocab}")
    if t.kind == "hf" and (not t.files or PurePosixPath(t.files[0].path).name != "tokenizer.json"):
        raise ArtifactError(f"{where}: a Hugging Face tokenizer needs its tokenizer.json as the first file")
    if any(type(i) is not int or not 0 <= i < (vocab or 1 << 31) for i in t.eos_token_ids):
        raise ArtifactError(f"{where}: eos_token_ids {t.eos_token_ids} are not ids of the {vocab}-token vocabulary")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in t.special_tokens.items()):
        raise ArtifactError(f"{where}: special_tokens must map names to text")


KV_LAYOUTS = ("in_place", "concat")


def kv_shapes(layout) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(layers, (key heads, key dim), (value heads, value dim)) from a causal LM's kv_layout:
    [layers, heads, head_dim] when keys and values have one shape, else the five numbers
    (DeepSeek's latent attention caches a latent and a rope key of different sizes)."""
    layers, *rest = layout
    return (layers, tuple(rest[:2]), tuple(rest[:2])) if len(rest) == 2 else (layers, tuple(rest[:2]), tuple(rest[2:]))


def lm_io_names(layers: int, kv_layout: str = "concat", states: int = 0,
                window_positions: bool = False) -> tuple[list[str], list[str]]:
    """Names of a causal LM artifact's inputs and outputs, in order (the causal LM protocol): token
    ids, their positions, the cached positions, then per attention layer the KV cache's key and
    value buffers (in place, followed by the stateful layers' state buffers) or past keys and
    values (concat, which also returns the extended ones; with a window on some layers only, the
    positions the windowed layers hold come after the cached positions)."""
    if kv_layout == "in_place":
        buffers = [f"key_buffer_{i}" for i in range(layers)] + [f"value_buffer_{i}" for i in range(layers)]
        return ["tokens", "positions", "past_positions"] + buffers + [f"state_{i}" for i in range(states)], ["logits"]
    kv = lambda prefix: [f"{prefix}keys_{i}" for i in range(layers)] + [f"{prefix}values_{i}" for i in range(layers)]  # noqa: E731
    held = ["past_positions", "window_positions"] if window_positions else ["past_positions"]
    return ["tokens", "positions", *held] + kv("past_"), ["logits"] + kv("")


def _check_program(m: Manifest) -> None:
    """Every step reads only values that exist by then, and the declared outputs get made."""
    available = {t.name for t in m.inputs} | {t.name for w in m.weights for t in w.tensors}
    if m.kind == "causal_lm":
        layers, key_shape, value_shape = m.model.kv_shapes
        if m.model.kv.layout == "in_place":
            # every dimension but the batch and the capacity fixed (KVCacheLayout.buffer_dims)
            key_buffer, value_buffer = m.model.kv.buffer_dims(m.model.kv_layout)
            kv_fits = all(len(t.shape) == len(dims) and all(want is None or d == want for d, want in zip(t.shape, dims))
                          for t in m.inputs if t.name.startswith(("key_buffer_", "value_buffer_"))
                          for dims in [key_buffer if t.name.startswith("key_buffer_") else value_buffer])
        else:
            kv_fits = all(len(t.shape) == 4 and t.shape[1::2] == list(key_shape if t.name.startswith("past_keys_") else value_shape)
                          for t in m.inputs if t.name.startswith(("past_keys_", "past_values_")))
        states = m.model.kv.states
        first = 4 if m.model.kv.full_layers else 3  # tokens, positions, past_positions (, window_positions)
        state_inputs = m.inputs[first + 2 * layers:]
        if len(m.inputs) != first + 2 * layers + len(states) \
                or not kv_fits \
                or any(t.shape[1:] != s.shape or t.dtype != s.dtype for t, s in zip(state_inputs, states)):
            raise ArtifactError(f"{MANIFEST_NAME}: model.kv_layout {m.model.kv_layout} does not match the "
                                f"{len(m.inputs)} declared inputs")
        needed_in, needed_out = m.model.io_names
        if not set(needed_in) <= available or not set(needed_out) <= {t.name for t in m.outputs}:
            raise ArtifactError(f"{MANIFEST_NAME}: inputs/outputs do not follow the causal LM protocol")
    for step in m.program:
        missing = [n for n in step.inputs if n not in available]
        if missing:
            raise ArtifactError(f"{MANIFEST_NAME}: program step {step.name} reads {missing}, which no earlier step makes")
        available.update(step.outputs)
    unmade = [t.name for t in m.outputs if t.name not in available]
    if unmade:
        raise ArtifactError(f"{MANIFEST_NAME}: outputs {unmade} are never produced by the program")


def safe_relative_path(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or any(ord(c) < 32 for c in path):
        raise ArtifactError(f"{MANIFEST_NAME}: path {path!r} escapes the artifact directory")
    return p


def resolve(root: Path, ref: FileRef) -> Path:
    """The file's real location, refusing anything (symlinks included) outside `root`. (os.path
    rather than pathlib: every expert load resolves its file, and this takes 47 -> 32 us.)"""
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, safe_relative_path(ref.path)))
    if not full.startswith(os.path.join(real_root, "")) or full == real_root:
        raise ArtifactError(f"{ref.path}: resolves outside the artifact directory")
    return Path(full)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(root: Path, ref: FileRef) -> Path:
    """Size and SHA-256 of one referenced file; returns its path."""
    copy_verified(root, ref, lambda chunk: None)
    return resolve(root, ref)


@contextmanager
def _open_regular(path: Path, label: str, what: str, missing: str):
    """(file, fstat) of `path` through one descriptor: a regular file, never reached through a
    symbolic link at its last component (it could point anywhere)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ArtifactError(missing) from None
    except OSError as e:
        if os.path.islink(path):
            raise ArtifactError(f"{label}: is a symbolic link; an artifact's {what} must be a regular file") from None
        raise ArtifactError(f"{label}: cannot read the {what} ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{label}: the {what} is not a regular file")
        yield f, info


READ_CHUNK = 1 << 20  # bytes a read asks for


def _verified_chunks(root: Path, ref: FileRef, verify: bool, buffer_for):
    """The file's bytes through one descriptor, each read into the writable buffer
    `buffer_for(the file's first 8 bytes)` gives (gone round as a ring: one as long as the file
    holds it whole, where the caller may place it by what those bytes say), hashed where it lies
    and yielded as a view of it; after the last, ArtifactError if size or SHA-256 differ from the
    manifest. Whoever uses what it read uses exactly the bytes verified: swapping the file after
    the check and before the use cannot work, as nothing reads the path twice."""
    h, size = hashlib.sha256(), 0
    with _open_regular(resolve(root, ref), ref.path, "file", f"{ref.path}: missing from the artifact") as (f, info):
        if info.st_size != ref.size:
            raise ArtifactError(f"{ref.path}: size {info.st_size} bytes, manifest says {ref.size} (truncated or replaced)")
        ring = memoryview(buffer_for(os.pread(f.fileno(), 8, 0))).cast("B")
        while size < ref.size:
            at = size % len(ring)
            got = f.readinto(ring[at:at + min(READ_CHUNK, ref.size - size, len(ring) - at)])
            if not got:
                break
            h.update(ring[at:at + got])
            yield ring[at:at + got]
            size += got
        if size == ref.size and f.read(1):  # grown since the fstat: read no further than the manifest allows
            size += 1
    if size != ref.size:
        raise ArtifactError(f"{ref.path}: size {size} bytes, manifest says {ref.size} (truncated or replaced)")
    if verify and h.hexdigest() != ref.sha256:
        raise ArtifactError(f"{ref.path}: SHA-256 mismatch (corrupted or tampered)")


def copy_verified(root: Path, ref: FileRef, sink, verify: bool = True) -> None:
    """Feed the file's bytes to `sink(chunk)` (a view, valid until the next call: the sink copies
    what it keeps), hashing the very bytes fed; ArtifactError (after the last chunk) if size or
    SHA-256 differ from the manifest (`_verified_chunks`)."""
    for chunk in _verified_chunks(root, ref, verify, lambda _first: bytearray(max(1, min(READ_CHUNK, ref.size)))):
        sink(chunk)


def read_verified_into(root: Path, ref: FileRef, allocate, verify: bool = True):
    """The file read once into `allocate(its first 8 bytes)` (a writable buffer of ref.size bytes,
    which the caller may place by what those bytes say) and hashed there: that buffer, or
    ArtifactError as copy_verified. No copy beside the read's own."""
    buffer = None

    def buffer_for(first: bytes):
        nonlocal buffer
        buffer = allocate(first)
        return buffer

    for _ in _verified_chunks(root, ref, verify, buffer_for):
        pass
    return buffer


def read_verified(root: Path, ref: FileRef, verify: bool = True) -> bytes:
    """The file's bytes, read once and checked against the manifest (see `copy_verified`)."""
    return bytes(read_verified_into(root, ref, lambda _first: bytearray(ref.size), verify))


def file_ref(root: Path, path: Path) -> FileRef:
    return FileRef(path=path.relative_to(root).as_posix(), size=path.stat().st_size, sha256=sha256_file(path))


MAX_MANIFEST_BYTES = 256 << 20  # a hash-routed manifest of a 256k vocabulary is ~20 MB


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, a regular file that is not a symbolic link (it could point anywhere),
    read through one descriptor and at most `limit` bytes long."""
    with _open_regular(path, str(path), what, f"{path}: no {what} (not a moetvm artifact directory?)") as (f, info):
        if info.st_size > limit:
            raise ArtifactError(f"{path}: the {what} is {info.st_size} bytes, more than {limit}")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ArtifactError(f"{path}: the {what} is more than {limit} bytes")
    return data


def read_manifest(root: Path) -> Manifest:
    return parse(read_regular_file(Path(root) / MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest"))

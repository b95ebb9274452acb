"""Model definitions (kept apart from the compiler passes) and the shipped reference model."""

from pathlib import Path

from moetvm.errors import UsageError

ASSETS = Path(__file__).parent / "assets"
REFERENCE_CHECKPOINT = ASSETS / "reference.safetensors"
HELDOUT_TEXT = ASSETS / "heldout.txt"


class ModelSourceError(UsageError, FileNotFoundError):
    """A model source that cannot be loaded: the message names the path and what is wrong."""


def load_model_source(source: str, stream: bool = False):
    """'reference' (the shipped checkpoint), 'hf:DIR' (a local Hugging Face transformers model
    directory) or a path to a reference-architecture checkpoint. stream: a transformers model's
    weights stay in its checkpoint, read one tensor at a time by the compiler (models/hf.py)."""
    from .reference import load_checkpoint

    if source.startswith("hf:"):
        from .hf import load_hf

        return load_hf(source[3:], stream=stream)
    if source == "reference":
        return load_checkpoint(REFERENCE_CHECKPOINT)
    path = Path(source)
    if path.is_dir():
        hint = f"; for a transformers model directory write hf:{source}" if (path / "config.json").is_file() else ""
        raise ModelSourceError(f"model {source!r}: is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise ModelSourceError(f"model {source!r}: not 'reference', 'hf:DIR' or an existing checkpoint file")
    return load_checkpoint(path)


def heldout_split() -> tuple[bytes, bytes]:
    """(calibration half, evaluation half) of the shipped held-out text: plans are fitted on
    the first and judged on the second."""
    data = HELDOUT_TEXT.read_bytes()
    return data[: len(data) // 2], data[len(data) // 2 :]


def text_windows(data: bytes, window: int = 128, count: int | None = None):
    """Non-overlapping token windows (count, window) int64 of `data`."""
    import numpy as np

    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    n = len(tokens) // window if count is None else min(count, len(tokens) // window)
    return tokens[: n * window].reshape(n, window)


def calibration_windows(path=None, count: int = 32, window: int = 128):
    """Token windows of a calibration text (default: the shipped held-out text's first half);
    a missing, unreadable or too short file is a UsageError."""
    if path is None:
        data = heldout_split()[0]
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"calibration text {path}: cannot read it ({e.strerror or e})") from None
        if len(data) < window:
            raise UsageError(f"calibration text {path}: {len(data)} bytes, at least {window} are needed "
                             f"(one {window}-token window)")
    return text_windows(data, count=count, window=window)


def cross_entropy_bits(logits, tokens) -> float:
    """Mean next-byte cross-entropy in bits of logits (batch, seq, vocab) on tokens (batch, seq)."""
    import numpy as np

    z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, tokens[:, 1:, None], -1).mean() / np.log(2))

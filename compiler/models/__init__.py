"""Model definitions (kept apart from the compiler passes) and the shipped reference model."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
REFERENCE_CHECKPOINT = ASSETS / "reference.safetensors"
HELDOUT_TEXT = ASSETS / "heldout.txt"


def load_model_source(source: str):
    """'reference' (the shipped checkpoint) or a path to a reference-architecture checkpoint."""
    from .reference import load_checkpoint

    if source == "reference":
        return load_checkpoint(REFERENCE_CHECKPOINT)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"model {source!r}: not 'reference' and no such checkpoint file")
    return load_checkpoint(path)

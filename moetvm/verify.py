"""An artifact against its PyTorch source: the numbers `moetvm verify` judges by, and the one
relative error every comparison in the project uses. NumPy at import; torch and the compiler's
model loader only when a comparison runs (a board imports the CLI, never runs verify)."""

from __future__ import annotations

import numpy as np

PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8", "int4")
# Least top-1 agreement with fp32 PyTorch a quantized artifact must reach on held-out text, by
# its lowest precision: the bounds the quantization tests hold the shipped model to (test_quant.py).
AGREEMENT_BOUNDS = {"fp16": 0.99, "bf16": 0.99, "int8": 0.99, "int4": 0.95}
FP32_TOLERANCE = 1e-4  # max logit error relative to the logits' magnitude, fp32 artifacts
WINDOW, PROMPT_TOKENS = 128, 32  # tokens per compared window; prompt of the greedy comparison


def relative_error(ours, theirs) -> float:
    """Max absolute error relative to the reference's largest magnitude (logits cross zero, so
    element-wise relative error is ill-posed)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def lowest_precision(manifest) -> str:
    """The lowest weight precision in the artifact (experts, dense weights, routers)."""
    tags = ([w.quant for w in manifest.workloads] + [w.quant for w in manifest.weights]
            + [str(manifest.compile_info.get("quant", {}).get("router", "fp32"))])
    found = [next((o for o in PRECISION_ORDER if t.startswith(o)), "int4") for t in tags]
    return max(found, key=PRECISION_ORDER.index)


def verify_against_source(model, reference, data: np.ndarray, windows: int, gen_tokens: int,
                          tolerance: float | None = None, min_agreement: float | None = None) -> dict:
    """Run a loaded causal-LM artifact `model` and its PyTorch source `reference` on `windows`
    windows of token ids `data` and on `gen_tokens` greedy tokens; the report, with "ok" by the
    criterion of the artifact's lowest precision (fp32: logit error within `tolerance` and the
    same greedy tokens; quantized: top-1 agreement of at least `min_agreement`)."""
    import torch

    starts = np.linspace(0, len(data) - WINDOW - 1, windows).astype(int)
    worst, agree, total = 0.0, 0, 0
    for s in starts:
        tokens = data[s : s + WINDOW][None]
        ours = model(tokens)
        with torch.no_grad():
            theirs = reference(torch.from_numpy(tokens)).numpy()
        worst = max(worst, relative_error(ours, theirs))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += tokens.size
    prompt = data[starts[0] : starts[0] + PROMPT_TOKENS]
    ours_gen = model.generate(prompt, gen_tokens)
    ids = torch.from_numpy(prompt[None])
    theirs_gen = []
    with torch.no_grad():
        for _ in range(gen_tokens):
            nxt = int(reference(ids)[0, -1].argmax())
            theirs_gen.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    same_prefix = next((i for i, (a, b) in enumerate(zip(ours_gen, theirs_gen)) if a != b), gen_tokens)
    precision = lowest_precision(model.manifest)
    if precision == "fp32":
        tolerance = FP32_TOLERANCE if tolerance is None else tolerance
        ok = worst <= tolerance and same_prefix == gen_tokens
        criterion = f"fp32: logit error <= {tolerance:.0e} and identical greedy tokens"
    else:
        min_agreement = AGREEMENT_BOUNDS[precision] if min_agreement is None else min_agreement
        ok = agree / total >= min_agreement and (tolerance is None or worst <= tolerance)
        criterion = (f"{precision}: top-1 agreement >= {min_agreement:.1%}"
                     + (f" and logit error <= {tolerance:.0e}" if tolerance is not None else ""))
    return {"max_relative_logit_error": worst, "argmax_agreement": agree / total, "tokens_compared": total,
            "greedy_tokens_equal": same_prefix, "greedy_tokens": gen_tokens, "precision": precision,
            "tolerance": tolerance, "min_agreement": min_agreement, "criterion": criterion, "ok": ok}

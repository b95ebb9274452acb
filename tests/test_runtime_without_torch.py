"""The runtime is what ships to a board: it must import and run with torch, onnx and xgboost
absent. A fresh interpreter blocks them in sys.modules, then loads and runs a real artifact.
ml_dtypes (0.8 s of start-up) is imported only for an artifact that holds bfloat16."""

import json
import subprocess
import sys

import numpy as np
import torch

from moetvm.verify import relative_error

BLOCKED = ("torch", "onnx", "xgboost", "moetvm.compiler")

SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of it now raises ImportError
import json
import numpy as np
from moetvm.runtime import load_model
model = load_model(sys.argv[1], cache_budget="25%")
tokens = np.array([list(b"def main(argv):")], dtype=np.int64)
logits = model(tokens)
np.save(sys.argv[2], logits)
new = model.generate(tokens[0], 8)
print(json.dumps({{"new": new, "modules": sorted(m for m in sys.modules if m.split('.')[0] in ("torch", "onnx", "xgboost", "ml_dtypes") and sys.modules[m] is not None)}}))
"""


def test_runtime_runs_with_torch_blocked(reference_artifact, reference_model, tmp_path):
    out = tmp_path / "logits.npy"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED), str(reference_artifact), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    tokens = torch.tensor([list(b"def main(argv):")])
    with torch.no_grad():
        theirs = reference_model(tokens).numpy()
    assert relative_error(np.load(out), theirs) < 1e-4
    assert len(result["new"]) == 8


def test_cli_run_works_with_torch_blocked(reference_artifact):
    code = f"import sys\nfor n in {BLOCKED!r}: sys.modules[n] = None\nfrom moetvm.cli import main\nmain()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", str(reference_artifact), "--prompt", "import ", "--max-new-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"text", "hit_rate", "latency_ms", "expert_loads", "peak_rss_mb"}

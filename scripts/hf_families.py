"""The name issue 18 gives the family report: runs scripts/reports/hf_families.py (same arguments)."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    script = Path(__file__).resolve().parent / "reports" / "hf_families.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")

"""bench/contrastive_memory.py end to end on 8 fake CPU devices (compile only)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "contrastive_memory.py"


def test_plans_per_negative_pool():
    out = subprocess.run([sys.executable, str(SCRIPT), "--devices", "8", "--clips-per-device", "4",
                          "--dim", "64"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[3]] = float(cells[4].replace(",", ""))
        assert cells[:3] == ["8", "32", "448"], line
    assert set(rows) == {"device", "global", "global, replicated inputs"}
    # Global negatives with the batch split cost a fraction of the replicated plan; the
    # per-device pools less still.
    assert rows["device"] < rows["global"] < rows["global, replicated inputs"] / 2

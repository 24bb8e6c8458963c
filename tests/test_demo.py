"""The controlled-sentiment demo, reduced (`scripts/demo.py --quick`): SFT on mixed reviews,
preference pairs from its samples labelled by the ground truth, DPO on them; DPO must earn a
clearly higher ground-truth reward than the SFT reference, at a KL above 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reduced_demo_dpo_beats_sft(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--seeds", "1"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())}
    sft, dpo = rows["SFT"], rows["DPO beta=0.1"]
    assert sft["kl"] == 0.0  # the reference, evaluated against itself
    assert abs(sft["reward"]) < 0.3  # trained on reviews of sentiment 0 on average
    assert dpo["reward"] > sft["reward"] + 0.3, rows
    assert dpo["kl"] > 0.5
    assert dpo["implicit_accuracy"] > 0.5  # on held-out pairs
    assert (out / "frontier.png").read_bytes().startswith(PNG_MAGIC)
    assert "| DPO beta=0.1 |" in (out / "results.md").read_text()

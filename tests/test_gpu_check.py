"""scripts/gpu_check.py is ready for a device: its CPU form (--device cpu --quick) runs every stage on the tiny model
in bf16, and every patch kind's no-op leaves every LSS score exactly as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lsn_exp import REPO_ROOT, noops


@pytest.mark.slow  # 20 s on the idle 2-core box, 70 s beside other jobs (6 recordings, 29 no-op kinds, compare)
def test_gpu_check_quick_form_runs_every_stage_and_every_noop_is_exactly_0(tmp_path):
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--models", "tiny",
                          "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    found = json.loads(out.read_text())
    rows = found["rows"]
    assert {r["stage"] for r in rows} == {"identify", "no-ops", "roofline", "compare"}
    assert not [r for r in rows if r["ok"] is False or r["what"] in ("error", "skipped")]
    checked = {r["what"].split()[1]: r["ok"] for r in rows if r["what"].startswith("no-op ") and r["ok"] is not None}
    assert checked == {kind.name: True for kind in noops.kinds(relu=False)}  # the tiny llama is silu, not relu
    shifts = found["results"]["tiny/no-ops"]
    assert all(top == 0.0 and wins == 0 and n > 0 for top, wins, n, _ in shifts.values())
    assert "\n| model | stage | what | value | ok |\n" in out.with_suffix(".md").read_text()
    assert "| tiny | compare |" in run.stdout

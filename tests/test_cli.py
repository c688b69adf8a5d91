"""The command line: the demo's table, and bad input as a one-line error without a traceback."""

import subprocess
import sys

from nemo_upcycle.cli import main
from nemo_upcycle.demo import DEMO_RECIPES


def test_demo_prints_step0_table(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| E")]
    assert len(rows) == 2 * len(DEMO_RECIPES)
    exact = [r for r in rows if "topk_then_softmax" in r]
    for row in exact:  # topK-then-softmax reproduces the dense logits at step 0
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == cells[5] and float(cells[6]) < 1e-4


def test_bad_input_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "nemo_upcycle.cli", "demo", "--routers", "bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr

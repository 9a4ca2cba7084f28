"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs_and_computes_the_hybrid_loss():
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert set(losses) >= {"total", "focal", "ms_ssim", "iou", "cgm"}
    assert losses["total"].isfinite()
    assert all(p.grad is not None for p in namespace["model"].parameters() if p.requires_grad)


def test_readme_results_block_is_the_one_report_writes():
    """The results table sits between the markers `unet3plus report --readme` rewrites, in the format it writes
    (so `make readme-results` after `make run` replaces it with what the run gave)."""
    from unet3plus.report import README_BEGIN, README_END, _check_readme

    text = _check_readme(README)
    block = text.split(README_BEGIN)[1].split(README_END)[0].strip().splitlines()
    assert re.fullmatch(r"Runs of \d{4}-\d{2}-\d{2}, trained on .+\.", block[0])  # when and where (issue 16)
    block = block[2:]
    assert block[0] == "| dataset | test volumes | Dice | IoU | HD95 (mm) | ASSD (mm) |"
    rows = [line.strip("|").split("|") for line in block[2:] if line.startswith("| ") and line.count("|") == 7]
    assert [row[0].strip() for row in rows[:2]] == ["liver", "spleen"]
    for row in rows[:2]:
        dice_value, iou = float(row[2]), float(row[3])
        assert 0 < iou <= dice_value <= 1 and abs(iou - dice_value / (2 - dice_value)) < 0.02  # IoU = D / (2 - D) per case
    makefile = (README.parent / "Makefile").read_text()
    assert "readme-results:" in makefile and "report --out reports/ablations.md --readme README.md" in makefile

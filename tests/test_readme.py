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

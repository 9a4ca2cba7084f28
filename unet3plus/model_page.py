"""One self-contained HTML page per trained model, for the Kubeflow UI: curves, best and worst cases, MLflow link.

The Kubeflow pipeline's evaluate step publishes it as an ``HTML`` artifact, so the run's page in
the KFP UI shows, per model, what MLflow shows for its run, and links there: the learning curves
(``curves.png`` of the training), the ``overlays/best_*`` and ``overlays/worst_*`` pictures and
the headline numbers of the evaluation (``metrics.json``). Images are embedded (``data:`` URIs):
the KFP UI shows the artifact without fetching anything else.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HEADLINE = ("dice", "iou", "hd95", "assd", "dice_no_gate", "cgm_roc_auc", "cases")
"""The numbers of ``metrics.json`` shown in the page's table, in this order (when present)."""


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run on an HTTP(S) tracking server (without any user:password), else None."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def run_link(mlflow_config: Any, run_id: str) -> tuple[str, str | None]:
    """The name and the UI page (:func:`mlflow_run_url`) of an MLflow run; ``("", None)`` when the store cannot say."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from unet3plus.tracking import configure

    try:
        uri = configure(mlflow_config, create=False)
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except (MlflowException, OSError):
        return "", None
    return run.info.run_name or "", mlflow_run_url(uri, run.info.experiment_id, run_id)


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" style="max-width:100%">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def model_page_html(title: str, train_dir: str | Path, evaluation_dir: str | Path, run_id: str,
                    run_url: str | None) -> str:
    """The page: ``title``, a link to the MLflow run (or its id), headline metrics, curves, best and worst overlays.

    Args:
        title: what the model is (``liver | unet3plus | ... ``, the MLflow run name).
        train_dir: the training output (``curves.png``; missing parts are left out).
        evaluation_dir: the evaluation output (``metrics.json``, ``overlays/*.png``).
        run_id: the MLflow run of the model.
        run_url: its MLflow UI page (:func:`mlflow_run_url`), or None where the store has no UI address.
    """
    train_dir, evaluation_dir = Path(train_dir), Path(evaluation_dir)
    link = (f'<a href="{html.escape(run_url)}" target="_blank">MLflow run {html.escape(run_id)}</a>' if run_url
            else f"MLflow run {html.escape(run_id or 'unknown')}")
    metrics: dict[str, Any] = {}
    if (evaluation_dir / "metrics.json").is_file():
        metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    rows = "".join(f"<tr><th>{key}</th><td>{metrics[key]:.4g}</td></tr>" for key in HEADLINE
                   if isinstance(metrics.get(key), (int, float)))
    figures = []
    if (train_dir / "curves.png").is_file():
        figures.append(_image(train_dir / "curves.png", "learning curves"))
    for kind in ("best", "worst"):
        for path in sorted((evaluation_dir / "overlays").glob(f"{kind}_*.png")):
            figures.append(_image(path, f"{kind} case: {path.stem}"))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{link}</p>"
            f"<table>{rows}</table>{''.join(figures)}</body></html>")

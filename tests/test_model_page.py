"""The per-model HTML page of the Kubeflow UI: curves, best and worst overlays embedded, a link to the MLflow run."""

import base64
import json
from html.parser import HTMLParser

from unet3plus.model_page import mlflow_run_url, model_page_html

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # the page embeds bytes, it does not decode them


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs["alt"], base64.b64decode(attrs["src"].split(",", 1)[1])))
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_embeds_curves_and_best_and_worst_cases_and_links_the_run(tmp_path):
    train, evaluation = tmp_path / "model", tmp_path / "evaluation"
    (evaluation / "overlays").mkdir(parents=True)
    train.mkdir()
    (train / "curves.png").write_bytes(PNG + b"curves")
    for name in ("worst_1_7", "best_1_3", "best_2_5"):
        (evaluation / "overlays" / f"{name}.png").write_bytes(PNG + name.encode())
    (evaluation / "metrics.json").write_text(json.dumps({"dice": 0.91234, "hd95": 4.5, "dataset": "liver"}))
    url = "https://mlflow.example.com/#/experiments/4/runs/abc"
    page = _Page()
    page.feed(model_page_html("liver | unet3plus <DS>", train, evaluation, "abc", url))
    assert [alt for alt, _ in page.images] == ["learning curves", "best case: best_1_3", "best case: best_2_5",
                                              "worst case: worst_1_7"]
    assert page.images[0][1] == PNG + b"curves" and page.images[3][1] == PNG + b"worst_1_7"
    assert page.links == [url]
    text = " ".join(page.text)
    assert "liver | unet3plus <DS>" in text and "0.9123" in text and "4.5" in text


def test_the_run_link_is_an_http_servers_ui_page_without_credentials():
    assert mlflow_run_url("https://alice:pw@mlflow.example.com:8443/mlflow/", "4", "abc") == (
        "https://mlflow.example.com:8443/mlflow/#/experiments/4/runs/abc")
    assert mlflow_run_url("sqlite:///mlflow.db", "4", "abc") is None
    assert mlflow_run_url("databricks", "4", "abc") is None

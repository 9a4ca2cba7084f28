"""benchmarks/bench_recipe.py: the per-(organ, model) summary against issue 16's targets, and its RESULTS.md section."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_recipe", ROOT / "benchmarks" / "bench_recipe.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def run(organ: str, model: str, dice: float, seed: int = 0, threads: int = 1) -> dict:
    return {"organ": organ, "model": model, "test_dice": dice, "seed": seed, "threads": threads}


def test_summary_is_min_mean_sample_std_max_per_pair_with_the_targets():
    runs = [run("spleen", "unet", d, seed=s) for s, d in enumerate((0.80, 0.84, 0.88))]
    runs += [run("liver", "main", d, threads=t) for t, d in ((1, 0.92), (2, 0.93))]
    liver, spleen = bench.summarise(runs)
    # by hand: spleen mean 0.84, deviations -0.04, 0, 0.04 -> sample variance 0.0032 / 2, std 0.04 > 0.03
    assert spleen == {"organ": "spleen", "model": "unet", "runs": 3, "min": 0.80, "mean": pytest.approx(0.84),
                      "std": pytest.approx(0.04), "max": 0.88, "passes": False}
    # liver: std of (0.92, 0.93) = 0.01 / sqrt(2) = 0.00707, min 0.92 >= 0.80: both targets met
    assert liver["std"] == pytest.approx(0.0070711, abs=1e-6) and liver["passes"]
    assert not bench.summarise([run("liver", "unet", 0.79)])[0]["passes"]  # min below 0.80


def test_results_section_replaces_its_markers_or_is_appended(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nother text\n")
    bench.write_results_section(results, "first\n")
    assert results.read_text() == (f"# Benchmarks\n\nother text\n\n## Training recipe robustness\n\n"
                                   f"{bench.BEGIN}\nfirst\n{bench.END}\n")
    bench.write_results_section(results, "second\n")
    text = results.read_text()
    assert "first" not in text and f"{bench.BEGIN}\nsecond\n{bench.END}\n" in text and text.count(bench.BEGIN) == 1


def test_a_run_is_filed_under_the_recipe_hash_that_main_looks_up(tmp_path, monkeypatch):
    """The cache key of a finished run is the hash of the params file alone: the benchmark's own overrides
    (seed, tracking store, no overlays) must not change it, or no rerun would ever find a cached run."""
    from unet3plus.config import load_config

    params = ROOT / "params.yaml"
    recorded = {}

    def fake_train(config, *args, **kwargs):
        recorded["overlays"] = config.evaluate.overlays
        out = Path(args[1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.csv").write_text("epoch,val_dice\n1,0.5\n")
        return {"best_val_dice": 0.5, "best_epoch": 1}

    monkeypatch.setattr("unet3plus.train.train", fake_train)
    monkeypatch.setattr("unet3plus.evaluate.evaluate", lambda *args, **kwargs: {"dice": 0.9})
    record = bench.run_one(str(params), tmp_path, "spleen", "unet", 1, 1)
    assert recorded["overlays"] == 0  # the override did apply to the run
    assert record["recipe"] == bench.recipe_hash(load_config(params))
    assert record["recipe"] != bench.recipe_hash(load_config(params, ["evaluate.overlays=0"]))

"""The fit-heads options that emo ablate compares: stacking methods, concatenation, run names."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression

from emo.cli import main
from emo.errors import CacheError
from emo.evaluate.run import evaluate_run
from emo.heads import FitHeadsConfig, StackedHeads, fit_heads
from emo.heads.stacking import _class_coefficients, fit_logreg_stacking
from emo.predict import predict


def fit(cache: Path, out: Path, **options) -> dict:
    return fit_heads(FitHeadsConfig(cache=cache, out=out, epochs=2, stack_epochs=2, **options))


def test_name_encodes_combination():
    base = {"cache": Path("c.h5"), "out": Path("o")}

    assert FitHeadsConfig(**base).name == "L0-L4_stack-weighted_weighted_lr0.001_drop0_e50"
    assert FitHeadsConfig(**base, stacking="logreg").name == "L0-L4_stack-logreg_weighted_lr0.001_drop0_e50"
    assert FitHeadsConfig(**base, fusion="concat").name == "L0-L4_concat_weighted_lr0.001_drop0_e50"
    assert FitHeadsConfig(**base, stages=("L4",), stacking="mean").name == "L4_weighted_lr0.001_drop0_e50"


def test_name_encodes_stages_and_extras():
    config = FitHeadsConfig(cache=Path("c.h5"), out=Path("o"), stages=("L0", "L2", "L4"), sampling="shuffle",
                            dropout=0.5, batch_size=64, stack_epochs=3, weight_decay=0.0)

    assert config.name == "L0+L2+L4_stack-weighted_shuffle_lr0.001_drop0.5_e50_se3_bs64_wd0"


@pytest.mark.parametrize("field, value, message", [
    ("stacking", "max", "stacking 'max' is not one of weighted, mean, logreg"),
    ("fusion", "sum", "fusion 'sum' is not one of branches, concat"),
])
def test_config_rejects_unknown_choice(field, value, message):
    with pytest.raises(ValueError, match=message):
        FitHeadsConfig(cache=Path("c.h5"), out=Path("o"), **{field: value})


def test_mean_stacking_keeps_equal_weights(ab_cache, tmp_path):
    metrics = fit(ab_cache, tmp_path / "run", stacking="mean", stages=("L3", "L4"))

    assert metrics["stack_weights"] == {"L3": 0.5, "L4": 0.5}
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert {record["phase"] for record in history} == {"branches"}


def test_weighted_stacking_records_stacking_epochs(ab_cache, tmp_path):
    fit(ab_cache, tmp_path / "run", stages=("L3", "L4"))

    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [record["phase"] for record in history] == ["branches"] * 2 + ["stacking"] * 2


def test_logreg_stacking_round_trips(ab_cache, tmp_path):
    metrics = fit(ab_cache, tmp_path / "run", stacking="logreg")
    again = evaluate_run(tmp_path / "run", split="test")

    assert metrics["stack_weights"] is None
    assert metrics["primary"] == "stacked"
    assert again["models"]["stacked"] == metrics["models"]["stacked"]


def test_fit_records_val_numbers(ab_cache, tmp_path):
    metrics = fit(ab_cache, tmp_path / "run", stacking="logreg", stages=("L3", "L4"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())

    assert set(metrics["val"]) == {"stacked", "L3", "L4"}
    assert 0.0 <= metrics["val"]["stacked"]["accuracy"] <= 1.0
    assert saved["val"] == metrics["val"]


def test_concat_fusion_trains_one_head(ab_cache, tmp_path):
    metrics = fit(ab_cache, tmp_path / "run", fusion="concat")
    settings = json.loads((tmp_path / "run" / "config.json").read_text())

    assert list(metrics["models"]) == ["concat"]
    assert settings["channels"] == {"L0": 64, "L1": 64, "L2": 128, "L3": 256, "L4": 512}
    assert settings["fusion"] == "concat"
    assert evaluate_run(tmp_path / "run")["models"]["concat"] == metrics["models"]["concat"]


def test_concat_run_predicts_images(ab_cache, tmp_path):
    fit(ab_cache, tmp_path / "run", fusion="concat")
    image = next((ab_cache.parent / "images" / "joy").iterdir())

    result = predict(tmp_path / "run", [image], device="cpu", top_k=2)[0]

    assert len(result["top"]) == 2
    assert 0.0 <= result["top"][0]["probability"] <= 1.0


def test_class_coefficients_fill_absent_class():
    # Two of three classes seen: scikit-learn keeps a single row of coefficients.
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(40, 6))
    targets = np.where(inputs[:, 0] > 0, 2, 0)
    regression = LogisticRegression().fit(inputs, targets)

    weight, bias = _class_coefficients(regression, 3)
    probabilities = torch.softmax(torch.from_numpy(inputs @ weight.T + bias), dim=1).numpy()

    np.testing.assert_allclose(probabilities[:, [0, 2]], regression.predict_proba(inputs), atol=1e-5)
    assert probabilities[:, 1].max() < 1e-6


def test_class_coefficients_multiclass_match_sklearn():
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(60, 6))
    targets = np.argmax(inputs[:, :3], axis=1)
    regression = LogisticRegression().fit(inputs, targets)

    weight, bias = _class_coefficients(regression, 3)
    probabilities = torch.softmax(torch.from_numpy(inputs @ weight.T + bias), dim=1).numpy()

    np.testing.assert_allclose(probabilities, regression.predict_proba(inputs), atol=1e-5)


def test_logreg_needs_two_val_classes():
    model = StackedHeads({"L3": 4, "L4": 4}, 3, stacking="logreg")
    features = {"L3": torch.randn(5, 4), "L4": torch.randn(5, 4)}

    with pytest.raises(CacheError, match="the val split has 1 class"):
        fit_logreg_stacking(model, features, torch.zeros(5, dtype=torch.long))


def test_cli_fit_heads_accepts_stacking(ab_cache, tmp_path):
    result = CliRunner().invoke(main, ["fit-heads", str(ab_cache), "--out", str(tmp_path / "run"), "--epochs", "1",
                                       "--stages", "L3,L4", "--stacking", "logreg"])

    assert result.exit_code == 0, result.output
    assert "stacked" in result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["stacking"] == "logreg"


def test_cli_fit_heads_rejects_unknown_fusion(ab_cache, tmp_path):
    result = CliRunner().invoke(main, ["fit-heads", str(ab_cache), "--out", str(tmp_path / "run"), "--fusion", "sum"])

    assert result.exit_code == 2
    assert "'sum' is not one of 'branches', 'concat'" in result.output

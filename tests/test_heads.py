import json

import numpy as np
import pytest
import torch

from emo.cache.synthetic import write_synthetic_cache
from emo.data.sampling import inverse_frequency_weights, make_sampler
from emo.errors import CacheError, RunError
from emo.heads import FitHeadsConfig, StackedHeads, fit_heads
from emo.runs import INCOMPLETE_MARKER


@pytest.fixture(scope="module")
def separable_cache(tmp_path_factory):
    """A synthetic resnet18-width cache whose classes a linear head can separate."""
    return write_synthetic_cache(tmp_path_factory.mktemp("syn") / "syn.h5", rows=600, classes=["a", "b", "c"],
                                 arch="resnet18", separation=1.0, seed=1)


def test_run_directory_layout(head_run):
    names = {path.name for path in head_run.iterdir()}
    assert {"config.json", "classes.json", "model.pt", "metrics.json", "confusion_matrix.png",
            "history.jsonl"} <= names
    assert INCOMPLETE_MARKER not in names


def test_metrics_for_stacked_and_every_branch(head_run):
    metrics = json.loads((head_run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["primary"] == "stacked"
    assert list(metrics["models"]) == ["stacked", "L0", "L1", "L2", "L3", "L4"]
    stacked = metrics["models"]["stacked"]
    assert set(stacked) >= {"accuracy", "macro_recall", "per_class_recall", "confusion_matrix", "classes"}
    assert stacked["classes"] == ["calm", "fear", "joy"]
    assert np.asarray(stacked["confusion_matrix"]).sum() == stacked["count"] == 9


def test_saved_heads_load_with_weights_only(head_run):
    state = torch.load(head_run / "model.pt", weights_only=True)
    settings = json.loads((head_run / "config.json").read_text())
    model = StackedHeads(settings["channels"], 3)
    model.load_state_dict(state)
    assert torch.isclose(model.stack_weights().sum(), torch.tensor(1.0))


def test_config_records_resolved_options_and_backbone(head_run):
    settings = json.loads((head_run / "config.json").read_text())
    assert settings["kind"] == "heads"
    assert settings["config"]["epochs"] == 5
    assert settings["config"]["sampling"] == "weighted"
    assert settings["backbone"]["arch"] == "resnet18"
    assert settings["backbone"]["weights"]["spec"] == "random"
    assert settings["name"] == "L0-L4_stack-weighted_weighted_lr0.001_drop0_e5_se3"


def test_history_has_both_phases(head_run):
    records = [json.loads(line) for line in (head_run / "history.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["branches"] * 5 + ["stacking"] * 3
    assert all(r["seconds"] > 0 for r in records)


def test_heads_learn_separable_classes(separable_cache, tmp_path):
    metrics = fit_heads(FitHeadsConfig(cache=separable_cache, out=tmp_path / "run", epochs=10, stack_epochs=3))
    assert metrics["models"]["L4"]["accuracy"] > 0.9
    assert metrics["models"]["stacked"]["accuracy"] > 0.9


def test_same_seed_repeats_exactly(separable_cache, tmp_path):
    first = fit_heads(FitHeadsConfig(cache=separable_cache, out=tmp_path / "a", epochs=2, stack_epochs=1,
                                     stages=("L3", "L4"), sampling="shuffle", dropout=0.5))
    second = fit_heads(FitHeadsConfig(cache=separable_cache, out=tmp_path / "b", epochs=2, stack_epochs=1,
                                      stages=("L3", "L4"), sampling="shuffle", dropout=0.5))
    assert torch.equal(torch.load(tmp_path / "a" / "model.pt")["stack_logits"],
                       torch.load(tmp_path / "b" / "model.pt")["stack_logits"])
    assert first["models"] == second["models"]


def test_single_stage_has_no_stacked_model(separable_cache, tmp_path):
    metrics = fit_heads(FitHeadsConfig(cache=separable_cache, out=tmp_path / "run", epochs=2, stages=("L4",)))
    assert list(metrics["models"]) == ["L4"]
    assert metrics["primary"] == "L4"


def test_stacking_of_one_head_warns(separable_cache, tmp_path, caplog):
    config = FitHeadsConfig(cache=separable_cache, out=tmp_path / "run", epochs=1, fusion="concat", stacking="logreg")
    metrics = fit_heads(config)
    assert list(metrics["models"]) == ["concat"]
    assert "--stacking logreg has no effect: the run trains one head (concat)" in caplog.text


def test_finished_run_needs_overwrite(head_run, tiny_cache):
    with pytest.raises(RunError, match="already contains a finished run; pass --overwrite"):
        fit_heads(FitHeadsConfig(cache=tiny_cache, out=head_run, epochs=1))


def test_missing_stage_in_cache(separable_cache, tmp_path):
    import h5py

    path = tmp_path / "cut.h5"
    path.write_bytes(separable_cache.read_bytes())
    with h5py.File(path, "r+") as file:
        del file["features"]["L2"]
        file.attrs["stages"] = json.dumps({"L0": 64, "L1": 64, "L3": 256, "L4": 512})
    with pytest.raises(CacheError, match="has no stage L2"):
        fit_heads(FitHeadsConfig(cache=path, out=tmp_path / "run", epochs=1))


@pytest.mark.parametrize("options, message", [
    ({"sampling": "balanced"}, "sampling 'balanced'"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"lr": 0.0}, "--lr must be a positive number"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"stages": ()}, "non-empty subset"),
    ({"stack_epochs": -1}, "--stack-epochs must be 0 or more"),
    ({"lr": float("inf")}, "--lr must be a positive number"),
    ({"seed": -1}, "--seed must be between 0 and 4294967295, got -1"),
])
def test_config_rejects_bad_values(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        FitHeadsConfig(cache=tmp_path / "c.h5", out=tmp_path / "r", **options)


def test_weighted_sampler_balances_classes():
    labels = np.array([0] * 90 + [1] * 10)
    drawn = labels[list(make_sampler(labels, "weighted", torch.Generator().manual_seed(0)))]
    counts = np.bincount(np.concatenate([drawn, labels[list(make_sampler(labels, "weighted",
                                                                          torch.Generator().manual_seed(1)))]]))
    assert 0.35 < counts[1] / counts.sum() < 0.65


def test_inverse_frequency_weights_sum_per_class():
    weights = inverse_frequency_weights(np.array([0, 0, 0, 1]))
    assert weights.tolist() == [1 / 3, 1 / 3, 1 / 3, 1.0]


def test_shuffle_sampler_is_a_permutation():
    labels = np.zeros(50, dtype=int)
    order = list(make_sampler(labels, "shuffle", torch.Generator().manual_seed(0)))
    assert sorted(order) == list(range(50))
    assert order != list(range(50))

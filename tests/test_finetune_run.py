"""``emo finetune`` end to end on generated images: run directories, evaluate, predict, resume, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import emo.finetune.loop as loop_module
from emo import runs
from emo.backbone import build_resnet
from emo.cli import main
from emo.errors import DataError, RunError, TrainingError, WeightsError
from emo.finetune import VARIANTS, FinetuneConfig, finetune
from emo.finetune.checkpoint import CHECKPOINT_FILE
from emo.finetune.models import build_model
from emo.finetune.steps import has_prefix, variant_steps
from emo.predict import predict

TINY = ["--arch", "resnet18", "--weights", "random", "--image-size", "32", "--batch-size", "16",
        "--workers", "0", "--device", "cpu"]


def tiny_config(data: Path, out: Path, variant: str, **overrides) -> FinetuneConfig:
    values = dict(data=data, variant=variant, out=out, arch="resnet18", weights="random", image_size=32,
                  batch_size=16, workers=0, device="cpu", epochs=1, stack_epochs=1)
    values.update(overrides)
    return FinetuneConfig(**values)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def initial_state(variant: str) -> dict:
    resnet, _ = build_resnet("resnet18", "random", seed=0)
    return build_model(variant, resnet, 3, arch="resnet18", dropout=0.5, seed=0).state_dict()


def read_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def without_seconds(history: list[dict]) -> list[dict]:
    timings = ("seconds", "train_seconds", "train_images_per_second")
    return [{key: value for key, value in record.items() if key not in timings} for record in history]


class Killed(Exception):
    """Stands in for the signal that kills a run right after a checkpoint."""


def kill_after(monkeypatch, step_name: str, epoch: int) -> None:
    """Make the next fine-tuning run stop right after writing the checkpoint of ``step_name``, ``epoch``."""
    real_save = loop_module.save_checkpoint

    def save_then_stop(run_dir, **kwargs):
        path = real_save(run_dir, **kwargs)
        if kwargs["progress"].history[-1]["step"] == step_name and kwargs["progress"].epoch == epoch:
            raise Killed()
        return path

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)


def assert_same_state(first: Path, second: Path) -> None:
    a, b = runs.load_state_dict(first), runs.load_state_dict(second)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- every variant through the CLI ---------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_finetune_cli_writes_run_that_evaluates(ft_images, tmp_path, variant):
    run_dir = tmp_path / variant
    result = invoke("finetune", ft_images, "--variant", variant, "--out", run_dir, "--epochs", "1",
                    "--stack-epochs", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output

    for name in ("config.json", "classes.json", "model.pt", "metrics.json", "confusion_matrix.png",
                 "history.jsonl", "split.csv", CHECKPOINT_FILE):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / runs.INCOMPLETE_MARKER).exists()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["primary"] == VARIANTS[variant]
    assert next(iter(metrics["models"])) == VARIANTS[variant]
    assert metrics["models"][VARIANTS[variant]]["count"] == 9
    assert metrics["minutes_per_epoch"] > 0

    steps = ["step1", "step2"] if variant == "ensemble" else ["train"]
    assert list(metrics["trainable_parameters"]) == steps
    history = read_history(run_dir)
    assert [record["step"] for record in history] == steps
    assert all(0 < record["train_seconds"] <= record["seconds"] for record in history)
    assert all(record["train_images_per_second"] > 0 for record in history)
    settings = json.loads((run_dir / "config.json").read_text())
    assert settings["backbone"]["image_size"] == 32
    assert settings["training"]["trainable_parameters"] == metrics["trainable_parameters"]

    # emo evaluate recomputes the same test metrics from model.pt and the run's split file.
    evaluated = invoke("evaluate", run_dir, "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    rewritten = json.loads((run_dir / "metrics.json").read_text())
    assert rewritten["models"] == metrics["models"]
    assert rewritten["trainable_parameters"] == metrics["trainable_parameters"]
    evaluated = invoke("evaluate", run_dir, "--split", "val", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((run_dir / "metrics-val.json").read_text())["models"][VARIANTS[variant]]["count"] == 3

    if variant != "ensemble":  # its two steps together train every parameter; see test_finetune_models
        before, after = initial_state(variant), runs.load_state_dict(run_dir / "model.pt")
        model = build_model(variant, build_resnet("resnet18", "random")[0], 3, arch="resnet18")
        (step,) = variant_steps(tiny_config(ft_images, run_dir, variant), model)
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed == {name for name in before if has_prefix(name, step.trainable)}


def test_finetune_follows_split_file(ft_fc_run, ft_images, tmp_path):
    finetune(tiny_config(ft_images, tmp_path / "run", "fc", seed=5, split_file=ft_fc_run / "split.csv"))
    assert (tmp_path / "run" / "split.csv").read_text() == (ft_fc_run / "split.csv").read_text()


# --- predict ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ft_fc_run(ft_images, tmp_path_factory) -> Path:
    """A finished fc run; tests must not change it."""
    run_dir = tmp_path_factory.mktemp("ft-run") / "fc"
    finetune(tiny_config(ft_images, run_dir, "fc"))
    return run_dir


def test_predict_on_finetuned_run(ft_fc_run, ft_images):
    images = [ft_images / "joy" / "joy_000.jpg", ft_images / "fear" / "fear_000.jpg"]
    results = predict(ft_fc_run, images, device="cpu", top_k=3)
    assert [result["path"] for result in results] == [str(path) for path in images]
    for result in results:
        assert sum(item["probability"] for item in result["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_cli_on_finetuned_run(ft_fc_run, ft_images):
    result = invoke("predict", ft_fc_run, ft_images / "joy" / "joy_000.jpg", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)[0]["top"]) == 3


def test_predict_loads_dataparallel_state_dict(ft_fc_run, ft_images, tmp_path):
    images = [ft_images / "sadness" / "sadness_003.jpg"]
    expected = predict(ft_fc_run, images, device="cpu")
    model = build_model("fc", build_resnet("resnet18", "random")[0], 3, arch="resnet18")
    model.load_state_dict(runs.load_state_dict(ft_fc_run / "model.pt"))
    wrapped = nn.DataParallel(model)
    torch.save(wrapped.state_dict(), tmp_path / "dataparallel.pt")
    assert next(iter(torch.load(tmp_path / "dataparallel.pt"))).startswith("module.")

    assert predict(ft_fc_run, images, device="cpu", weights=str(tmp_path / "dataparallel.pt")) == expected


def test_predict_loads_run_saved_from_dataparallel(ft_fc_run, ft_images, tmp_path):
    images = [ft_images / "joy" / "joy_004.jpg"]
    expected = predict(ft_fc_run, images, device="cpu")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in ft_fc_run.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    state = runs.load_state_dict(ft_fc_run / "model.pt")
    torch.save({f"module.{name}": value for name, value in state.items()}, copy / "model.pt")
    assert predict(copy, images, device="cpu") == expected


def test_predict_loads_checkpoint_as_weights(ft_fc_run, ft_images):
    images = [ft_images / "fear" / "fear_002.jpg"]
    # One epoch: the checkpoint's weights are the best epoch's, which model.pt holds.
    from_checkpoint = predict(ft_fc_run, images, device="cpu", weights=str(ft_fc_run / CHECKPOINT_FILE))
    assert from_checkpoint == predict(ft_fc_run, images, device="cpu")


@pytest.mark.parametrize("weights", ["imagenet", "random"])
def test_predict_rejects_backbone_weights_spec(ft_fc_run, ft_images, weights):
    with pytest.raises(WeightsError, match="does not apply to a fine-tuned run"):
        predict(ft_fc_run, [ft_images / "joy" / "joy_000.jpg"], device="cpu", weights=weights)


def test_predict_rejects_missing_weights_file(ft_fc_run, ft_images, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        predict(ft_fc_run, [ft_images / "joy" / "joy_000.jpg"], weights=str(tmp_path / "none.pt"))


def test_predict_rejects_weights_of_other_model(ft_fc_run, ft_images, tmp_path):
    resnet, _ = build_resnet("resnet18", "random")
    torch.save(build_model("skip", resnet, 3, arch="resnet18").state_dict(), tmp_path / "skip.pt")
    with pytest.raises(WeightsError, match="do not fit the ResNet-fc model"):
        predict(ft_fc_run, [ft_images / "joy" / "joy_000.jpg"], weights=str(tmp_path / "skip.pt"))


def test_predict_rejects_config_without_variant(ft_fc_run, ft_images, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in ft_fc_run.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    settings = json.loads((copy / "config.json").read_text())
    del settings["variant"]
    (copy / "config.json").write_text(json.dumps(settings))
    with pytest.raises(RunError, match="has no 'variant' entry"):
        predict(copy, [ft_images / "joy" / "joy_000.jpg"])


def test_evaluate_reports_missing_images(ft_images_copy, tmp_path):
    finetune(tiny_config(ft_images_copy, tmp_path / "run", "fc"))
    for path in (ft_images_copy / "joy").iterdir():
        path.unlink()
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "image(s) of the run's test split are missing" in result.output


def test_evaluate_rejects_unknown_label_in_split_file(ft_fc_run, tmp_path):
    from emo.evaluate.run import evaluate_run

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in ft_fc_run.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    split = (copy / "split.csv").read_text().replace(",joy,", ",bliss,")
    (copy / "split.csv").write_text(split)
    with pytest.raises(RunError, match="label 'bliss', which is not a class of the run"):
        evaluate_run(copy, split="test", device="cpu")


# --- checkpoints and --resume ----------------------------------------------------------------------

@pytest.mark.parametrize(("variant", "kill_step", "kill_epoch", "workers"), [
    ("l4-dropout", "train", 1, 1),  # dropout draws from the global RNG, random crops from a worker's
    ("ensemble", "step2", 1, 0),  # killed inside step 2, random crops drawn in the main process
])
def test_resume_matches_uninterrupted_run(ft_images, tmp_path, monkeypatch, variant, kill_step, kill_epoch, workers):
    options = dict(epochs=1 if variant == "ensemble" else 2, stack_epochs=2, workers=workers)
    finetune(tiny_config(ft_images, tmp_path / "straight", variant, **options))

    with monkeypatch.context() as patch:
        kill_after(patch, kill_step, kill_epoch)
        with pytest.raises(Killed):
            finetune(tiny_config(ft_images, tmp_path / "resumed", variant, **options))
    assert (tmp_path / "resumed" / runs.INCOMPLETE_MARKER).exists()
    finetune(tiny_config(ft_images, tmp_path / "resumed", variant, resume=True, **options))

    assert_same_state(tmp_path / "straight" / "model.pt", tmp_path / "resumed" / "model.pt")
    assert without_seconds(read_history(tmp_path / "resumed")) == without_seconds(read_history(tmp_path / "straight"))
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert resumed["models"] == straight["models"]


@pytest.fixture(scope="module")
def ft_interrupted_run(ft_images, tmp_path_factory) -> Path:
    """An fc run of 2 epochs killed after the checkpoint of epoch 1; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("ft-interrupted") / "fc"
    with pytest.MonkeyPatch.context() as patch:
        kill_after(patch, "train", 1)
        with pytest.raises(Killed):
            finetune(tiny_config(ft_images, run_dir, "fc", epochs=2))
    return run_dir


def copy_run(run_dir: Path, target: Path) -> Path:
    return Path(shutil.copytree(run_dir, target))


def test_checkpoint_written_each_epoch(ft_interrupted_run):
    checkpoint = torch.load(ft_interrupted_run / CHECKPOINT_FILE, weights_only=True)
    assert (checkpoint["step"], checkpoint["epoch"]) == (0, 1)
    assert (ft_interrupted_run / runs.INCOMPLETE_MARKER).exists()
    assert len(read_history(ft_interrupted_run)) == 1
    assert not list(ft_interrupted_run.glob("*.tmp"))


def test_interrupted_run_needs_resume_or_overwrite(ft_interrupted_run, ft_images, tmp_path):
    run_dir = copy_run(ft_interrupted_run, tmp_path / "run")
    with pytest.raises(RunError, match="contains an interrupted run"):
        finetune(tiny_config(ft_images, run_dir, "fc", epochs=2))
    finetune(tiny_config(ft_images, run_dir, "fc", epochs=2, overwrite=True))
    assert len(read_history(run_dir)) == 2


def test_interrupt_says_resume_continues(ft_images, tmp_path, monkeypatch, caplog):
    real_save = loop_module.save_checkpoint

    def save_then_interrupt(run_dir, **kwargs):
        real_save(run_dir, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_interrupt)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_config(ft_images, run_dir, "fc", epochs=2))
    assert f"checkpoint of the last finished epoch is kept in {run_dir}" in caplog.text
    assert "rerun the same command with --resume" in caplog.text


def test_resume_rejects_other_options(ft_interrupted_run, ft_images, tmp_path):
    run_dir = copy_run(ft_interrupted_run, tmp_path / "run")
    with pytest.raises(RunError, match="with other options"):
        finetune(tiny_config(ft_images, run_dir, "fc", epochs=2, lr_new=0.1, resume=True))


def test_resume_rejects_other_checkpoint_version(ft_interrupted_run, ft_images, tmp_path):
    run_dir = copy_run(ft_interrupted_run, tmp_path / "run")
    checkpoint = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    torch.save({**checkpoint, "version": 99}, run_dir / CHECKPOINT_FILE)
    with pytest.raises(RunError, match="checkpoint version 99"):
        finetune(tiny_config(ft_images, run_dir, "fc", epochs=2, resume=True))


def test_resume_warns_about_other_worker_count(ft_interrupted_run, ft_images, tmp_path, caplog):
    run_dir = copy_run(ft_interrupted_run, tmp_path / "run")
    finetune(tiny_config(ft_images, run_dir, "fc", epochs=2, workers=1, resume=True))
    assert "used 0 worker(s) and this one uses 1" in caplog.text
    assert len(read_history(run_dir)) == 2


def test_resume_rejects_changed_classes(ft_images_copy, tmp_path, monkeypatch):
    kill_after(monkeypatch, "train", 1)
    with pytest.raises(Killed):
        finetune(tiny_config(ft_images_copy, tmp_path / "run", "fc", epochs=2))
    for path in (ft_images_copy / "fear").iterdir():
        path.unlink()
    (ft_images_copy / "fear").rmdir()
    with pytest.raises(DataError, match="interrupted run .* was started with"):
        finetune(tiny_config(ft_images_copy, tmp_path / "run", "fc", epochs=2, resume=True))


def test_resume_without_checkpoint(ft_images, tmp_path):
    with pytest.raises(RunError, match="no checkpoint.pt to resume from"):
        finetune(tiny_config(ft_images, tmp_path / "run", "fc", resume=True))


def test_resume_of_finished_run(ft_images, tmp_path):
    finetune(tiny_config(ft_images, tmp_path / "run", "fc"))
    with pytest.raises(RunError, match="has finished; there is nothing to resume"):
        finetune(tiny_config(ft_images, tmp_path / "run", "fc", resume=True))


def test_finished_run_needs_overwrite(ft_images, tmp_path):
    finetune(tiny_config(ft_images, tmp_path / "run", "fc"))
    with pytest.raises(RunError, match="already (holds|contains) a finished run"):
        finetune(tiny_config(ft_images, tmp_path / "run", "fc"))


def test_resume_rejects_foreign_checkpoint(ft_images, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / runs.INCOMPLETE_MARKER).write_text("")
    torch.save({"weight": torch.zeros(1)}, run_dir / CHECKPOINT_FILE)
    with pytest.raises(RunError, match="is not an emo-vision fine-tuning checkpoint"):
        finetune(tiny_config(ft_images, run_dir, "fc", resume=True))


# --- divergence -------------------------------------------------------------------------------------

def poison_after_checkpoint(monkeypatch, epoch: int) -> None:
    """Set the classifier weights to NaN right after the checkpoint of ``epoch``, as a diverging run would."""
    real_save = loop_module.save_checkpoint

    def save_then_poison(run_dir, **kwargs):
        path = real_save(run_dir, **kwargs)
        if kwargs["progress"].epoch == epoch:
            with torch.no_grad():
                kwargs["model"].fc.weight.fill_(float("nan"))
        return path

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_poison)


def test_nan_loss_stops_and_keeps_last_checkpoint(ft_images, tmp_path, monkeypatch):
    poison_after_checkpoint(monkeypatch, 1)
    with pytest.raises(TrainingError, match=r"training loss became nan in train, epoch 2/3, batch 1 of 3") as error:
        finetune(tiny_config(ft_images, tmp_path / "run", "fc", epochs=3))
    assert "checkpoint after train, epoch 1 is kept" in str(error.value)
    assert (tmp_path / "run" / runs.INCOMPLETE_MARKER).exists()
    checkpoint = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["epoch"] == 1
    assert torch.isfinite(checkpoint["model"]["fc.weight"]).all()

    monkeypatch.undo()
    finetune(tiny_config(ft_images, tmp_path / "run", "fc", epochs=3, resume=True))
    assert len(read_history(tmp_path / "run")) == 3


def test_nan_val_loss_stops_before_checkpoint(ft_images, tmp_path, monkeypatch):
    real_train_epoch = loop_module.train_epoch

    def train_then_poison(model, *args, **kwargs):
        loss = real_train_epoch(model, *args, **kwargs)
        with torch.no_grad():
            model.fc.bias.fill_(float("inf"))
        return loss

    monkeypatch.setattr(loop_module, "train_epoch", train_then_poison)
    with pytest.raises(TrainingError, match="val loss became nan after train, epoch 1/1") as error:
        finetune(tiny_config(ft_images, tmp_path / "run", "fc"))
    assert "No epoch had finished, so there is no checkpoint" in str(error.value)
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_cli_reports_training_error(ft_images, tmp_path, monkeypatch):
    poison_after_checkpoint(monkeypatch, 1)
    result = CliRunner().invoke(main, ["finetune", str(ft_images), "--variant", "fc", "--out",
                                       str(tmp_path / "run"), "--epochs", "2", *TINY])
    assert result.exit_code == 1
    assert "Error: training loss became nan" in result.output


# --- data errors ------------------------------------------------------------------------------------

def write_split(source: Path, target: Path, change) -> Path:
    lines = source.read_text().splitlines()
    target.write_text("\n".join([lines[0], *[change(line) for line in lines[1:]]]) + "\n")
    return target


def test_split_without_val_images(ft_fc_run, ft_images, tmp_path):
    split_file = write_split(ft_fc_run / "split.csv", tmp_path / "split.csv", lambda line: line.replace(",val,", ",train,"))
    with pytest.raises(DataError, match="the val split of .* is empty"):
        finetune(tiny_config(ft_images, tmp_path / "run", "fc", split_file=split_file))


def test_split_with_class_missing_from_train(ft_fc_run, ft_images, tmp_path):
    def move_joy(line: str) -> str:
        return line.replace(",train,", ",test,") if ",joy," in line else line

    split_file = write_split(ft_fc_run / "split.csv", tmp_path / "split.csv", move_joy)
    with pytest.raises(DataError, match="class 'joy' has no training image"):
        finetune(tiny_config(ft_images, tmp_path / "run", "fc", split_file=split_file))


def test_split_with_one_training_image(ft_images_copy, tmp_path):
    for name in ("fear", "sadness"):
        for path in (ft_images_copy / name).iterdir():
            path.unlink()
        (ft_images_copy / name).rmdir()
    parts = ["train", "val"] + ["test"] * 18
    rows = [f"joy/joy_{index:03d}.jpg,joy,{part}" for index, part in enumerate(parts)]
    split_file = tmp_path / "split.csv"
    split_file.write_text("\n".join(["path,label,split", *rows]) + "\n")
    with pytest.raises(DataError, match="at least two training images"):
        finetune(tiny_config(ft_images_copy, tmp_path / "run", "fc", split_file=split_file))


# A script that calls finetune() at module level, without an if __name__ == "__main__": guard.
UNGUARDED_SCRIPT = """
import sys
from pathlib import Path
from emo.finetune import FinetuneConfig, finetune
finetune(FinetuneConfig(data=Path(sys.argv[1]), variant="fc", out=Path(sys.argv[2]), arch="resnet18",
                        weights="random", image_size=32, epochs=1, batch_size=8, device="cpu", workers=1))
"""


@pytest.mark.slow
def test_unguarded_script_names_missing_guard(ft_images, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(ft_images), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"called while a data loader worker imported {script}" in result.stderr
    assert "call finetune() under 'if __name__ == \"__main__\":'" in result.stderr

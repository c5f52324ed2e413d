"""``emo finetune``: train one of the six ResNet variants end to end and write a run directory.

Each training step (one for most variants, two for ``ensemble``) runs its epochs, keeps the
epoch with the best val accuracy (ties: lower val loss) and goes on from it. Every epoch ends
with an atomic checkpoint, from which ``--resume`` continues a killed run with the same
results. Test metrics come from the best epoch of the last step.
"""

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from emo import runs
from emo.backbone import build_resnet
from emo.errors import DataError, RunError, TrainingError
from emo.evaluate.files import write_metrics
from emo.finetune.checkpoint import (
    CHECKPOINT_FILE, Best, Progress, capture_rng, load_checkpoint, progress_from, restore_rng, save_checkpoint,
)
from emo.finetune.config import FinetuneConfig
from emo.finetune.data import SPLIT_FILE, eval_loader, prepare_data, split_images, train_loader, write_run_split
from emo.finetune.evaluate import mean_minutes_per_epoch, metrics_from_logits, predict_logits, val_scores
from emo.finetune.models import FinetuneNet, build_model
from emo.finetune.outputs import backbone_record, run_settings, write_history
from emo.finetune.runtime import Runtime
from emo.finetune.steps import TrainingStep, apply_step, build_optimizer, trainable_count, variant_steps

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything the epochs of one run share."""

    config: FinetuneConfig
    run_dir: Path
    model: FinetuneNet
    runtime: Runtime
    classes: list[str]
    train: DataLoader
    val: DataLoader
    sampler_generator: torch.Generator
    loader_generator: torch.Generator


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune a ResNet variant on an image dataset and write a run directory.

    Weights and the checkpoint to resume are checked first and the dataset is scanned next,
    so most mistakes are reported before any training.

    Args:
        config: the resolved options of ``emo finetune``.

    Returns:
        The content of the run's ``metrics.json``: test metrics of every model output, plus
        trainable parameters per step, mean minutes per epoch and the best epoch of each step.

    Raises:
        TrainingError: if the loss or the val loss becomes NaN or infinite; the checkpoint of
            the last good epoch stays in place.

    Example:
        >>> finetune(FinetuneConfig(data=Path("emotion6"), variant="l4", out=Path("runs/l4")))  # doctest: +SKIP
    """
    started = time.perf_counter()
    runtime = Runtime.create(config.device, precision=config.precision, channels_last=config.channels_last)
    checkpoint = load_checkpoint(config.out, fingerprint=config.fingerprint()) if config.resume else None
    if checkpoint is None:
        _check_out_folder(Path(config.out), overwrite=config.overwrite)

    resnet, weights = build_resnet(config.arch, config.weights, seed=config.seed)
    split_file = Path(config.out) / SPLIT_FILE if config.resume else config.split_file
    dataset, split = prepare_data(config, split_file=split_file)
    model = build_model(config.variant, resnet, len(dataset.classes), arch=config.arch, dropout=config.dropout,
                        seed=config.seed)
    settings = run_settings(config, backbone=backbone_record(config, weights), dataset_root=dataset.root, model=model)
    run_dir = _open_run_dir(config, settings, dataset.classes, resuming=checkpoint is not None)
    if checkpoint is None:
        write_run_split(run_dir, dataset, split)

    torch.manual_seed(config.seed)
    sampler_generator = torch.Generator().manual_seed(config.seed)
    loader_generator = torch.Generator().manual_seed(config.seed + 1)
    session = Session(
        config=config, run_dir=run_dir, model=model.to(runtime.device, memory_format=runtime.memory_format),
        runtime=runtime, classes=dataset.classes,
        train=train_loader(split_images(dataset, split, "train"), config, sampler_generator=sampler_generator,
                           loader_generator=loader_generator),
        val=eval_loader(split_images(dataset, split, "val"), image_size=config.image_size,
                        batch_size=config.batch_size, workers=config.workers),
        sampler_generator=sampler_generator, loader_generator=loader_generator,
    )
    steps = variant_steps(config, model)
    progress = _resume(session, checkpoint) if checkpoint is not None else Progress()
    _log_start(session, steps, len(split_images(dataset, split, "train")))

    progress = train_steps(session, steps, progress, checkpoint)
    training = _training_summary(model, steps, progress.history)
    test = eval_loader(split_images(dataset, split, "test"), image_size=config.image_size,
                       batch_size=config.batch_size, workers=config.workers)
    metrics = metrics_from_logits(model, *predict_logits(model, test, runtime, desc="test"), dataset.classes)
    metrics.update(training)
    _finish_run(run_dir, settings, training, model, metrics, title=config.name)
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def _check_out_folder(run_dir: Path, *, overwrite: bool) -> None:
    """Reject an output folder that holds a run, before the slow scan (start_run checks again later)."""
    if overwrite:
        return
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.is_file() and (run_dir / runs.INCOMPLETE_MARKER).exists():
        raise RunError(f"{run_dir} holds an interrupted run ({checkpoint}); pass --resume to continue it "
                       "or --overwrite to start over")
    if (run_dir / "metrics.json").exists():
        raise RunError(f"run directory {run_dir} already holds a finished run; pass --overwrite or choose another --out")


def _open_run_dir(config: FinetuneConfig, settings: dict, classes: list[str], *, resuming: bool) -> Path:
    """Start the run directory, or check that a resumed one still fits the dataset."""
    if resuming:
        run_dir = Path(config.out)
        recorded = runs.read_classes(run_dir)
        if recorded != classes:
            raise DataError(f"the dataset now has classes {classes}, but the interrupted run in {run_dir} was "
                            f"started with {recorded}; resume with the original data or pass --overwrite")
        return run_dir
    run_dir = runs.start_run(config.out, overwrite=config.overwrite)
    for name in (CHECKPOINT_FILE, "metrics.json", "model.pt"):
        (run_dir / name).unlink(missing_ok=True)
    runs.write_json_atomically(run_dir / "config.json", settings)
    runs.write_json_atomically(run_dir / "classes.json", classes)
    write_history(run_dir, [])
    return run_dir


def _resume(session: Session, checkpoint: dict) -> Progress:
    """Load model and random-number state from ``checkpoint``; return where training stands."""
    if checkpoint["workers"] != session.config.workers:
        logger.warning("the interrupted run used %d worker(s) and this one uses %d, so its random crops differ "
                       "from those of an uninterrupted run", checkpoint["workers"], session.config.workers)
    session.model.load_state_dict(checkpoint["model"], strict=True)
    restore_rng(checkpoint["rng"], session.sampler_generator, session.loader_generator)
    progress = progress_from(checkpoint)
    logger.info("resuming %s after epoch %d of step %d", session.run_dir, progress.epoch, progress.step + 1)
    return progress


def _log_start(session: Session, steps: list[TrainingStep], train_images: int) -> None:
    config = session.config
    logger.info("fine-tuning %s (%s, %s weights) on %d training images, %s; steps: %s", session.model.primary,
                config.arch, config.weights, train_images, session.runtime.describe(),
                ", ".join(f"{step.name} {step.epochs} epoch(s), {trainable_count(session.model, step)} trainable "
                          "parameters" for step in steps))


def train_steps(session: Session, steps: list[TrainingStep], progress: Progress, checkpoint: dict | None) -> Progress:
    """Run every step from ``progress`` on; leave the model at the best epoch of the last step."""
    model = session.model
    while progress.step < len(steps):
        step = steps[progress.step]
        apply_step(model, step)
        optimizer = build_optimizer(model, session.config)
        if checkpoint is not None and progress.step == checkpoint["step"]:
            optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            progress.best = _start_best(session, step)

        for epoch in range(progress.epoch + 1, step.epochs + 1):
            _run_epoch(session, step, epoch, optimizer, progress)

        model.load_state_dict(progress.best.state)
        logger.info("%s: best val accuracy %.4f at epoch %d", step.name, progress.best.accuracy, progress.best.epoch)
        progress.step, progress.epoch = progress.step + 1, 0
    return progress


def _start_best(session: Session, step: TrainingStep) -> Best:
    """Return the best-epoch record a step starts from: nothing, or the model as it enters the step."""
    if not step.keep_start:
        return Best()
    scores = val_scores(session.model, *predict_logits(session.model, session.val, session.runtime, desc="val"),
                        session.classes)
    return Best(scores["val_accuracy"], scores["val_loss"], 0, _state_copy(session.model))


def _state_copy(model: FinetuneNet) -> dict:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _run_epoch(session: Session, step: TrainingStep, epoch: int, optimizer: torch.optim.Optimizer,
               progress: Progress) -> None:
    """Train one epoch, score it on val, update the best epoch, and write history and checkpoint."""
    where = f"{step.name}, epoch {epoch}/{step.epochs}"
    started = time.perf_counter()
    try:
        loss = train_epoch(session.model, session.train, optimizer, step, session.runtime, where=where)
        scores = val_scores(session.model, *predict_logits(session.model, session.val, session.runtime, desc="val"),
                            session.classes)
        if not math.isfinite(scores["val_loss"]):
            raise TrainingError(f"val loss became {scores['val_loss']} after {where}")
    except TrainingError as error:
        raise TrainingError(f"{error}; training stopped. {_kept_checkpoint(session.run_dir, progress)} "
                            "Lower --lr-new or --lr-backbone and start again with --overwrite.") from None

    if progress.best.improves_on(scores["val_accuracy"], scores["val_loss"]):
        progress.best = Best(scores["val_accuracy"], scores["val_loss"], epoch, _state_copy(session.model))
    record = {"step": step.name, "epoch": epoch, "loss": loss, **scores, "best_epoch": progress.best.epoch,
              "seconds": time.perf_counter() - started}
    progress.history.append(record)
    progress.epoch = epoch
    # The checkpoint comes last: a run killed in between resumes from the previous one and rewrites the history.
    write_history(session.run_dir, progress.history)
    save_checkpoint(session.run_dir, fingerprint=session.config.fingerprint(), workers=session.config.workers,
                    progress=progress, model=session.model, optimizer=optimizer,
                    rng=capture_rng(session.sampler_generator, session.loader_generator))
    logger.info("%s: loss %.4f, val accuracy %.4f, val macro recall %.4f, %.1f s", where, loss,
                scores["val_accuracy"], scores["val_macro_recall"], record["seconds"])


def _kept_checkpoint(run_dir: Path, progress: Progress) -> str:
    if not progress.history:
        return "No epoch had finished, so there is no checkpoint."
    last = progress.history[-1]
    return f"The checkpoint after {last['step']}, epoch {last['epoch']} is kept in {run_dir / CHECKPOINT_FILE}."


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, step: TrainingStep,
                runtime: Runtime, *, where: str = "") -> float:
    """Train ``model`` for one pass over ``loader``; return the mean loss per image.

    The loss is the sum of the cross-entropies of ``step.loss_outputs``.

    Raises:
        TrainingError: if the loss of a batch is NaN or infinite; the optimizer then has not
            stepped on that batch.
    """
    model.train()
    total, count = 0.0, 0
    for batch, (images, labels, _) in enumerate(tqdm(loader, desc=where or "train", unit="batch", leave=False), 1):
        labels = labels.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            outputs = model(runtime.images(images))  # {output: logits [B, K]}
        loss = sum(F.cross_entropy(outputs[name].float(), labels) for name in step.loss_outputs)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(f"training loss became {value} in {where}, batch {batch} of {len(loader)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * len(labels)
        count += len(labels)
    return total / count


def _training_summary(model: FinetuneNet, steps: list[TrainingStep], history: list[dict]) -> dict:
    best_epochs = {record["step"]: record["best_epoch"] for record in history}
    return {"trainable_parameters": {step.name: trainable_count(model, step) for step in steps},
            "minutes_per_epoch": mean_minutes_per_epoch(history),
            "best_epochs": best_epochs,
            "training_minutes": sum(record["seconds"] for record in history) / 60.0}


def _finish_run(run_dir: Path, settings: dict, training: dict, model: FinetuneNet, metrics: dict, *,
                title: str) -> None:
    runs.write_json_atomically(run_dir / "config.json", {**settings, "training": training})
    runs.save_state_dict_atomically(run_dir / "model.pt", _state_copy(model))
    write_metrics(run_dir, metrics, split="test", title=title)
    runs.finish_run(run_dir)

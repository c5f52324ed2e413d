"""``emo finetune``: train one of the six ResNet variants end to end and write a run directory.

The training loop itself is in :mod:`emo.finetune.loop`; this module prepares the data, the
model and the run directory, and writes the results. Under ``torchrun`` (see
:mod:`emo.finetune.distributed`) every rank trains, and rank 0 alone writes files.
"""

import logging
import multiprocessing
import sys
import time
from pathlib import Path

import torch

from emo import runs
from emo.backbone import build_resnet
from emo.data.scan import Dataset
from emo.errors import DataError, RunError
from emo.evaluate.files import write_metrics
from emo.finetune.checkpoint import CHECKPOINT_FILE, Progress, load_checkpoint, progress_from, restore_rng
from emo.finetune.config import FinetuneConfig
from emo.finetune.data import SPLIT_FILE, eval_loader, prepare_data, split_images, train_loader, write_run_split
from emo.finetune.distributed import Distributed
from emo.finetune.evaluate import mean_minutes_per_epoch, metrics_from_logits, predict_logits
from emo.finetune.loop import Session, state_copy, train_steps
from emo.finetune.models import FinetuneNet, build_model
from emo.finetune.outputs import backbone_record, run_settings, write_history
from emo.finetune.runtime import Runtime
from emo.finetune.steps import TrainingStep, trainable_count, variant_steps

logger = logging.getLogger(__name__)


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune a ResNet variant on an image dataset and write a run directory.

    Weights and the checkpoint to resume are checked first and the dataset is scanned next,
    so most mistakes are reported before any training.

    Args:
        config: the resolved options of ``emo finetune``.

    Returns:
        The content of the run's ``metrics.json``: test metrics of every model output, plus
        trainable parameters per step, mean minutes per epoch and the best epoch of each step.
        Ranks other than 0 of a ``torchrun`` job return an empty dict.

    Raises:
        TrainingError: if the loss or the val loss becomes NaN or infinite; the checkpoint of
            the last good epoch stays in place.
        RuntimeError: in a loader worker that reached this call by importing a main script
            that lacks an ``if __name__ == "__main__":`` guard.

    Example:
        >>> finetune(FinetuneConfig(data=Path("emotion6"), variant="l4", out=Path("runs/l4")))  # doctest: +SKIP
    """
    _check_not_in_worker_bootstrap()
    started = time.perf_counter()
    distributed = Distributed.from_environment()
    if config.batch_size < 2 * distributed.world_size:
        raise ValueError(f"batch_size {config.batch_size} gives fewer than 2 images to some of the "
                         f"{distributed.world_size} processes; use at least {2 * distributed.world_size}")
    runtime = Runtime.create(distributed.device_name(config.device), precision=config.precision,
                             channels_last=config.channels_last)
    checkpoint = load_checkpoint(config.out, fingerprint=config.fingerprint()) if config.resume else None
    if checkpoint is None and distributed.is_main:
        _check_out_folder(Path(config.out), overwrite=config.overwrite)
    distributed.start(runtime.device)

    session, dataset, split, settings = _prepare(config, runtime, distributed, resuming=checkpoint is not None)
    steps = variant_steps(config, session.model)
    progress = _resume(session, checkpoint) if checkpoint is not None else Progress()
    if distributed.is_main:
        _log_start(session, steps, len(session.train.dataset))

    try:
        progress = train_steps(session, steps, progress, checkpoint)
    except KeyboardInterrupt:
        if distributed.is_main and (session.run_dir / CHECKPOINT_FILE).exists():
            logger.warning("interrupted; the checkpoint of the last finished epoch is kept in %s, so rerun the "
                           "same command with --resume to continue", session.run_dir)
        raise
    metrics = _test_and_finish(session, steps, progress, dataset, split, settings) if distributed.is_main else {}
    distributed.stop()
    if metrics:
        metrics["seconds"] = time.perf_counter() - started
    return metrics


def _check_not_in_worker_bootstrap() -> None:
    """Raise RuntimeError if a starting loader worker reached this call by importing the main script.

    Workers from a forkserver import the main script again, as spawned ones do. A script that
    calls finetune() without an ``if __name__ == "__main__":`` guard would otherwise run a second
    training in every worker, up to scanning the data and preparing the run folder, before
    multiprocessing stops it with a message that the parent's traceback buries.
    ``_inheriting`` is the flag that CPython's multiprocessing.spawn sets for that import.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # runpy runs the script as __mp_main__ for this import.
        script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "the main script"
        raise RuntimeError(f"emo.finetune.finetune() was called while a data loader worker imported {script}. "
                           "Loader workers import the main script again, so call finetune() under "
                           "'if __name__ == \"__main__\":' in that script.")


def _check_out_folder(run_dir: Path, *, overwrite: bool) -> None:
    """Reject an output folder that contains a run before the slow scan (start_run checks again later)."""
    if overwrite:
        return
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.is_file() and (run_dir / runs.INCOMPLETE_MARKER).exists():
        raise RunError(f"{run_dir} contains an interrupted run ({checkpoint}); pass --resume to continue it "
                       "or --overwrite to start over")
    if (run_dir / "metrics.json").exists():
        raise RunError(f"run directory {run_dir} already contains a finished run; pass --overwrite or choose another --out")


def _prepare(config: FinetuneConfig, runtime: Runtime, distributed: Distributed, *,
             resuming: bool) -> tuple[Session, Dataset, list[str], dict]:
    """Load the weights, scan and split the data, build the model, loaders and (on rank 0) the run directory."""
    resnet, weights = build_resnet(config.arch, config.weights, seed=config.seed)
    split_file = Path(config.out) / SPLIT_FILE if resuming else config.split_file
    dataset, split = prepare_data(config, split_file=split_file)
    model = build_model(config.variant, resnet, len(dataset.classes), arch=config.arch, dropout=config.dropout,
                        seed=config.seed)
    settings = run_settings(config, backbone=backbone_record(config, weights), dataset_root=dataset.root, model=model)
    if resuming:
        _check_classes(Path(config.out), dataset.classes)
    elif distributed.is_main:
        _start_run_dir(config, settings, dataset, split)

    torch.manual_seed(config.seed)
    sampler_generator = torch.Generator().manual_seed(config.seed)
    loader_generator = torch.Generator().manual_seed(config.seed + 1)
    session = Session(
        config=config, run_dir=Path(config.out), runtime=runtime, classes=dataset.classes,
        model=model.to(runtime.device, memory_format=runtime.memory_format),
        train=train_loader(split_images(dataset, split, "train"), config, sampler_generator=sampler_generator,
                           loader_generator=loader_generator, pin_memory=runtime.pin_memory,
                           distributed=distributed),
        val=eval_loader(split_images(dataset, split, "val"), image_size=config.image_size,
                        batch_size=config.batch_size, workers=config.workers, pin_memory=runtime.pin_memory),
        sampler_generator=sampler_generator, loader_generator=loader_generator, distributed=distributed,
    )
    return session, dataset, split, settings


def _check_classes(run_dir: Path, classes: list[str]) -> None:
    recorded = runs.read_classes(run_dir)
    if recorded != classes:
        raise DataError(f"the dataset now has classes {classes}, but the interrupted run in {run_dir} was "
                        f"started with {recorded}; resume with the original data or pass --overwrite")


def _start_run_dir(config: FinetuneConfig, settings: dict, dataset: Dataset, split: list[str]) -> None:
    """Create the run directory with the files known before training: config, classes, split."""
    run_dir = runs.start_run(config.out, overwrite=config.overwrite)
    # With --overwrite, files of the replaced run must not pass for files of this one.
    stale = [run_dir / CHECKPOINT_FILE, run_dir / "model.pt", *run_dir.glob("metrics*.json"),
             *run_dir.glob("confusion_matrix*.png")]
    for path in stale:
        path.unlink(missing_ok=True)
    runs.write_json_atomically(run_dir / "config.json", settings)
    runs.write_json_atomically(run_dir / "classes.json", dataset.classes)
    write_run_split(run_dir, dataset, split)
    write_history(run_dir, [])


def _resume(session: Session, checkpoint: dict) -> Progress:
    """Load the model and random-number state from ``checkpoint`` and return its training progress."""
    if checkpoint["workers"] != session.config.workers and session.distributed.is_main:
        logger.warning("the interrupted run used %d worker(s) and this one uses %d, so its random crops differ "
                       "from those of an uninterrupted run", checkpoint["workers"], session.config.workers)
    session.model.load_state_dict(checkpoint["model"], strict=True)
    restore_rng(checkpoint["rng"], session.sampler_generator, session.loader_generator)
    progress = progress_from(checkpoint)
    if session.distributed.is_main:
        logger.info("resuming %s after epoch %d of step %d", session.run_dir, progress.epoch, progress.step + 1)
    return progress


def _log_start(session: Session, steps: list[TrainingStep], train_images: int) -> None:
    config = session.config
    processes = f", {session.distributed.world_size} processes" if session.distributed.enabled else ""
    logger.info("fine-tuning %s (%s, %s weights) on %d training images, %s%s; steps: %s", session.model.primary,
                config.arch, config.weights, train_images, session.runtime.describe(), processes,
                ", ".join(f"{step.name} {step.epochs} epoch(s), {trainable_count(session.model, step)} trainable "
                          "parameters" for step in steps))


def _test_and_finish(session: Session, steps: list[TrainingStep], progress: Progress, dataset: Dataset,
                     split: list[str], settings: dict) -> dict:
    """Evaluate the best model on test and write the remaining files of the run; return its metrics."""
    config, model = session.config, session.model
    test = eval_loader(split_images(dataset, split, "test"), image_size=config.image_size,
                       batch_size=config.batch_size, workers=config.workers, pin_memory=session.runtime.pin_memory)
    metrics = metrics_from_logits(model, *predict_logits(model, test, session.runtime, desc="test"), dataset.classes)
    training = _training_summary(model, steps, progress.history)
    metrics.update(training)

    run_dir = session.run_dir
    runs.write_json_atomically(run_dir / "config.json", {**settings, "training": training})
    runs.save_state_dict_atomically(run_dir / "model.pt", state_copy(model))
    write_metrics(run_dir, metrics, split="test", title=config.name)
    runs.finish_run(run_dir)
    return metrics


def _training_summary(model: FinetuneNet, steps: list[TrainingStep], history: list[dict]) -> dict:
    best_epochs = {record["step"]: record["best_epoch"] for record in history}
    return {"trainable_parameters": {step.name: trainable_count(model, step) for step in steps},
            "minutes_per_epoch": mean_minutes_per_epoch(history),
            "best_epochs": best_epochs,
            "training_minutes": sum(record["seconds"] for record in history) / 60.0}

"""The training loop: steps, epochs, the best val epoch and the per-epoch checkpoint.

Each training step (one for most variants, two for ``ensemble``) runs its epochs, keeps the
epoch with the best val accuracy (ties: lower val loss) and goes on from it. Every epoch ends
with an atomic checkpoint, from which ``--resume`` continues a killed run.

NOTE: a resumed run matches an uninterrupted one bit for bit on the CPU with one process (the
tests check this). On CUDA, nondeterministic kernels (cuDNN convolution backward) and under DDP
the per-rank random-number states, of which the checkpoint keeps rank 0's, make it match only
approximately.
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

from emo.errors import TrainingError
from emo.finetune.checkpoint import CHECKPOINT_FILE, Best, Progress, capture_rng, save_checkpoint
from emo.finetune.config import FinetuneConfig
from emo.finetune.distributed import Distributed
from emo.finetune.evaluate import predict_logits, val_scores
from emo.finetune.models import FinetuneNet
from emo.finetune.outputs import write_history
from emo.finetune.runtime import Runtime
from emo.finetune.steps import TrainingStep, apply_step, build_optimizer

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything the epochs of one run share. ``run_dir`` is written by rank 0 only."""

    config: FinetuneConfig
    run_dir: Path
    model: FinetuneNet
    runtime: Runtime
    classes: list[str]
    train: DataLoader
    val: DataLoader
    sampler_generator: torch.Generator
    loader_generator: torch.Generator
    distributed: Distributed


def train_steps(session: Session, steps: list[TrainingStep], progress: Progress, checkpoint: dict | None) -> Progress:
    """Run every step from ``progress`` on; leave the model at the best epoch of the last step.

    Args:
        session: the model, data and settings of the run.
        steps: the variant's training steps.
        progress: where to start; a fresh :class:`Progress` or one restored from ``checkpoint``.
        checkpoint: the checkpoint being resumed, whose optimizer state the step it was written
            in continues from; None for a new run.

    Returns:
        ``progress`` after the last step.
    """
    model, distributed = session.model, session.distributed
    while progress.step < len(steps):
        step = steps[progress.step]
        apply_step(model, step)
        optimizer = build_optimizer(model, session.config)
        if checkpoint is not None and progress.step == checkpoint["step"]:
            optimizer.load_state_dict(checkpoint["optimizer"])
        elif distributed.is_main:
            progress.best = _start_best(session, step)

        trained = distributed.wrap(model, session.runtime.device)
        for epoch in range(progress.epoch + 1, step.epochs + 1):
            _run_epoch(session, trained, step, epoch, optimizer, progress)
        del trained  # DDP's gradient hooks go with it; the next step wraps its own parameters.

        if distributed.is_main:
            model.load_state_dict(progress.best.state)
            logger.info("%s: best val accuracy %.4f at epoch %d", step.name, progress.best.accuracy,
                        progress.best.epoch)
        distributed.share_model(model)
        progress.step, progress.epoch = progress.step + 1, 0
    return progress


def _start_best(session: Session, step: TrainingStep) -> Best:
    """Return the best-epoch record a step starts from: nothing, or the model as it enters the step."""
    if not step.keep_start:
        return Best()
    scores = val_scores(session.model, *predict_logits(session.model, session.val, session.runtime, desc="val"),
                        session.classes)
    return Best(scores["val_accuracy"], scores["val_loss"], 0, state_copy(session.model))


def state_copy(model: FinetuneNet) -> dict:
    """Return a CPU copy of ``model``'s state dict."""
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _run_epoch(session: Session, trained: torch.nn.Module, step: TrainingStep, epoch: int,
               optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    """Train one epoch; on rank 0 also score it on val, update the best epoch, write history and checkpoint."""
    where = f"{step.name}, epoch {epoch}/{step.epochs}"
    started = time.perf_counter()
    try:
        loss = train_epoch(trained, session.train, optimizer, step, session.runtime, where=where,
                           distributed=session.distributed)
        train_seconds = time.perf_counter() - started
        progress.epoch = epoch
        if not session.distributed.is_main:
            return
        scores = val_scores(session.model, *predict_logits(session.model, session.val, session.runtime, desc="val"),
                            session.classes)
        if not math.isfinite(scores["val_loss"]):
            raise TrainingError(f"val loss became {scores['val_loss']} after {where}")
    except TrainingError as error:
        raise TrainingError(f"{error}; training stopped. {_kept_checkpoint(session.run_dir, progress)} "
                            "Lower --lr-new or --lr-backbone and start again with --overwrite.") from None

    if progress.best.improves_on(scores["val_accuracy"], scores["val_loss"]):
        progress.best = Best(scores["val_accuracy"], scores["val_loss"], epoch, state_copy(session.model))
    # train_seconds covers the training pass alone: loading, forward, backward and optimizer step.
    # The ranks draw len(dataset) images per epoch between them. seconds also covers scoring val
    # and writing the checkpoint.
    record = {"step": step.name, "epoch": epoch, "loss": loss, **scores, "best_epoch": progress.best.epoch,
              "train_seconds": train_seconds,
              "train_images_per_second": len(session.train.dataset) / train_seconds,
              "seconds": time.perf_counter() - started}
    progress.history.append(record)
    # The checkpoint comes last: a run killed in between resumes from the previous one and rewrites the history.
    write_history(session.run_dir, progress.history)
    save_checkpoint(session.run_dir, fingerprint=session.config.fingerprint(), workers=session.config.workers,
                    progress=progress, model=session.model, optimizer=optimizer,
                    rng=capture_rng(session.sampler_generator, session.loader_generator))
    logger.info("%s: loss %.4f, val accuracy %.4f, val macro recall %.4f, %.1f s (%.1f training images/s)", where,
                loss, scores["val_accuracy"], scores["val_macro_recall"], record["seconds"],
                record["train_images_per_second"])


def _kept_checkpoint(run_dir: Path, progress: Progress) -> str:
    if not progress.history:
        return "No epoch had finished, so there is no checkpoint."
    last = progress.history[-1]
    return f"The checkpoint after {last['step']}, epoch {last['epoch']} is kept in {run_dir / CHECKPOINT_FILE}."


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, step: TrainingStep,
                runtime: Runtime, *, where: str = "", distributed: Distributed = Distributed()) -> float:
    """Train ``model`` for one pass over ``loader``; return the mean loss per image over all ranks.

    The loss is the sum of the cross-entropies of ``step.loss_outputs``.

    Raises:
        TrainingError: if the loss of a batch is NaN or infinite on any rank; the optimizer
            then has not stepped on that batch.
    """
    model.train()
    total, count = 0.0, 0
    for batch, (images, labels, _) in enumerate(tqdm(loader, desc=where or "train", unit="batch", leave=False), 1):
        labels = labels.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            outputs = model(runtime.images(images))  # {output: logits [B, K]}
        loss = sum(F.cross_entropy(outputs[name].float(), labels) for name in step.loss_outputs)
        value = loss.item()
        # Every rank must stop at the same batch, or the others would wait for it forever.
        if distributed.any_rank(not math.isfinite(value), runtime.device):
            became = f"became {value}" if not math.isfinite(value) else "became NaN or infinite on another rank"
            raise TrainingError(f"training loss {became} in {where}, batch {batch} of {len(loader)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * len(labels)
        count += len(labels)
    total, count = distributed.sum([total, count], runtime.device)
    return total / count

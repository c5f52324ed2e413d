"""Evaluating fine-tuned models: on a data loader during training, and a finished run for ``emo evaluate``."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from emo.errors import RunError
from emo.evaluate.metrics import compute_metrics
from emo.finetune.data import eval_loader, read_run_split
from emo.finetune.models import FinetuneNet
from emo.finetune.outputs import load_finetune_model, require_finetune_settings
from emo.finetune.runtime import Runtime


@torch.no_grad()
def predict_logits(model: FinetuneNet, loader: DataLoader, runtime: Runtime, *,
                   desc: str = "evaluate") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``model`` in eval mode over ``loader``.

    Returns:
        The float32 logits [N, K] of every model output, on the CPU, and the labels [N].
    """
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    labels = []
    for images, batch_labels, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        with runtime.autocast():
            batch_outputs = model(runtime.images(images))
        for name, logits in batch_outputs.items():
            outputs.setdefault(name, []).append(logits.float().cpu())
        labels.append(batch_labels)
    return {name: torch.cat(values) for name, values in outputs.items()}, torch.cat(labels)


def metrics_from_logits(model: FinetuneNet, logits: dict[str, torch.Tensor], labels: torch.Tensor,
                        classes: list[str]) -> dict:
    """Return the metrics of every model output, in the layout of ``metrics.json``.

    The primary output comes first; the ensemble variant adds one entry per branch (L0..L4).
    Variants with a learned weighted average add its weights as ``combination_weights``.
    """
    y_true = labels.numpy()
    models = {name: compute_metrics(y_true, values.argmax(dim=1).numpy(), classes) for name, values in logits.items()}
    metrics = {"primary": model.primary, "models": models}
    weights = model.combination_weights()
    if weights is not None:
        metrics["combination_weights"] = weights
    return metrics


def val_scores(model: FinetuneNet, logits: dict[str, torch.Tensor], labels: torch.Tensor,
               classes: list[str]) -> dict[str, float]:
    """Return accuracy, macro recall and cross-entropy of the primary output on val."""
    primary = logits[model.primary]
    metrics = compute_metrics(labels.numpy(), primary.argmax(dim=1).numpy(), classes)
    return {"val_accuracy": metrics["accuracy"], "val_macro_recall": metrics["macro_recall"],
            "val_loss": float(F.cross_entropy(primary, labels))}


def evaluate_finetune_run(run_dir: Path, settings: dict, *, split: str = "test", device: str = "auto") -> dict:
    """Recompute the metrics of a finished fine-tuned run on one split of its own split file.

    Args:
        run_dir: the run directory.
        settings: its config.json with ``classes`` added (from :func:`emo.runs.read_run_config`).
        split: ``train``, ``val`` or ``test``; train images get the evaluation transform.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        ``{"primary", "models", ...}`` as in ``metrics.json``, with the run's training summary.

    Example:
        >>> evaluate_finetune_run(Path("runs/l4"), read_run_config(Path("runs/l4")))["primary"]  # doctest: +SKIP
        'ResNet-L4'
    """
    run_dir = Path(run_dir)
    require_finetune_settings(settings, run_dir)
    config = settings["config"]
    runtime = Runtime.create(device, precision=config["precision"], channels_last=config["channels_last"])
    images = read_run_split(run_dir, Path(settings["dataset_root"]), settings["classes"], split)
    if not len(images):
        raise RunError(f"the split file of run {run_dir} has no {split} images")

    model = load_finetune_model({**settings, "run_dir": str(run_dir)})
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    loader = eval_loader(images, image_size=settings["backbone"]["image_size"], batch_size=config["batch_size"],
                         workers=config["workers"], pin_memory=runtime.pin_memory)
    logits, labels = predict_logits(model, loader, runtime, desc=split)
    metrics = metrics_from_logits(model, logits, labels, settings["classes"])
    metrics.update(settings.get("training", {}))
    return metrics


def mean_minutes_per_epoch(history: list[dict]) -> float:
    """Return the mean wall-clock minutes of an epoch (training and validation) over ``history``."""
    return float(np.mean([record["seconds"] for record in history])) / 60.0 if history else float("nan")

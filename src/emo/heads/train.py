"""``emo fit-heads``: train branch heads on cached features, then their weighted stacking.

Phase 1 trains every branch at once on the same sampled mini-batches. The branches share no
parameters, so summing their losses gives each branch exactly the gradient it would get alone.
Each branch keeps its best epoch on val. Phase 2 learns the stacking weights while fine-tuning
the branches, the cached-feature form of the two-step ResNet-ensemble of Najid & Chahyati
(EECSI 2018), again keeping the best epoch on val. The other stackings replace phase 2: ``mean``
keeps equal weights, ``logreg`` fits a meta-learner on the val split (:mod:`emo.heads.stacking`).
"""

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from emo.cache.reader import FeatureCache
from emo import runs
from emo.data.sampling import make_sampler
from emo.errors import CacheError, TrainingError
from emo.evaluate.metrics import compute_metrics
from emo.heads.config import FitHeadsConfig
from emo.heads.gradients import set_branch_gradients
from emo.heads.data import InMemoryRows, StageColumns, StreamedRows, read_matrix, row_bytes
from emo.heads.model import StackedHeads
from emo.heads.outputs import write_head_run
from emo.heads.stacking import fit_logreg_stacking
from emo.threads import torch_threads

logger = logging.getLogger(__name__)


@dataclass
class SplitData:
    """Features {stage: [N, C]} and labels [N] of one split, as float32 / int64 tensors."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return the rows ``index`` of every stage and their labels."""
        return {name: values[index] for name, values in self.features.items()}, self.labels[index]


def load_split(cache: FeatureCache, split: str, stages: tuple[str, ...]) -> SplitData:
    """Read the features of ``stages`` and the labels of one split into tensors.

    The stages share one matrix, so each feature tensor is a column slice of it.
    """
    columns = StageColumns.of({name: cache.stages[name] for name in stages})
    matrix = torch.from_numpy(read_matrix(cache, cache.indices(split), columns))
    return SplitData(columns.split(matrix), torch.from_numpy(cache.labels(split)).long())


def load_train_rows(cache: FeatureCache, config: FitHeadsConfig) -> InMemoryRows | StreamedRows:
    """Return the training rows of ``config.stages``: in memory, or streamed when they exceed ``config.max_memory``.

    NOTE: ``max_memory`` bounds the training rows only; the val split stays in memory during
    training and the test split is read whole afterwards (together a quarter of the training
    rows with the default 80/5/15 split).

    Raises:
        ValueError: if ``config.max_memory`` cannot hold one mini-batch of training rows.
    """
    columns = StageColumns.of({name: cache.stages[name] for name in config.stages})
    rows = cache.indices("train")
    labels = torch.from_numpy(cache.labels("train")).long()
    needed = len(rows) * row_bytes(columns)
    if config.max_memory is None or needed <= config.max_memory:
        return InMemoryRows(torch.from_numpy(read_matrix(cache, rows, columns)), labels, columns)

    window_rows = config.max_memory // row_bytes(columns)
    if window_rows < config.batch_size:
        raise ValueError(f"max_memory of {config.max_memory} bytes holds {window_rows} training rows, fewer than "
                         f"one batch of {config.batch_size}; raise --max-memory to at least "
                         f"{config.batch_size * row_bytes(columns)} bytes")
    logger.info("training features need %.1f MB, more than max_memory (%.1f MB); streaming them from %s "
                "in windows of %d rows", needed / 1e6, config.max_memory / 1e6, cache.path, window_rows)
    return StreamedRows(cache.path, rows, labels, columns, window_rows=window_rows)


def fit_heads(config: FitHeadsConfig) -> dict:
    """Train one branch head per stage and their stacking from a feature cache, and write a run.

    Args:
        config: the resolved options of ``emo fit-heads``.

    Returns:
        The content of the run's ``metrics.json``: test metrics of the stacked model and of every
        branch, and under ``"val"`` the val accuracy and macro recall of each of them.

    Example:
        >>> fit_heads(FitHeadsConfig(cache=Path("e6.h5"), out=Path("runs/heads")))  # doctest: +SKIP
    """
    with torch_threads(config.threads):
        return _fit_heads(config)


def _fit_heads(config: FitHeadsConfig) -> dict:
    start = time.perf_counter()
    runs.check_run_destination(config.out, overwrite=config.overwrite)
    with FeatureCache(config.cache) as cache:
        _check_stages(cache, config.stages)
        train = load_train_rows(cache, config)
        splits = {"train": train, "val": load_split(cache, "val", config.stages)}
        classes, backbone, source = cache.classes, cache.backbone_record(), cache.run_record()
        channels = {name: cache.stages[name] for name in config.stages}
    _check_training_labels(train.labels, classes, config.cache)
    _check_finite({"val": splits["val"]}, config.cache)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = StackedHeads(channels, len(classes), dropout=config.dropout, fusion=config.fusion,
                         stacking=config.stacking)
    _set_standardization(model, train, config.cache)
    if len(model.branches) == 1 and config.stacking != "weighted":
        logger.warning("--stacking %s has no effect: the run trains one head (%s), so there is nothing to stack; "
                       "pass several --stages with --fusion branches to stack them", config.stacking,
                       model.stages[0])
    train.standardize(*model.standardization())

    with train:
        history = train_branches(model, splits, config, generator)
        if len(model.branches) > 1 and config.stacking == "weighted" and config.stack_epochs > 0:
            history += train_stacking(model, splits, config, generator)
        elif len(model.branches) > 1 and config.stacking == "logreg":
            fit_logreg_stacking(model, splits["val"].features, splits["val"].labels)

    metrics = _test_and_val_metrics(model, splits["val"], config, classes)
    metrics["seconds"] = time.perf_counter() - start
    require_finite_parameters(model, config, when="after training")
    write_head_run(config, model=model, classes=classes, backbone=backbone, cache=source, metrics=metrics,
                   history=history)
    return metrics


def _set_standardization(model: StackedHeads, train: InMemoryRows | StreamedRows, path: Path) -> None:
    """Set each branch's mean and standard deviation from the training rows of its stages."""
    statistics = {name: train.statistics(name) for name in model.channels}
    for name, (mean, std) in statistics.items():
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise CacheError(f"cache {path} has NaN or infinite {name} features in the train split; "
                             "recreate it with `emo extract`")
    for name, head in model.branches.items():
        # A concatenated branch sees every stage side by side, so its statistics are too.
        parts = [statistics[stage] for stage in model.channels] if name not in statistics else [statistics[name]]
        head.set_statistics(torch.cat([mean for mean, _ in parts]), torch.cat([std for _, std in parts]))


def _test_and_val_metrics(model: StackedHeads, val: SplitData, config: FitHeadsConfig, classes: list[str]) -> dict:
    """Return test metrics, with a summary of the val metrics under ``"val"``.

    The test split is read only now that the training rows are freed, which lowers peak memory.
    """
    with FeatureCache(config.cache) as cache:
        test = load_split(cache, "test", config.stages)
    _check_finite({"test": test}, config.cache)
    metrics = evaluate_heads(model, test, classes)
    metrics["val"] = {name: {key: values[key] for key in ("accuracy", "macro_recall")}
                      for name, values in evaluate_heads(model, val, classes)["models"].items()}
    return metrics


def _check_stages(cache: FeatureCache, stages: tuple[str, ...]) -> None:
    missing = [name for name in stages if name not in cache.stages]
    if missing:
        raise CacheError(f"cache {cache.path} has no stage {missing[0]}; it has {', '.join(cache.stages)}")


def _check_training_labels(labels: torch.Tensor, classes: list[str], path: Path) -> None:
    counts = np.bincount(labels.numpy(), minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise CacheError(f"class {empty[0]!r} has no training rows in {path}; weighted sampling and "
                         "the heads need every class in the train split")


def _check_finite(splits: dict[str, SplitData], path: Path) -> None:
    for split, data in splits.items():
        for name, values in data.features.items():
            if not torch.isfinite(values).all():
                raise CacheError(f"cache {path} has NaN or infinite {name} features in the {split} split; "
                                 "recreate it with `emo extract`")


def epoch_batches(labels: torch.Tensor, config: FitHeadsConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Return the row indices of each mini-batch of one training epoch."""
    order = torch.tensor(list(make_sampler(labels.numpy(), config.sampling, generator)))
    return list(order.split(config.batch_size))


def _sgd(parameters, config: FitHeadsConfig) -> torch.optim.SGD:
    parameters = list(parameters)
    options = dict(lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay)
    try:
        # The fused kernel updates every parameter in one call instead of five operators per tensor,
        # a large part of a mini-batch step of small linear heads.
        return torch.optim.SGD(parameters, fused=True, **options)
    except RuntimeError:  # torch before 2.4 fuses SGD on CUDA only
        return torch.optim.SGD(parameters, **options)


def train_branches(model: StackedHeads, splits: dict[str, SplitData], config: FitHeadsConfig,
                   generator: torch.Generator) -> list[dict]:
    """Train all branches jointly for ``config.epochs``; leave each at its best val epoch."""
    optimizer = _sgd(model.branches.parameters(), config)
    best = {name: (-1.0, float("inf"), None) for name in model.stages}  # (val acc, val loss, state)
    history = []

    for epoch in tqdm(range(1, config.epochs + 1), desc="branches", unit="epoch", leave=False):
        started = time.perf_counter()
        loss = _train_epoch(model, splits["train"], config, generator, optimizer, stacked=False, epoch=epoch)
        scores = _branch_scores(model, splits["val"])
        for name, (accuracy, val_loss) in scores.items():
            if (accuracy, -val_loss) > (best[name][0], -best[name][1]):
                best[name] = (accuracy, val_loss, copy.deepcopy(model.branches[name].state_dict()))
        history.append({"phase": "branches", "epoch": epoch, "loss": loss,
                        "val_accuracy": {name: s[0] for name, s in scores.items()},
                        "seconds": time.perf_counter() - started})

    for name, (_, _, state) in best.items():
        model.branches[name].load_state_dict(state)
    logger.info("branches: best val accuracy %s", {name: round(b[0], 4) for name, b in best.items()})
    return history


def train_stacking(model: StackedHeads, splits: dict[str, SplitData], config: FitHeadsConfig,
                   generator: torch.Generator) -> list[dict]:
    """Learn the stacking weights while fine-tuning the branches; keep the best val epoch."""
    optimizer = _sgd(model.parameters(), config)
    best_score = _stacked_score(model, splits["val"])  # epoch 0: the plain mean of the best branches
    best_state = copy.deepcopy(model.state_dict())
    history = []

    for epoch in tqdm(range(1, config.stack_epochs + 1), desc="stacking", unit="epoch", leave=False):
        started = time.perf_counter()
        loss = _train_epoch(model, splits["train"], config, generator, optimizer, stacked=True, epoch=epoch)
        score = _stacked_score(model, splits["val"])
        if (score[0], -score[1]) > (best_score[0], -best_score[1]):
            best_score, best_state = score, copy.deepcopy(model.state_dict())
        history.append({"phase": "stacking", "epoch": epoch, "loss": loss, "val_accuracy": score[0],
                        "stack_weights": model.stack_weights().tolist(), "seconds": time.perf_counter() - started})

    model.load_state_dict(best_state)
    logger.info("stacking: best val accuracy %.4f, weights %s", best_score[0],
                {name: round(w, 3) for name, w in zip(model.stages, model.stack_weights().tolist())})
    return history


def _train_epoch(model: StackedHeads, train: InMemoryRows | StreamedRows, config: FitHeadsConfig,
                 generator: torch.Generator, optimizer: torch.optim.Optimizer, *, stacked: bool, epoch: int) -> float:
    model.train()
    total, count = 0.0, 0
    phase = "stacking" if stacked else "branch"
    for features, labels in train.batches(epoch_batches(train.labels, config, generator)):
        # The training rows arrive standardized (see _fit_heads). Branches alone have a gradient in
        # closed form; the stacking trains through autograd.
        if stacked:
            value = _stacked_backward(model, features, labels, optimizer)
        else:
            value = set_branch_gradients(model, features, labels)
        if not math.isfinite(value):
            raise TrainingError(f"the training loss became {value} in epoch {epoch} of {phase} training; "
                                f"stopped without writing a run, so {config.out} is unchanged. Lower --lr "
                                f"(now {config.lr:g}) and rerun")
        optimizer.step()
        total += value * len(labels)
        count += len(labels)
    # A step can overflow the parameters while the loss that led to it was still finite. Checking
    # once per epoch costs little and still stops before a diverged model is kept or written.
    require_finite_parameters(model, config, when=f"in epoch {epoch} of {phase} training")
    return total / count


def require_finite_parameters(model: torch.nn.Module, config: FitHeadsConfig, *, when: str) -> None:
    """Raise TrainingError if any parameter or buffer of ``model`` is NaN or infinite.

    Such a model predicts NaN for every image, so no run may be written from it.
    """
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingError(f"the head parameter {name} became NaN or infinite {when}, so training diverged; "
                                f"stopped without writing a run, so {config.out} is unchanged. Lower --lr "
                                f"(now {config.lr:g}) and rerun")


def _stacked_backward(model: StackedHeads, standardized: dict[str, torch.Tensor], labels: torch.Tensor,
                      optimizer: torch.optim.Optimizer) -> float:
    """Set the gradients of the stacked loss on one mini-batch; return the loss."""
    loss = _stacked_loss(model, model.branch_logits(standardized, standardized=True), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item()


def _stacked_loss(model: StackedHeads, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    probabilities = model.stack(logits)
    return F.nll_loss(torch.log(probabilities.clamp_min(1e-12)), labels)


@torch.no_grad()
def _branch_scores(model: StackedHeads, split: SplitData) -> dict[str, tuple[float, float]]:
    model.eval()
    logits = model.branch_logits(split.features)
    return {name: ((values.argmax(1) == split.labels).float().mean().item(),
                   F.cross_entropy(values, split.labels).item()) for name, values in logits.items()}


@torch.no_grad()
def _stacked_score(model: StackedHeads, split: SplitData) -> tuple[float, float]:
    model.eval()
    logits = model.branch_logits(split.features)
    probabilities = model.stack(logits)
    accuracy = (probabilities.argmax(1) == split.labels).float().mean().item()
    return accuracy, _stacked_loss(model, logits, split.labels).item()


@torch.no_grad()
def head_probabilities(model: StackedHeads, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return class probabilities [N, K] of the stacked model (when it has several branches) and of each branch."""
    model.eval()
    logits = model.branch_logits(features)
    outputs = {"stacked": model.stack(logits)} if len(logits) > 1 else {}
    outputs.update({name: torch.softmax(values, dim=1) for name, values in logits.items()})
    return outputs


def evaluate_heads(model: StackedHeads, split: SplitData, classes: list[str]) -> dict:
    """Return metrics of every model of the run on one split, in the layout of ``metrics.json``."""
    outputs = head_probabilities(model, split.features)
    labels = split.labels.numpy()
    models = {name: compute_metrics(labels, probs.argmax(1).numpy(), classes) for name, probs in outputs.items()}
    # The logreg meta-learner has no per-branch weights.
    weights = None if hasattr(model, "meta") else dict(zip(model.stages, model.stack_weights().tolist()))
    return {"primary": next(iter(models)), "models": models, "stack_weights": weights}

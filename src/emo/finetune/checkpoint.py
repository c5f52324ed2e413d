"""The per-epoch checkpoint of a fine-tuning run, and the random-number state it carries.

``checkpoint.pt`` contains everything that decides the remaining epochs: the model, the optimizer,
the best epoch so far and its weights, the history, and the state of every random-number
generator training draws from (the global torch, CUDA, NumPy and Python generators, the sampler's
generator and the generator of the worker seeds). Restoring it continues a killed run with the
same results an uninterrupted run gives. It contains only tensors and plain data, so it loads
with ``torch.load(weights_only=True)``.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emo import runs
from emo.errors import RunError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "emo-vision finetune checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Best:
    """The best epoch of the current step on val: its score, epoch and model state."""

    accuracy: float = -1.0
    loss: float = float("inf")
    epoch: int = -1
    state: dict | None = None

    def improves_on(self, accuracy: float, loss: float) -> bool:
        """Return whether a val accuracy and loss beat this epoch (higher accuracy, then lower loss)."""
        return (accuracy, -loss) > (self.accuracy, -self.loss)


@dataclass
class Progress:
    """Training progress: the step, the last finished epoch of that step, the best epoch and the history."""

    step: int = 0
    epoch: int = 0
    best: Best = field(default_factory=Best)
    history: list[dict] = field(default_factory=list)


def capture_rng(sampler_generator: torch.Generator, loader_generator: torch.Generator) -> dict:
    """Return the state of every random-number generator training uses."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
        "sampler": sampler_generator.get_state(),
        "loader": loader_generator.get_state(),
    }


def restore_rng(state: dict, sampler_generator: torch.Generator, loader_generator: torch.Generator) -> None:
    """Set every random-number generator back to a state from :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])
    sampler_generator.set_state(state["sampler"])
    loader_generator.set_state(state["loader"])


def save_checkpoint(run_dir: Path, *, fingerprint: str, workers: int, progress: Progress, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, rng: dict) -> Path:
    """Write ``checkpoint.pt`` through a temporary file and a rename; return its path."""
    path = Path(run_dir) / CHECKPOINT_FILE
    runs.save_state_dict_atomically(path, {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "workers": workers,
        "step": progress.step, "epoch": progress.epoch, "history": progress.history,
        "best": {"accuracy": progress.best.accuracy, "loss": progress.best.loss, "epoch": progress.best.epoch,
                 "state": progress.best.state},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
    })
    return path


def load_checkpoint(run_dir: Path, *, fingerprint: str) -> dict:
    """Load the checkpoint of an interrupted run, checking that it belongs to the same command.

    Raises:
        RunError: if the run has no checkpoint, has finished, or was started with other options.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} has no {CHECKPOINT_FILE} to resume from; run without --resume to start")
    if not (run_dir / runs.INCOMPLETE_MARKER).exists():
        raise RunError(f"run {run_dir} has finished; there is nothing to resume")
    checkpoint = runs.load_state_dict(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not an emo-vision fine-tuning checkpoint")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise RunError(f"{path} has checkpoint version {checkpoint.get('version')}, but this emo-vision "
                       f"reads version {CHECKPOINT_VERSION}; start the run again with --overwrite")
    if checkpoint["fingerprint"] != fingerprint:
        raise RunError(f"{path} was written by `emo finetune` with other options (data, variant, architecture, "
                       "weights, epochs, learning rates, batch size, sampling, image size, seed or precision); "
                       "resume with the original options, or pass --overwrite to start over")
    return checkpoint


def progress_from(checkpoint: dict) -> Progress:
    """Return the :class:`Progress` stored in a checkpoint."""
    best = checkpoint["best"]
    return Progress(step=checkpoint["step"], epoch=checkpoint["epoch"], history=list(checkpoint["history"]),
                    best=Best(best["accuracy"], best["loss"], best["epoch"], best["state"]))

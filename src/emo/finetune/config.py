"""Configuration of ``emo finetune``."""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from emo.data.sampling import SAMPLINGS
from emo.stages import validate_arch

# CLI spelling of each variant -> the model name of Najid & Chahyati (EECSI 2018), used in metrics.json.
VARIANTS = {
    "fc": "ResNet-fc",
    "l4": "ResNet-L4",
    "full": "ResNet",
    "l4-dropout": "ResNet-L4-dropout",
    "skip": "ResNet-skip",
    "ensemble": "ResNet-ensemble",
}
PRECISIONS = ("bf16", "fp32")

# Options that may change between a killed run and its --resume. Another worker count changes the
# random crops, so resuming warns about it. Another device changes the arithmetic slightly.
RESUMABLE_CHANGES = ("out", "device", "workers", "resume", "overwrite")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``emo finetune`` needs; the CLI maps its options onto these fields.

    ``epochs`` is the length of the only training step, or of step 1 of ``ensemble``.
    ``stack_epochs`` is the length of step 2 of ``ensemble`` (branches and combining weights).
    ``precision`` applies on CUDA only, so on the CPU training runs in float32; ``channels_last`` applies everywhere.
    """

    data: Path
    variant: str
    out: Path
    labels: Path | None = None
    path_column: str = "path"
    label_column: str = "label"
    split_file: Path | None = None
    arch: str = "resnet101"
    weights: str = "imagenet"
    epochs: int = 50
    stack_epochs: int = 10
    batch_size: int = 32
    lr_backbone: float = 1e-4
    lr_new: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    dropout: float = 0.5
    sampling: str = "weighted"
    image_size: int = 224
    workers: int = 2
    device: str = "auto"
    precision: str = "bf16"
    channels_last: bool = True
    seed: int = 0
    skip_bad: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        validate_arch(self.arch)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.epochs < 1 or self.stack_epochs < 1:
            raise ValueError(f"epochs and stack_epochs must be at least 1, got {self.epochs} and {self.stack_epochs}")
        # A batch of one image cannot train BatchNorm once the feature maps shrink to 1x1.
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if not (self.lr_backbone > 0 and self.lr_new > 0):
            raise ValueError(f"learning rates must be positive, got lr_backbone {self.lr_backbone}, "
                             f"lr_new {self.lr_new}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite discards it; pass only one of them")

    @property
    def model_name(self) -> str:
        """The paper's name of the variant, e.g. ``ResNet-L4``."""
        return VARIANTS[self.variant]

    @property
    def name(self) -> str:
        """A run name that encodes the hyperparameters, e.g. ``ResNet-L4_resnet101_lr0.0001-0.001_e50``."""
        return f"{self.model_name}_{self.arch}_lr{self.lr_backbone:g}-{self.lr_new:g}_e{self.epochs}"

    def to_json(self) -> dict:
        """Return the config as JSON-ready values."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}

    def fingerprint(self) -> str:
        """Return a SHA-256 over every option that decides the training result.

        A checkpoint may only be resumed by a config with the same fingerprint.
        """
        values = {key: value for key, value in self.to_json().items() if key not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

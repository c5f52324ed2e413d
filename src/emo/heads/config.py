"""Configuration of ``emo fit-heads``."""

from dataclasses import asdict, dataclass
from pathlib import Path

from emo.data.sampling import SAMPLINGS
from emo.stages import STAGE_NAMES


@dataclass(frozen=True)
class FitHeadsConfig:
    """Everything ``emo fit-heads`` needs; the CLI maps its options onto these fields."""

    cache: Path
    out: Path
    stages: tuple[str, ...] = STAGE_NAMES
    sampling: str = "weighted"
    epochs: int = 50
    stack_epochs: int = 10
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    dropout: float = 0.0
    seed: int = 0
    overwrite: bool = False
    max_memory: int | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not self.stages or any(stage not in STAGE_NAMES for stage in self.stages):
            raise ValueError(f"stages {self.stages} must be a non-empty subset of {', '.join(STAGE_NAMES)}")
        if self.epochs < 1 or self.stack_epochs < 0:
            raise ValueError(f"epochs must be at least 1 and stack_epochs at least 0, got {self.epochs}, "
                             f"{self.stack_epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_memory is not None and self.max_memory < 1:
            raise ValueError(f"max_memory must be a positive number of bytes, got {self.max_memory}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    @property
    def name(self) -> str:
        """A head name that encodes the hyperparameters, e.g. ``L0-L4_weighted_lr0.001_drop0.0_e50``."""
        stages = "-".join(self.stages) if len(self.stages) < 3 else f"{self.stages[0]}-{self.stages[-1]}"
        return f"{stages}_{self.sampling}_lr{self.lr:g}_drop{self.dropout:g}_e{self.epochs}"

    def to_json(self) -> dict:
        """Return the config as JSON-ready values."""
        values = asdict(self)
        values["stages"] = list(self.stages)
        return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}

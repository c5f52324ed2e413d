"""Configuration of ``emo fit-heads``."""

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from emo.data.sampling import SAMPLINGS
from emo.data.split import check_seed
from emo.stages import STAGE_NAMES

# Ways to combine the branch probabilities of several stages into one prediction: a learned
# weighted average, a plain mean, or a logistic-regression meta-learner fit on the val split.
STACKINGS = ("weighted", "mean", "logreg")
# "branches": one linear head per stage, then stacking; "concat": one linear head on the
# concatenated features of all stages.
FUSIONS = ("branches", "concat")
# Fields that appear in a run name only when they differ from their default, with their tag.
_NAME_EXTRAS = {"stack_epochs": "se", "batch_size": "bs", "momentum": "m", "weight_decay": "wd"}


@dataclass(frozen=True)
class FitHeadsConfig:
    """Everything ``emo fit-heads`` needs; the CLI maps its options onto these fields."""

    cache: Path
    out: Path
    stages: tuple[str, ...] = STAGE_NAMES
    sampling: str = "weighted"
    fusion: str = "branches"
    stacking: str = "weighted"
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
        # Messages name the CLI option of each field, which is also its key in an ablation grid.
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"--sampling {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--fusion {self.fusion!r} is not one of {', '.join(FUSIONS)}")
        if self.stacking not in STACKINGS:
            raise ValueError(f"--stacking {self.stacking!r} is not one of {', '.join(STACKINGS)}")
        if not self.stages or any(stage not in STAGE_NAMES for stage in self.stages):
            raise ValueError(f"--stages {self.stages} must be a non-empty subset of {', '.join(STAGE_NAMES)}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if self.stack_epochs < 0:
            raise ValueError(f"--stack-epochs must be 0 or more, got {self.stack_epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.max_memory is not None and self.max_memory < 1:
            raise ValueError(f"--max-memory must be a positive number of bytes, got {self.max_memory}")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        check_seed(self.seed)

    @property
    def combination(self) -> str:
        """How the stages become one prediction: ``single``, ``concat`` or ``stack-<stacking>``."""
        if self.fusion == "concat":
            return "concat"
        return "single" if len(self.stages) == 1 else f"stack-{self.stacking}"

    @property
    def name(self) -> str:
        """A head name that encodes the hyperparameters.

        Examples: ``L0-L4_stack-weighted_weighted_lr0.001_drop0_e50`` (all five stages, learned
        stacking, weighted sampling), ``L4_shuffle_lr0.001_drop0.5_e50`` (one stage),
        ``L0+L2_concat_weighted_lr0.001_drop0_e50_bs64`` (a non-default batch size is appended).
        """
        parts = [_stage_label(self.stages)]
        if self.combination != "single":
            parts.append(self.combination)
        parts += [self.sampling, f"lr{self.lr:g}", f"drop{self.dropout:g}", f"e{self.epochs}"]
        defaults = {field.name: field.default for field in fields(self)}
        parts += [f"{tag}{getattr(self, key):g}" for key, tag in _NAME_EXTRAS.items()
                  if getattr(self, key) != defaults[key]]
        return "_".join(parts)

    def to_json(self) -> dict:
        """Return the config as JSON-ready values, with absolute paths so a run works from any folder."""
        values = asdict(self)
        values["stages"] = list(self.stages)
        return {key: str(Path(value).resolve()) if isinstance(value, Path) else value for key, value in values.items()}


def _stage_label(stages: tuple[str, ...]) -> str:
    """Return ``L1-L4`` for a run of consecutive stages, else the stages joined by ``+``."""
    positions = [STAGE_NAMES.index(stage) for stage in stages]
    consecutive = positions == list(range(positions[0], positions[0] + len(positions)))
    if len(stages) > 1 and consecutive:
        return f"{stages[0]}-{stages[-1]}"
    return "+".join(stages)

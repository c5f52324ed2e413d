"""Configuration of ``emo extract``."""

from dataclasses import asdict, dataclass
from pathlib import Path

from emo.data.split import check_seed
from emo.extract.precision import PRECISIONS
from emo.stages import validate_arch

DTYPES = ("float16", "float32")
# The smallest crop whose layer4 output (stride 32) is a whole 1x1 map.
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``emo extract`` needs; the CLI maps its options onto these fields."""

    data: Path
    out: Path
    labels: Path | None = None
    path_column: str = "path"
    label_column: str = "label"
    split_file: Path | None = None
    weights: str = "imagenet"
    arch: str = "resnet101"
    image_size: int = 224
    batch_size: int = 32
    workers: int | None = None
    threads: int | None = None
    device: str = "auto"
    dtype: str = "float16"
    precision: str = "auto"
    seed: int = 0
    skip_bad: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        # Messages name the CLI option of each field.
        validate_arch(self.arch)
        _check_choice("--dtype", self.dtype, DTYPES)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--image-size", self.image_size, minimum=MIN_IMAGE_SIZE)
        _check_positive("--batch-size", self.batch_size)
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")
        if self.threads is not None:
            _check_positive("--threads", self.threads)
        check_seed(self.seed)
        if Path(self.out).suffix not in (".h5", ".hdf5"):
            raise ValueError(f"output {str(self.out)!r} should end in .h5 or .hdf5")

    def to_json(self) -> dict:
        """Return the config as JSON-ready values, with absolute paths."""
        return {key: str(Path(value).resolve()) if isinstance(value, Path) else value
                for key, value in asdict(self).items()}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: int, *, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")

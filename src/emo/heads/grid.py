"""Configuration grids of ``emo ablate``: the default grid and TOML grid files.

A grid file lists configurations with the keys of the ``emo fit-heads`` options, written with
``-`` or ``_`` (``stack-epochs`` or ``stack_epochs``). An optional ``[defaults]`` table applies to
every configuration; a key set in a configuration wins::

    [defaults]
    epochs = 30

    [[configs]]
    stages = ["L4"]

    [[configs]]
    stages = "L3,L4"
    stacking = "mean"
    dropout = 0.5

Keys left out keep the defaults of ``emo fit-heads``. The seed is not a grid key: every
configuration runs once per seed of ``--seeds``.
"""

import dataclasses
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no tomllib; tomli is the same parser.
    import tomli as tomllib

from emo.errors import GridError
from emo.heads.config import FitHeadsConfig
from emo.stages import parse_stages

DEFAULT_GRID_NAME = "default"

# Each entry overrides the fit-heads defaults: all five stages, learned weighted stacking,
# weighted sampling, dropout 0. The sampling and dropout rows change one factor of that baseline.
DEFAULT_GRID: tuple[dict, ...] = (
    {"stages": "L0"},
    {"stages": "L1"},
    {"stages": "L2"},
    {"stages": "L3"},
    {"stages": "L4"},  # L4 alone is the cached form of ResNet-fc.
    {"stages": "L0,L1,L2,L3,L4", "stacking": "weighted"},
    {"stages": "L1,L2,L3,L4", "stacking": "weighted"},
    {"stages": "L3,L4", "stacking": "weighted"},
    {"stages": "L0,L1,L2,L3,L4", "stacking": "mean"},
    {"stages": "L0,L1,L2,L3,L4", "stacking": "logreg"},
    {"stages": "L0,L1,L2,L3,L4", "fusion": "concat"},  # The cached analogue of ResNet-skip.
    {"stages": "L0,L1,L2,L3,L4", "sampling": "shuffle"},
    {"stages": "L0,L1,L2,L3,L4", "dropout": 0.5},
)

# Grid key -> (FitHeadsConfig field, accepted Python types). bool is excluded from the numbers
# below explicitly, because TOML's true/false would otherwise pass as an int.
GRID_KEYS = {
    "stages": ("stages", (str, list)),
    "sampling": ("sampling", (str,)),
    "fusion": ("fusion", (str,)),
    "stacking": ("stacking", (str,)),
    "epochs": ("epochs", (int,)),
    "stack-epochs": ("stack_epochs", (int,)),
    "lr": ("lr", (int, float)),
    "batch-size": ("batch_size", (int,)),
    "dropout": ("dropout", (int, float)),
}
_NOT_GRID_KEYS = {"seed": "every configuration runs once per seed of --seeds",
                  "cache": "the cache is the argument of emo ablate",
                  "out": "each run's folder is chosen by emo ablate",
                  "overwrite": "use --overwrite of emo ablate"}


def load_grid(spec: str | Path) -> list[dict]:
    """Return the configurations of a grid as lists of fit-heads overrides, validated.

    Args:
        spec: ``"default"`` for :data:`DEFAULT_GRID`, or the path of a TOML grid file.

    Returns:
        One dict per configuration, mapping FitHeadsConfig field names to values.

    Raises:
        GridError: naming the file, the configuration and the key of the first invalid entry.

    Example:
        >>> len(load_grid("default"))
        13
    """
    if str(spec) == DEFAULT_GRID_NAME:
        return [_resolve_entry(entry, {}, where=f"default grid, configs[{i}]") for i, entry in enumerate(DEFAULT_GRID)]
    document = _read_toml(Path(spec))
    unknown = sorted(set(document) - {"defaults", "configs"})
    if unknown:
        raise GridError(f"grid {spec}: unknown top-level key {unknown[0]!r}; a grid file has an optional "
                        "[defaults] table and a list of [[configs]] tables")
    defaults = document.get("defaults", {})
    entries = document.get("configs")
    if not isinstance(defaults, dict):
        raise GridError(f"grid {spec}: 'defaults' must be a table ([defaults]), got {type(defaults).__name__}")
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise GridError(f"grid {spec}: list at least one configuration as a [[configs]] table")
    defaults = _resolve_entry(defaults, {}, where=f"grid {spec}, [defaults]")
    return [_resolve_entry(entry, defaults, where=f"grid {spec}, configs[{i}]") for i, entry in enumerate(entries)]


def grid_configs(entries: list[dict], *, cache: Path, seed: int, runs_dir: Path) -> list[FitHeadsConfig]:
    """Return one FitHeadsConfig per grid entry for ``seed``, writing to ``runs_dir/NAME/seed<seed>``.

    Raises:
        GridError: if two entries resolve to the same configuration.
    """
    configs, seen = [], {}
    for index, entry in enumerate(entries):
        config = FitHeadsConfig(cache=cache, out=Path(), seed=seed, overwrite=True, **entry)
        if config.name in seen:
            raise GridError(f"grid configs[{index}] repeats configs[{seen[config.name]}] ({config.name}); "
                            "remove one of them")
        seen[config.name] = index
        configs.append(dataclasses.replace(config, out=Path(runs_dir) / config.name / f"seed{seed}"))
    return configs


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as error:
        raise GridError(f"grid file {path} not found; pass --grid default or the path of a TOML file") from error
    except OSError as error:
        raise GridError(f"cannot read grid file {path}: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise GridError(f"grid file {path} is not valid TOML: {error}") from error


def _resolve_entry(entry: dict, defaults: dict, *, where: str) -> dict:
    """Check the keys and value types of one grid entry and return it as FitHeadsConfig fields."""
    resolved = dict(defaults)
    for key, value in entry.items():
        option = key.replace("_", "-")
        if option in _NOT_GRID_KEYS:
            raise GridError(f"{where}: key {key!r} cannot be set in a grid; {_NOT_GRID_KEYS[option]}")
        if option not in GRID_KEYS:
            raise GridError(f"{where}: unknown key {key!r}; valid keys are {', '.join(GRID_KEYS)}")
        field, types = GRID_KEYS[option]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(kind.__name__ for kind in types)
            raise GridError(f"{where}: key {key!r} must be {expected}, got {value!r}")
        resolved[field] = _parse_stages(value, where=where, key=key) if field == "stages" else value

    # FitHeadsConfig checks the values (ranges, choices); its message names the option, which is the key.
    try:
        FitHeadsConfig(cache=Path(), out=Path(), **resolved)
    except ValueError as error:
        raise GridError(f"{where}: {error}") from error
    return resolved


def _parse_stages(value: str | list, *, where: str, key: str) -> tuple[str, ...]:
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise GridError(f"{where}: key {key!r} must list stage names such as [\"L3\", \"L4\"], got {value!r}")
    try:
        return parse_stages(value if isinstance(value, str) else ",".join(value))
    except ValueError as error:
        raise GridError(f"{where}: key {key!r}: {error}") from error

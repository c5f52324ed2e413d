"""Run directories: the files every training command writes and every reader checks.

Layout:
    config.json             kind ("heads" or "finetune"), resolved config, backbone record
    classes.json            class names in index order
    model.pt                state dict of the trained model (loadable with weights_only=True)
    metrics.json            test metrics of every model in the run (see emo.evaluate.metrics)
    confusion_matrix.png    confusion matrix of the run's primary model on test
    history.jsonl           one JSON object per epoch
    INCOMPLETE              present while the run is being written; readers reject such runs
"""

import json
import os
from pathlib import Path

import torch

from emo.errors import RunError

INCOMPLETE_MARKER = "INCOMPLETE"


def write_json_atomically(path: Path, value) -> None:
    """Write ``value`` as indented JSON through a temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def save_state_dict_atomically(path: Path, state_dict: dict) -> None:
    """Save a state dict through a temporary file and a rename, so a crash never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state_dict, temporary)
    os.replace(temporary, path)


def check_run_destination(run_dir: Path, *, overwrite: bool = False) -> None:
    """Raise RunError unless a run can be written to ``run_dir``.

    ``run_dir`` must be new, empty, an interrupted run, or a finished run with ``overwrite``. A
    folder with other files (a dataset, say) is never written into. Cheap enough to call
    before training, so a wrong ``--out`` fails before any work is done.

    Example:
        >>> check_run_destination(Path("runs/heads"), overwrite=True)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if not existing.is_dir():
        raise RunError(f"cannot write run directory {run_dir}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK):
        raise RunError(f"cannot write run directory {run_dir}: {existing} is not writable; choose another --out")
    if run_dir.is_dir() and not _is_run_directory(run_dir) and any(run_dir.iterdir()):
        raise RunError(f"--out {run_dir} is a folder with other files and not an emo-vision run; choose an empty "
                       "or new folder for --out")
    if (run_dir / "metrics.json").exists() and not overwrite:
        raise RunError(f"run directory {run_dir} already contains a finished run; pass --overwrite or choose another --out")


def _is_run_directory(folder: Path) -> bool:
    """Return whether ``folder`` was written by an emo-vision run (finished or interrupted)."""
    return (folder / "config.json").is_file() or (folder / INCOMPLETE_MARKER).is_file()


# Files that emo evaluate writes for splits other than test. A new run in the same folder removes
# them, so they cannot be mistaken for its own.
SPLIT_METRIC_PATTERNS = ("metrics-*.json", "confusion_matrix-*.png")


def start_run(run_dir: Path, *, overwrite: bool = False) -> Path:
    """Create ``run_dir`` (or reuse it with ``overwrite``) and mark it incomplete.

    Files of a previous run stay until the new run replaces them, but the marker makes readers
    reject the directory from now until :func:`finish_run`. Its val and train metric files are
    removed, because the new run does not write them.
    """
    run_dir = Path(run_dir)
    check_run_destination(run_dir, overwrite=overwrite)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / INCOMPLETE_MARKER).write_text("this run has not finished writing\n")
        for pattern in SPLIT_METRIC_PATTERNS:
            for stale in run_dir.glob(pattern):
                stale.unlink()
    except OSError as error:
        raise RunError(f"cannot write run directory {run_dir}: {error}") from error
    return run_dir


def finish_run(run_dir: Path) -> None:
    """Remove the incomplete marker once every file of the run is in place."""
    (Path(run_dir) / INCOMPLETE_MARKER).unlink(missing_ok=True)


def read_run_config(run_dir: Path) -> dict:
    """Return the config.json of a finished run, or raise RunError naming what is wrong."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise RunError(f"{run_dir} is a file, not a run directory; pass the folder that fit-heads wrote with --out"
                       + (" (give a feature cache with --cache)" if run_dir.suffix in (".h5", ".hdf5") else ""))
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} not found")
    if (run_dir / INCOMPLETE_MARKER).exists():
        raise RunError(f"run {run_dir} is incomplete (it was interrupted or is still running); rerun it")
    for name in ("config.json", "classes.json", "model.pt"):
        if not (run_dir / name).is_file():
            raise RunError(f"run {run_dir} has no {name}; it is not an emo-vision run directory")
    config = _read_json(run_dir / "config.json")
    problem = _config_problem(config)
    if problem:
        raise RunError(f"{run_dir / 'config.json'} is not a run configuration: {problem}")
    config["classes"] = read_classes(run_dir)
    return config


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is not a readable JSON file: {error}") from error


def _config_problem(config) -> str | None:
    """Return what is missing from a run's config.json, or None when the keys every run has are present."""
    if not isinstance(config, dict):
        return "it is not a JSON object"
    for key, kind in (("kind", str), ("config", dict), ("backbone", dict)):
        if not isinstance(config.get(key), kind):
            return f"key {key!r} is missing or not a {kind.__name__}"
    backbone = config["backbone"]
    if not isinstance(backbone.get("weights"), dict) or not isinstance(backbone.get("image_size"), int):
        return "the backbone record lacks 'weights' or 'image_size'"
    return None


def read_classes(run_dir: Path) -> list[str]:
    """Return the class names of a run in index order."""
    classes = _read_json(Path(run_dir) / "classes.json")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise RunError(f"{run_dir}/classes.json is not a list of class names")
    return classes


def load_state_dict(path: Path) -> dict:
    """Load a state dict saved by a run, refusing anything but tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code payloads, RuntimeError/EOFError for damage.
        raise RunError(f"cannot load {path} safely as a state dict: {error}") from error


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON object as a line to ``path``."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")

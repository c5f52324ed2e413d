"""``emo evaluate``: recompute a run's metrics on a split and rewrite its metric files."""

from pathlib import Path

import torch

from emo import runs
from emo.backbone import resolve_device
from emo.cache.reader import FeatureCache
from emo.errors import CacheError, RunError
from emo.evaluate.files import write_metrics
from emo.heads.outputs import load_head_model
from emo.heads.train import evaluate_heads, load_split


def evaluate_run(run_dir: Path, *, cache: Path | None = None, split: str = "test", device: str = "auto") -> dict:
    """Recompute the metrics of every model in a run on one split and write them into the run.

    Test metrics go to ``metrics.json`` and ``confusion_matrix.png``; other splits get a suffix
    (``metrics-val.json``), so re-evaluating on val never replaces the test numbers.

    Args:
        run_dir: a finished run directory.
        cache: for head runs, a feature cache to use instead of the one the run was trained on;
            its classes must match the run's.
        split: ``test``, ``val`` or ``train``.
        device: where fine-tuned models run (``auto``, ``cpu``, ``cuda``).

    Returns:
        The metrics, in the layout of ``metrics.json``.

    Raises:
        RunError: if the run is unreadable or its metric files cannot be written (read-only folder).
        CacheError: if the cache is missing or does not match the run.

    Example:
        >>> evaluate_run(Path("runs/heads"), split="val")["models"]["stacked"]["accuracy"]  # doctest: +SKIP
        0.61
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r} is not one of train, val, test")
    resolve_device(device)  # Head runs compute on the CPU, but a wrong --device is reported for them too.
    settings = runs.read_run_config(run_dir)
    evaluators = {"heads": _evaluate_head_run, "finetune": _evaluate_finetune_run}
    if settings.get("kind") not in evaluators:
        raise RunError(f"run {run_dir} has unknown kind {settings.get('kind')!r}")
    metrics = evaluators[settings["kind"]](Path(run_dir), settings, cache=cache, split=split, device=device)
    try:
        write_metrics(Path(run_dir), metrics, split=split, title=settings.get("name", Path(run_dir).name))
    except OSError as error:
        raise RunError(f"cannot write the {split} metrics into run {run_dir}: {error.strerror or error} "
                       f"({error.filename}). Make the folder writable, or copy the run to a writable folder and "
                       "evaluate the copy") from error
    return {"split": split, **metrics}


def _evaluate_head_run(run_dir: Path, settings: dict, *, cache: Path | None, split: str, device: str) -> dict:
    cache_path = Path(cache) if cache is not None else Path(settings["config"]["cache"])
    if cache is None and not cache_path.exists():
        raise CacheError(f"the run's cache {cache_path} (recorded in {run_dir / 'config.json'}) not found; "
                         "pass --cache with that cache or a copy of it")
    model = load_head_model(run_dir, settings)
    with FeatureCache(cache_path) as features:
        features.require_classes(settings["classes"])
        check_cache_matches_run(features, settings, run_dir)
        data = load_split(features, split, tuple(settings["channels"]))
    if len(data.labels) == 0:
        raise RunError(f"cache {cache_path} has no rows in the {split} split")
    with torch.no_grad():
        return evaluate_heads(model, data, settings["classes"])


def check_cache_matches_run(features: FeatureCache, settings: dict, run_dir: Path) -> None:
    """Raise CacheError unless ``features`` contains the features a head run was trained and split on.

    The backbone (arch, weights, image size) decides what the features mean, and the split
    assignment decides which images are test images. A re-extraction with the same options
    passes, whatever its file name, storage type or row order.

    Example:
        >>> with FeatureCache("e6.h5") as features:  # doctest: +SKIP
        ...     check_cache_matches_run(features, runs.read_run_config("runs/heads"), Path("runs/heads"))
    """
    recorded, actual = settings["backbone"], features.backbone_record()
    differences = []
    if actual["arch"] != recorded.get("arch"):
        differences.append(f"arch {actual['arch']} instead of {recorded.get('arch')}")
    if actual["image_size"] != recorded["image_size"]:
        differences.append(f"image size {actual['image_size']} instead of {recorded['image_size']}")
    ours, theirs = actual["weights"].get("sha256", ""), recorded["weights"].get("sha256", "")
    if ours != theirs:
        differences.append(f"weights {actual['weights'].get('source')} (sha256 {ours[:12]}) instead of "
                           f"{recorded['weights'].get('source')} (sha256 {theirs[:12]})")
    # NOTE: runs written before the cache record existed have no split digest, so their split is not compared.
    digest = settings.get("cache", {}).get("split_sha256")
    if digest is not None and digest != features.split_sha256():
        differences.append("split assignment (other images, or other images in train, val and test)")
    if differences:
        raise CacheError(f"cache {features.path} does not match run {run_dir}; it differs in " + "; ".join(differences)
                         + ". Evaluate with the cache the run was trained on, or train a new run on this cache "
                         "with `emo fit-heads`")


def _evaluate_finetune_run(run_dir: Path, settings: dict, *, cache: Path | None, split: str, device: str) -> dict:
    from emo.finetune.evaluate import evaluate_finetune_run

    return evaluate_finetune_run(run_dir, settings, split=split, device=device)

"""``emo ablate``: run a grid of head configurations on one feature cache, each for several seeds.

Every (configuration, seed) pair is an ordinary ``emo fit-heads`` run written under
``OUT/runs/NAME/seed<N>``. Its test and val numbers are appended as one JSON line to
``OUT/results.jsonl`` as soon as it finishes, so rerunning the same command after an
interruption runs only what is missing. The summary table goes to ``OUT/ablation.md`` and
``OUT/ablation.csv``.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from emo import runs
from emo.cache.reader import FeatureCache
from emo.errors import CacheError, RunError
from emo.heads.ablate_table import summarize, write_tables
from emo.heads.config import FitHeadsConfig
from emo.heads.grid import grid_configs, load_grid
from emo.heads.train import fit_heads
from emo.parallel import available_cores, map_unordered

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
# Config fields that do not change what a run computes, left out when matching earlier results.
_LOCATION_FIELDS = ("out", "overwrite")


@dataclass(frozen=True)
class AblateConfig:
    """Everything ``emo ablate`` needs; the CLI maps its options onto these fields."""

    cache: Path
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    grid: str = "default"
    workers: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, e.g. 0,1,2")
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"seeds must be 0 or more, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {list(self.seeds)} repeat a seed; each seed gives one run per configuration")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per available core) or more, got {self.workers}")

    def to_json(self) -> dict:
        """Return the config as JSON-ready values."""
        values = asdict(self)
        values["seeds"] = list(self.seeds)
        return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def ablate(config: AblateConfig) -> list[dict]:
    """Run every configuration of a grid for every seed, then write and return the summary table.

    Args:
        config: the resolved options of ``emo ablate``.

    Returns:
        One row per configuration in grid order (see :func:`emo.heads.ablate_table.summarize`).

    Raises:
        GridError: if the grid is invalid.
        CacheError: if the cache is missing or lacks a stage the grid uses.
        RunError: if ``out`` contains results of another cache and ``overwrite`` is not set.

    Example:
        >>> rows = ablate(AblateConfig(cache=Path("e6.h5"), out=Path("ablation"), seeds=(0, 1)))  # doctest: +SKIP
        >>> rows[0]["name"], round(rows[0]["test_accuracy_mean"], 3)  # doctest: +SKIP
        ('L0_weighted_lr0.001_drop0_e50', 0.312)
    """
    entries = load_grid(config.grid)
    cache = Path(config.cache).resolve()
    out = Path(config.out)
    # Seed-major lists, reordered configuration-major so the seeds of one configuration finish together.
    per_seed = [grid_configs(entries, cache=cache, seed=seed, runs_dir=out / "runs") for seed in config.seeds]
    configs = [seed_configs[i] for i in range(len(entries)) for seed_configs in per_seed]
    fingerprint = _check_cache(cache, per_seed[0])
    _prepare_out(out, config, entries, fingerprint=fingerprint)

    records = _read_results(out / RESULTS_FILE, configs)
    pending = [c for c in configs if (c.name, c.seed) not in records]
    logger.info("ablation: %d configurations x %d seeds, %d runs already in %s, %d to run",
                len(entries), len(config.seeds), len(configs) - len(pending), out / RESULTS_FILE, len(pending))

    for record in _run_pending(pending, configs, workers=config.workers):
        runs.append_jsonl(out / RESULTS_FILE, record)
        records[record["name"], record["seed"]] = record

    rows = summarize([c.name for c in per_seed[0]], config.seeds, records)
    write_tables(out, rows)
    return rows


def run_one(config: FitHeadsConfig) -> dict:
    """Fit one configuration and return its record for ``results.jsonl`` (runs in a worker process)."""
    metrics = fit_heads(config)
    primary = metrics["primary"]
    test = metrics["models"][primary]
    return {"name": config.name, "seed": config.seed, "config": _comparable(config), "primary": primary,
            "test": {"accuracy": test["accuracy"], "macro_recall": test["macro_recall"]},
            "val": metrics["val"][primary], "seconds": metrics["seconds"], "run_dir": str(config.out)}


def _run_pending(pending: list[FitHeadsConfig], configs: list[FitHeadsConfig], *, workers: int):
    """Yield the record of each pending run as it finishes, with a bar of configurations done."""
    if not pending:
        return
    remaining = {}  # configuration name -> seeds still to run
    for config in pending:
        remaining[config.name] = remaining.get(config.name, 0) + 1
    names = {config.name for config in configs}
    workers = min(workers or available_cores(), len(pending))
    logger.info("running %d fit-heads runs in %d worker processes", len(pending), workers)

    with tqdm(total=len(names), initial=len(names) - len(remaining), desc="ablate", unit="config") as bar:
        for _, record in map_unordered(run_one, pending, workers=workers):
            remaining[record["name"]] -= 1
            if remaining[record["name"]] == 0:
                bar.update(1)
            yield record


def _check_cache(cache: Path, configs: list[FitHeadsConfig]) -> str:
    """Check that the cache has every stage the grid uses and return its fingerprint."""
    with FeatureCache(cache) as features:
        for config in configs:
            missing = [stage for stage in config.stages if stage not in features.stages]
            if missing:
                raise CacheError(f"cache {cache} has no stage {missing[0]}, which the grid uses; "
                                 f"it has {', '.join(features.stages)}")
        return str(features.attrs["fingerprint"])


def _prepare_out(out: Path, config: AblateConfig, entries: list[dict], *, fingerprint: str) -> None:
    """Create ``out``, or check that its earlier results come from the same cache."""
    settings_path = out / "config.json"
    if settings_path.is_file():
        earlier = _read_settings(settings_path)
        if config.overwrite:
            (out / RESULTS_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / "runs", ignore_errors=True)
        elif earlier.get("cache_fingerprint") != fingerprint:
            raise RunError(f"{out} contains results of another cache ({earlier['config'].get('cache')}); "
                           "choose another --out or pass --overwrite to discard them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create ablation folder {out}: {error}") from error
    settings = {"kind": "ablation", "config": config.to_json(), "cache_fingerprint": fingerprint,
                "grid": [{key: list(value) if key == "stages" else value for key, value in entry.items()}
                         for entry in entries]}
    runs.write_json_atomically(settings_path, settings)


def _read_settings(path: Path) -> dict:
    """Return the config.json of an earlier ablation in the same folder, or raise RunError."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunError(f"{path} is not valid JSON: {error}; choose another --out") from error
    if not isinstance(settings, dict) or settings.get("kind") != "ablation":
        raise RunError(f"{path.parent} contains a config.json that emo ablate did not write; choose another --out")
    return settings


def _read_results(path: Path, configs: list[FitHeadsConfig]) -> dict[tuple[str, int], dict]:
    """Return the earlier records of ``configs`` from ``results.jsonl``, keyed by (name, seed).

    A record counts only if its config matches exactly; a line cut off by an interruption is skipped.
    """
    expected = {(c.name, c.seed): _comparable(c) for c in configs}
    records = {}
    if not path.is_file():
        return records
    text = path.read_text(encoding="utf-8")
    kept = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
            key = (record["name"], record["seed"])
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("dropping unreadable line %d of %s", number, path)
            continue
        kept.append(line)
        if expected.get(key) == record.get("config"):
            records[key] = record

    # A line cut off by an interruption would swallow the next appended record; rewrite without it.
    repaired = "".join(line + "\n" for line in kept)
    if repaired != text:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(repaired, encoding="utf-8")
        temporary.replace(path)
    return records


def _comparable(config: FitHeadsConfig) -> dict:
    return {key: value for key, value in config.to_json().items() if key not in _LOCATION_FIELDS}

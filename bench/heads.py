"""Benchmark of ``emo fit-heads`` on a synthetic cache of FI's size, against scikit-learn.

Writes a synthetic feature cache (23,185 rows, 8 classes, the five ResNet-101 stage widths,
float16, class-dependent means so that accuracy is meaningful) and measures, each in a fresh
process:

1. ``emo fit-heads`` with all five branches and the stacking (wall time of the whole call);
2. ``emo fit-heads`` with the L4 branch alone, and scikit-learn's ``LogisticRegression()``
   (its defaults) on the L4 columns alone: test accuracy and time from the cache file to a
   trained model;
3. ``emo fit-heads`` on the same cache with a ``--max-memory`` budget smaller than its training
   features, which streams them from disk, against the same run held in memory: peak resident
   memory, time and whether the test metrics are identical.

The last lines of the output are a Markdown block for docs/benchmarks.md.

Usage:
    python bench/heads.py [--rows 23185] [--epochs 50] [--separation 0.25] [--max-memory 64MB]
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info

from emo.cache import FeatureCache
from emo.cache.synthetic import write_synthetic_cache
from emo.data.split import MIN_PER_CLASS
from emo.errors import DataError
from emo.heads import FitHeadsConfig, fit_heads
from emo.stages import validate_arch
from emo.units import parse_bytes

from machine import (Timer, current_rss_mb, machine_lines, machine_record, markdown_table, peak_rss_mb,
                     print_results, run_child, work_folder)

CLASSES = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
BATCH_SIZE = 32  # fit-heads' default, which every run here uses


def fit_child(task: dict) -> dict:
    """Run ``fit_heads`` in this process; return wall and CPU seconds, peak memory and test accuracies."""
    config = FitHeadsConfig(cache=Path(task["cache"]), out=Path(task["out"]), stages=tuple(task["stages"]),
                            epochs=task["epochs"], stack_epochs=task["stack_epochs"], max_memory=task["max_memory"],
                            overwrite=True)
    before = current_rss_mb()
    with Timer() as timer:
        metrics = fit_heads(config)
    return {"wall": timer.wall, "cpu": timer.cpu, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
            "threads": config.threads, "accuracy": {name: m["accuracy"] for name, m in metrics["models"].items()},
            "models": metrics["models"]}


def sklearn_child(task: dict) -> dict:
    """Fit ``LogisticRegression()`` on one stage's train rows, read from the cache; score the test rows."""
    with Timer() as timer:
        with FeatureCache(task["cache"]) as cache:
            train_x, train_y = cache.features(task["stage"], "train"), cache.labels("train")
            test_x, test_y = cache.features(task["stage"], "test"), cache.labels("test")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            with Timer() as fit_timer:
                model = LogisticRegression().fit(train_x, train_y)
    accuracy = float((model.predict(test_x) == test_y).mean())
    threads = max((pool["num_threads"] for pool in threadpool_info()), default=1)
    return {"wall": timer.wall, "cpu": timer.cpu, "fit_wall": fit_timer.wall, "accuracy": accuracy,
            "iterations": int(model.n_iter_.max()), "threads": threads,
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)}


def child(task: dict) -> None:
    """Run one measurement in this fresh process and print its result as JSON."""
    result = sklearn_child(task) if task["kind"] == "sklearn" else fit_child(task)
    print(json.dumps(result))


def fit_task(cache: Path, out: Path, args, *, stages: list[str], epochs: int, max_memory: int | None = None) -> dict:
    return {"kind": "fit", "cache": str(cache), "out": str(out), "stages": stages, "epochs": epochs,
            "stack_epochs": args.stack_epochs, "max_memory": max_memory}


def training_memory(result: dict) -> float:
    """Return how many MB a fit-heads child's peak memory rose above its memory before training."""
    # Without /proc the memory before training is unknown, and the whole peak counts.
    return result["peak_rss_mb"] - (result["rss_before_mb"] or 0.0)


def memory_note(result: dict) -> str:
    """Return the peak memory of a fit-heads child, and its growth over the imports, as table text."""
    note = f"peak RSS {result['peak_rss_mb']:.0f} MB"
    if result["rss_before_mb"] is not None:
        note += f", {training_memory(result):.0f} MB above the process before training"
    return note


def report(args, record: dict, results: dict) -> list[str]:
    """Return the Markdown block of a benchmark run."""
    command = "python bench/heads.py " + " ".join(sys.argv[1:])
    full, l4, sk = results["full"], results["l4"], results["sklearn"]
    streamed, in_memory = results["streamed"], results["in_memory"]
    lines = [f"### `emo fit-heads`: synthetic cache of {args.rows} rows, {len(CLASSES)} classes, {args.arch} widths, "
             f"float16, separation {args.separation}", "", f"Command: `{command}`", ""]
    lines += machine_lines(record)
    lines += [f"- fit-heads: {full['threads']} torch thread(s), batch {BATCH_SIZE}, {args.epochs} branch epochs and "
              f"{args.stack_epochs} stacking epochs; scikit-learn {sk['threads']} BLAS thread(s). Times are from "
              "the cache file to a trained model in a fresh process; fit-heads also writes its run directory.", ""]
    lines += markdown_table(["ratio", "value"], [
        ["fit-heads L4 time / LogisticRegression L4 time", f"{l4['wall'] / sk['wall']:.3f}"],
        ["fit-heads L4 accuracy - LogisticRegression accuracy (points)",
         f"{100 * (l4['accuracy']['L4'] - sk['accuracy']):+.2f}"],
        [f"training memory streamed / in memory ({args.stream_epochs} epochs)",
         f"{training_memory(streamed) / training_memory(in_memory):.3f}"],
    ]) + [""]

    lines += markdown_table(["measurement", "wall s", "CPU s", "test accuracy", "notes"], [
        ["fit-heads, 5 branches + stacking", f"{full['wall']:.1f}", f"{full['cpu']:.1f}",
         f"{full['accuracy']['stacked']:.4f} stacked",
         ", ".join(f"{k} {v:.4f}" for k, v in full["accuracy"].items() if k != "stacked")],
        ["fit-heads, L4 only", f"{l4['wall']:.1f}", f"{l4['cpu']:.1f}", f"{l4['accuracy']['L4']:.4f}", ""],
        ["LogisticRegression(), L4", f"{sk['wall']:.1f}", f"{sk['cpu']:.1f}", f"{sk['accuracy']:.4f}",
         f"fit alone {sk['fit_wall']:.1f} s, {sk['iterations']} lbfgs iterations"
         + ("" if sk["converged"] else ", did not converge")],
        [f"fit-heads in memory, {args.stream_epochs} epochs", f"{in_memory['wall']:.1f}", f"{in_memory['cpu']:.1f}",
         f"{in_memory['accuracy']['stacked']:.4f} stacked",
         memory_note(in_memory)],
        [f"fit-heads --max-memory {args.max_memory}, {args.stream_epochs} epochs", f"{streamed['wall']:.1f}",
         f"{streamed['cpu']:.1f}", f"{streamed['accuracy']['stacked']:.4f} stacked",
         memory_note(streamed)],
    ]) + [""]

    same = "identical to" if streamed["models"] == in_memory["models"] else "DIFFERENT from"
    lines += [f"Training features: {results['train_mb']:.0f} MB as float32 (cache file {results['cache_mb']:.0f} MB); "
              f"the streamed run's test metrics are {same} the in-memory run's.", ""]
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=23185, help="rows of the synthetic cache (FI has 23,185)")
    parser.add_argument("--arch", default="resnet101", help="decides the stage widths")
    parser.add_argument("--separation", type=float, default=0.25,
                        help="class separation of the synthetic features; 0.25 keeps L4 near 0.75 accuracy")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--stack-epochs", type=int, default=10)
    parser.add_argument("--max-memory", default="64MB", help="budget of the streaming run")
    parser.add_argument("--stream-epochs", type=int, default=5, help="epochs of the streaming comparison")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the cache and runs here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_options(parser, args)
    return args


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` on an invalid option, before anything is measured.

    Also adds ``args.max_memory_bytes``, the parsed ``--max-memory``.
    """
    if args.epochs < 1 or args.stream_epochs < 1:
        parser.error(f"--epochs and --stream-epochs must be at least 1, got {args.epochs} and {args.stream_epochs}")
    if args.stack_epochs < 0:
        parser.error(f"--stack-epochs must be 0 or more, got {args.stack_epochs}")
    # The stratified 80/5/15 split needs MIN_PER_CLASS rows per class. Labels are drawn at random,
    # so a --rows above this bound can still fail, which main() reports.
    if args.rows < MIN_PER_CLASS * len(CLASSES):
        parser.error(f"--rows must be at least {MIN_PER_CLASS * len(CLASSES)}, {MIN_PER_CLASS} per class for the "
                     f"stratified split; got {args.rows}")
    if not args.separation > 0:
        parser.error(f"--separation must be above 0, got {args.separation}")
    try:
        validate_arch(args.arch)
    except ValueError as error:
        parser.error(f"--arch: {error}")
    try:
        args.max_memory_bytes = parse_bytes(args.max_memory)
    except ValueError as error:
        parser.error(f"--max-memory: {error}")


def check_streaming_budget(max_memory: str, budget: int, train_rows: int, row_bytes: int) -> None:
    """Exit with an error unless ``budget`` makes fit-heads stream the training rows in windows of a batch or more."""
    needed = train_rows * row_bytes
    if budget >= needed:
        sys.exit(f"heads.py: error: --max-memory {max_memory} is not below the {needed} bytes of training features, "
                 f"so nothing would be streamed; pass less, e.g. {needed // 2} (bytes)")
    if budget < BATCH_SIZE * row_bytes:
        sys.exit(f"heads.py: error: --max-memory {max_memory} is less than one batch of {BATCH_SIZE} training rows; "
                 f"pass at least {BATCH_SIZE * row_bytes} (bytes)")


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    record = machine_record()
    with work_folder(args.workdir, prefix="emo-bench-heads-") as work:
        try:
            cache = write_synthetic_cache(work / "fi-like.h5", rows=args.rows, classes=CLASSES, arch=args.arch,
                                          dtype="float16", separation=args.separation, seed=0)
        except DataError as error:  # a class got fewer than MIN_PER_CLASS rows
            sys.exit(f"heads.py: error: --rows {args.rows} is too few: {error.args[0].split(';')[0]}; pass more, "
                     "e.g. --rows 400")
        with FeatureCache(cache) as opened:
            train_rows, row_bytes = len(opened.indices("train")), sum(opened.stages.values()) * 4
        check_streaming_budget(args.max_memory, args.max_memory_bytes, train_rows, row_bytes)
        train_mb = train_rows * row_bytes / 1e6
        stages = ["L0", "L1", "L2", "L3", "L4"]
        results = {"train_mb": train_mb, "cache_mb": cache.stat().st_size / 1e6}
        results["full"] = run_child(__file__, fit_task(cache, work / "full", args, stages=stages, epochs=args.epochs))
        results["l4"] = run_child(__file__, fit_task(cache, work / "l4", args, stages=["L4"], epochs=args.epochs))
        results["sklearn"] = run_child(__file__, {"kind": "sklearn", "cache": str(cache), "stage": "L4"})
        if args.stream_epochs == args.epochs:
            results["in_memory"] = results["full"]
        else:
            results["in_memory"] = run_child(__file__, fit_task(cache, work / "mem", args, stages=stages,
                                                                epochs=args.stream_epochs))
        results["streamed"] = run_child(__file__, fit_task(cache, work / "stream", args, stages=stages,
                                                           epochs=args.stream_epochs,
                                                           max_memory=args.max_memory_bytes))
        print_results(results, report(args, record, results))


if __name__ == "__main__":
    main()

"""The ``emo`` command line. Each command parses options into a config object and calls the package."""

import json
import logging
import sys
from pathlib import Path

import click

from emo.errors import EmoError
from emo.stages import STAGE_NAMES, parse_stages
from emo.units import parse_bytes

logger = logging.getLogger("emo")


def _configure_logging(verbose: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Only emo's own loggers go to DEBUG; h5py, matplotlib and PIL debug lines would drown them.
    logger.setLevel(logging.DEBUG if verbose > 0 else logging.NOTSET)


def _stages_option(ctx, param, value: str) -> tuple[str, ...]:
    try:
        return parse_stages(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


def _seeds_option(ctx, param, value: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError as error:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers such as 0,1,2") from error
    if not seeds:
        raise click.BadParameter(f"{value!r} lists no seed; give one or more, such as 0,1,2")
    return seeds


def _bytes_option(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


def _run(function, *args, **kwargs):
    """Call ``function``, turning user-facing errors into a clean message and exit status 1."""
    try:
        return function(*args, **kwargs)
    except (EmoError, ValueError) as error:
        raise click.ClickException(str(error)) from error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log emo-vision's debug messages.")
@click.version_option(package_name="emo-vision")
def main(verbose: int) -> None:
    """Visual emotion recognition with ResNet stage features (Najid & Chahyati, EECSI 2018)."""
    _configure_logging(verbose)


weights_option = click.option(
    "--weights", default="imagenet", show_default=True,
    help="Backbone weights: 'imagenet' (torchvision's cache), 'random' (smoke runs) or a state dict path.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when available), cpu, cuda or cuda:N.")


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Cache file to write (.h5); the split is written next to it as NAME.split.csv.")
@click.option("--labels", type=click.Path(path_type=Path),
              help="With a folder DATA: CSV of images and labels that replaces the folder labels. Its paths are "
                   "relative to DATA; images it does not list are left out (with a warning).")
@click.option("--path-column", default="path", show_default=True,
              help="CSV column with image paths, relative to the manifest's folder (or to DATA with --labels).")
@click.option("--label-column", default="label", show_default=True, help="CSV column with labels.")
@click.option("--split-file", type=click.Path(path_type=Path),
              help="Split CSV (path, split; optional label, sha256) to use instead of a new 80/5/15 split; "
                   "every class needs images in train, val and test.")
@weights_option
@click.option("--arch", default="resnet101", show_default=True, help="torchvision ResNet: resnet18/34/50/101/152.")
@click.option("--image-size", default=224, show_default=True,
              help="Centre-crop size in pixels, at least 32; the shorter side is first resized to 256/224 of it.")
@click.option("--batch-size", default=32, show_default=True, help="Images per forward pass, at least 1.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes for decoding, 0 = decode in the main process  [default: one per "
                   "8 cores on the CPU, every core but one with CUDA]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of the forward pass  [default: torch's default, one per core]")
@device_option
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the cached features.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Arithmetic of the forward pass; auto picks bf16 where the hardware computes it natively "
                   "(CUDA compute capability 8.0+, CPUs with AVX512-BF16 or AMX), else fp32.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the split and of random weights, 0 to 4294967295.")
@click.option("--skip-bad", is_flag=True, help="Leave out unusable files instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache once the new one is complete.")
def extract(**options) -> None:
    """Cache the pooled outputs of the five ResNet stages of every image in DATA."""
    from emo.extract import ExtractConfig, extract as run_extract

    config = _run(ExtractConfig, **options)
    summary = _run(run_extract, config)
    click.echo(f"{summary.images} images -> {summary.cache} ({summary.bytes / 1e6:.1f} MB), "
               f"{summary.images_per_second:.1f} images/s; split: {summary.split_csv}")


@main.command("fit-heads")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory to write: a new or empty folder, or an earlier run with --overwrite.")
@click.option("--stages", default=",".join(STAGE_NAMES), show_default=True, callback=_stages_option,
              help="Comma-separated stages to train branches on.")
@click.option("--sampling", type=click.Choice(["weighted", "shuffle"]), default="weighted", show_default=True,
              help="weighted: draws inversely proportional to class size; shuffle: plain random order.")
@click.option("--fusion", type=click.Choice(["branches", "concat"]), default="branches", show_default=True,
              help="branches: one linear head per stage, then stacking; concat: one linear head on the "
                   "concatenated features of all stages.")
@click.option("--stacking", type=click.Choice(["weighted", "mean", "logreg"]), default="weighted",
              show_default=True,
              help="How branch probabilities combine: learned weighted average, plain mean, or a "
                   "logistic-regression meta-learner fit on the val split.")
@click.option("--epochs", default=50, show_default=True, help="Epochs of branch training, at least 1.")
@click.option("--stack-epochs", default=10, show_default=True,
              help="Epochs of weighted stacking, 0 or more (0 = plain mean).")
@click.option("--lr", default=1e-3, show_default=True, help="SGD learning rate, above 0.")
@click.option("--batch-size", default=32, show_default=True, help="Mini-batch size in rows, at least 1.")
@click.option("--dropout", default=0.0, show_default=True,
              help="Dropout probability before each head, in [0, 1).")
@click.option("--seed", default=0, show_default=True,
              help="Seed of initialisation and sampling, 0 to 4294967295.")
@click.option("--max-memory", callback=_bytes_option, default=None,
              help="Memory budget for the training features, e.g. 2GB or 512MiB; above it they are read "
                   "from the cache in windows instead of loaded whole  [default: no limit]")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads for training; mini-batches of linear heads gain nothing from more.")
@click.option("--overwrite", is_flag=True, help="Replace a finished run in --out, with its metric files.")
def fit_heads(**options) -> None:
    """Train branch heads and their weighted stacking on a feature CACHE."""
    from emo.evaluate.metrics import format_table
    from emo.heads import FitHeadsConfig, fit_heads as run_fit_heads

    config = _run(FitHeadsConfig, **options)
    metrics = _run(run_fit_heads, config)
    click.echo(format_table(metrics["models"]))
    click.echo(f"run written to {config.out} in {metrics['seconds']:.1f} s")


@main.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Ablation folder: results.jsonl, ablation.md, ablation.csv and one run folder per run.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_seeds_option,
              help="Comma-separated seeds; every configuration runs once per seed.")
@click.option("--grid", default="default", show_default=True,
              help="'default' for the built-in grid, or a TOML file listing [[configs]] with fit-heads option keys.")
@click.option("--workers", default=0, show_default=True,
              help="Parallel worker processes (0 = one per available CPU core).")
@click.option("--overwrite", is_flag=True, help="Discard earlier results in --out instead of resuming.")
def ablate(**options) -> None:
    """Train a grid of head configurations on a feature CACHE for several seeds and tabulate them.

    Rerunning the same command resumes: runs already in --out/results.jsonl are not repeated.
    """
    from emo.heads.ablate import AblateConfig, ablate as run_ablate
    from emo.heads.ablate_table import MARKDOWN_FILE, format_markdown

    config = _run(AblateConfig, **options)
    rows = _run(run_ablate, config)
    click.echo(format_markdown(rows))
    click.echo(f"tables written to {config.out / MARKDOWN_FILE} and .csv")


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--variant", required=True,
              type=click.Choice(["fc", "l4", "full", "l4-dropout", "skip", "ensemble"]),
              help="fc: new classifier only; l4: layer4 and classifier; full: every layer; l4-dropout: l4 with "
                   "Dropout2d in layer4's blocks; skip: L0-L2 projected and averaged with L3 before layer4; "
                   "ensemble: a branch per stage and their weighted average, trained in two steps.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--labels", type=click.Path(path_type=Path), help="CSV whose label column overrides folder labels.")
@click.option("--path-column", default="path", show_default=True, help="CSV column with image paths.")
@click.option("--label-column", default="label", show_default=True, help="CSV column with labels.")
@click.option("--split-file", type=click.Path(path_type=Path), help="Use this split CSV instead of a new split.")
@click.option("--arch", default="resnet101", show_default=True, help="torchvision ResNet: resnet18/34/50/101/152.")
@weights_option
@click.option("--epochs", default=50, show_default=True,
              help="Epochs of training (of step 1 for the ensemble variant).")
@click.option("--stack-epochs", default=10, show_default=True,
              help="Epochs of step 2 of the ensemble variant (branches and combining weights only).")
@click.option("--batch-size", default=32, show_default=True, help="Images per mini-batch (at least 2).")
@click.option("--lr-backbone", default=1e-4, show_default=True, help="SGD learning rate of the pretrained layers.")
@click.option("--lr-new", default=1e-3, show_default=True, help="SGD learning rate of the new layers.")
@click.option("--dropout", default=0.5, show_default=True, help="Dropout2d probability of the l4-dropout variant.")
@click.option("--sampling", type=click.Choice(["weighted", "shuffle"]), default="weighted", show_default=True,
              help="weighted: draws inversely proportional to class size; shuffle: plain random order.")
@click.option("--image-size", default=224, show_default=True, help="Crop size in pixels.")
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes for decoding.")
@device_option
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Arithmetic on CUDA: bf16 autocast or float32. The CPU always uses float32.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Channels-last memory format of the model and images (faster on CUDA and on the CPU).")
@click.option("--seed", default=0, show_default=True, help="Seed of the split, initialisation and sampling.")
@click.option("--skip-bad", is_flag=True, help="Leave out unusable files instead of stopping.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a finished or interrupted run in --out.")
def finetune(**options) -> None:
    """Fine-tune a ResNet variant end to end on the images in DATA.

    Under `torchrun --nproc_per_node=N -m emo.cli finetune ...` the N processes share each
    mini-batch (DDP); only the first one logs and writes the run.
    """
    from emo.evaluate.metrics import format_table
    from emo.finetune import FinetuneConfig, finetune as run_finetune
    from emo.finetune.distributed import silence_other_ranks

    silence_other_ranks()
    config = _run(FinetuneConfig, **options)
    metrics = _run(run_finetune, config)
    if not metrics:  # a rank other than 0 of a torchrun job
        return
    click.echo(format_table(metrics["models"]))
    trainable = ", ".join(f"{step} {count:,}" for step, count in metrics["trainable_parameters"].items())
    click.echo(f"trainable parameters: {trainable}; {metrics['minutes_per_epoch']:.2f} min per epoch")
    click.echo(f"run written to {config.out} in {metrics['seconds'] / 60:.1f} min")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--cache", type=click.Path(path_type=Path),
              help="Feature cache to use instead of the run's own; it must have the run's backbone and split.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Split to evaluate; val and train results go to metrics-SPLIT.json.")
@click.option("--device", default="auto", show_default=True,
              help="Where fine-tuned runs compute: auto (CUDA when available), cpu, cuda or cuda:N. "
                   "Head runs compute on the CPU.")
def evaluate(run_dir: Path, cache: Path | None, split: str, device: str) -> None:
    """Recompute and print the metrics of RUN_DIR on a split, and rewrite its metric files."""
    from emo.evaluate.metrics import format_table
    from emo.evaluate.run import evaluate_run

    metrics = _run(evaluate_run, run_dir, cache=cache, split=split, device=device)
    click.echo(f"{split} split, {next(iter(metrics['models'].values()))['count']} images")
    click.echo(format_table(metrics["models"]))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default="report", show_default=True, type=click.Path(path_type=Path),
              help="Folder for report.md and its PNG figures.")
def report(run_dirs: tuple[Path, ...], out: Path) -> None:
    """Compare the test results of RUN_DIRS (head and fine-tuned runs) in a table with figures."""
    from emo.evaluate.report import REPORT_FILE, ReportConfig, format_table, write_report

    config = _run(ReportConfig, runs=run_dirs, out=out)
    summaries = _run(write_report, config)
    click.echo(format_table(summaries, list(summaries[0].per_class_recall)))
    click.echo(f"report written to {out / REPORT_FILE}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", default=None, help="Backbone weights to use instead of those recorded in the run.")
@click.option("--top-k", default=3, show_default=True, help="Classes to show per image, at least 1.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def predict(run_dir: Path, images: tuple[Path, ...], weights: str | None, top_k: int, device: str,
            as_json: bool) -> None:
    """Print the most likely emotions of each of IMAGES according to RUN_DIR."""
    from emo.predict import predict as run_predict

    results = _run(run_predict, run_dir, list(images), weights=weights, device=device, top_k=top_k)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            click.echo(_format_prediction(result))
    if any("error" in result for result in results):
        sys.exit(1)


def _format_prediction(result: dict) -> str:
    if "error" in result:
        return f"{result['path']}: error: {result['error']}"
    top = ", ".join(f"{item['class']} {item['probability']:.3f}" for item in result["top"])
    return f"{result['path']}: {top}"


@main.command()
@click.option("--out", default="emo-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the sample images, cache, run and predictions.")
@click.option("--weights", default="random", show_default=True,
              help="Backbone weights; 'random' works offline, 'imagenet' needs torchvision's cached file.")
@click.option("--arch", default="resnet101", show_default=True, help="torchvision ResNet: resnet18/34/50/101/152.")
@click.option("--image-size", default=112, show_default=True, help="Centre-crop size in pixels, at least 32.")
@device_option
def demo(out: Path, weights: str, arch: str, image_size: int, device: str) -> None:
    """Run extract, fit-heads, evaluate and predict on a generated sample set."""
    from emo.demo import DEMO_CLASSES, run_demo

    click.echo(f"Sample set: {len(DEMO_CLASSES)} classes ({', '.join(DEMO_CLASSES)}) of synthetic JPEGs, one colour "
               f"palette and texture per class; not photos, so the numbers only show the pipeline works.")
    result = _run(run_demo, out, weights=weights, arch=arch, image_size=image_size, device=device)
    stacked = result.metrics["models"][result.metrics["primary"]]
    click.echo(f"test accuracy {stacked['accuracy']:.3f}, macro recall {stacked['macro_recall']:.3f} "
               f"({weights} weights, {arch})")
    click.echo(f"outputs in {result.out}: images {result.out / 'data'}, cache {result.cache}, run {result.run}, "
               f"predictions {result.predictions}")


if __name__ == "__main__":
    main()

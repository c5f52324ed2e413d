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
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _stages_option(ctx, param, value: str) -> tuple[str, ...]:
    try:
        return parse_stages(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


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
@click.option("-v", "--verbose", count=True, help="Log debug messages.")
@click.version_option(package_name="emo-vision")
def main(verbose: int) -> None:
    """Visual emotion recognition with ResNet stage features (Najid & Chahyati, EECSI 2018)."""
    _configure_logging(verbose)


weights_option = click.option(
    "--weights", default="imagenet", show_default=True,
    help="Backbone weights: 'imagenet' (torchvision's cache), 'random' (smoke runs) or a state dict path.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto, cpu, cuda or cuda:N.")


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache file to write (.h5).")
@click.option("--labels", type=click.Path(path_type=Path), help="CSV whose label column overrides folder labels.")
@click.option("--path-column", default="path", show_default=True, help="CSV column with image paths.")
@click.option("--label-column", default="label", show_default=True, help="CSV column with labels.")
@click.option("--split-file", type=click.Path(path_type=Path), help="Use this split CSV instead of a new split.")
@weights_option
@click.option("--arch", default="resnet101", show_default=True, help="torchvision ResNet: resnet18/34/50/101/152.")
@click.option("--image-size", default=224, show_default=True, help="Centre-crop size in pixels.")
@click.option("--batch-size", default=32, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes for decoding  [default: one per 8 cores on the CPU, every core "
                   "but one with CUDA]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads of the forward pass  [default: torch's default, one per core]")
@device_option
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the cached features.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Arithmetic of the forward pass; auto picks bf16 where the hardware computes it natively "
                   "(CUDA compute capability 8.0+, CPUs with AVX512-BF16 or AMX), else fp32.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split and of random weights.")
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
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--stages", default=",".join(STAGE_NAMES), show_default=True, callback=_stages_option,
              help="Comma-separated stages to train branches on.")
@click.option("--sampling", type=click.Choice(["weighted", "shuffle"]), default="weighted", show_default=True,
              help="weighted: draws inversely proportional to class size; shuffle: plain random order.")
@click.option("--epochs", default=50, show_default=True, help="Epochs of branch training.")
@click.option("--stack-epochs", default=10, show_default=True, help="Epochs of stacking (0 = plain mean).")
@click.option("--lr", default=1e-3, show_default=True, help="SGD learning rate.")
@click.option("--batch-size", default=32, show_default=True, help="Mini-batch size.")
@click.option("--dropout", default=0.0, show_default=True, help="Dropout probability before each head.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation and sampling.")
@click.option("--max-memory", callback=_bytes_option, default=None,
              help="Memory budget for the training features, e.g. 2GB or 512MiB; above it they are read "
                   "from the cache in windows instead of loaded whole  [default: no limit]")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads for training; mini-batches of linear heads gain nothing from more.")
@click.option("--overwrite", is_flag=True, help="Replace a finished run in --out.")
def fit_heads(**options) -> None:
    """Train branch heads and their weighted stacking on a feature CACHE."""
    from emo.evaluate.metrics import format_table
    from emo.heads import FitHeadsConfig, fit_heads as run_fit_heads

    config = _run(FitHeadsConfig, **options)
    metrics = _run(run_fit_heads, config)
    click.echo(format_table(metrics["models"]))
    click.echo(f"run written to {config.out} in {metrics['seconds']:.1f} s")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--cache", type=click.Path(path_type=Path), help="Feature cache to use instead of the run's own.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@device_option
def evaluate(run_dir: Path, cache: Path | None, split: str, device: str) -> None:
    """Recompute and print the metrics of RUN_DIR on a split, and rewrite its metric files."""
    from emo.evaluate.metrics import format_table
    from emo.evaluate.run import evaluate_run

    metrics = _run(evaluate_run, run_dir, cache=cache, split=split, device=device)
    click.echo(f"{split} split, {next(iter(metrics['models'].values()))['count']} images")
    click.echo(format_table(metrics["models"]))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", default=None, help="Backbone weights to use instead of those recorded in the run.")
@click.option("--top-k", default=3, show_default=True, help="Classes to show per image.")
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
@click.option("--arch", default="resnet101", show_default=True)
@click.option("--image-size", default=112, show_default=True)
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

"""Benchmark of ``emo extract`` against the compute ceiling and a plain baseline, in one run.

Generates N photo-sized JPEGs (500x375) and measures images per second of:

1. the ceiling: torchvision's ResNet forward alone on decoded, transformed batches held in
   memory (same batch size, threads, channels-last layout and precision as emo), alternating
   batch by batch with emo's own backbone (BatchNorms folded) on the same batches;
2. ``emo extract`` end to end through its Python API (scan, decode, transform, forward, pool,
   HDF5 write, and building the model), per precision;
3. a baseline as a researcher would write it: ``create_feature_extractor`` returning the five
   stage outputs, a DataLoader without workers, the default memory format, fp32, and pooled
   rows written to h5py one image at a time.

It also compares every pooled row of the bf16 cache with the fp32 row of the same image
(cosine similarity), and runs ``emo extract`` in child processes on N0 and 2*N0 images to
compare their peak resident memory. Weights are random (ImageNet weights need a download).
The last lines of the output are a Markdown block for docs/benchmarks.md.

With ``--device cuda`` every measurement runs on the GPU, the ceiling and the baseline
included, and ``--distinct-photos`` keeps the number of JPEGs to generate small while N is
large: the dataset then repeats them under other names.

NOTE: the ``--device cuda`` path has been run on the CPU's code path only; no GPU was available
when it was written.

Usage:
    python bench/extract.py [--images 1024] [--arch resnet101] [--image-size 224] [--batch-size 32]
                            [--precisions fp32,bf16] [--rss-images 128] [--sweep 2:1,2:0,1:1]
                            [--device cpu] [--distinct-photos 1024]
"""

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.models.feature_extraction import create_feature_extractor

from emo.cache import FeatureCache
from emo.data.transforms import eval_transform
from emo.extract import ExtractConfig, extract
from emo.backbone import resolve_device
from emo.extract.forward import cudnn_autotuning, inference_backbone, pooled_stages
from emo.extract.loading import default_workers
from emo.stages import STAGE_NAMES, stage_infos

from machine import (Timer, add_model_options, machine_lines, machine_record, markdown_table, peak_rss_mb,
                     print_results, run_child, work_folder)
from photos import PHOTO_SIZE, write_photos

POOL_BATCHES = 2  # distinct batches of the ceiling's in-memory images, reused round robin
BASELINE_NODES = {"maxpool": "L0", "layer1": "L1", "layer2": "L2", "layer3": "L3", "layer4": "L4"}


def repeated_photos(folder: Path, count: int, distinct: int) -> list[Path]:
    """Write ``min(count, distinct)`` JPEGs and return ``count`` paths, hard links repeating them in turn.

    Decoding a repeated file costs as much as decoding a new one, so a GPU run can measure tens of
    thousands of images without generating each of them.
    """
    originals = write_photos(folder, min(count, distinct))
    paths = list(originals)
    for index in range(len(originals), count):
        path = folder / f"{index:06d}.jpg"
        path.unlink(missing_ok=True)
        os.link(originals[index % len(originals)], path)
        paths.append(path)
    return paths


def write_dataset(root: Path, photos: list[Path]) -> Path:
    """Hard-link ``photos`` into an ImageFolder under ``root`` and write its split file; return the split file.

    Rows go to train, val and test in turn, so any number of images from three on works (a
    stratified split would need 20 per class, and every class needs a row in each split).
    """
    folder = root / "photo"
    shutil.rmtree(folder, ignore_errors=True)  # links of an earlier run in the same --workdir
    folder.mkdir(parents=True)
    for photo in photos:
        os.link(photo, folder / photo.name)
    split_file = root.with_name(root.name + ".split.csv")
    with open(split_file, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "split"])
        splits = ("train", "val", "test")
        writer.writerows([f"photo/{photo.name}", splits[index % 3]] for index, photo in enumerate(photos))
    return split_file


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so that a timer around it measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rates(photos: list[Path], *, arch: str, image_size: int, batch_size: int, precision: str,
                  device: torch.device) -> dict:
    """Return images/s of the forward pass alone on transformed batches held in memory on ``device``.

    ``ceiling`` is torchvision's model; ``emo_backbone`` is the model as ``emo extract`` runs it
    (BatchNorms folded, pooled stage outputs). The two alternate batch by batch, so a change in
    the machine's load affects both alike.
    """
    model = torchvision.models.get_model(arch, weights=None).eval().to(device, memory_format=torch.channels_last)
    backbone = inference_backbone(torchvision.models.get_model(arch, weights=None).eval(), device)
    transform = eval_transform(image_size)
    pool = torch.stack([transform(Image.open(path).convert("RGB")) for path in photos[:POOL_BATCHES * batch_size]])
    pool = pool.to(device).contiguous(memory_format=torch.channels_last)
    sizes = [min(batch_size, len(photos) - start) for start in range(0, len(photos), batch_size)]
    batches = [pool[(i % POOL_BATCHES) * batch_size:][:size] for i, size in enumerate(sizes)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    seconds = {"ceiling": 0.0, "emo_backbone": 0.0}
    with torch.inference_mode(), autocast, cudnn_autotuning(device):
        # Warm-up: oneDNN builds (and cuDNN times) its kernels on the first call of each shape.
        for size in sorted(set(sizes)):
            model(batches[0][:size])
            pooled_stages(backbone, batches[0][:size])
        synchronize(device)
        for batch in batches:
            with Timer() as timer:
                model(batch)
                synchronize(device)
            seconds["ceiling"] += timer.wall
            with Timer() as timer:
                pooled_stages(backbone, batch)
                synchronize(device)
            seconds["emo_backbone"] += timer.wall
    images = sum(len(batch) for batch in batches)
    return {name: images / value for name, value in seconds.items()}


def emo_extract(data: Path, split_file: Path, out: Path, args, precision: str, **overrides) -> dict:
    """Run ``emo extract`` through its Python API; return images/s of the whole call and of its loop."""
    options = dict(data=data, out=out, split_file=split_file, weights="random", arch=args.arch,
                   image_size=args.image_size, batch_size=args.batch_size, device=args.device, dtype="float32",
                   precision=precision, overwrite=True)
    if args.workers is not None:
        options["workers"] = args.workers
    if args.threads is not None:
        options["threads"] = args.threads
    options.update(overrides)
    with Timer() as timer:
        summary = extract(ExtractConfig(**options))
    return {"images_per_s": summary.images / timer.wall, "loop_images_per_s": summary.images_per_second,
            "wall": timer.wall}


class PlainImages(Dataset):
    """Images opened with PIL and passed through the evaluation transform, one at a time."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths = paths
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def baseline(photos: list[Path], out: Path, *, arch: str, image_size: int, batch_size: int,
             device: torch.device) -> float:
    """Return images/s of a plain extraction script, model construction included as in ``emo extract``."""
    widths = {info.name: info.channels for info in stage_infos(arch)}
    with Timer() as timer:
        model = torchvision.models.get_model(arch, weights=None).eval().to(device)
        extractor = create_feature_extractor(model, return_nodes=BASELINE_NODES)
        loader = DataLoader(PlainImages(photos, image_size), batch_size=batch_size)
        with h5py.File(out, "w") as file, torch.no_grad():
            datasets = {name: file.create_dataset(name, (len(photos), width), "float32")
                        for name, width in widths.items()}
            row = 0
            for images in loader:
                maps = extractor(images.to(device)).items()
                pooled = {name: fmap.mean(dim=(2, 3)).cpu().numpy() for name, fmap in maps}
                for index in range(len(images)):
                    for name, values in pooled.items():
                        datasets[name][row] = values[index]
                    row += 1
    return len(photos) / timer.wall


def min_cosine(first: Path, second: Path) -> dict[str, float]:
    """Return, per stage, the smallest cosine similarity between the rows of two caches of the same images."""
    result = {}
    with FeatureCache(first) as a, FeatureCache(second) as b:
        for stage in STAGE_NAMES:
            x, y = a.features(stage).astype(np.float64), b.features(stage).astype(np.float64)
            norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
            result[stage] = float(np.min((x * y).sum(axis=1) / np.maximum(norms, 1e-300)))
    return result


def child(task: dict) -> None:
    """Run one ``emo extract`` in this fresh process and print its peak memory as JSON."""
    config = ExtractConfig(**{key: Path(value) if key in ("data", "out", "split_file") else value
                              for key, value in task.items()})
    with Timer() as timer:
        extract(config)
    print(json.dumps({"wall": timer.wall, "peak_rss_mb": peak_rss_mb()}))


def rss_check(work: Path, photos: list[Path], args, precision: str) -> list[dict]:
    """Run ``emo extract`` in child processes on N0 and 2*N0 images; return their peak memory."""
    results = []
    for count in (args.rss_images, 2 * args.rss_images):
        root = work / f"rss{count}"
        split_file = write_dataset(root, photos[:count])
        task = dict(data=str(root), out=str(work / f"rss{count}.h5"), split_file=str(split_file), weights="random",
                    arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                    dtype="float32", precision=precision, overwrite=True)
        if args.workers is not None:
            task["workers"] = args.workers
        if args.threads is not None:
            task["threads"] = args.threads
        results.append({"images": count, **run_child(__file__, task)})
    return results


def sweep(data: Path, split_file: Path, work: Path, args) -> list[dict]:
    """Measure ``emo extract`` (fp32) for each ``threads:workers`` pair of ``args.sweep``."""
    rows = []
    for threads, workers in args.sweep_pairs:
        result = emo_extract(data, split_file, work / "sweep.h5", args, "fp32", threads=threads, workers=workers)
        rows.append({"threads": threads, "workers": workers, **result})
    return rows


def report(args, record: dict, results: dict) -> list[str]:
    """Return the Markdown block of a benchmark run."""
    command = "python bench/extract.py " + " ".join(sys.argv[1:])
    fp32_ceiling = results["ceiling"]["fp32"]
    lines = [f"### `emo extract`: {args.images} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, {args.arch}, "
             f"{args.image_size} px, batch {args.batch_size}, {args.device}", "", f"Command: `{command}`", ""]
    lines += machine_lines(record)
    if results.get("gpu"):
        lines += [f"- GPU: {results['gpu']}."]
    lines += [f"- emo settings: workers {results['workers']}, threads {results['threads']}; random weights, "
              "float32 cache (a random ResNet-101 overflows float16).", ""]
    ratio_rows = []
    for precision in args.precisions:
        emo_rate = results["emo"][precision]["images_per_s"]
        ratio_rows.append([f"emo extract {precision} / ceiling {precision}",
                           f"{emo_rate / results['ceiling'][precision]:.3f}"])
        ratio_rows.append([f"emo backbone alone {precision} / ceiling {precision}",
                           f"{results['emo_backbone'][precision] / results['ceiling'][precision]:.3f}"])
        # How much of the backbone's speed survives decoding, transforming and writing around it.
        ratio_rows.append([f"emo extract {precision} / emo backbone alone {precision}",
                           f"{emo_rate / results['emo_backbone'][precision]:.3f}"])
        if precision != "fp32":
            ratio_rows.append([f"emo extract {precision} / ceiling fp32", f"{emo_rate / fp32_ceiling:.3f}"])
        if "baseline" in results:
            ratio_rows.append([f"emo extract {precision} / baseline fp32", f"{emo_rate / results['baseline']:.3f}"])
    lines += markdown_table(["ratio", "value"], ratio_rows) + [""]

    absolute = []
    for precision in args.precisions:
        absolute.append([f"ceiling {precision}", f"{results['ceiling'][precision]:.2f}",
                         "torchvision model, batches already in memory"])
        absolute.append([f"emo backbone alone {precision}", f"{results['emo_backbone'][precision]:.2f}",
                         "BatchNorms folded, same batches"])
        emo = results["emo"][precision]
        absolute.append([f"emo extract {precision}", f"{emo['images_per_s']:.2f}",
                         f"{emo['wall']:.1f} s for the whole call; forward loop alone "
                         f"{emo['loop_images_per_s']:.2f} images/s"])
    if "baseline" in results:
        absolute.append(["baseline fp32", f"{results['baseline']:.2f}", ""])
    lines += markdown_table(["measurement", "images/s", "notes"], absolute) + [""]

    if "cosine" in results:
        worst = min(results["cosine"].values())
        lines += [f"Smallest cosine similarity between a bf16 and the fp32 pooled row of the same image: "
                  f"{worst:.5f} (" + ", ".join(f"{k} {v:.5f}" for k, v in results["cosine"].items()) + ")", ""]
    rss = results["rss"]
    growth = rss[1]["peak_rss_mb"] / rss[0]["peak_rss_mb"] - 1
    lines += [f"Peak resident memory of the `emo extract` process ({results['rss_precision']}, loader workers "
              f"not counted) in a fresh interpreter: {rss[0]['peak_rss_mb']:.0f} MB for {rss[0]['images']} images, "
              f"{rss[1]['peak_rss_mb']:.0f} MB for {rss[1]['images']} ({growth:+.1%}).", ""]
    if results.get("sweep"):
        lines += ["Threads and loader workers of `emo extract` (fp32):", ""]
        lines += markdown_table(["threads", "workers", "images/s (whole call)", "images/s (loop)"],
                                [[r["threads"], r["workers"], f"{r['images_per_s']:.2f}",
                                  f"{r['loop_images_per_s']:.2f}"] for r in results["sweep"]]) + [""]
    return lines


def parse_sweep(text: str) -> list[tuple[int, int]]:
    """Return the ``(threads, workers)`` pairs of a ``--sweep`` value such as ``2:1,2:0``.

    Raises:
        ValueError: if a pair is not two whole numbers with at least 1 thread.
    """
    pairs = []
    for pair in filter(None, text.split(",")):
        threads, colon, workers = pair.strip().partition(":")
        if not (colon and threads.isdigit() and workers.isdigit() and int(threads) >= 1):
            raise ValueError(f"--sweep: {pair!r} is not THREADS:WORKERS with at least 1 thread and 0 or more "
                             "workers, e.g. 2:1")
        pairs.append((int(threads), int(workers)))
    return pairs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to generate and extract")
    add_model_options(parser)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated; fp32 must be one")
    parser.add_argument("--rss-images", type=int, default=128, help="N0 of the peak-memory check")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain baseline")
    parser.add_argument("--sweep", default="", help="threads:workers pairs to compare, e.g. 2:1,2:0,1:1")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; every measurement runs there")
    parser.add_argument("--distinct-photos", type=int, default=1024,
                        help="JPEGs to generate; a larger --images repeats them under other names")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images and caches here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_options(parser, args)
    return args


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` on an invalid option, before anything is measured.

    Also splits ``args.precisions`` into a list and adds ``args.sweep_pairs``.
    """
    args.precisions = args.precisions.split(",")
    if "fp32" not in args.precisions:
        parser.error("--precisions must include fp32, the reference of every ratio")
    unknown = [precision for precision in args.precisions if precision not in ("fp32", "bf16")]
    if unknown:
        parser.error(f"--precisions: {unknown[0]!r} is not fp32 or bf16")
    if args.distinct_photos < 1:
        parser.error(f"--distinct-photos must be at least 1, got {args.distinct_photos}")
    # write_dataset puts the images in train, val and test in turn, and emo extract needs all three.
    for option, value in (("--images", args.images), ("--rss-images", args.rss_images)):
        if value < 3:
            parser.error(f"{option} must be at least 3, one image each for train, val and test; got {value}")
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    try:
        args.sweep_pairs = parse_sweep(args.sweep)
        # The options that reach emo extract, checked now instead of after the first measurements.
        ExtractConfig(data=Path("."), out=Path("check.h5"), weights="random", arch=args.arch,
                      image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                      threads=args.threads, device=args.device, dtype="float32")
    except ValueError as error:
        parser.error(str(error))


def main() -> None:
    args = parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = machine_record()
    device = resolve_device(args.device)
    with work_folder(args.workdir, prefix="emo-bench-extract-") as work:
        photos = repeated_photos(work / "photos", max(args.images, 2 * args.rss_images), args.distinct_photos)
        data = work / "data"
        split_file = write_dataset(data, photos[:args.images])
        results = {"ceiling": {}, "emo_backbone": {}, "emo": {}, "threads": torch.get_num_threads(),
                   "workers": args.workers if args.workers is not None else default_workers(device),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        for precision in args.precisions:
            rates = forward_rates(photos[:args.images], arch=args.arch, image_size=args.image_size,
                                  batch_size=args.batch_size, precision=precision, device=device)
            results["ceiling"][precision], results["emo_backbone"][precision] = rates["ceiling"], rates["emo_backbone"]
            results["emo"][precision] = emo_extract(data, split_file, work / f"emo-{precision}.h5", args, precision)
            print(f"{precision}: ceiling {results['ceiling'][precision]:.2f} images/s, "
                  f"emo {results['emo'][precision]['images_per_s']:.2f} images/s", file=sys.stderr)
        if not args.no_baseline:
            results["baseline"] = baseline(photos[:args.images], work / "baseline.h5", arch=args.arch,
                                           image_size=args.image_size, batch_size=args.batch_size, device=device)
        if "bf16" in args.precisions:
            results["cosine"] = min_cosine(work / "emo-fp32.h5", work / "emo-bf16.h5")
        results["rss_precision"] = args.precisions[-1]
        results["rss"] = rss_check(work, photos, args, args.precisions[-1])
        if args.sweep:
            results["sweep"] = sweep(data, split_file, work, args)
        print_results(results, report(args, record, results))


if __name__ == "__main__":
    main()

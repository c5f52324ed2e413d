"""Benchmark of ``emo finetune`` training against a minimal plain PyTorch loop, in one run.

Generates photo-sized JPEGs (500x375) in two classes and measures training images per second of:

1. a plain loop as a researcher would write it: torchvision's ResNet with a new linear
   classifier, every parameter trained by SGD with Nesterov momentum at emo's two learning
   rates and weight decay. Its batches are decoded and transformed once and held in memory, in
   the default memory format. The same loop also runs in channels-last, emo's format, which
   shows what emo's loop itself costs;
2. ``emo finetune --variant full`` on the JPEG files (loader workers decoding and cropping,
   weighted sampling, forward, backward, optimizer step). The figure is the training pass of
   the last epoch (``train_seconds`` in history.jsonl), because the first steps pay for
   oneDNN's set-up. The plain loop runs as many epochs and is timed on its last one too;
3. ``emo finetune`` of each other variant asked for (default ``fc``), whose step time is
   compared with the ``full`` step: a frozen backbone must not cost a backward pass.

Weights are random (ImageNet weights need a download); they cost the same arithmetic as trained ones.
The last lines of the output are a Markdown block for docs/benchmarks.md.

Usage:
    python bench/finetune.py [--train-images 192] [--arch resnet101] [--image-size 224] [--batch-size 32]
                             [--epochs 2] [--variants fc]
"""

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from emo.data.transforms import train_transform
from emo.finetune import FinetuneConfig, finetune
from emo.finetune.config import VARIANTS

from machine import (Timer, add_model_options, machine_lines, machine_record, markdown_table, print_results,
                     work_folder)
from photos import PHOTO_SIZE, write_photos

CLASSES = ("a", "b")
HELD_OUT_PER_CLASS = 2  # val and test images per class: enough for emo's split checks, cheap to score


def write_dataset(root: Path, photos: list[Path], train_images: int) -> Path:
    """Hard-link ``photos`` into a two-class ImageFolder and write its split file; return the split file.

    The first ``train_images`` photos are the train split; the rest go to val and test, two per
    class each.
    """
    rows = []
    for index, photo in enumerate(photos):
        label = CLASSES[index % len(CLASSES)]
        (root / label).mkdir(parents=True, exist_ok=True)
        os.link(photo, root / label / photo.name)
        held_out = index - train_images
        if held_out < 0:
            split = "train"
        elif held_out < len(CLASSES) * HELD_OUT_PER_CLASS:
            split = "val"
        else:
            split = "test"
        rows.append([f"{label}/{photo.name}", split])
    split_file = root.with_name(root.name + ".split.csv")
    with open(split_file, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "split"])
        writer.writerows(rows)
    return split_file


def plain_model(arch: str, num_classes: int) -> tuple[torch.nn.Module, torch.optim.SGD]:
    """Return torchvision's ResNet with a new classifier and its optimizer, as emo's ``full`` variant sets them."""
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    defaults = FinetuneConfig(data=Path("."), variant="full", out=Path("."))
    backbone = [parameter for name, parameter in model.named_parameters() if not name.startswith("fc.")]
    optimizer = torch.optim.SGD([{"params": backbone, "lr": defaults.lr_backbone},
                                 {"params": model.fc.parameters(), "lr": defaults.lr_new}],
                                momentum=defaults.momentum, nesterov=True, weight_decay=defaults.weight_decay)
    return model.train(), optimizer


def plain_rate(photos: list[Path], *, arch: str, image_size: int, batch_size: int, epochs: int,
               memory_format: torch.memory_format = torch.contiguous_format, seed: int = 0) -> float:
    """Return training images/s of the last of ``epochs`` epochs of the plain loop over ``photos``.

    The photos are transformed once and held in memory; each epoch visits them in shuffled
    mini-batches. Timing the last epoch, as for emo, leaves out oneDNN's set-up on the first
    steps, whose cost fades over several batches.
    """
    torch.manual_seed(seed)
    transform = train_transform(image_size)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in photos])  # [N, 3, H, W]
    images = images.contiguous(memory_format=memory_format)
    labels = torch.arange(len(photos)) % len(CLASSES)  # [N], as write_dataset labels them
    model, optimizer = plain_model(arch, len(CLASSES))
    model = model.to(memory_format=memory_format)

    def epoch() -> None:
        batches = list(torch.randperm(len(photos)).split(batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm needs two images, as in emo
            batches[-2:] = [torch.cat(batches[-2:])]
        for index in batches:
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(epochs - 1):
        epoch()
    with Timer() as timer:
        epoch()
    return len(photos) / timer.wall


def emo_rate(data: Path, split_file: Path, out: Path, variant: str, args) -> dict:
    """Run ``emo finetune`` through its Python API; return the training images/s of its last epoch."""
    options = dict(data=data, variant=variant, out=out, split_file=split_file, arch=args.arch, weights="random",
                   epochs=args.epochs, stack_epochs=1, batch_size=args.batch_size, image_size=args.image_size,
                   device="cpu", overwrite=True)
    if args.workers is not None:
        options["workers"] = args.workers
    config = FinetuneConfig(**options)
    with Timer() as timer:
        finetune(config)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    first_step = [record for record in history if record["step"] == history[0]["step"]]
    last = first_step[-1]
    return {"images_per_s": last["train_images_per_second"], "epoch_seconds": last["seconds"],
            "train_seconds": last["train_seconds"], "wall": timer.wall, "workers": config.workers}


def report(args, record: dict, results: dict) -> list[str]:
    """Return the Markdown block of a benchmark run."""
    command = "python bench/finetune.py " + " ".join(sys.argv[1:])
    full = results["emo"]["full"]
    lines = [f"### `emo finetune`: {args.train_images} training JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, "
             f"{args.arch}, {args.image_size} px, batch {args.batch_size}", "", f"Command: `{command}`", ""]
    lines += machine_lines(record)
    lines += [f"- emo settings: {full['workers']} loader workers, float32 and channels-last on the CPU, random weights. "
              f"Every figure is of epoch {args.epochs} of {args.epochs}, the plain loop's too.", ""]
    ratio_rows = [["emo finetune full / plain loop (images/s)", f"{full['images_per_s'] / results['plain']:.3f}"],
                  ["emo finetune full / plain loop in channels-last (images/s)",
                   f"{full['images_per_s'] / results['plain_channels_last']:.3f}"]]
    for variant in args.variants:
        ratio_rows.append([f"{variant} step / full step (seconds per image)",
                           f"{full['images_per_s'] / results['emo'][variant]['images_per_s']:.3f}"])
    lines += markdown_table(["ratio", "value"], ratio_rows) + [""]

    absolute = [["plain loop, full", f"{results['plain']:.2f}", "batches already in memory, default memory format"],
                ["plain loop, full, channels-last", f"{results['plain_channels_last']:.2f}",
                 "batches already in memory, model and batches channels-last"]]
    for variant, emo in results["emo"].items():
        absolute.append([f"emo finetune {variant}", f"{emo['images_per_s']:.2f}",
                         f"training pass {emo['train_seconds']:.1f} s; whole epoch with val and checkpoint "
                         f"{emo['epoch_seconds']:.1f} s; whole call {emo['wall']:.1f} s"])
    lines += markdown_table(["measurement", "training images/s", "notes"], absolute) + [""]
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=192, help="training JPEGs to generate")
    add_model_options(parser)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run; the last one is measured")
    parser.add_argument("--variants", default="fc", help="comma-separated variants to compare with full")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images and runs here")
    args = parser.parse_args()
    check_options(parser, args)
    return args


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` on an invalid option, before anything is measured.

    Also turns ``args.variants`` into a list of the variants other than ``full``.
    """
    # full always runs, as the reference; a variant named twice runs once.
    names = [variant.strip() for variant in args.variants.split(",")]
    args.variants = list(dict.fromkeys(variant for variant in names if variant and variant != "full"))
    unknown = [variant for variant in args.variants if variant not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {unknown[0]!r} is not one of {', '.join(VARIANTS)}")
    # A whole warmed-up epoch of several batches is measured.
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2, so that a warmed-up epoch is measured; got {args.epochs}")
    if args.train_images < 2 * args.batch_size:
        parser.error(f"--train-images must be at least twice --batch-size ({args.batch_size}), so that an epoch has "
                     f"several batches; got {args.train_images}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        # The options that reach emo finetune, checked now instead of after the plain loops.
        FinetuneConfig(data=Path("."), variant="full", out=Path("."), arch=args.arch, weights="random",
                       epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                       workers=args.workers if args.workers is not None else 0)
    except ValueError as error:
        parser.error(str(error))


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = machine_record()
    with work_folder(args.workdir, prefix="emo-bench-finetune-") as work:
        held_out = 2 * len(CLASSES) * HELD_OUT_PER_CLASS
        photos = write_photos(work / "photos", args.train_images + held_out)
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        split_file = write_dataset(data, photos, args.train_images)
        plain = dict(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs)
        results = {"plain": plain_rate(photos[:args.train_images], **plain),
                   "plain_channels_last": plain_rate(photos[:args.train_images], memory_format=torch.channels_last,
                                                     **plain),
                   "emo": {}}
        print(f"plain loop: {results['plain']:.2f} images/s, channels-last {results['plain_channels_last']:.2f}",
              file=sys.stderr)
        for variant in ["full", *args.variants]:
            results["emo"][variant] = emo_rate(data, split_file, work / f"run-{variant}", variant, args)
            print(f"emo {variant}: {results['emo'][variant]['images_per_s']:.2f} images/s", file=sys.stderr)
        print_results(results, report(args, record, results))


if __name__ == "__main__":
    main()

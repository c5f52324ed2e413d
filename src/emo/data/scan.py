"""Finding the samples of a dataset: an ImageFolder tree or a CSV manifest, and checking each file.

Scanning happens before any heavy work, so that a bad file is reported in seconds rather than
after an hour of extraction.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from emo.data.csvfile import read_csv_rows
from emo.data.images import BadImageError, check_image
from emo.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
HIDDEN_NAMES = {"Thumbs.db", "desktop.ini", "__MACOSX"}


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the dataset root and its label."""

    relpath: str
    label: str


@dataclass
class Dataset:
    """The usable samples of a dataset, its class names in index order, and the files left out."""

    root: Path
    samples: list[Sample]
    classes: list[str]
    sha256: list[str] = field(default_factory=list)
    bad: list[BadImageError] = field(default_factory=list)

    def path(self, index: int) -> Path:
        """Return the absolute path of sample ``index``."""
        return self.root / self.samples[index].relpath

    def label_indices(self) -> list[int]:
        """Return the class index of every sample."""
        lookup = {name: index for index, name in enumerate(self.classes)}
        return [lookup[sample.label] for sample in self.samples]


def is_hidden(name: str) -> bool:
    """Return whether a file or folder name is hidden or an OS artefact, never a sample."""
    return name.startswith(".") or name in HIDDEN_NAMES


def find_samples(data: Path, *, labels_csv: Path | None = None, path_column: str = "path",
                 label_column: str = "label") -> tuple[Path, list[Sample], list[BadImageError]]:
    """List the candidate samples of ``data`` without opening any image.

    Args:
        data: an ImageFolder root (one sub-folder per class) or a CSV manifest.
        labels_csv: with a folder ``data``, a CSV whose ``label_column`` overrides the folder labels;
            its paths are relative to ``data``.
        path_column: the column of file paths in a CSV.
        label_column: the column of labels in a CSV.

    Returns:
        The root that relative paths start from, the samples, and files already known to be unusable
        (symlinks leaving the root, missing files).
    """
    data = Path(data)
    if not data.exists():
        raise DataError(f"dataset {str(data)!r} does not exist; pass an ImageFolder directory or a CSV manifest")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"dataset {str(data)!r} is a file but not a .csv manifest")
        return data.parent, *_read_manifest(data, data.parent, path_column, label_column)
    if labels_csv is not None:
        return data, *_read_manifest(Path(labels_csv), data, path_column, label_column)
    return data, *_walk_image_folder(data)


def _walk_image_folder(root: Path) -> tuple[list[Sample], list[BadImageError]]:
    class_dirs = sorted((entry for entry in os.scandir(root) if entry.is_dir() and not is_hidden(entry.name)),
                        key=lambda entry: entry.name)
    if not class_dirs:
        raise DataError(f"{root} has no class folders; an ImageFolder dataset has one sub-folder per class")
    samples, bad = [], []
    for entry in class_dirs:
        found = _walk_class_folder(root, Path(entry.path), bad)
        if not found:
            raise DataError(f"class folder {entry.path} contains no images; remove it or add images")
        samples += [Sample(relpath, entry.name) for relpath in found]
    return samples, bad


def _walk_class_folder(root: Path, folder: Path, bad: list) -> list[str]:
    real_root = root.resolve()
    found = []
    # followlinks=False: a linked folder could loop or leave the dataset; linked files are checked below.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(name for name in dirnames if not is_hidden(name))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_hidden(name) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            problem = _link_problem(path, real_root)
            if problem:
                bad.append(BadImageError(path, problem))
                continue
            found.append(path.relative_to(root).as_posix())
    return found


def _link_problem(path: Path, real_root: Path) -> str | None:
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return "broken symlink or symlink loop"
    if not target.is_relative_to(real_root):
        return f"symlink points outside the dataset ({target})"
    return None


def _read_manifest(csv_path: Path, root: Path, path_column: str,
                   label_column: str) -> tuple[list[Sample], list[BadImageError]]:
    rows = read_csv_rows(csv_path, [path_column, label_column])
    samples, bad, seen = [], [], {}
    real_root = root.resolve()
    for line, row in enumerate(rows, start=2):
        relpath, label = row[path_column].strip(), row[label_column].strip()
        _check_manifest_row(csv_path, line, relpath, label, seen)
        path = root / relpath
        problem = _manifest_path_problem(path, real_root)
        if problem:
            bad.append(BadImageError(path, problem))
        else:
            samples.append(Sample(Path(relpath).as_posix(), label))
    if not samples and not bad:
        raise DataError(f"manifest {csv_path} has no rows")
    return samples, bad


def _check_manifest_row(csv_path: Path, line: int, relpath: str, label: str, seen: dict) -> None:
    where = f"{csv_path}, line {line}"
    if not relpath:
        raise DataError(f"{where}: empty path")
    if not label:
        raise DataError(f"{where}: empty label for {relpath!r}")
    if Path(relpath).is_absolute() or ".." in Path(relpath).parts:
        raise DataError(f"{where}: path {relpath!r} must be relative to the dataset root, without '..'")
    if relpath in seen:
        raise DataError(f"{where}: duplicate path {relpath!r} (first on line {seen[relpath]})")
    seen[relpath] = line


def _manifest_path_problem(path: Path, real_root: Path) -> str | None:
    if not path.exists() and not path.is_symlink():
        return "file not found"
    problem = _link_problem(path, real_root)
    if problem:
        return problem
    if not path.is_file():
        return "not a regular file"
    return None


def check_files(root: Path, samples: list[Sample], *, workers: int = 4) -> tuple[list[str], list[BadImageError]]:
    """Decode every sample cheaply and hash it; return the digests (None for bad files) and the bad files."""

    def check(sample: Sample) -> str | BadImageError:
        try:
            return check_image(root / sample.relpath)
        except BadImageError as error:
            return error

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(check, samples), total=len(samples), desc="scan", unit="img",
                            leave=False))
    bad = [result for result in results if isinstance(result, BadImageError)]
    return results, bad


def scan_dataset(data: Path, *, labels_csv: Path | None = None, path_column: str = "path",
                 label_column: str = "label", skip_bad: bool = False, workers: int = 4) -> Dataset:
    """Find, check and hash every sample of a dataset, stopping on unusable files unless ``skip_bad``.

    Hidden files and folders (``.DS_Store``, ``Thumbs.db``, ``.ipynb_checkpoints/``) are ignored.
    Classes are the sorted folder names, or the sorted distinct labels of a CSV.

    Raises:
        DataError: listing every unusable file with its reason, unless ``skip_bad`` is set.

    Example:
        >>> dataset = scan_dataset(Path("emotion6"))  # doctest: +SKIP
        >>> dataset.classes
        ['anger', 'disgust', 'fear', 'joy', 'sadness', 'surprise']
    """
    root, candidates, bad = find_samples(data, labels_csv=labels_csv, path_column=path_column,
                                         label_column=label_column)
    digests, bad_files = check_files(root, candidates, workers=workers)
    bad += bad_files
    if bad and not skip_bad:
        listing = "\n".join(f"  {error.path}: {error.reason}" for error in bad)
        raise DataError(f"{len(bad)} unusable file(s) in {data}:\n{listing}\n"
                        "Fix or remove them, or pass --skip-bad to leave them out.")
    if bad:
        logger.warning("left out %d unusable file(s) (--skip-bad)", len(bad))
    kept = [(sample, digest) for sample, digest in zip(candidates, digests) if isinstance(digest, str)]
    if not kept:
        raise DataError(f"no usable images in {data}")
    samples = [sample for sample, _ in kept]
    classes = sorted({sample.label for sample in samples})
    return Dataset(root=root, samples=samples, classes=classes, sha256=[d for _, d in kept], bad=bad)

"""Helpers shared by the benchmark scripts: the machine record, child processes and Markdown tables."""

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch


def cpu_model() -> str:
    """Return the CPU model name as ``lscpu`` prints it, or Python's guess where lscpu is missing."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, e.g. ``"0.10 0.20 0.30"``."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine_record() -> dict:
    """Return what a benchmark figure needs to be reproduced: cores, CPU, versions, threads, date, load."""
    return {
        "cores": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load": load_average(),
    }


def machine_lines(record: dict) -> list[str]:
    """Return Markdown lines describing the machine of ``record``."""
    return [
        f"- Machine: {record['cores']} cores, {record['cpu']}; Python {record['python']}, torch {record['torch']}, "
        f"{record['torch_threads']} torch threads by default.",
        f"- Date: {record['date']}. Load average (1, 5, 15 min) at the start: {record['load']}; "
        f"at the end: {load_average()}. A load above the core count means other jobs shared the CPU.",
    ]


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # the value is in kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Return the peak resident memory of this process in MB.

    On Linux this is VmHWM, which starts afresh in a new program. ``ru_maxrss``, the fallback
    elsewhere, keeps the peak of the parent process across fork and exec, so there it can
    overstate a child's peak.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def current_rss_mb() -> float | None:
    """Return the resident memory of this process in MB now, or None where /proc is missing."""
    return _proc_status_mb("VmRSS")


def run_child(script: str, task: dict) -> dict:
    """Run ``script --child TASK`` in a fresh interpreter and return the JSON object it prints last."""
    result = subprocess.run([sys.executable, script, "--child", json.dumps(task)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"child {task} failed with status {result.returncode}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class Timer:
    """Wall-clock and process CPU seconds of a ``with`` block."""

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """Return the lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that the image benchmarks share: architecture, crop size, batch, workers, threads."""
    parser.add_argument("--arch", default="resnet101")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="loader workers of emo (default: emo's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


@contextlib.contextmanager
def work_folder(workdir: Path | None, *, prefix: str) -> Iterator[Path]:
    """Yield ``workdir``, created if missing, or else a temporary folder that is removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_results(results: dict, lines: list[str]) -> None:
    """Print the raw results as JSON to stderr and the Markdown block to stdout."""
    print(json.dumps(results), file=sys.stderr)
    print("\n".join(lines))

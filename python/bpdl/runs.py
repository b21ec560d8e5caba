"""Run folders: the files one training run writes, and the one reader of each of them.

::

    run_dir/
      config.json          the resolved run configuration (written once; a resume must match it)
      metrics.jsonl        one JSON record per evaluation (appended as the run goes)
      checkpoints/last.pt  learner, every optimiser by name, loop position and RNG state
      summary.json         written last: status (completed / diverged / failed / interrupted),
                           message and final metrics; a run without it never finished
      figures/             plots made by ``bpdl plot``, ``bpdl compare`` or a reproduction

Every write that replaces a file is atomic (a temporary file renamed over it), so a crash or a
kill at any moment leaves either the old file or the new one. :func:`read_metrics` is the only
parser of ``metrics.jsonl``: the training loop (on resume), the plots and the dynamics figures
all read it here. This module knows file formats only; building a learner from a run folder is
:func:`bpdl.train.load_learner`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from bpdl.errors import RunDirError

__all__ = ["RunDir", "atomic_torch_save", "atomic_write_text", "load_run", "make_output_dir",
           "read_metrics"]


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents); RunDirError, naming the file in the
    way, when the folder cannot be created."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise RunDirError(f"cannot create the output folder {path}: {blocker} is a file, not a "
                          f"folder; choose another path with --out") from err
    except OSError as err:
        raise RunDirError(f"cannot create the output folder {path}: {err.strerror}; choose "
                          f"another path with --out") from err
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (no half-written file after a crash)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` in one rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike, *, strict: bool = False) -> list[dict[str, Any]]:
    """The evaluation records of a ``metrics.jsonl`` file, in order ([] if it does not exist).

    A last line cut short by a crash is dropped: everything before it is intact. Lenient (the
    default, used when a run resumes) the records before the first unreadable line are returned;
    ``strict`` (used by the figures) raises :class:`RunDirError` for an unreadable line that is
    not the last, for a line that is not an evaluation record, and for a file that holds no
    record at all, so a damaged file is an error rather than an empty figure.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"cannot read {path}: {err}") from err
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if not strict or number == len(lines):
                break  # a line cut short by a crash: what follows it is lost anyway
            raise RunDirError(f"{path} is damaged: line {number} is not a JSON record; rerun the "
                              f"training command to rewrite it from the checkpoint") from None
        if strict and not (isinstance(record, dict) and "examples" in record and "epoch" in record):
            raise RunDirError(f"{path} is damaged: line {number} is not an evaluation record "
                              f"(no 'examples' and 'epoch'); pass a run folder written by "
                              f"`bpdl train`")
        records.append(record)
    if strict and not records:
        raise RunDirError(f"{path} holds no evaluation record (empty or damaged); pass a run "
                          f"folder whose run has evaluated at least once")
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


class RunDir:
    """The files of one run. Nothing is created until :meth:`create`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoint = self.path / "checkpoints" / "last.pt"
        self.figures = self.path / "figures"

    def existing_config(self) -> dict[str, Any] | None:
        """The stored config.json, None if there is none; RunDirError if it cannot be read."""
        if not self.config.exists():
            return None
        value = _read_json(self.config)
        if value is None:
            raise RunDirError(f"{self.config} exists but cannot be read as a run config; choose "
                              f"another output folder or delete this one")
        return value

    def read_summary(self) -> dict[str, Any] | None:
        return _read_json(self.summary)

    def read_metrics(self, *, strict: bool = False) -> list[dict[str, Any]]:
        return read_metrics(self.metrics, strict=strict)

    def check_writable(self) -> None:
        """RunDirError unless the folder exists or can be created, and accepts files.

        Probes by creating (and removing) a temporary file in the nearest existing ancestor,
        so nothing of the run is created before the configuration and data are known good.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output path {self.path} exists and is not a folder; choose a "
                              f"folder path with --out")
        probe_dir = self.path.absolute()
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise RunDirError(f"cannot create the run folder {self.path}: {probe_dir} is a "
                              f"file; choose another folder with --out")
        try:
            with tempfile.TemporaryFile(dir=probe_dir):
                pass
        except OSError as err:
            raise RunDirError(f"cannot write the run folder {self.path}: {probe_dir} is not "
                              f"writable ({err.strerror}); choose another folder with --out"
                              ) from err

    def create(self, config: dict[str, Any]) -> None:
        """Make the folder and write config.json (kept if it exists: a resumed run)."""
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            if not self.config.exists():
                atomic_write_text(self.config, json.dumps(config, indent=2) + "\n")
        except OSError as err:
            raise RunDirError(f"cannot write the run folder {self.path}: {err}; choose another "
                              f"folder with --out") from err

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary, json.dumps(summary, indent=2) + "\n")

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        atomic_torch_save(checkpoint, self.checkpoint)

    def load_checkpoint(self, map_location: torch.device | str = "cpu") -> dict[str, Any]:
        """The last checkpoint; RunDirError naming the file if it is missing or unreadable."""
        if not self.checkpoint.exists():
            raise RunDirError(f"{self.path} has no checkpoint ({self.checkpoint}); pass a run "
                              f"folder written by `bpdl train`")
        try:
            return torch.load(self.checkpoint, map_location=map_location, weights_only=False)
        except Exception as err:  # a damaged file: the user's to resolve
            raise RunDirError(f"cannot read the checkpoint {self.checkpoint}: {err}. Delete the "
                              f"folder or choose another --out.") from err


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's config, evaluation history and summary (None if unfinished), for figures
    and reports: a folder without metrics, or with a damaged metrics file, is a RunDirError."""
    run = RunDir(run_dir)
    if not run.metrics.exists():
        raise RunDirError(f"{run.path} is not a bpdl run directory (no metrics.jsonl); pass "
                          f"folders written by `bpdl train --out`")
    history = run.read_metrics(strict=True)
    return {"path": run.path, "config": _read_json(run.config) or {}, "history": history,
            "summary": run.read_summary()}

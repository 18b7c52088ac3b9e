"""Training metrics: one JSON line per record in ``<run_dir>/metrics.jsonl``.

Each line is written with a single ``write`` and flushed, so a killed process
loses at most the line it was writing. Readers skip such an unterminated last
line unless it is a complete record; a new logger repairs it before appending.
Optionally the numeric values also go to TensorBoard (tag ``"<kind>/<key>"``,
step from the record's ``"step"``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from gndgl_compiler.errors import ArtifactError, GndglError, TrainingError
from gndgl_compiler import fsio

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(key: str, value: Any) -> Any:
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise TypeError(f"metric '{key}' is a tensor of shape {tuple(value.shape)}; log a 0-dim tensor or a number")
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _scalar(f"{key}.{k}", v) for k, v in value.items()}
    raise TypeError(f"metric '{key}' has type {type(value).__name__}; log numbers (or a string such as 'kind')")


def flatten_scalars(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a (nested) record as ``(tag, value)`` pairs, nested keys joined by ``/``.

    ``{"test_acc": 0.9, "partition_acc": {"m0.g0": 0.5}}`` → ``[("test_acc", 0.9),
    ("partition_acc/m0.g0", 0.5)]``. Strings, bools and None are left out.

    Args:
        record: a metric record (after :func:`_scalar`).
        prefix: prepended to every tag (e.g. ``"eval/"``).

    Returns:
        The pairs in record order.
    """
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        if isinstance(value, dict):
            out += flatten_scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", value))
    return out


def _parse_lines(text: str, path: Path) -> tuple[list[dict], int]:
    """Parse JSON lines; return the records and the length of the valid prefix of ``text``."""
    records: list[dict] = []
    pos = 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if last:  # unterminated tail of a killed writer
                    break
                raise ArtifactError(f"{path} line {i + 1} is not a JSON record ({exc}); "
                                    "fix or delete that line") from exc
            records.append(record)
        pos += len(line) + (0 if last else 1)
    return records, pos


class MetricsLogger:
    """Appends metric records to ``run_dir/metrics.jsonl`` (and TensorBoard).

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: ``True`` to require TensorBoard, ``False`` for none, ``None`` to
            use it when ``torch.utils.tensorboard`` and ``tensorboard`` import.
        writer: an object with ``add_scalar(tag, value, global_step)`` and ``close()`` to log the
            scalars to instead (another tracker; ``tensorboard`` is then not consulted).

    Raises:
        GndglError: if ``tensorboard`` is True and TensorBoard is not installed.
        TrainingError: if the metrics file cannot be opened.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool | None = None, writer: Any = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._writer = writer if writer is not None else self._open_tensorboard(tensorboard)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            if self._writer is not None:
                self._writer.close()
            raise TrainingError(f"cannot open {self.path} for appending: {exc.strerror or exc}; "
                                "check the run directory is writable") from exc

    def _open_tensorboard(self, tensorboard: bool | None):
        if tensorboard is False:
            return None
        try:
            import tensorboard as _tb  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            if tensorboard:
                raise GndglError(f"TensorBoard logging was requested but is not available ({exc}); "
                                 "run `pip install tensorboard`") from exc
            return None
        return SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def _repair_tail(self) -> None:
        """Make the file end with a newline: drop an unparsable unterminated tail."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        if text.endswith("\n"):
            return
        _, valid = _parse_lines(text, self.path)
        with open(self.path, "r+b") as f:
            if valid >= len(text):  # complete last record without its newline
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                f.truncate(len(text[:valid].encode("utf-8")))

    def log(self, record: dict) -> None:
        """Append one record as a JSON line and flush it.

        Args:
            record: str keys → numbers, 0-dim tensors (converted with ``float``),
                bools, None or strings (e.g. ``"kind": "train"``); ``"step"`` is the
                global step used by TensorBoard and :func:`truncate_metrics`.

        Raises:
            TypeError: if a value is not a scalar.
            TrainingError: if the logger is closed or the line cannot be written.
        """
        if self._file is None:
            raise TrainingError(f"MetricsLogger for {self.path} is closed; create a new one to log more records")
        clean = {str(k): _scalar(str(k), v) for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        try:
            fsio.current().write(self._file, line, self.path)
            self._file.flush()
        except OSError as exc:
            raise TrainingError(f"cannot write to {self.path}: {exc.strerror or exc}; check free disk space") from exc
        if self._writer is not None:
            self._write_scalars(clean)

    def _write_scalars(self, record: dict) -> None:
        kind = record.get("kind")
        step = record.get("step")
        prefix = f"{kind}/" if kind else ""
        if kind == "train" and isinstance(record.get("partition"), str):
            prefix += f"{record['partition']}/"  # one curve per partition
        rest = {k: v for k, v in record.items() if k not in ("kind", "step", "partition")}
        for tag, value in flatten_scalars(rest, prefix):
            self._writer.add_scalar(tag, value, global_step=step if isinstance(step, int) else None)

    def close(self) -> None:
        """Flush and close the metrics file and the TensorBoard writer (idempotent).

        Raises:
            TrainingError: if buffered records cannot be written (the file is closed anyway).
        """
        f, self._file = self._file, None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if f is not None:
            try:
                f.close()  # closes the descriptor even when the final flush fails
            except OSError as exc:
                raise TrainingError(f"cannot write to {self.path}: {exc.strerror or exc}; "
                                    "check free disk space") from exc

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except TrainingError:
            if exc_type is None:
                raise
            # an error is already on its way (e.g. the disk filled up): report that one, not the failed flush


def _read_text(run_dir: str | os.PathLike) -> tuple[Path, str]:
    path = Path(run_dir) / METRICS_FILE
    try:
        return path, path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise ArtifactError(f"no metrics file {path}; is {run_dir} a run directory of `gndgl train`?") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Read all records of ``run_dir/metrics.jsonl``.

    An unterminated last line that is not a complete record (a killed writer) is
    skipped.

    Args:
        run_dir: the run directory.

    Returns:
        The records in file order.

    Raises:
        ArtifactError: if the file is missing or a line other than the last is broken.
    """
    path, text = _read_text(run_dir)
    return _parse_lines(text, path)[0]


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> int:
    """Drop records whose ``"step"`` is after ``step`` (on resume, so none repeat), and the ``partial``
    records of the last window before a stop (the resumed run continues that window and logs it whole).

    Records without a numeric step are kept. The file is rewritten atomically; call
    this before opening a :class:`MetricsLogger` on the same run directory.

    Args:
        run_dir: the run directory; without a metrics file nothing happens.
        step: the global step of the checkpoint being resumed.

    Returns:
        The number of records dropped.

    Raises:
        ArtifactError: if a line other than the last is broken.
        TrainingError: if the file cannot be rewritten.
    """
    if not (Path(run_dir) / METRICS_FILE).exists():
        return 0
    path, text = _read_text(run_dir)
    records = _parse_lines(text, path)[0]

    def after(r: dict) -> bool:
        s = r.get("step")
        return isinstance(s, (int, float)) and not isinstance(s, bool) and not math.isnan(s) and s > step

    kept = [r for r in records if not after(r) and not r.get("partial")]
    fsio.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


METRICS_CSV = "metrics.csv"


def write_metrics_csv(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/metrics.csv``: every record of ``metrics.jsonl`` as one row.

    Columns are the union of the records' keys in first-seen order; nested values
    (``partition_acc``) become one column per key (``partition_acc/m0.g0``). The file
    is rewritten atomically from ``metrics.jsonl``, which stays the source of truth.

    Args:
        run_dir: the run directory.

    Returns:
        The path of the CSV file.

    Raises:
        ArtifactError: if ``metrics.jsonl`` is missing or damaged.
    """
    import csv
    import io

    rows: list[dict] = []
    columns: dict[str, None] = {}
    for rec in read_metrics(run_dir):
        row = {k: v for k, v in rec.items() if not isinstance(v, dict)}
        row.update(dict(flatten_scalars({k: v for k, v in rec.items() if isinstance(v, dict)})))
        for k in row:
            columns.setdefault(k, None)
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(run_dir) / METRICS_CSV
    fsio.atomic_write_text(path, buf.getvalue())
    return path


def check_finite(acc_loss: dict, names: dict, gstep: int) -> None:
    """Raise before a checkpoint could store weights trained on a non-finite loss."""
    for pid, total in acc_loss.items():
        if not math.isfinite(float(total)):
            raise TrainingError(f"partition {names[pid]} has a non-finite loss around step {gstep}; lower the "
                                "learning rate or check the data. The last good checkpoint is kept.")


def log_records(acc_loss, acc_correct, n, bs, names, epoch, gstep, lr, ips) -> list[dict]:
    """One 'train' record per partition: mean loss and local accuracy since the last log."""
    out = []
    for pid, total in acc_loss.items():
        loss = float(total) / n
        if not math.isfinite(loss):
            raise TrainingError(f"partition {names[pid]} has a non-finite loss ({loss}) around step {gstep}; "
                                "lower the learning rate or check the data. The last good checkpoint is kept.")
        rec = {"kind": "train", "epoch": epoch, "step": gstep, "partition": names[pid], "loss": loss, "lr": lr,
               "images_per_s": ips}
        if pid in acc_correct:
            rec["acc"] = float(acc_correct[pid]) / (n * bs)
        out.append(rec)
    return out

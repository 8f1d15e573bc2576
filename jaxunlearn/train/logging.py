"""Per-step metrics of a run: JSON Lines (resume-consistent) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax


class MetricsLog:
    """Per-step metrics to JSON Lines and, when asked, TensorBoard.

    On resume the JSON Lines file keeps only the lines of steps before the resumed step, so an
    interrupted-and-resumed run leaves the same lines as an uninterrupted one. Non-finite
    values are written as null (JSON has no NaN). Only process 0 writes.

    Args:
      path: the JSON Lines file, or None.
      tensorboard_dir: a TensorBoard log directory, or None.
      start_step: the first step this run will log.
    """

    def __init__(self, path: str | os.PathLike | None, tensorboard_dir: Any, start_step: int):
        leader = jax.process_index() == 0
        self._writer = open_tensorboard(tensorboard_dir) if tensorboard_dir and leader else None
        self._file = None
        if path is None or jax.process_index() != 0:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists() and start_step > 0:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", math.inf) < start_step:
                        kept.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Appends one step's record (flushed, so a crash loses nothing logged)."""
        if self._file is not None:
            clean = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in record.items()
            }
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    self._writer.add_scalar(f"unlearn/{key}", value, step)

    def close(self) -> None:
        """Closes the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _TFWriter:
    """`tf.summary` behind tensorboardX's `add_scalar` / `close` interface."""

    def __init__(self, tf: Any, logdir: str):
        self._tf = tf
        self._writer = tf.summary.create_file_writer(logdir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        with self._writer.as_default():
            self._tf.summary.scalar(tag, value, step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def open_tensorboard(logdir: str | os.PathLike) -> Any:
    """A TensorBoard scalar writer from tensorboardX, else TensorFlow.

    Raises:
      ImportError: neither package is installed (the message says what to install).
    """
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter(os.fspath(logdir))
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return _TFWriter(tf, os.fspath(logdir))
    except ImportError:
        pass
    raise ImportError(
        f"tensorboard_dir={os.fspath(logdir)!r} needs tensorboardX or tensorflow to write "
        "TensorBoard files, and neither is installed: `pip install tensorboardX`, or drop "
        "tensorboard_dir (metrics still go to the JSON Lines log)."
    )

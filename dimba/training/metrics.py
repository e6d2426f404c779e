"""Rank-0 metrics: a console line and tensorboard scalars/text; other ranks get a writer that does nothing."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a") if enabled else None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {f"{prefix}{k}": float(v) for k, v in values.items()}
        if self._tb is not None:
            for k, v in row.items():
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
        self._jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()

"""``metrics.jsonl``: one JSON line per optimizer step (``type='train'``), evaluation, recalibration or error."""
from __future__ import annotations

import json
import os

__all__ = ["MetricsLog"]


class MetricsLog:
    """``OUTPUT/metrics.jsonl`` on the main rank; resuming keeps the lines up to the checkpoint's step."""

    def __init__(self, output: str | None, enabled: bool, resume_step: int | None):
        self.path = os.path.join(output, "metrics.jsonl") if output else None
        self.file = None
        if not (enabled and self.path is not None):
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            # drop what a crashed attempt logged after the checkpoint we resume from
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        os.makedirs(output, exist_ok=True)
        with open(self.path, "w") as f:
            f.writelines(kept)
        self.file = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

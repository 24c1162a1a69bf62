"""Finished measurements, one JSON object per line in DIR, so a killed search resumes where it stopped.

Each record carries its ``key``: a hash of the candidate's canonical recipe, the source model's fingerprint,
the evaluation split's tokens and the measurement settings (``candidate_key``). A change to any of them is a
new key, so a stale result is never reused. Lines are appended and flushed one by one; a line cut short by
a kill is skipped on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def canonical(obj: Any) -> str:
    """One JSON text per value: sorted keys, no spaces (``{a: 1, b: 2}`` and ``{b: 2, a: 1}`` are one recipe)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def candidate_key(steps: list[dict], **context: Any) -> str:
    """Hash of the recipe's steps plus what the measurement depends on (source, split, objective, ...)."""
    return hashlib.sha256(canonical({"steps": steps, **context}).encode()).hexdigest()[:24]


class ResultCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.skipped_lines = 0
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short
                    self.skipped_lines += 1
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, record: dict) -> None:
        """Store ``record`` (which has a ``key``) and append it to the file at once."""
        self.records[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_newline:  # after a truncated line: start a fresh one
                f.write("\n")
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self.records)

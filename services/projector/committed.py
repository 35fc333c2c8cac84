"""What readers may know of the committed checkpoints without a DuckDB transaction of their own.

A seqlock: `commits` is odd while a fold is committing (the fold thread is its one
writer), and `checkpoints` are updated on that thread right after the commit. A read that
finds `commits` even and unchanged after it ran saw exactly those checkpoints
(services/query/cursors.py `read_consistent`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["Committed"]


class Committed:
    def __init__(self) -> None:
        self.commits = 0
        self._by_schema: dict[str, dict[str, int]] = {}

    def start(self, schema: str, checkpoints: dict[str, int]) -> None:
        """A generation's checkpoints as the file holds them when its folding starts."""
        self._by_schema[schema] = dict(checkpoints)

    @contextmanager
    def committing(self) -> Iterator[None]:
        self.commits += 1
        try:
            yield
        finally:
            self.commits += 1

    def moved(self, schema: str, stream: str, seq: int) -> None:
        """Inside `committing`, after the commit: `schema` has folded `stream` to `seq`."""
        mine = self._by_schema.setdefault(schema, {})
        mine[stream] = max(mine.get(stream, 0), seq)

    def view(self, schemas: Sequence[str]) -> tuple[int, dict[str, int]] | None:
        """(commits, lowest committed checkpoint per stream of `schemas`), or None while a
        fold is committing."""
        seen = self.commits
        if seen % 2:
            return None
        out: dict[str, int] = {}
        try:
            for schema in schemas:
                for stream, seq in tuple(self._by_schema.get(schema, {}).items()):
                    out[stream] = min(out.get(stream, seq), seq)
        except RuntimeError:  # the fold thread added a stream meanwhile: it is committing
            return None
        return seen, out

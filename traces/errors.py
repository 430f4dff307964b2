"""Errors raised by the trace loaders and the named-trace registry."""

from __future__ import annotations

from pathlib import Path


class TraceFormatError(ValueError):
    """A trace file is malformed; the message names the file, the line (1-based) and the problem.

    :param path: the file being read.
    :param line: 1-based line number of the offending row, or ``None`` for a whole-file problem.
    :param problem: what is wrong, in words.
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {problem}")


class TraceDataNotFoundError(FileNotFoundError):
    """A named trace's data file is not where the data directory says; the message says how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

"""Exception types and the exit codes the CLI maps them to.

0 success; 1 the checkpoints differ or problems were found (a result, not a failure); 2 bad input, usage
or I/O; 3 a bug. CI scripts rely on 1 never meaning a crash.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_DIFFER = 1
EXIT_BAD_INPUT = 2
EXIT_BUG = 3


class OssconvError(Exception):
    """Bad input: names the file (when there is one) and the problem, in one line."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointError(OssconvError):
    """A checkpoint folder or file is missing, unreadable, unsafe or inconsistent."""


class OutputExistsError(OssconvError):
    """The output folder exists and --overwrite was not given."""

    def __init__(self, path: str | Path):
        super().__init__("output already exists; pass --overwrite to replace it", path)

"""ossconv: convert, check and move gpt-oss checkpoints, one tensor at a time, with exact MXFP4 codecs.

The library offers what the command line does, as functions that return data:

    >>> import ossconv
    >>> ossconv.unpack("gpt-oss-20b/original", "gpt-oss-20b-bf16", dtype="bf16")  # doctest: +SKIP
    >>> ossconv.inspect_checkpoint("gpt-oss-20b-bf16").problems  # doctest: +SKIP
    []

Names are imported on first use, so ``import ossconv`` (and ``ossconv --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Checkpoint": "ossconv.checkpoint",
    "open_checkpoint": "ossconv.checkpoint",
    "convert": "ossconv.convert.layout",
    "pack": "ossconv.convert.precision",
    "unpack": "ossconv.convert.precision",
    "reshard": "ossconv.convert.reshard",
    "merge": "ossconv.expert_parallel",
    "ConversionResult": "ossconv.convert.target",
    "Target": "ossconv.convert.target",
    "WriteOptions": "ossconv.convert.target",
    "ExpertForm": "ossconv.convert.target",
    "plan": "ossconv.convert.plan",
    "execute": "ossconv.convert.execute",
    "CheckpointError": "ossconv.errors",
    "OssconvError": "ossconv.errors",
    "ModelConfig": "ossconv.formats.config",
    "Precision": "ossconv.formats.precision",
    "decode": "ossconv.formats.mxfp4",
    "encode": "ossconv.formats.mxfp4",
    "download": "ossconv.hub",
    "InspectReport": "ossconv.inspection",
    "inspect_checkpoint": "ossconv.inspection",
    "Problem": "ossconv.problems",
    "VerifyReport": "ossconv.verify.lockstep",
    "verify": "ossconv.verify.lockstep",
    "CheckpointWriter": "ossconv.writer",
}
__all__ = sorted(_EXPORTS)

# The subpackages ossconv.convert and ossconv.verify would otherwise bind the names ``convert`` and ``verify``
# to themselves the first time any of their modules is imported, hiding the functions; loading them now (they
# are empty) and unbinding leaves the names to __getattr__ below for good.
for _subpackage in ("convert", "verify"):
    importlib.import_module(f"ossconv.{_subpackage}")
    del globals()[_subpackage]
del _subpackage


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ossconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value

"""ossconv: convert, check and move gpt-oss checkpoints, one tensor at a time, with exact MXFP4 codecs.

The library offers what the command line does, as functions that return data:

    >>> import ossconv
    >>> ossconv.unpack("gpt-oss-20b/original", "gpt-oss-20b-bf16", dtype="bf16")  # doctest: +SKIP
    >>> ossconv.inspect_checkpoint("gpt-oss-20b-bf16").problems  # doctest: +SKIP
    []
"""

__version__ = "0.1.0"

from ossconv.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from ossconv.convert.layout import convert  # noqa: E402
from ossconv.convert.precision import pack, unpack  # noqa: E402
from ossconv.convert.reshard import merge, reshard  # noqa: E402
from ossconv.convert.stream import ConversionResult  # noqa: E402
from ossconv.errors import CheckpointError, OssconvError  # noqa: E402
from ossconv.formats.config import ModelConfig  # noqa: E402
from ossconv.formats.mxfp4 import decode, encode  # noqa: E402
from ossconv.hub import download  # noqa: E402
from ossconv.inspection import InspectReport, inspect_checkpoint  # noqa: E402
from ossconv.verify.lockstep import VerifyReport, verify  # noqa: E402
from ossconv.writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "ConversionResult",
    "InspectReport",
    "ModelConfig",
    "convert",
    "OssconvError",
    "decode",
    "download",
    "merge",
    "reshard",
    "encode",
    "inspect_checkpoint",
    "open_checkpoint",
    "pack",
    "unpack",
    "verify",
    "VerifyReport",
]

"""llama.cpp's own GGUF converter, the oracle for ``convert --to gguf``: its source is in the llama-cpp-python
sdist on PyPI (``vendor/llama.cpp``: ``convert_hf_to_gguf.py``, ``conversion/``, its own ``gguf-py``). Fetched
once with pip into a cache folder, only those files extracted; run in a subprocess so that its gguf-py never
meets ours.

As a script: ``python tests/llama_cpp.py LLAMA_CPP_DIR MODEL_DIR --outfile OUT.gguf`` runs the converter with
the vocabulary step skipped (it needs a real tokenizer; ``KEEP_VOCAB=1`` keeps it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
CACHE = Path(os.environ.get("OSSCONV_TEST_CACHE", Path.home() / ".cache" / "ossconv-tests"))
WANTED = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


def converter_folder() -> Path:
    """``vendor/llama.cpp`` of the sdist, downloaded and extracted on first use."""
    folder = CACHE / SDIST / "vendor" / "llama.cpp"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"{SDIST}.tar.gz"
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True, capture_output=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.removeprefix(SDIST + "/").startswith(WANTED)]
        tar.extractall(CACHE, members=members, filter="data")
    return folder


def convert(model: Path, out: Path, keep_vocab: bool = False, extra: tuple[str, ...] = ()) -> None:
    """Run llama.cpp's converter on an HF checkpoint folder (``extra``: more of its options)."""
    env = dict(os.environ, KEEP_VOCAB="1" if keep_vocab else "0")
    command = [sys.executable, __file__, str(converter_folder()), str(model), "--outfile", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise AssertionError(f"llama.cpp's converter failed:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    llama = Path(sys.argv[1])
    sys.path[:0] = [str(llama), str(llama / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.gpt_oss import GptOssModel

    if os.environ.get("KEEP_VOCAB") != "1":
        GptOssModel.set_vocab = lambda self: None
    sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
    convert_hf_to_gguf.main()

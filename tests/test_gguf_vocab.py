"""gguf_vocab.add_tokenizer against llama.cpp's real converter.

Each case writes a small byte-level BPE tokenizer (with gpt-oss's Harmony special tokens as added special tokens)
next to a synthetic HF gpt-oss checkpoint, runs llama.cpp's convert_hf_to_gguf.py on it in a subprocess (real
set_vocab; only an unknown pre-tokenizer hash is answered with "gpt-4o", and the hash llama.cpp computed is
recorded), then writes a GGUF holding llama.cpp's non-tokenizer KVs plus add_tokenizer(..., pre="gpt-4o") and
compares every KV, serialized bytes and order included.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import gguf
import llama_cpp
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ossconv import gguf_vocab

VOCAB_SIZE = 400
BPE_SIZE = 330
# gpt-oss's layout: specials after the BPE ranks, gaps filled with reserved tokens.
HARMONY = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|return|>",
    "<|constrain|>",
    "<|reserved_2|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|reserved_3|>",
    "<|call|>",
]
TEMPLATE = (
    "{%- for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|start|>assistant{%- endif %}"
)
TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world, hello there! 3.14 and 42; "
    "def f(x): return x * 2\n  indented\tline — naïve café, 日本語 テキスト 🦙"
)

RUNNER = r"""
import sys
from pathlib import Path
llama, hash_out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(llama)); sys.path.insert(1, str(llama / "gguf-py"))
import convert_hf_to_gguf
from conversion import base
real_sha256, hashed = base.sha256, []
base.sha256 = lambda data: (hashed.append(data), real_sha256(data))[1]
real_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        res = real_pre(self, tokenizer)
    except NotImplementedError:  # a tiny tokenizer's hash is unknown; gpt-oss's o200k is "gpt-4o"
        res = "gpt-4o"
    hash_out.write_text(real_sha256(hashed[-1]).hexdigest())
    return res
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
convert_hf_to_gguf.main()
"""


def make_tokenizer(extra: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY])
    if extra:  # USER_DEFINED (normalized or not, with the SentencePiece space) and a special not looking special
        tok.add_tokens([AddedToken("hello world", normalized=True), AddedToken("\u2581tool", normalized=False)])
        tok.add_special_tokens([AddedToken("[TOOL]", special=True, normalized=False)])
    return tok


CASES = {
    # gpt-oss's own shape: specials named in tokenizer_config, template in chat_template.jinja
    "config-specials": dict(tc="specials", template="jinja"),
    # no special tokens in tokenizer_config: ids come from config.json
    "config-json-ids": dict(tc="plain", template="jinja"),
    # no tokenizer_config.json at all: SpecialVocab then also skips chat_template.jinja
    "no-tokenizer-config": dict(tc=None, template="jinja"),
    "tc-template-wins": dict(tc="specials", template="both"),
    "chat-template-json": dict(tc="specials", template="json"),
    # add_bos_token changes AutoTokenizer's encoding (the hash); "<unk>" is added by AutoTokenizer; extra tokens
    "add-bos-unk-extra": dict(tc="bos-unk", template="jinja", extra=True),
    # pre-4.45 "a b" merges and a normalizer that SpecialVocab turns into normalizer.* flags
    "legacy-merges-normalizer": dict(tc="specials", template="jinja", legacy=True),
}


@pytest.fixture(scope="session")
def llama() -> pathlib.Path:
    return llama_cpp.converter_folder()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from ossconv.synthetic import build, tiny_config

    return build(tmp_path_factory.mktemp("ckpt") / "hf", tiny_config(vocab_size=VOCAB_SIZE), layout="hf")


def make_folder(
    base: pathlib.Path,
    checkpoint: pathlib.Path,
    tc: str | None,
    template: str,
    extra: bool = False,
    legacy: bool = False,
) -> pathlib.Path:
    folder = base / "model"
    shutil.copytree(checkpoint, folder)
    tok = make_tokenizer(extra)
    tok.save(str(folder / "tokenizer.json"))
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    if extra:  # a merge with spaces inside its parts (U+0120 in the GGUF), its tokens at the top of the vocab
        tj["model"]["vocab"].update({"x y": VOCAB_SIZE - 3, "z": VOCAB_SIZE - 2, "x yz": VOCAB_SIZE - 1})
        tj["model"]["merges"].append(["x y", "z"])
    if legacy:
        tj["model"]["merges"] = [" ".join(pair) for pair in tj["model"]["merges"]]
        tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "StripAccents"}, {"type": "Lowercase"}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=ids["<|return|>"], pad_token_id=ids["<|endoftext|>"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tc is not None:
        config_tc: dict = {"model_max_length": 1_000_000, "tokenizer_class": "PreTrainedTokenizerFast"}
        if tc in ("specials", "bos-unk"):
            config_tc.update(bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>")
            config_tc["added_tokens_decoder"] = {
                str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for t in tj["added_tokens"]
            }
        if tc == "bos-unk":
            config_tc.update(add_bos_token=True, unk_token="<unk>")
        if template == "both":
            config_tc["chat_template"] = "{{ 'from tokenizer_config' }}"
        (folder / "tokenizer_config.json").write_text(json.dumps(config_tc, indent=2))
    if template in ("jinja", "both"):
        (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    if template == "json":
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE + "{# json #}"}))
    return folder


def kvs(path: pathlib.Path) -> list[tuple[str, bytes]]:
    """Every KV as (key, its exact serialized bytes), in file order."""
    reader = gguf.GGUFReader(path)
    return [
        (f.name, b"".join(p.tobytes() for p in f.parts))
        for f in reader.fields.values()
        if not f.name.startswith("GGUF.")
    ]


def write_ours(reference: pathlib.Path, folder: pathlib.Path, out: pathlib.Path) -> None:
    reader = gguf.GGUFReader(reference)
    writer = gguf.GGUFWriter(out, "gpt-oss")  # adds general.architecture itself
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "tokenizer.")) or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    hf_config = json.loads((folder / "config.json").read_text())
    gguf_vocab.add_tokenizer(writer, folder, hf_config["vocab_size"], hf_config, pre="gpt-4o")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.mark.parametrize("case", CASES)
def test_matches_llama_cpp(case: str, llama: pathlib.Path, checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = make_folder(tmp_path, checkpoint, **CASES[case])
    runner, hash_file, reference = tmp_path / "runner.py", tmp_path / "chkhsh", tmp_path / "llama.gguf"
    runner.write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(runner), str(llama), str(hash_file), str(folder), "--outfile", str(reference)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ours = tmp_path / "ours.gguf"
    write_ours(reference, folder, ours)

    expected, got = kvs(reference), kvs(ours)
    expected_tok = [(k, v) for k, v in expected if k.startswith("tokenizer.")]
    got_tok = [(k, v) for k, v in got if k.startswith("tokenizer.")]
    assert [k for k, _ in got_tok] == [k for k, _ in expected_tok]
    for (key, want), (_, have) in zip(expected_tok, got_tok, strict=True):
        assert have == want, key
    assert got == expected  # the whole KV section, order included

    tc_file = folder / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    assert gguf_vocab.chkhsh(gguf_vocab.load_tokenizer(folder, tc)) == hash_file.read_text()


def test_unknown_pre_tokenizer_is_refused(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = make_folder(tmp_path, checkpoint, tc="specials", template="jinja")
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "gpt-oss")
    before = dict(writer.kv_data[0])
    with pytest.raises(ValueError, match=r"tokenizer\.json: unknown pre-tokenizer \(hash [0-9a-f]{64}\)"):
        gguf_vocab.add_tokenizer(writer, folder, VOCAB_SIZE, {})
    assert writer.kv_data[0] == before


def test_chktxt_is_llama_cpps(llama: pathlib.Path) -> None:
    import ast

    tree = ast.parse((llama / "conversion" / "base.py").read_text(encoding="utf-8"))
    found = [
        n.value.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "chktxt"
    ]
    assert found and found[0] == gguf_vocab.CHKTXT


def test_whole_file_with_a_tokenizer_matches_llama_cpp(llama: pathlib.Path, checkpoint: pathlib.Path, tmp_path) -> None:
    from ossconv.convert.to_gguf import convert_to_gguf

    folder = make_folder(tmp_path, checkpoint, **CASES["config-specials"])
    runner, reference = tmp_path / "runner.py", tmp_path / "llama.gguf"
    runner.write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        str(runner),
        str(llama),
        str(tmp_path / "hash"),
        str(folder),
        "--outfile",
        str(reference),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = convert_to_gguf(folder, tmp_path / "ours.gguf", tokenizer_pre="gpt-4o")
    assert (tmp_path / "ours.gguf").read_bytes() == reference.read_bytes()
    assert result.details["tokenizer"] == str(folder) and "note" not in result.details

"""The tokenizer KVs of a gpt-oss GGUF, byte for byte as llama.cpp's converter writes them (vendored in
llama-cpp-python 0.3.36, run with transformers 5). Its GptOssModel.set_vocab (_set_vocab_gpt2) reads transformers'
AutoTokenizer, which ossconv does not depend on: this rebuilds AutoTokenizer's view with ``tokenizers`` and repeats
gguf-py SpecialVocab's rules on the raw JSON. What it does not reproduce (Template/Roberta post-processors, non-BPE
models) raises ValueError rather than write something different.
"""

from __future__ import annotations

import json
import pathlib
from hashlib import sha256
from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer

CHKTXT = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"  # noqa: E501 (copied verbatim from get_vocab_base_pre)
# chkhsh -> tokenizer.ggml.pre, from get_vocab_base_pre; only the o200k (gpt-4o, gpt-oss) entry is kept.
KNOWN_PRE = {"ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o"}
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
ID_KEYS = {t: getattr(gguf.Keys.Tokenizer, f"{t.upper()}_ID") for t in ("bos", "eos", "unk", "sep", "pad", "mask")}
ADD_KEYS = {t: getattr(gguf.Keys.Tokenizer, f"ADD_{t.upper()}") for t in ("bos", "eos", "sep")}  # no cls id KV
# Written by the vendored gguf-py (in this order), missing from gguf 0.19.0's Keys.
NORMALIZER_KEYS = ("tokenizer.ggml.normalizer.lowercase", "tokenizer.ggml.normalizer.strip_accents")


def _json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _content(entry: Any) -> str | None:
    """A special token as tokenizer_config spells it: a string or an AddedToken dict."""
    value = entry.get("content") if isinstance(entry, dict) else entry
    return value if isinstance(value, str) else None


def load_tokenizer(folder: pathlib.Path, tc: dict) -> Tokenizer:
    """tokenizer.json plus the tokens AutoTokenizer (transformers 5, TokenizersBackend) adds on loading: entries of
    tokenizer_config's added_tokens_decoder that differ from tokenizer.json's, and named special tokens that are not
    added tokens yet (which makes them added and special, hence CONTROL in llama.cpp)."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    named = dict(tc)
    if "added_tokens_decoder" not in tc:  # transformers reads special_tokens_map.json only then, and it wins
        named.update(_json(folder / "special_tokens_map.json") or {})
    have = tok.get_added_tokens_decoder().values()
    new = [
        AddedToken(**{k: v for k, v in d.items() if k != "__type"})
        for _, d in sorted((tc.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))
    ]
    new = [t for t in new if repr(t) not in {repr(h) for h in have}]
    extra = named.get("extra_special_tokens") or named.get("additional_special_tokens") or []
    known = {t.content for t in have} | {t.content for t in new}
    for entry in [named.get(f"{typ}_token") for typ in SPECIAL_TYPES] + list(
        extra.values() if isinstance(extra, dict) else extra
    ):
        if (content := _content(entry)) is not None and content not in known:
            new.append(AddedToken(content, special=True))
            known.add(content)
    tok.add_tokens(new)
    return tok


def chkhsh(tok: Tokenizer) -> str:
    """sha256 of str(AutoTokenizer.encode(CHKTXT)). encode adds special tokens by default, so tokenizer.json's
    post-processor applies; transformers 5 drops tokenizer_config's add_bos/eos_token when tokenizer.json exists."""
    return sha256(str(tok.encode(CHKTXT, add_special_tokens=True).ids).encode()).hexdigest()


def _looks_special(token: str) -> bool:
    """does_token_look_special: added tokens some models forget to mark special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or any(
        token.startswith(a) and token.endswith(b) for a, b in (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))
    )


def vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """get_vocab_base: [PAD{i}] (UNUSED) for missing ids; added tokens are CONTROL if special or special-looking, else
    USER_DEFINED, after a non-normalized one is round-tripped (decode keeps special tokens; no clean-up for BPE)."""
    ids = tok.get_vocab(with_added_tokens=True)
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(ids.values())}, but vocab_size is {vocab_size}")
    reverse = {i: t for t, i in ids.items()}
    decoder = tok.get_added_tokens_decoder()
    added = {t.content for t in decoder.values()}
    out: list[tuple[str, int]] = []
    for i in range(vocab_size):
        if i not in reverse:
            out.append((f"[PAD{i}]", gguf.TokenType.UNUSED))
        elif (token := reverse[i]) not in added:
            out.append((token, gguf.TokenType.NORMAL))
        else:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if decoder[i].special or _looks_special(token):
                out.append((token, gguf.TokenType.CONTROL))
            else:
                out.append((token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED))
    return [t for t, _ in out], [k for _, k in out]


def merges(tj: dict, folder: pathlib.Path) -> list[str]:
    """SpecialVocab's merges: tokenizer.json strings as they are, or pairs joined by a space with spaces inside a
    part written as U+0120; merges.txt only when tokenizer.json has none."""
    found = tj.get("model", {}).get("merges")
    if isinstance(found, list) and found:
        if isinstance(found[0], str):
            return found
        if isinstance(found[0], list) and len(found[0]) == 2 and isinstance(found[0][0], str):
            return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in found]
        raise ValueError(f"{folder / 'tokenizer.json'}: unknown tokenizer merges format")
    path = folder / "merges.txt"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    lines = lines[1:] if lines and lines[0].strip().startswith("#") else lines
    return [" ".join(p) for p in (line.split(None, 3) for line in lines if line.strip()) if len(p) == 2]


def _normalizer(node: dict) -> dict[str, bool]:
    """SpecialVocab._parse_normalizer: Lowercase/StripAccents anywhere in the normalizer become flags."""
    kind, flags = node.get("type"), {}
    if kind in ("Lowercase", "StripAccents"):
        flags[NORMALIZER_KEYS[kind == "StripAccents"]] = True
    elif kind == "BertNormalizer":
        flags = {k: node[n] for k, n in zip(NORMALIZER_KEYS, ("lowercase", "strip_accents"), strict=True) if n in node}
    for child in node.get("normalizers", []) if kind == "Sequence" else []:
        flags.update(_normalizer(child))
    return flags


def special_vocab(
    folder: pathlib.Path, tj: dict, tc: dict | None, hf_config: dict
) -> tuple[list[str], dict[str, int], dict[str, bool], Any, dict[str, bool]]:
    """SpecialVocab(folder, load_merges=True): (merges, ids, add_* flags, chat template, normalizer flags). Ids:
    tokenizer_config's *_token found in tokenizer.json's added_tokens, then config.json's *_token_id, first wins.
    Without a tokenizer_config it reads neither those names nor any chat template, chat_template.jinja included."""
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    template: Any = None
    wanted: list[tuple[str, Any]] = []  # (type, id) in the order SpecialVocab tries them
    post = tj.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        if proc.get("type") in ("TemplateProcessing", "RobertaProcessing"):
            raise ValueError(f"{folder / 'tokenizer.json'}: {proc['type']} post-processor is not reproduced")
        if proc.get("type") == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
    if tc:
        tc = dict(tc)
        tc.update(
            {
                f"{t}_token": tc[f"{f}_token"]
                for t, f in (("bos", "cls"), ("eos", "sep"))
                if not tc.get(f"{t}_token") and tc.get(f"{f}_token")
            }
        )  # cls stands in for bos, sep for eos
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
            if extra := list((folder / "additional_chat_templates").glob("*.jinja")):
                template = [{"name": "default", "template": template}]
                template += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif (folder / "chat_template.json").is_file():
            template = _json(folder / "chat_template.json").get("chat_template")
        template = found if isinstance(found := tc.get("chat_template", template), (str, list)) else None
        for typ in SPECIAL_TYPES:
            if isinstance(tc.get(f"add_{typ}_token"), bool):
                add.setdefault(typ, tc[f"add_{typ}_token"])
            if (content := _content(tc.get(f"{typ}_token"))) is not None:
                atoks = tj.get("added_tokens", [])
                wanted.append((typ, next((t.get("id") for t in atoks if t.get("content") == content), None)))
    for typ in SPECIAL_TYPES:
        tid = hf_config.get(f"{typ}_token_id")
        wanted.append((typ, tid if tid is not None else (hf_config.get("text_config") or {}).get(f"{typ}_token_id")))
    for typ, tid in wanted:  # _set_special_token: ints only, the first one wins
        if isinstance(tid, int):
            if tid < 0:
                raise ValueError(f"invalid value for special token type {typ}: {tid}")
            ids.setdefault(typ, tid)
    return merges(tj, folder), ids, add, template, _normalizer(tj.get("normalizer") or {})


def add_tokenizer(
    writer: gguf.GGUFWriter, folder: pathlib.Path, vocab_size: int, hf_config: dict, pre: str | None = None
) -> None:
    """Add the tokenizer.* KVs of llama.cpp's _set_vocab_gpt2, SpecialVocab's included, in their order. ``pre``
    replaces the hash lookup (test tokenizers have hashes llama.cpp does not know). Everything is computed before
    the first KV is added, so a refusal leaves the writer untouched."""
    folder = pathlib.Path(folder)
    tj, tc = _json(folder / "tokenizer.json"), _json(folder / "tokenizer_config.json")
    tok = load_tokenizer(folder, tc or {})
    if type(tok.model).__name__ != "BPE":
        raise ValueError(f"{folder / 'tokenizer.json'}: {type(tok.model).__name__} model, expected BPE")
    if pre is None:
        if (pre := KNOWN_PRE.get(digest := chkhsh(tok))) is None:
            raise ValueError(
                f"{folder / 'tokenizer.json'}: unknown pre-tokenizer (hash {digest}); llama.cpp would refuse it too"
            )
    tokens, types = vocab(tok, vocab_size)
    found, ids, add, template, flags = special_vocab(folder, tj, tc, hf_config)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if found:
        writer.add_token_merges(found)
    for keys, values, put in ((ID_KEYS, ids, writer.add_uint32), (ADD_KEYS, add, writer.add_bool)):
        for typ in (t for t in values if t in keys):  # SpecialVocab skips types the writer has no method for
            put(keys[typ], values[typ])
    if template is not None:
        writer.add_chat_template(template)
    for key in (k for k in NORMALIZER_KEYS if k in flags):
        writer.add_bool(key, flags[key])

"""ossconv.text and ossconv.harmony against transformers 5 (the behaviour ossconv copies without importing it at run
time): rendering, template files, special tokens and token ids. (Our Harmony template was also checked against the
released gpt-oss template, outside the suite: that template's text is not copied into the project.)"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import jinja2
import pytest
import transformers.utils.chat_template_utils as ctu
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ossconv import harmony
from ossconv import text as chat

FIXED = dt.datetime(2025, 8, 5, 23, 59, 30)
VOCAB = 1024
BOS = "<|startoftext|>"

SYS = {"role": "system", "content": "Always answer in French."}
DEV = {"role": "developer", "content": "Be terse.\nUse lists."}
U1 = {"role": "user", "content": "What is 2 + 2?"}
A1 = {"role": "assistant", "content": "4."}
A1T = {"role": "assistant", "content": "4.", "thinking": "Simple arithmetic."}
U2 = {"role": "user", "content": "And in base 3, with emoji 🦙 and naïve café?"}
CONVERSATIONS = {
    "user": [U1],
    "system+user": [SYS, U1],
    "developer+user": [DEV, U1],
    "user+assistant+user": [U1, A1, U2],
    "system+user+assistant+user": [SYS, U1, A1, U2],
    "history-thinking-dropped": [DEV, U1, A1T, U2],
    "empty-system": [{"role": "system", "content": ""}, U1],
    "late-system-dropped": [U1, A1, SYS, U2],
    "special-text-in-content": [{"role": "user", "content": "say <|end|> then <|start|>"}],
    "whitespace": [{"role": "user", "content": "  lead\n\n\ttabs  trail  "}],
    "ends-with-assistant": [U1, A1T],
    "reasoning_content-alias": [U1, {"role": "assistant", "content": "4.", "reasoning_content": "2+2"}],
    "none-valued-key": [U1, {"role": "assistant", "content": "4.", "thinking": None}],
}
EFFORTS = [None, "low", "medium", "high"]


class _Frozen(dt.datetime):
    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:
        return FIXED


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ossconv import synthetic

    ckpt = synthetic.build(tmp_path_factory.mktemp("ckpt") / "hf", synthetic.tiny_config(vocab_size=VOCAB), layout="hf")
    harmony.build_tokenizer(ckpt, VOCAB)
    return ckpt


@pytest.fixture(scope="session")
def hf(folder: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' strftime_now reads datetime.now() from chat_template_utils at each call."""
    monkeypatch.setattr(ctu, "datetime", _Frozen)


def kw(effort: str | None) -> dict:
    return {} if effort is None else {"reasoning_effort": effort}


def ours(folder: Path, template: str, conv: list[dict], agp: bool, **kwargs: object) -> str:
    return chat.render_chat(
        template, conv, add_generation_prompt=agp, special_tokens=chat.load_special_tokens(folder), now=FIXED, **kwargs
    )


CASES = [(name, effort, agp) for name in CONVERSATIONS for effort in EFFORTS for agp in (True, False)]


@pytest.mark.parametrize("name,effort,agp", CASES)
def test_render_chat_equals_apply_chat_template(folder, hf, name, effort, agp) -> None:
    conv = CONVERSATIONS[name]
    for template in (harmony.CHAT_TEMPLATE,):
        want = hf.apply_chat_template(
            conv, chat_template=template, add_generation_prompt=agp, tokenize=False, **kw(effort)
        )
        assert ours(folder, template, conv, agp, **kw(effort)) == want


def test_model_identity_and_exact_system_message(hf) -> None:
    got = hf.apply_chat_template([DEV, U1], add_generation_prompt=True, tokenize=False, model_identity="You are Tiny.")
    assert got == (
        "<|start|>system<|message|>You are Tiny.\nKnowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\n"
        "Reasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|><|start|>developer<|message|># Instructions\n\nBe terse.\nUse lists.\n\n<|end|>"
        "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    )


def test_date_is_todays_without_now(folder, monkeypatch) -> None:
    monkeypatch.setattr(chat, "datetime", _Frozen)
    text = chat.render_chat(harmony.CHAT_TEMPLATE, [U1])
    assert "Current date: 2025-08-05\n" in text


@pytest.mark.parametrize("name,effort", [(n, e) for n in CONVERSATIONS for e in ("low", None)])
def test_chat_ids_equal_apply_chat_template_tokenize(folder, hf, name, effort) -> None:
    conv = CONVERSATIONS[name]
    text = ours(folder, harmony.CHAT_TEMPLATE, conv, True, **kw(effort))
    want = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False, **kw(effort))
    assert chat.encode(chat.find_tokenizer(folder), text, add_special_tokens=False) == want
    assert want[0] == harmony.special_token_ids(VOCAB)["<|start|>"]


TEXTS = [
    "Hello world",
    "",
    "  spaces   and\n\nnewlines\t",
    "naïve café 日本語 🦙 3.14159 2024-06-28",
    "<|start|>user<|message|>hi<|end|>",
    "I've been 'told he's there",
    "x" * 300,
]


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_ids(folder, hf, text) -> None:
    path = chat.find_tokenizer(folder)
    assert chat.encode(path, text, add_special_tokens=True) == hf(text)["input_ids"] == hf.encode(text)
    assert chat.encode(path, text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_add_special_tokens_matters_for_a_bos_model(folder, tmp_path) -> None:
    """A tokenizer whose post-processor adds BOS: --prompt (tokenizer(text)) gets it, a chat does not."""
    bos = tmp_path / "bos"
    shutil.copytree(folder, bos)
    tok = Tokenizer.from_file(str(bos / "tokenizer.json"))
    bos_id = tok.token_to_id("<|startoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", special_tokens=[(BOS, bos_id)])
    tok.save(str(bos / "tokenizer.json"))
    (bos / "chat_template.jinja").write_text("{{ bos_token }}" + harmony.CHAT_TEMPLATE, encoding="utf-8")
    hf_bos = AutoTokenizer.from_pretrained(str(bos))
    path = chat.find_tokenizer(bos)
    plain = chat.encode(path, "Hello", add_special_tokens=True)
    assert plain == hf_bos("Hello")["input_ids"] and plain[0] == hf_bos.bos_token_id
    text = ours(bos, chat.load_chat_template(bos), [U1], True)
    ids = hf_bos.apply_chat_template([U1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.encode(path, text, add_special_tokens=False) == ids and ids.count(hf_bos.bos_token_id) == 1


BAD = {
    "syntax": ("{% if messages %}never closed", "syntax error on line 1"),
    "raise_exception": ('{{ raise_exception("no tools here") }}', "no tools here"),
    "undefined": ("{{ nothing.field }}", "'nothing' is undefined"),
    "type": ('{{ "a" + 1 }}', "TypeError"),
    "sandbox": ("{{ messages.__class__ }}{% set ns = namespace(_x=1) %}", "namespace"),
    "index": ("{{ messages[5].content }}", "no element 5"),
}


@pytest.mark.parametrize("case", BAD)
def test_template_errors_are_value_errors(folder, hf, case) -> None:
    template, words = BAD[case]
    with pytest.raises(ValueError, match=words):
        ours(folder, template, [U1], True)
    with pytest.raises((jinja2.TemplateError, TypeError)):  # transformers fails on it too, unwrapped
        hf.apply_chat_template([U1], chat_template=template, tokenize=False)


def test_template_raises_become_value_errors(folder) -> None:
    tagged = [U1, {"role": "assistant", "content": "<|channel|>final<|message|>4"}]
    for template in (harmony.CHAT_TEMPLATE,):
        with pytest.raises(ValueError, match="chat template error"):
            ours(folder, template, tagged, True)
    with pytest.raises(ValueError, match="without tools"):
        ours(folder, harmony.CHAT_TEMPLATE, [U1], True, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="low, medium or high"):
        ours(folder, harmony.CHAT_TEMPLATE, [U1], True, reasoning_effort="max")
    with pytest.raises(ValueError, match="non-empty"):
        ours(folder, harmony.CHAT_TEMPLATE, [], True)


def test_generation_tag_and_loopcontrols(folder, hf) -> None:
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% break %}{% endfor %}"
    template += "{{ bos_token }}"
    conv = [U1, U2]
    assert ours(folder, template, conv, False) == hf.apply_chat_template(conv, chat_template=template, tokenize=False)
    template = '{{ {"a": "é<"} | tojson }}{{ dict(x=1) | tojson(indent=2) }}{% set ns = namespace(n=1) %}{{ ns.n }}'
    assert ours(folder, template, conv, False) == hf.apply_chat_template(conv, chat_template=template, tokenize=False)


@pytest.mark.parametrize("layout", ["jinja+config", "config", "config-list", "json-only", "jinja+json", "none"])
def test_template_file_precedence(folder, tmp_path, layout) -> None:
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(folder / "tokenizer.json", model)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if "config" in layout:
        config["chat_template"] = (
            "CONFIG"
            if layout != "config-list"
            else [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
        )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    if "jinja" in layout:
        (model / "chat_template.jinja").write_text("JINJA")
    if "json" in layout:
        (model / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    expected = AutoTokenizer.from_pretrained(str(model)).chat_template
    expected = expected.get("default") if isinstance(expected, dict) else expected
    if layout == "json-only":  # AutoTokenizer ignores chat_template.json; ours falls back to it
        assert expected is None and chat.load_chat_template(model) == "JSON"
    else:
        assert chat.load_chat_template(model) == expected


def test_find_tokenizer_layouts(tmp_path) -> None:
    from ossconv import synthetic

    repo = tmp_path / "gpt-oss-tiny"
    synthetic.build(repo / "original", synthetic.tiny_config(vocab_size=512), layout="openai")
    assert chat.find_tokenizer(repo / "original") is None
    harmony.build_tokenizer(repo, 512)
    assert chat.find_tokenizer(repo / "original") == repo / "tokenizer.json"  # OpenAI original/ -> HF root
    assert chat.load_chat_template(repo / "original") == harmony.CHAT_TEMPLATE
    assert chat.find_tokenizer(repo) == repo / "tokenizer.json"
    (repo / "other").mkdir()
    assert chat.find_tokenizer(repo / "other") is None  # only original/ looks upwards


def test_special_tokens_as_transformers(folder, hf, tmp_path) -> None:
    assert chat.load_special_tokens(folder) == hf.special_tokens_map
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "tokenizer.json", legacy)
    (legacy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "image_token": "<|call|>"}))
    legacy_map = {"bos_token": {"content": "<|start|>"}, "eos_token": "<|return|>"}
    (legacy / "special_tokens_map.json").write_text(json.dumps(legacy_map))
    assert chat.load_special_tokens(legacy) == AutoTokenizer.from_pretrained(str(legacy)).special_tokens_map


@pytest.mark.parametrize("size", [harmony.MIN_VOCAB_SIZE, 512, 1024, 5000])
def test_build_tokenizer(tmp_path, size) -> None:
    path = harmony.build_tokenizer(tmp_path, size)
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size(with_added_tokens=True) == size
    ids = harmony.special_token_ids(size)
    assert list(ids.values()) == list(range(size - 21, size))
    assert all(tok.token_to_id(t) == i for t, i in ids.items())
    assert [tok.id_to_token(ids[t]) for t in harmony.HARMONY_SPECIAL_TOKENS] == list(harmony.HARMONY_SPECIAL_TOKENS)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert len(hf_tok) == size and max(hf_tok.get_vocab().values()) == size - 1
    text = "Reasoning: high — naïve 🦙 <|start|>x<|end|>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert harmony.build_tokenizer(tmp_path / "again", size).read_bytes() == path.read_bytes()  # deterministic


def test_real_ids_and_small_vocab() -> None:
    real = harmony.HARMONY_SPECIAL_TOKENS
    named = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>"]
    assert [real[t] for t in named] == [199998, 199999, 200002, 200003, 200005, 200006, 200007]
    assert (real["<|message|>"], real["<|call|>"], real["<|endofprompt|>"]) == (200008, 200012, 200018)
    assert list(real.values()) == list(range(199998, 200019))
    with pytest.raises(ValueError, match="too small"):
        harmony.build_tokenizer(Path("/nonexistent"), 256)


def test_tokens_autotokenizer_adds(folder, tmp_path) -> None:
    """A named special token missing from tokenizer.json becomes a new added token in AutoTokenizer; plain
    tokenizer.json does not know it, ossconv.gguf_vocab.load_tokenizer (passed to encode) does."""
    from ossconv import gguf_vocab

    model = tmp_path / "unk"
    model.mkdir()
    shutil.copy(folder / "tokenizer.json", model)
    config = {**json.loads((folder / "tokenizer_config.json").read_text()), "unk_token": "<unk>"}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    want = AutoTokenizer.from_pretrained(str(model))("a<unk>b")["input_ids"]
    assert chat.encode(model / "tokenizer.json", "a<unk>b", add_special_tokens=True) != want
    assert chat.encode(gguf_vocab.load_tokenizer(model, config), "a<unk>b", add_special_tokens=True) == want
    assert max(want) == VOCAB  # one past the embedding: the caller must check ids against vocab_size

"""Text for verify: prompts and chats through the checkpoint's own tokenizer and chat template.

Chat templates and tokenization as transformers 5.24 does them, with only jinja2 and tokenizers at run time:
``verify --chat`` must feed both checkpoints the ids ``AutoTokenizer.apply_chat_template`` would give
(environment, context, template files and encoding rules are copied from transformers; tests/test_text.py
checks each against it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ossconv.errors import CheckpointError, OssconvError
from ossconv.files import check_regular, parse_json
from ossconv.verify.lockstep import Case


class _Generation(Extension):
    """``{% generation %}`` (transformers' assistant-mask tag) renders its body; without it such templates fail."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace(): no underscore attributes (a route out of the sandbox)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        jinja2.utils.Namespace.__init__(args[0])
        for name, value in dict(*args[1:], **kwargs).items():
            args[0][name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    """transformers' tojson: json.dumps without jinja's HTML escaping, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# transformers' globals; its dict() is a constructor and fromkeys, nothing else reachable.
_DICT = type("TemplateDict", (), {"__call__": staticmethod(dict), "fromkeys": staticmethod(dict.fromkeys)})()
_GLOBALS = {"raise_exception": _raise_exception, "dict": _DICT, "namespace": _Namespace}


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    now: datetime | None = None,
    **kwargs: Any,
) -> str:
    """``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=False, **kwargs)``'s text.

    Context as transformers builds it: named special tokens (``load_special_tokens``), then kwargs such as
    ``reasoning_effort`` (they win), ``tools``/``documents`` None unless given; messages lose None-valued keys and
    get ``thinking``/``reasoning_content`` from any reasoning field (gpt-oss reads ``thinking``). ``strftime_now``
    reads the local clock per call like transformers (gpt-oss prints "Current date"); ``now`` pins it so the renders
    for A and B cannot straddle midnight. Any template failure is one ValueError saying what went wrong."""
    if not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("a conversation must be a non-empty list of {role, content} objects")
    chat = []
    for m in ({k: v for k, v in m.items() if v is not None} for m in messages):
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    context = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    extensions = [_Generation, "jinja2.ext.loopcontrols"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = _tojson
    env.globals.update(_GLOBALS, strftime_now=lambda fmt: (now or datetime.now()).strftime(fmt))
    try:
        return env.from_string(template).render(messages=chat, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error on line {e.lineno}: {e.message}") from e
    except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
        raise ValueError(f"chat template error: {e.message or type(e).__name__}") from e
    except Exception as e:  # the template is code: "a" + 1 and the like fail inside it
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def find_tokenizer(folder: Path) -> Path | None:
    """tokenizer.json beside the weights, or in the parent of an OpenAI ``original/`` folder (the HF repo root)."""
    folder = Path(folder)
    candidates = [folder, folder.parent] if folder.name == "original" else [folder]
    return next((p / "tokenizer.json" for p in candidates if (p / "tokenizer.json").is_file()), None)


def load_chat_template(folder: Path) -> str | None:
    """AutoTokenizer's template: chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a
    list of {name, template} of which "default" is used without tools). AutoTokenizer never reads
    chat_template.json (AutoProcessor's legacy file, which there wins over the .jinja): used only as a last resort."""
    folder = (find_tokenizer(folder) or Path(folder, "tokenizer.json")).parent  # the tokenizer files' folder
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        template = (_json(folder / name) or {}).get("chat_template")
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def load_special_tokens(folder: Path) -> dict[str, str]:
    """tokenizer.special_tokens_map, which apply_chat_template puts in the context: tokenizer_config.json's *_token
    strings or AddedToken dicts, overridden by special_tokens_map.json if the config has no added_tokens_decoder."""
    folder = (find_tokenizer(folder) or Path(folder, "tokenizer.json")).parent
    named = _json(folder / "tokenizer_config.json") or {}
    if "added_tokens_decoder" not in named:
        named = {**named, **(_json(folder / "special_tokens_map.json") or {})}
    extra = named.get("extra_special_tokens")
    out = {}
    for key, value in [*named.items(), *(extra.items() if isinstance(extra, dict) else ())]:
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def encode(tokenizer: str | Path | Tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    """Ids as transformers gives them. ``True`` for --prompt text: ``tokenizer(text)``/``encode(text)`` default to
    it, so tokenizer.json's post-processor runs (BOS for models that want one; gpt-oss's adds nothing). ``False``
    for a rendered chat: apply_chat_template(tokenize=True) encodes so, as the template writes its own special
    tokens. Special tokens spelled in the text become their ids either way (split_special_tokens=False).

    A path loads tokenizer.json as is; load it once and pass the Tokenizer for many texts. AutoTokenizer also
    adds tokenizer_config tokens missing from tokenizer.json (e.g. an unk_token "<unk>"): for such checkpoints
    pass ``ossconv.gguf_vocab.load_tokenizer(folder, config)``."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
    tok.no_truncation()  # transformers turns both off for a call without truncation/padding arguments
    tok.no_padding()
    return tok.encode(text, add_special_tokens=add_special_tokens).ids


# ---------------------------------------------------------------------------------------------- cases for verify

REASONING_EFFORTS = ("low", "medium", "high")


class TextSource:
    """A checkpoint's tokenizer and chat template, turning prompts, chats and case files into token ids."""

    def __init__(self, tokenizer_path: Path, folder: Path):
        self.tokenizer_path, self.folder = tokenizer_path, folder
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the tokenizers library raises its own Exception for a bad file
            raise CheckpointError(f"not a tokenizer file ({str(error).splitlines()[0]})", tokenizer_path) from None

    @classmethod
    def open(cls, checkpoint: Path, tokenizer: str | Path | None = None) -> TextSource:
        """The tokenizer beside ``checkpoint`` (or above OpenAI's ``original/``), or the one given."""
        path = Path(tokenizer) if tokenizer is not None else find_tokenizer(Path(checkpoint))
        if tokenizer is not None and path.is_dir():
            path = path / "tokenizer.json"
        if path is None or not path.is_file():
            where = checkpoint if path is None else path
            raise CheckpointError("no tokenizer.json found (beside the checkpoint, or pass --tokenizer)", where)
        check_regular(path)
        return cls(path, path.parent)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prompt(self, case_id: str, text: str) -> Case:
        ids = encode(self.tokenizer, text, add_special_tokens=True)
        if not ids:
            raise OssconvError(f"case {case_id}: the prompt encodes to no tokens")
        return Case(case_id, ids, text)

    def chat(self, case_id: str, messages: Any, reasoning_effort: str | None, where: Path) -> Case:
        template = load_chat_template(self.folder)
        if template is None:
            raise CheckpointError("no chat template (chat_template.jinja or tokenizer_config.json)", self.folder)
        extra = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}
        try:
            text = render_chat(template, messages, special_tokens=load_special_tokens(self.folder), **extra)
        except ValueError as error:
            raise CheckpointError(f"case {case_id}: {error}", where) from None
        return Case(case_id, encode(self.tokenizer, text, add_special_tokens=False), text)

    def cases(
        self,
        prompts: Sequence[str],
        chats: Sequence[str | Path],
        cases_file: str | Path | None,
        reasoning_effort: str | None,
    ) -> list[Case]:
        """Prompts first, then chats, then the lines of a cases file, each with an id."""
        if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
            raise OssconvError(f"reasoning effort {reasoning_effort!r}: choose low, medium or high")
        found = [self.prompt(f"prompt-{n + 1}", text) for n, text in enumerate(prompts)]
        for path in map(Path, chats):
            found.append(self.chat(path.stem, read_json_value(path), reasoning_effort, path))
        if cases_file is not None:
            found += self._lines(Path(cases_file), reasoning_effort)
        return found

    def _lines(self, path: Path, reasoning_effort: str | None) -> list[Case]:
        check_regular(path)
        found = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise CheckpointError("not UTF-8 text", path) from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            entry = parse_json(line, path, f"line {number}")
            if not isinstance(entry, dict) or ("text" in entry) == ("messages" in entry):
                raise CheckpointError(f'line {number}: expected an object with either "text" or "messages"', path)
            case_id = str(entry.get("id", f"line-{number}"))
            if "text" in entry:
                if not isinstance(entry["text"], str):
                    raise CheckpointError(f'line {number}: "text" must be a string', path)
                found.append(self.prompt(case_id, entry["text"]))
            else:
                found.append(self.chat(case_id, entry["messages"], reasoning_effort, path))
        if not found:
            raise CheckpointError("holds no cases", path)
        return found


def read_json_value(path: Path) -> Any:
    check_regular(path)
    return parse_json(path.read_bytes(), path, "chat")

"""gpt-oss's text side for synthetic checkpoints: the Harmony special tokens, a small byte-level BPE tokenizer
shaped like o200k_harmony, and ossconv's own Harmony chat template for conversations without tools.

Synthetic checkpoints have a vocabulary of a few hundred ids, so text cases (``verify --prompt/--chat``) need a
tokenizer of exactly that size whose special tokens and template behave like the real ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# o200k_harmony's special tokens (gpt-oss tokenizer.json added_tokens / tokenizer_config added_tokens_decoder):
# 21 contiguous ids from 199998, all special. Ids 200019..201087 of the 201088-row embedding have no token.
HARMONY_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
    "<|reserved_200013|>": 200013,
    "<|reserved_200014|>": 200014,
    "<|reserved_200015|>": 200015,
    "<|reserved_200016|>": 200016,
    "<|reserved_200017|>": 200017,
    "<|endofprompt|>": 200018,
}
BOS, EOS, PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"  # gpt-oss tokenizer_config (instruct eos)
# tiktoken's o200k split pattern, as gpt-oss's tokenizer.json (and transformers' gguf mapping, "gpt-4o") has it.
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MIN_VOCAB_SIZE = 256 + len(HARMONY_SPECIAL_TOKENS)  # the byte alphabet and the special tokens

# ossconv's Harmony template (written here; the released gpt-oss template is only the test's oracle). For
# conversations without tools it renders what the released one renders: a system message (identity, knowledge
# cutoff, today's date via strftime_now, reasoning effort, valid channels), the first system/developer message as
# "# Instructions" in a developer message, user turns, assistant final answers (the last one, outside generation,
# ends in <|return|> with its analysis first), later system/developer messages dropped, and "<|start|>assistant".
CHAT_TEMPLATE = """\
{%- set no_tools = "this Harmony template renders conversations without tools" %}
{%- if tools or builtin_tools %}{{ raise_exception(no_tools) }}{% endif %}
{%- set effort = reasoning_effort if reasoning_effort is defined else "medium" %}
{%- if effort not in ("low", "medium", "high") %}
{{- raise_exception("reasoning_effort must be low, medium or high") }}
{%- endif %}
{%- set identity = "You are ChatGPT, a large language model trained by OpenAI." %}
{%- set tags = ("<|channel|>analysis<|message|>", "<|channel|>final<|message|>") %}
<|start|>system<|message|>{{ model_identity if model_identity is defined else identity }}
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- set head = messages[0] %}
{%- set rest = messages[1:] if head.role in ("system", "developer") else messages %}
{%- if head.role in ("system", "developer") and head.content %}
<|start|>developer<|message|># Instructions

{{ head.content }}

<|end|>
{%- endif %}
{%- for m in rest %}
{%- if m.role == "user" %}
<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == "assistant" %}
{%- for field in ("content", "thinking") if field in m and (tags[0] in m[field] or tags[1] in m[field]) %}
{{- raise_exception("assistant " ~ field ~ " must be plain text; pass analysis as 'thinking', not channel tags") }}
{%- endfor %}
{%- if "tool_calls" in m %}{{ raise_exception(no_tools) }}{% endif %}
{%- if loop.last and not add_generation_prompt %}
{%- if "thinking" in m %}
<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>
{%- endif %}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|return|>
{%- else %}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>
{%- endif %}
{%- elif m.role == "tool" %}{{ raise_exception(no_tools) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|start|>assistant
{%- endif %}
"""


def _corpus() -> list[str]:
    """Fixed training text: Harmony's own words, some prose and code, then seeded pseudo-words so that merges
    keep coming for a vocabulary of a few thousand."""
    words = (
        "system developer user assistant analysis commentary final Reasoning low medium high Knowledge cutoff "
        "Current date Valid channels Channel must be included for every message Instructions You are ChatGPT "
        "a large language model trained by OpenAI"
    )
    prose = [
        "The quick brown fox jumps over the lazy dog. Hello world, hello there! 3.14 and 42; 2024-06-28",
        "def f(x):\n    return x * 2  # naïve café, 日本語 テキスト 🦙",
        words,
    ]
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    pseudo = [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(64)) for _ in range(256)]
    return prose * 16 + pseudo


def build_tokenizer(folder: Path, vocab_size: int, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write tokenizer.json (byte-level BPE with o200k's pre-tokenizer, exactly ``vocab_size`` ids, the Harmony
    special tokens on the last 21 ids in their real order), tokenizer_config.json (bos/eos/pad as gpt-oss) and,
    unless ``chat_template`` is None, chat_template.jinja. Returns the tokenizer.json path."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (at least {MIN_VOCAB_SIZE})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = vocab_size - len(HARMONY_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=base, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), base):  # more ids than the text has merges: unreachable fillers, like unused rows
        vocab[f"<|ossconv_unused_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIAL_TOKENS])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"built {tok.get_vocab_size(with_added_tokens=True)} ids, wanted {vocab_size}")
    path = folder / "tokenizer.json"
    tok.save(str(path))
    added = {
        str(base + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(HARMONY_SPECIAL_TOKENS)
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,  # transformers' "no limit" value
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return path


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Where build_tokenizer puts each Harmony token in a ``vocab_size`` vocabulary (real order, top ids)."""
    base = vocab_size - len(HARMONY_SPECIAL_TOKENS)
    return {t: base + i for i, t in enumerate(HARMONY_SPECIAL_TOKENS)}

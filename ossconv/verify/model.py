"""The gpt-oss forward pass, in fp32, one layer at a time, with weights read lazily from a checkpoint.

It follows OpenAI's reference (``gpt_oss/torch/model.py``): pre-norm residual blocks; attention with GQA,
biases, YaRN rotary embeddings on non-interleaved halves, a learned sink logit per head, and a sliding
window on even layers; a top-k router with softmax over the selected logits; SwiGLU experts with clamping
and the +1 on the linear half. Facts: GPT_OSS_FACTS.md section 7.

Why fp32: bf16 rounding flips top-k routing in small random MoE models and moves logits by O(1) between
two correct implementations, which would hide a real conversion bug. Weights are upcast as they are read
(exactly: bf16, fp16 and MXFP4 values are all fp32 values), so two checkpoints holding the same values in
different layouts or precisions give bit-identical activations.

Memory: one layer's dense weights in fp32 plus one expert at a time (for gpt-oss-20b shapes about 110 MB
of attention weights and 100 MB per expert), plus activations of a few tokens. Only the experts that the
router picks for these tokens are read and decoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ossconv.adapters import Adapter, merge_expert, merge_rows
from ossconv.checkpoint import Checkpoint
from ossconv.errors import CheckpointError
from ossconv.formats import mxfp4
from ossconv.formats.config import RMS_NORM_EPS, SWIGLU_ALPHA, ModelConfig
from ossconv.formats.layouts import ExpertWeight
from ossconv.parallel import in_parallel

UNEMBED_ROWS = 16384  # vocabulary rows per step: 190 MB of fp32 at hidden 2880, not the 2.3 GB whole


class WeightReader:
    """Canonical (OpenAI-named, ``[out, in]``) fp32 weights from a checkpoint in either layout, with LoRA
    ``adapters`` merged on the fly as the weights are read."""

    def __init__(self, ckpt: Checkpoint, adapters: Sequence[Adapter] = ()):
        self.ckpt = ckpt
        self.config = ckpt.config
        self.adapters = tuple(adapters)
        self._experts = {(w.layer, w.proj): w for w in ckpt.expert_weights}
        self._buffers: dict[str, torch.Tensor] = {}  # decoded weights, by projection
        self._reads: dict[str, torch.Tensor] = {}  # stored bytes, by role (blocks, scales)

    def dense(self, name: str) -> torch.Tensor:
        """A canonical non-expert tensor (qkv is re-fused from HF's q/k/v rows)."""
        return self.rows(name, 0, None)

    def rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows ``start:stop`` of a canonical dense tensor (None: to the end)."""
        if stop is None and start == 0:
            values = self.ckpt.canonical(name).to(torch.float32)
            stop = values.shape[0] if values.dim() else 0
        else:
            values = self.ckpt.canonical_rows(name, start, stop).to(torch.float32)
        values = merge_rows(self.adapters, name, start, stop, values) if self.adapters else values
        return self._finite(values, name)

    def apply_expert(self, layer: int, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for one expert's ``[out, in]`` weight of ``mlp1`` (gate/up interleaved rows) or
        ``mlp2``, by :func:`row_product`, from bytes read into buffers reused for every expert (a fresh tensor
        per expert costs more in page faults than the decode). NaN/Inf is caught through the product: a
        non-finite weight always makes a non-finite product, which is then traced back to the weight."""
        weight = self._experts[(layer, proj)]
        if isinstance(self.ckpt, Checkpoint) and weight.blocks in self.ckpt.tensors and not self.adapters:
            blocks = self.ckpt.get_rows(weight.blocks, expert, out=self._read_buffer("blocks", weight.blocks))[0]
            scales = self.ckpt.get_rows(weight.scales, expert, out=self._read_buffer("scales", weight.scales))[0]

            def rows(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
                return mxfp4.decode(blocks[start:stop], scales[start:stop], torch.float32, out=out)

        else:  # floats, a GGUF file, or adapters to merge: the whole fp32 weight first
            matrix = self._expert_matrix(weight, expert)

            def rows(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
                return out.copy_(matrix[start:stop])

        product = row_product(x, weight.out_features, rows)
        if not torch.isfinite(product).all():
            self._finite(self._expert_matrix(weight, expert), f"block.{layer}.mlp.{proj}_weight expert {expert}")
        return product

    def _expert_matrix(self, weight: ExpertWeight, expert: int) -> torch.Tensor:
        """The whole fp32 ``[out, in]`` weight, adapters merged, in a buffer reused for every expert."""
        shape = (weight.out_features, weight.in_features)
        buffer = self._buffers.get(weight.proj)
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = self._buffers[weight.proj] = torch.empty(shape, dtype=torch.float32)
        matrix = self.ckpt.get_expert(weight, expert, torch.float32, out=buffer)
        return merge_expert(self.adapters, weight.layer, weight.proj, expert, matrix) if self.adapters else matrix

    def _read_buffer(self, role: str, name: str) -> torch.Tensor:
        """A uint8 buffer, reused for every expert, for one expert's rows of a stored tensor."""
        info = self.ckpt.info(name)
        size = info.nbytes // max(1, info.shape[0])
        buffer = self._reads.get(role)
        if buffer is None or buffer.numel() < size:
            buffer = self._reads[role] = torch.empty(size, dtype=torch.uint8)
        return buffer

    def _finite(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """NaN or Inf in a weight is bad input to name, not a difference to report."""
        if not torch.isfinite(values.sum()):  # one cheap pass; NaN and Inf reach the sum (as may overflow)
            bad = int((~torch.isfinite(values)).sum())
            if not bad:
                return values
            raise CheckpointError(f"{what} holds {bad} NaN or Inf value(s)", self.ckpt.path)
        return values


PRODUCT_ROWS = 256  # weight rows made and multiplied at a time: 2.9 MB of fp32 at 2880 columns, in cache


def row_product(
    x: torch.Tensor, out_features: int, rows: Callable[[int, int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x @ W.T`` for a few tokens ``x`` ``[T, in]`` and a weight ``W`` ``[out_features, in]`` that
    ``rows(start, stop, buffer)`` makes a few hundred rows at a time (MXFP4 decoded, floats upcast) into a
    buffer that stays in cache while it is multiplied: twice as fast as making the whole weight first, which
    writes and reads it through memory. Every weight goes through the same chunks and threads, so the same
    values give the same bits whatever their encoding (``verify --exact`` of MXFP4 against bf16)."""
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)

    def multiply(first: int, last: int) -> None:
        buffer = torch.empty(min(PRODUCT_ROWS, last - first), x.shape[1], dtype=torch.float32)  # reused
        for start in range(first, last, PRODUCT_ROWS):
            stop = min(last, start + PRODUCT_ROWS)
            torch.matmul(x, rows(start, stop, buffer[: stop - start]).T, out=out[:, start:stop])

    in_parallel(multiply, out_features, PRODUCT_ROWS)
    return out


def rms_norm(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS) * scale


def rotary_cos_sin(cfg: ModelConfig, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """YaRN: blend interpolated and extrapolated frequencies with a linear ramp (no rounding of the bounds),
    and scale cos/sin by the concentration 0.1 ln(factor) + 1."""
    d = cfg.head_dim
    freq = cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if cfg.rope_scaling_factor > 1.0:
        concentration = 0.1 * math.log(cfg.rope_scaling_factor) + 1.0
        d_half = d / 2
        low = (
            d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_beta * 2 * math.pi)) / math.log(cfg.rope_theta)
        )
        high = (
            d_half
            * math.log(cfg.initial_context_length / (cfg.rope_ntk_alpha * 2 * math.pi))
            / math.log(cfg.rope_theta)
        )
        interpolation = 1.0 / (cfg.rope_scaling_factor * freq)
        extrapolation = 1.0 / freq
        ramp = (torch.arange(d_half, dtype=torch.float32) - low) / (high - low)
        mask = 1 - ramp.clamp(0, 1)
        inv_freq = interpolation * (1 - mask) + extrapolation * mask
    else:
        concentration = 1.0
        inv_freq = 1.0 / freq
    angles = torch.einsum("t,f->tf", torch.arange(num_tokens, dtype=torch.float32), inv_freq)
    return angles.cos() * concentration, angles.sin() * concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first and second halves of each head (not interleaved pairs). x: (T, heads, D)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class KVCache:
    """Each layer's keys (after rotary) and values so far, ``(T, KV heads, D)``: generation then computes one
    new token per step, so its cost grows linearly with the number of tokens."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat((self.keys[layer], k)), torch.cat((self.values[layer], v))
        self.keys[layer], self.values[layer] = k, v
        return k, v


def attention(
    x: torch.Tensor,
    weights: WeightReader,
    layer: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Attention for tokens at positions ``start`` .. ``start + T - 1`` (``cos``/``sin`` for those), over the
    cached keys and values of earlier positions when a ``cache`` is given."""
    cfg = weights.config
    p = f"block.{layer}.attn."
    t = rms_norm(x, weights.dense(p + "norm.scale"))
    qkv = t @ weights.dense(p + "qkv.weight").T + weights.dense(p + "qkv.bias")  # (T, Q + 2K)
    num_tokens, kv_heads, d = x.shape[0], cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // kv_heads
    q = qkv[:, : cfg.q_dim].reshape(num_tokens, kv_heads * group, d)
    k = qkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim].reshape(num_tokens, kv_heads, d)
    v = qkv[:, cfg.q_dim + cfg.kv_dim :].reshape(num_tokens, kv_heads, d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.extend(layer, k, v)  # (S, KV, D): every position so far
    q = q.view(num_tokens, kv_heads, group, d)
    scores = torch.einsum("qhmd,khd->hmqk", q, k) / math.sqrt(d)  # (KV, G, T, S)
    query_at = torch.arange(start, start + num_tokens).unsqueeze(1)
    key_at = torch.arange(k.shape[0]).unsqueeze(0)
    hidden = key_at > query_at
    if cfg.is_sliding(layer):  # a query at t sees keys t - window + 1 .. t
        hidden |= query_at - key_at >= cfg.sliding_window
    scores = scores.masked_fill(hidden, -math.inf)
    sinks = weights.dense(p + "sinks").view(kv_heads, group, 1, 1).expand(-1, -1, num_tokens, 1)
    probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]  # the sink only absorbs mass
    out = torch.einsum("hmqk,khd->qhmd", probs, v).reshape(num_tokens, cfg.q_dim)
    return x + out @ weights.dense(p + "out.weight").T + weights.dense(p + "out.bias")


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """Gate = even rows clamped above, up = odd rows clamped both ways; the +1 on up is gpt-oss's own."""
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1)


def moe(x: torch.Tensor, weights: WeightReader, layer: int) -> torch.Tensor:
    cfg = weights.config
    p = f"block.{layer}.mlp."
    t = rms_norm(x, weights.dense(p + "norm.scale"))
    logits = t @ weights.dense(p + "gate.weight").T + weights.dense(p + "gate.bias")  # (T, E)
    top = torch.topk(logits, k=cfg.experts_per_token, dim=-1, sorted=True)
    gates = torch.softmax(top.values, dim=-1)  # over the selected experts only
    mlp1_bias, mlp2_bias = weights.dense(p + "mlp1_bias"), weights.dense(p + "mlp2_bias")
    out = torch.zeros_like(x)
    for expert in top.indices.unique().tolist():  # only the experts the router picked are read
        tokens, slot = (top.indices == expert).nonzero(as_tuple=True)
        h = weights.apply_expert(layer, "mlp1", expert, t[tokens]) + mlp1_bias[expert]
        y = weights.apply_expert(layer, "mlp2", expert, swiglu(h, cfg.swiglu_limit)) + mlp2_bias[expert]
        out.index_add_(0, tokens, y * gates[tokens, slot, None])
    return x + out


def embed(weights: WeightReader, tokens: torch.Tensor) -> torch.Tensor:
    rows = [weights.rows("embedding.weight", int(t), int(t) + 1)[0] for t in tokens]  # read only the rows used
    return torch.stack(rows)


def block(
    x: torch.Tensor,
    weights: WeightReader,
    layer: int,
    rotary: tuple[torch.Tensor, torch.Tensor],
    cache: KVCache | None = None,
    start: int = 0,
) -> torch.Tensor:
    return moe(attention(x, weights, layer, *rotary, cache=cache, start=start), weights, layer)


def unembed(x: torch.Tensor, weights: WeightReader) -> torch.Tensor:
    x = rms_norm(x, weights.dense("norm.scale"))
    vocab = weights.config.vocab_size
    chunks = []
    for start in range(0, vocab, UNEMBED_ROWS):
        rows = weights.rows("unembedding.weight", start, min(vocab, start + UNEMBED_ROWS))
        chunks.append(x @ rows.T)
    return torch.cat(chunks, dim=-1)


def forward(ckpt: Checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) in fp32 for one sequence; the whole pass, for checking against the references."""
    weights = WeightReader(ckpt)
    rotary = rotary_cos_sin(ckpt.config, len(tokens))
    x = embed(weights, tokens)
    for layer in range(ckpt.config.num_hidden_layers):
        x = block(x, weights, layer, rotary)
    return unembed(x, weights)


def step(
    weights: WeightReader, token: int, position: int, cache: KVCache, rotary: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Logits ``(vocab,)`` after one more token at ``position``, reading earlier positions from ``cache``;
    ``rotary`` covers every position up to this one."""
    cos, sin = rotary
    x = embed(weights, torch.tensor([token]))
    for layer in range(weights.config.num_hidden_layers):
        x = block(x, weights, layer, (cos[position : position + 1], sin[position : position + 1]), cache, position)
    return unembed(x, weights)[0]


def greedy(weights: WeightReader, logits: torch.Tensor, start: int, count: int, cache: KVCache) -> list[int]:
    """``count`` tokens by argmax, continuing from the prompt's last ``logits`` at ``start`` tokens."""
    rotary = rotary_cos_sin(weights.config, start + count)
    tokens = []
    for position in range(start, start + count):
        tokens.append(int(torch.argmax(logits)))
        if position + 1 < start + count:
            logits = step(weights, tokens[-1], position, cache, rotary)
    return tokens

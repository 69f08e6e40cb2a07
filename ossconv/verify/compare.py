"""Metrics between two runs of the same tokens: hidden states after each layer, and final logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StateMetrics:
    """Hidden states of A and B after one step (embedding or a layer), over all tokens."""

    step: str
    max_abs_error: float
    relative_error: float  # ||a - b|| / ||a||
    cosine: float  # cosine similarity of the flattened states
    identical: bool  # bit for bit


@dataclass
class LogitMetrics:
    max_abs_error: float
    kl_mean: float  # KL(softmax(a) || softmax(b)) averaged over positions
    kl_max: float
    top1_agreement: float  # share of positions whose argmax agrees
    identical: bool


def state_metrics(step: str, a: torch.Tensor, b: torch.Tensor) -> StateMetrics:
    diff = (a - b).flatten()
    norm = a.flatten().norm().item()
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    return StateMetrics(
        step=step,
        max_abs_error=diff.abs().max().item(),
        relative_error=diff.norm().item() / norm if norm else float(diff.norm().item() > 0),
        cosine=cosine,
        identical=torch.equal(a.view(torch.int32), b.view(torch.int32)),
    )


def logit_metrics(a: torch.Tensor, b: torch.Tensor) -> LogitMetrics:
    log_p, log_q = torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)  # per position
    return LogitMetrics(
        max_abs_error=(a - b).abs().max().item(),
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        identical=torch.equal(a.view(torch.int32), b.view(torch.int32)),
    )

"""reshard: cut a checkpoint differently without changing a byte of any tensor.

- by size: shards of at most ``max_shard_size`` bytes (a bigger tensor gets a shard of its own);
- split experts: every fused expert tensor ``[E, ...]`` becomes E tensors named ``...experts.{j}...``
  (``block.{n}.mlp.experts.{j}.mlp1_weight.blocks``, ``model.layers.{n}.mlp.experts.{j}.gate_up_proj_blocks``),
  MXFP4 blocks, scales, float weights and biases alike; ``fused`` puts them back;
- expert-parallel ranks: :mod:`ossconv.expert_parallel`.
"""

from __future__ import annotations

from pathlib import Path

from ossconv import expert_parallel
from ossconv.checkpoint import open_folder_checkpoint
from ossconv.convert.execute import run
from ossconv.convert.plan import plan
from ossconv.convert.target import ConversionResult, ExpertForm, Target, WriteOptions, experts_form
from ossconv.errors import OssconvError
from ossconv.progress import Progress
from ossconv.units import DEFAULT_MAX_SHARD_SIZE


def reshard(
    src: str | Path,
    out: str | Path,
    *,
    experts: str | ExpertForm | None = None,
    ep_ranks: int | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
) -> ConversionResult:
    """Re-cut ``src`` into ``out``: by size, with experts ``"fused"`` or ``"split"`` (default: as the
    source), or into ``ep_ranks`` expert-parallel rank folders (whose experts are split).

    Example:
        >>> reshard("gpt-oss-120b/original", "gpt-oss-120b-ep4", ep_ranks=4)  # doctest: +SKIP
    """
    form = experts_form(experts)
    if ep_ranks is not None and form is ExpertForm.FUSED:
        raise OssconvError("expert-parallel ranks hold split experts; drop experts='fused'")
    options = WriteOptions(overwrite, max_shard_size, progress)
    ckpt = open_folder_checkpoint(src, "reshard")
    if ep_ranks is not None:
        return expert_parallel.write_ranks(ckpt, Path(out), ep_ranks, options)
    if form is None:
        form = ExpertForm.SPLIT if ckpt.pieces else ExpertForm.FUSED
    result = run(plan(ckpt, Target(ckpt.layout, ckpt.precision, experts=form)), out, options, command="reshard")
    result.details = {"experts": form.value}
    return result

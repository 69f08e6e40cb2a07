"""The checkpoint reader and the streaming writer: safetensors' own reader must agree with what we write,
outputs appear only when complete, and unsafe or broken inputs are refused with the file named."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossconv import writer as writer_module
from ossconv.checkpoint import open_checkpoint
from ossconv.direct_io import direct_buffer
from ossconv.errors import CheckpointError, OutputExistsError
from ossconv.files import cached_fraction, tensor_infos
from ossconv.formats.layouts import TensorSpec
from ossconv.units import parse_size
from ossconv.writer import CheckpointWriter


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b": torch.randint(0, 256, (7, 2, 16), generator=g, dtype=torch.uint8),
        "c": torch.randn(11, generator=g),
        "d": torch.randn(2, 3, generator=g).to(torch.float16),
    }


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = sample_tensors()
    with CheckpointWriter(tmp_path / "out", specs_of(tensors)) as writer:
        for name, tensor in reversed(tensors.items()):  # any order: every tensor has its planned place
            writer.write(name, tensor)
        writer.finish({"config.json": {"x": 1}})
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert list(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    header_len = struct.unpack("<Q", (tmp_path / "out" / "model.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_parts_written_at_offsets_make_the_whole_tensor(tmp_path):
    whole = torch.arange(4 * 6, dtype=torch.float32).view(4, 6)
    with CheckpointWriter(tmp_path / "out", specs_of({"w": whole})) as writer:
        for row in (2, 0, 3, 1):
            writer.write("w", whole[row], row * 6 * 4)
        writer.finish({})
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], whole)


@pytest.mark.parametrize("o_direct", ["used", "refused by the file system"])
def test_direct_streams_write_the_planned_bytes_around_copies_and_partial_blocks(tmp_path, monkeypatch, o_direct):
    """Written tensor bytes go past the page cache in whole blocks, staged per run of consecutive writes;
    the partial blocks at a run's ends go through the cache. Here: small chunks and two streams, so that
    MXFP4-like blocks and scales written alternately, a tensor written backwards (a new run per row, each
    starting mid-block) and a kernel copy between them all cross chunk and block boundaries."""
    from ossconv import direct_io

    monkeypatch.setattr(direct_io, "STREAM_CHUNK", 3 * direct_io.ALIGN)
    monkeypatch.setattr(direct_io, "UNCOPIED_MIN", 3 * direct_io.ALIGN)
    monkeypatch.setattr(direct_io, "STREAMS", 2)
    monkeypatch.setattr(writer_module, "COPY_BUFFER", 2 * direct_io.ALIGN)  # a copy of several reads
    if o_direct != "used":
        monkeypatch.setattr(direct_io, "open_direct", lambda path, flags: None)
    direct_writes = []
    write_direct = direct_io.DirectWrites._write_direct
    sources = []  # where each direct write's bytes were
    monkeypatch.setattr(
        direct_io.DirectWrites,
        "_write_direct",
        lambda self, *a: direct_writes.append(a[2]) or sources.append(a[1].ctypes.data) or write_direct(self, *a),
    )
    g = torch.Generator().manual_seed(1)
    tensors = {
        "blocks": torch.randint(0, 256, (6, 20011), generator=g, dtype=torch.uint8),
        "copied": torch.randn(5001, generator=g),
        "scales": torch.randint(0, 256, (6, 301), generator=g, dtype=torch.uint8),
        "backwards": torch.randn(9, 1001, generator=g).to(torch.bfloat16),
        "lined_up": torch.randint(0, 256, (3, 8 * direct_io.ALIGN + 20), generator=g, dtype=torch.uint8),
    }
    source = tmp_path / "source.safetensors"
    save_file({"copied": tensors["copied"]}, source)
    copied = tensor_infos(source)["copied"]
    with CheckpointWriter(tmp_path / "out", specs_of(tensors)) as writer:
        for expert in range(6):
            writer.write("blocks", tensors["blocks"][expert], expert * 20011)
            writer.write("scales", tensors["scales"][expert], expert * 301)
            if expert == 2:  # in two pieces, the second first, each starting mid-block on both sides
                writer.copy("copied", copied, start=4 * 2999, offset=4 * 2999, direct=True)
                writer.copy("copied", copied, nbytes=4 * 2999, direct=True)
        for row in reversed(range(9)):
            writer.write("backwards", tensors["backwards"][row], row * 1001 * 2)
        # A producer whose buffer lines up with the file's blocks has whole blocks written from it, uncopied.
        row_bytes = tensors["lined_up"][0].numel()  # 8 blocks and 20 bytes
        lined_up = direct_buffer(3 * row_bytes)[writer.block_offset("lined_up") :][: 3 * row_bytes]
        lined_up.copy_(tensors["lined_up"].view(-1))
        for row in range(3):
            writer.write("lined_up", lined_up.view(3, -1)[row], row * row_bytes)
        start = lined_up.data_ptr()
        uncopied = sum(start <= address < start + 3 * row_bytes for address in sources)
        writer.finish({})
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert all(position % direct_io.ALIGN == 0 for position in direct_writes)
    if o_direct == "used" and direct_io.open_direct(tmp_path / "probe", os.O_WRONLY | os.O_CREAT) is not None:
        assert len(direct_writes) >= 6  # the blocks alone fill several chunks
        assert uncopied == 3  # each row's whole blocks, straight from the buffer
    else:
        assert not direct_writes
    os.truncate(source, copied.offset + copied.nbytes - 1)
    with CheckpointWriter(tmp_path / "again", specs_of({"copied": tensors["copied"]})) as writer:
        with pytest.raises(CheckpointError, match=r"source.safetensors: file ended inside tensor copied"):
            writer.copy("copied", copied, direct=True)


def test_size_sharding_with_index(tmp_path):
    tensors = sample_tensors()
    with CheckpointWriter(tmp_path / "out", specs_of(tensors), max_shard_size=100) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.finish({})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for file in files:
        assert os.path.getsize(tmp_path / "out" / file) < 100 + 200 or len(load_file(tmp_path / "out" / file)) == 1
    merged = {}
    for file in files:
        merged.update(load_file(tmp_path / "out" / file))
    assert all(torch.equal(merged[n], t) for n, t in tensors.items())


def test_failure_leaves_no_output_and_no_temporary_folder(tmp_path):
    tensors = sample_tensors()
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", specs_of(tensors)) as writer:
            writer.write("a", tensors["a"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_tensor_is_never_renamed_into_place(tmp_path):
    tensors = sample_tensors()
    with pytest.raises(RuntimeError, match="not fully written"):
        with CheckpointWriter(tmp_path / "out", specs_of(tensors)) as writer:
            writer.write("a", tensors["a"])
            writer.finish({})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        CheckpointWriter(tmp_path / "out", [])
    tensors = {"a": torch.ones(2)}
    with CheckpointWriter(tmp_path / "out", specs_of(tensors), overwrite=True) as writer:
        writer.write("a", tensors["a"])
        writer.finish({})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("100KB") == 100_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000


def test_reader_detects_layout_precision_and_order(checkpoints):
    expected = {
        "openai-mxfp4": ("openai", "mxfp4"),
        "openai-bf16": ("openai", "bf16"),
        "hf-mxfp4": ("hf", "mxfp4"),
        "hf-bf16": ("hf", "bf16"),
    }
    for name, (layout, precision) in expected.items():
        ckpt = open_checkpoint(checkpoints[name])
        assert (ckpt.layout, ckpt.precision.value) == (layout, precision)
        names = list(ckpt.tensors)
        assert names[0] in ("embedding.weight", "model.embed_tokens.weight")
        assert names[-1] in ("unembedding.weight", "lm_head.weight")
    sharded = open_checkpoint(checkpoints["hf-bf16"])
    assert len({info.file for info in sharded.tensors.values()}) > 1


# ------------------------------------------------------------------------------------------ bad input


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        open_checkpoint(tmp_path / "nope")


def test_folder_without_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors files in this folder"):
        open_checkpoint(tmp_path)


def test_pickles_are_refused_not_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\); ossconv never loads"):
        open_checkpoint(tmp_path)


def test_truncated_file(checkpoints, copy_of):
    folder = copy_of(checkpoints["openai-mxfp4"])
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*(not fully covered|incomplete)"):
        open_checkpoint(folder)


def test_mapped_expert_equals_the_read_one_and_a_file_cut_after_opening_is_an_error(checkpoints, copy_of):
    """Experts are mapped from the page cache for the encoder and inspect --stats: the bytes are those a read
    gives, and a file cut short after it was opened gives an error, not a SIGBUS from reading past its end."""
    folder = copy_of(checkpoints["hf-bf16"])
    ckpt = open_checkpoint(folder)
    weight = ckpt.expert_weights[-1]
    last = weight.num_experts - 1
    mapped = ckpt.map_rows(weight.float_name, last)
    assert mapped.dtype == torch.bfloat16 and mapped.shape == ckpt.get_rows(weight.float_name, last).shape
    assert torch.equal(mapped.view(torch.int16), ckpt.get_rows(weight.float_name, last).view(torch.int16))
    info = ckpt.info(weight.float_name)
    os.truncate(info.file, info.offset + info.nbytes - 1)
    with pytest.raises(CheckpointError, match=rf"{info.file.name}: file ended inside tensor {weight.float_name}"):
        ckpt.map_rows(weight.float_name, last)


@pytest.mark.parametrize("o_direct", ["used", "refused by the file system"])
def test_direct_read_equals_the_read_one_at_any_offset_and_a_short_file_is_an_error(
    checkpoints, copy_of, monkeypatch, o_direct
):
    """Cold float experts are read past the page cache into an aligned buffer: the bytes are those a read
    gives wherever the tensor starts (the sharded fixture puts them at odd offsets), also where the file
    system refuses O_DIRECT, and a file cut short is an error."""
    folder = copy_of(checkpoints["hf-bf16"])
    ckpt = open_checkpoint(folder)
    if o_direct != "used":
        real_open = os.open

        def refuse_direct(path, flags, *args):  # noqa: ANN001, ANN202
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", refuse_direct)
    offsets = set()
    for weight in ckpt.expert_weights:
        info = ckpt.info(weight.float_name)
        buffer = direct_buffer(info.nbytes // weight.num_experts)
        for expert in range(weight.num_experts):
            direct = ckpt.read_direct(weight.float_name, expert, buffer)
            read = ckpt.get_rows(weight.float_name, expert)
            assert direct.dtype == read.dtype and direct.shape == read.shape
            assert torch.equal(direct.view(torch.int16), read.view(torch.int16)), (weight.float_name, expert)
            offsets.add((info.offset + expert * info.nbytes // weight.num_experts) % 4096)
    assert len(offsets) >= 3  # the reads really started at different alignments
    with pytest.raises(ValueError, match="needs a direct_buffer"):
        ckpt.read_direct(weight.float_name, 0, direct_buffer(16))
    os.truncate(info.file, info.offset + info.nbytes - 1)
    with pytest.raises(CheckpointError, match=rf"{info.file.name}: file ended inside tensor {weight.float_name}"):
        ckpt.read_direct(weight.float_name, weight.num_experts - 1, buffer)


def test_cached_fraction_of_a_file_just_read_is_all_of_it(checkpoints):
    ckpt = open_checkpoint(checkpoints["hf-bf16"])
    weight = ckpt.expert_weights[0]
    info = ckpt.info(weight.float_name)
    info.file.read_bytes()
    assert cached_fraction(info.file, info.offset, info.nbytes) == 1.0
    assert ckpt.cached(weight) == 1.0


def test_header_that_lies_about_offsets(checkpoints, copy_of):
    folder = copy_of(checkpoints["openai-mxfp4"])
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    name = next(n for n in header if n != "__metadata__")
    header[name]["data_offsets"][1] += 10**6
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
    with pytest.raises(CheckpointError, match="model.safetensors: "):
        open_checkpoint(folder)


def test_garbage_header_length(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        open_checkpoint(tmp_path)


def test_index_pointing_outside_the_folder(checkpoints, copy_of, tmp_path):
    folder = copy_of(checkpoints["hf-bf16"])
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    first_file = next(iter(index["weight_map"].values()))
    (folder / first_file).rename(outside)
    for name, file in index["weight_map"].items():
        if file == first_file:
            index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index points outside the checkpoint folder: '../elsewhere"):
        open_checkpoint(folder)


def test_symlink_pointing_outside_the_folder(checkpoints, copy_of, tmp_path):
    folder = copy_of(checkpoints["openai-mxfp4"])
    (folder / "model.safetensors").rename(tmp_path / "real.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    with pytest.raises(CheckpointError, match="symlink points outside the checkpoint folder"):
        open_checkpoint(folder)


def test_missing_config(checkpoints, copy_of):
    folder = copy_of(checkpoints["openai-mxfp4"])
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_checkpoint(folder)


def test_config_of_the_wrong_layout(checkpoints, copy_of):
    folder = copy_of(checkpoints["hf-mxfp4"])
    (folder / "config.json").write_text(json.dumps({"num_experts": 4}))
    with pytest.raises(CheckpointError, match=r"config.json: not a gpt-oss hf config: config.json lacks"):
        open_checkpoint(folder)


def test_a_lined_up_buffer_under_one_staging_piece_is_written_uncopied(tmp_path, monkeypatch):
    """A bf16 down_proj expert of 20b shape (16.6 MB) is smaller than a staging piece (16 MiB); lined up
    with the file's blocks, it goes to the disk from where it is, not copied into a piece first."""
    from ossconv import direct_io

    sources = []
    write_direct = direct_io.DirectWrites._write_direct

    def recorded(self, *args):
        sources.append(args[1].ctypes.data)
        return write_direct(self, *args)

    monkeypatch.setattr(direct_io.DirectWrites, "_write_direct", recorded)
    data = direct_buffer(2 << 20)[: 2 << 20]
    data.copy_(torch.randint(0, 256, (2 << 20,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8))
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    writes = direct_io.DirectWrites()
    try:
        writes.add("out", path, fd)
        writes.write("out", memoryview(data.numpy()), 0)
        writes.flush()
    finally:
        writes.close()
        os.close(fd)
    assert path.read_bytes() == data.numpy().tobytes()
    assert sources == [data.data_ptr()]


def test_copy_falls_back_when_the_kernel_cannot_copy_between_file_systems(checkpoints, tmp_path, monkeypatch):
    import errno

    from helpers import assert_byte_identical

    from ossconv import convert

    calls = []

    def cross_device(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    convert(checkpoints["openai-mxfp4"], tmp_path / "out", to="openai")
    assert len(calls) == 1  # tried once, then read/write for the rest
    assert_byte_identical(checkpoints["openai-mxfp4"], tmp_path / "out")


def test_writer_left_without_finish_removes_its_temporary_folder(tmp_path):
    from ossconv.writer import WriterState

    spec = TensorSpec("x", (4,), torch.float32)
    with CheckpointWriter(tmp_path / "out", [spec]) as writer:
        writer.write("x", torch.ones(4))
        temp = writer.temp
        assert temp.is_dir()
    assert writer.state is WriterState.ABORTED
    assert not temp.exists() and not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match="aborted"):
        writer.write("x", torch.ones(4))


def test_read_ahead_hints_the_items_that_fit_the_window_in_order(monkeypatch):
    from pathlib import Path

    from ossconv import files

    hinted: list[int] = []
    monkeypatch.setattr(files, "will_need", lambda ranges: hinted.append(ranges[0][2]))
    sizes = [4, 3, 5, 1, 20, 2]  # one range per item, its size naming it
    with files.ReadAhead([[(Path("f"), 0, n)] for n in sizes], window=8) as read_ahead:
        read_ahead.reached(0)
        read_ahead.worker.shutdown(wait=True)  # the hints run on a worker thread
    assert hinted == [4, 3]  # 4 + 3 fit in 8 bytes from item 0; 4 + 3 + 5 do not
    hinted.clear()
    with files.ReadAhead([[(Path("f"), 0, n)] for n in sizes], window=8) as read_ahead:
        for index in range(len(sizes)):
            read_ahead.reached(index)
        read_ahead.worker.shutdown(wait=True)
    assert hinted == sizes  # each once, in order, the big item too when it is reached


@pytest.mark.parametrize("reverse", [False, True])
def test_hash_behind_the_writer_equals_hashlib_over_the_files(tmp_path, reverse):
    """Digests computed in one pass while writing (in pieces, in any order, over several shards) equal
    hashlib over the finished files."""
    import hashlib

    from ossconv.digests import TrailingHash

    tensors = {f"t{i}": torch.arange(i * 1000, i * 1000 + 600 + 37 * i, dtype=torch.int32) for i in range(6)}
    hasher = TrailingHash()
    try:
        with CheckpointWriter(tmp_path / "out", specs_of(tensors), max_shard_size=5000, watcher=hasher) as writer:
            for name, tensor in reversed(tensors.items()) if reverse else tensors.items():
                half = tensor.numel() // 2
                writer.write(name, tensor[half:], offset=half * 4)  # the second half first
                writer.write(name, tensor[:half])
            writer.finish({})
        digests = hasher.finish()
    finally:
        hasher.close()
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1 and sorted(digests) == [p.name for p in files]
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_writer_reports_only_bytes_already_written(tmp_path):
    """Each frontier the writer reports covers bytes that are written: a snapshot of the file up to it, taken
    at that moment, is the finished file's beginning."""

    class Snapshots:
        def __init__(self):
            self.fds, self.names, self.taken = {}, {}, []

        def opened(self, shard, fd, name):
            self.fds[shard], self.names[shard] = fd, name

        def written(self, shard, frontier):
            self.taken.append((self.names[shard], os.pread(self.fds[shard], frontier, 0)))

    tensors = {f"t{i}": torch.arange(i * 1000, i * 1000 + 600 + 37 * i, dtype=torch.int32) for i in range(6)}
    watcher = Snapshots()
    with CheckpointWriter(tmp_path / "out", specs_of(tensors), max_shard_size=5000, watcher=watcher) as writer:
        for name, tensor in reversed(tensors.items()):
            half = tensor.numel() // 2
            writer.write(name, tensor[half:], offset=half * 4)
            writer.write(name, tensor[:half])
        writer.finish({})
    final = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.safetensors")}
    assert len(final) > 1 and {name for name, _ in watcher.taken} == set(final)
    assert all(final[name].startswith(prefix) for name, prefix in watcher.taken)
    assert {name: max(len(p) for n, p in watcher.taken if n == name) for name in final} == {
        name: len(data) for name, data in final.items()
    }

"""Sharded safetensors writer: tensor by tensor, so peak memory is one tensor, not one shard."""
from __future__ import annotations

import json
import os
import struct

import torch

from medgpt_ds.convert.plans import Entry
from medgpt_ds.convert.zero import ZeroCheckpoint
from medgpt_ds.errors import CheckpointError, writing

def _out_dtype(entry: Entry, dtype: torch.dtype) -> torch.dtype:
    return dtype if entry.dtype.is_floating_point else entry.dtype


def _shard(entries: list[Entry], dtype: torch.dtype, max_bytes: int) -> list[list[Entry]]:
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = e.shape.numel() * _out_dtype(e, dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def _write_one_safetensors(path: str, entries: list[Entry], dtype: torch.dtype, ckpt: ZeroCheckpoint,
                           window_bytes: int) -> int:
    """Write one safetensors file tensor by tensor: the header (offsets known from the shapes)
    first, then each tensor's bytes as soon as it is produced. Peak memory is one tensor, not one
    shard. Returns the bytes of tensor data written."""
    header, offset = {}, 0
    for e in entries:
        dt = _out_dtype(e, dtype)
        nbytes = e.shape.numel() * dt.itemsize
        header[e.key] = {"dtype": ST_DTYPES[dt], "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    files = ckpt.open_files()
    with writing(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            t = e.produce(files).to(_out_dtype(e, dtype)).contiguous()
            if t.shape != e.shape:
                raise CheckpointError(f"{e.key}: produced shape {tuple(t.shape)}, planned {tuple(e.shape)}")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
            if files.touched > window_bytes:  # unmap what was read so far (see OpenFiles)
                files.close()
                files = ckpt.open_files()
    files.close()
    return offset


def write_safetensors(ckpt: ZeroCheckpoint, entries: list[Entry], output_dir: str, dtype: torch.dtype,
                      max_shard_size: int | str = "5GB", weights_name: str = "model",
                      window_bytes: int = 256 * 2**20) -> list[str]:
    """Write ``entries`` as safetensors shards of at most ``max_shard_size`` (+ index when more
    than one), in Hugging Face's file naming. Streams tensor by tensor; the checkpoint's memory-
    mapped files are re-opened every ``window_bytes`` read so their pages do not pile up."""
    from transformers.utils.hub import convert_file_size_to_int

    shards = _shard(entries, dtype, convert_file_size_to_int(max_shard_size))
    n = len(shards)
    files_written, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"{weights_name}.safetensors" if n == 1 else f"{weights_name}-{i:05d}-of-{n:05d}.safetensors"
        total += _write_one_safetensors(os.path.join(output_dir, fname), shard, dtype, ckpt, window_bytes)
        weight_map.update({e.key: fname for e in shard})
        files_written.append(fname)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(output_dir, f"{weights_name}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return files_written

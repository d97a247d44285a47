"""Checkpoints: lazy slices, bf16 shards, and errors naming tensor, file and shapes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import golden_dir
from safetensors.numpy import load_file, save_file

from daskllm.io.checkpoint import Checkpoint, CheckpointError
from daskllm.io.tokenizer import Tokenizer


def _copy(tmp_path, name="llama"):
    dst = tmp_path / name
    shutil.copytree(golden_dir(name), dst)
    return dst


def test_reads_a_slice_only(tmp_path):
    ckpt = Checkpoint(golden_dir("llama"))
    full = ckpt.read("layers.0.wq")
    np.testing.assert_array_equal(ckpt.read("layers.0.wq", (slice(16, 32), slice(None))), full[16:32])
    np.testing.assert_array_equal(ckpt.read("layers.1.wo", (slice(None), slice(0, 8))), ckpt.read("layers.1.wo")[:, :8])


def test_bf16_sharded_checkpoint_reads_as_float32():
    ckpt = Checkpoint(golden_dir("llama_bf16_sharded"))
    assert len({entry[0] for entry in ckpt.entries.values()}) >= 3        # several files
    assert ckpt.entries["embed"][3] == "BF16" and ckpt.read("embed").dtype == np.float32


def test_missing_tensor_is_named(tmp_path):
    d = _copy(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'.*expected shape \(96, 64\)"):
        Checkpoint(d)


def test_misshapen_tensor_names_file_and_both_shapes(tmp_path):
    d = _copy(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight in model\.safetensors "
                                              r"has shape \(16, 64\), expected \(32, 64\)"):
        Checkpoint(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = _copy(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.layers\.0\.mlp\.extra\.weight \(in model\.safetensors\)"):
        Checkpoint(d)


def test_pickle_checkpoints_are_refused_without_opening(tmp_path):
    d = tmp_path / "torch_ckpt"
    d.mkdir()
    shutil.copy(golden_dir("llama") / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="pickle-based checkpoint.*safetensors"):
        Checkpoint(d)
    with pytest.raises(CheckpointError, match="never unpickles"):
        Checkpoint(d / "pytorch_model.bin")


def test_tokenizer_round_trip_and_special_ids():
    tok = Tokenizer.from_dir(golden_dir("llama"))
    assert tok.decode(tok.encode("Hello, world! héllo")) == "Hello, world! héllo"
    assert tok.bos_id == 0 and tok.eos_ids == (1,)
    stream = tok.stream_decoder()
    ids = tok.encode("naïve café")
    assert "".join(stream.step(i) for i in ids) == "naïve café"

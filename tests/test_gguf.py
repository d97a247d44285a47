"""GGUF checkpoints: every tensor type against transformers' GGUF loader, the parser against
gguf.GGUFReader, the tokenizer and chat template against transformers, and bad files."""
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from daskllm.io.checkpoint import CheckpointError
from daskllm.io.formats import open_checkpoint, open_tokenizer
from daskllm.io.gguf import GGUFCheckpoint
from daskllm.io.gguf_file import GGUFFile
from daskllm.model.config import UnsupportedModelError
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh
from fixtures import gguf_models  # tests/ is on sys.path (pytest prepend import mode)

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden" / "gguf"
INFO = json.loads((GOLDEN_DIR / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN_DIR / "golden.safetensors"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny GGUF file of each type, written again; each must be the file the goldens were made from."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for t in gguf_models.TYPES:
        out[t] = gguf_models.write_gguf(d / f"tiny-{t}.gguf", t)
        assert gguf_models.sha256(out[t]) == INFO["types"][t]["sha256"], \
            f"{t}: the fixture writer no longer writes the file the goldens were made from; rerun make_gguf_golden.py"
    return out


def cases(golden, t):
    return [golden[f"{t}.tokens_{i}"].tolist() for i in range(3)], [golden[f"{t}.logits_{i}"] for i in range(3)]


def assert_close(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        err = float(np.abs(g - w).max()) / float(np.abs(w).max())
        assert err <= 1e-4, f"{what}: case {i}: max |daskllm - transformers| is {err:.2e} of max |logit|"


@pytest.mark.parametrize("qtype", gguf_models.TYPES)
def test_every_type_matches_transformers(files, golden, qtype):
    ckpt = GGUFCheckpoint(files[qtype])
    assert ckpt.entries["layers.0.wq"].qtype.name == qtype
    prompts, want = cases(golden, qtype)
    with InProcessReplica(ckpt, Mesh()) as rep:
        assert_close(rep.logits(prompts), want, qtype)


@pytest.mark.parametrize("qtype,tp", [("Q4_K", 2), ("Q4_K", 3), ("Q6_K", 3), ("Q8_0", 4), ("Q4_1", 3)])
def test_tensor_parallel_reads_whole_blocks_and_matches(files, golden, qtype, tp):
    """tp=2 cuts the MLP's 256 columns at 128, inside a 256-value K block (read whole, cropped);
    tp=3 gives one KV head to two ranks and the other to one (uneven GQA)."""
    prompts, want = cases(golden, qtype)
    with InProcessReplica(GGUFCheckpoint(files[qtype]), Mesh(tp=tp)) as rep:
        assert_close(rep.logits(prompts), want, f"{qtype} tp={tp}")


def test_directory_with_one_gguf_and_slices(files, tmp_path):
    (tmp_path / files["Q4_0"].name).symlink_to(files["Q4_0"])
    ckpt = open_checkpoint(tmp_path)
    assert isinstance(ckpt, GGUFCheckpoint)
    whole = ckpt.read("layers.1.w_down")
    assert np.array_equal(ckpt.read("layers.1.w_down", (slice(3, 9), slice(40, 200))), whole[3:9, 40:200])
    wq = ckpt.read("layers.0.wq")
    assert np.array_equal(ckpt.read("layers.0.wq", (slice(128, 384), slice(None))), wq[128:384])
    # the unpermuted rows are the Hugging Face rows (up to Q4_0's rounding)
    ref = gguf_models.hf_weights()["0.wq"]
    assert np.abs(wq - ref).max() < 0.15 * np.abs(ref).max()
    (tmp_path / "second.gguf").symlink_to(files["Q8_0"])
    with pytest.raises(CheckpointError, match="holds 2 .gguf files"):
        open_checkpoint(tmp_path)


def test_parser_agrees_with_gguf_reader(files):
    ours, reader = GGUFFile(files["Q4_K"]), gguf.GGUFReader(files["Q4_K"])
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.qtype, info.offset, info.nbytes) == (t.tensor_type, t.data_offset, t.n_bytes), t.name
        assert info.shape == tuple(int(x) for x in reversed(t.shape)), t.name
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = ours.metadata[key]
            assert (value.tolist() if isinstance(value, np.ndarray) else value) == field.contents(), key


def test_config_from_metadata(files):
    cfg = GGUFCheckpoint(files["Q4_1"]).config
    c = gguf_models.CONFIG
    assert (cfg.family, cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == \
        ("llama", c["layers"], c["hidden"], c["heads"], c["kv_heads"], c["head_dim"])
    assert cfg.tie_embeddings and not GGUFCheckpoint(files["F32"]).config.tie_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position) == (0, (1,), c["context"])


def test_tokenizer_round_trip_equals_transformers(files):
    tok = open_tokenizer(GGUFCheckpoint(files["F32"]))
    ids = tok.encode(INFO["text"])
    assert ids == INFO["tiny_text_ids"]
    assert tok._tok.decode(ids, skip_special_tokens=False) == "<s>" + INFO["text"]
    assert tok.decode(ids) == INFO["text"].replace("<s>", "").replace("</s>", "")


# -- bad files ---------------------------------------------------------------------------

def test_truncated_file_is_refused(files, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = files["Q8_0"].read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: tensor '.*' needs bytes up to"):
        open_checkpoint(cut)
    cut.write_bytes(data[:5000])       # inside the metadata
    with pytest.raises(CheckpointError, match="is truncated: its header needs more"):
        open_checkpoint(cut)


def test_unknown_tensor_type_is_refused(files, tmp_path):
    reader = gguf.GGUFReader(files["Q8_0"])
    tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    type_offset = tensor.field.offset + sum(int(p.nbytes) for p in tensor.field.parts[:4])   # name, n_dims, dims
    data = bytearray(files["Q8_0"].read_bytes())
    assert struct.unpack_from("<I", data, type_offset)[0] == gguf.GGMLQuantizationType.Q8_0
    struct.pack_into("<I", data, type_offset, 99)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor 'blk.1.attn_v.weight' has tensor type 99, which is not a GGUF type"):
        open_checkpoint(bad)


def test_unsupported_architecture_is_refused(files, tmp_path):
    data = files["Q4_0"].read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8        # after the key, its value type (u32) and string length (u64)
    assert data[at:at + 5] == b"llama"
    bad = tmp_path / "gemma.gguf"
    bad.write_bytes(data[:at] + b"gemma" + data[at + 5:])
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gemma' is not supported; supported: llama, qwen2, qwen3"):
        open_checkpoint(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        open_checkpoint(bad)


def test_raw_blocks_for_kernels_that_read_them(files):
    """The rank's Q8_0 blocks as stored (unpermuted rows) decode to the same values read() gives."""
    ckpt = GGUFCheckpoint(files["Q8_0"])
    index = (slice(128, 256), slice(64, 512))
    qtype, raw = ckpt.raw_blocks("layers.0.wk", index)
    assert qtype == gguf.GGMLQuantizationType.Q8_0 and raw.shape == (128, (512 - 64) // 32 * 34)
    assert np.array_equal(gguf.quants.dequantize(raw, qtype), ckpt.read("layers.0.wk", index))
    assert ckpt.stored_dtype("layers.0.wk") == "float32" and GGUFCheckpoint(files["BF16"]).stored_dtype("embed") == "bfloat16"
    with pytest.raises(ValueError, match="do not fall on Q8_0 block boundaries"):
        ckpt.raw_blocks("layers.0.wk", (slice(None), slice(10, 64)))


def test_sentencepiece_tokenizer_equals_transformers(tmp_path):
    """A Llama-2-style vocabulary (scores, byte tokens, no merges stored) against transformers' GGUF tokenizer."""
    path = gguf_models.write_gguf(tmp_path / "tiny-spm.gguf", "Q8_0", tokenizer="llama")
    assert gguf_models.sha256(path) == INFO["spm"]["sha256"]
    tok = open_tokenizer(open_checkpoint(path))
    for text, want, decoded in zip(INFO["spm"]["texts"], INFO["spm"]["ids"], INFO["spm"]["decoded"]):
        ids = tok.encode(text)
        assert ids == want, text
        assert tok.decode(ids) == decoded, text

"""Reading Hugging Face configs: both key styles, and refusals that name what is unsupported."""
from __future__ import annotations

import json

import pytest
from conftest import golden_dir

from daskllm.model.config import ModelConfig, UnsupportedModelError


def _hf(name="llama"):
    return json.loads((golden_dir(name) / "config.json").read_text())


def test_transformers4_and_5_keys_give_the_same_rope():
    v5 = _hf("llama_mha_tied")                      # rope_parameters
    v4 = dict(v5)
    params = v4.pop("rope_parameters")
    v4["rope_theta"] = params.pop("rope_theta")
    v4["rope_scaling"] = params
    assert ModelConfig.from_hf(v4).rope == ModelConfig.from_hf(v5).rope
    assert ModelConfig.from_hf(v5).rope.type == "llama3"
    assert ModelConfig.from_hf(_hf("llama_bf16_sharded")).rope.theta == 500000.0   # a real v4 file


def test_families_and_their_options():
    assert ModelConfig.from_hf(_hf("qwen2")).qkv_bias
    q3 = ModelConfig.from_hf(_hf("qwen3"))
    assert q3.qk_norm == "head" and q3.head_dim == 32
    assert ModelConfig.from_hf(_hf("olmoe")).qk_norm == "full"
    moe = ModelConfig.from_hf(_hf("qwen3_moe")).moe
    assert moe.sparse_layers == (0, 2) and moe.norm_topk_prob
    assert ModelConfig.from_hf(_hf("qwen2_moe")).moe.shared_intermediate_size == 64


def test_unsupported_architecture_is_named():
    hf = _hf()
    hf["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedModelError, match="architecture 'GPT2LMHeadModel' is not supported"):
        ModelConfig.from_hf(hf)


def test_unknown_rope_type_is_refused():
    hf = _hf()
    hf["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic' is not supported"):
        ModelConfig.from_hf(hf)


def test_qwen_sliding_window_in_effect_is_refused_and_mistral_window_is_kept():
    hf = _hf("qwen2")
    hf["use_sliding_window"], hf["sliding_window"] = True, 64
    with pytest.raises(UnsupportedModelError, match="per-layer sliding windows"):
        ModelConfig.from_hf(hf)
    mistral = _hf("mistral")
    mistral["sliding_window"] = 64                  # shorter than the context: a real window, applied exactly
    assert ModelConfig.from_hf(mistral).sliding_window == 64


def test_heads_must_divide():
    hf = _hf()
    hf["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match=r"attention heads \(4\) must be a multiple of KV heads \(3\)"):
        ModelConfig.from_hf(hf)

"""Bad input, fuzzed: damaged checkpoints and odd prompts are refused with a clear message or served,
and the workers keep serving afterwards."""
from __future__ import annotations

import json
import random
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import golden_dir
from safetensors.numpy import load_file, save_file

from daskllm import LLM
from daskllm.engine.validate import RequestError
from daskllm.io.checkpoint import Checkpoint, CheckpointError
from daskllm.io.integrity import MAX_HEADER_BYTES, check_finite, has_nonfinite

WEIGHTS = "model.safetensors"


def _copy(tmp_path, name="llama"):
    dst = tmp_path / name
    shutil.copytree(golden_dir(name), dst)
    return dst


def _split(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data, length=None):
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


def _rewrite(d, mutate):
    """Apply mutate(header) -> data-or-None to the checkpoint's weight file."""
    header, data = _split(d / WEIGHTS)
    data = mutate(header) or data
    _write(d / WEIGHTS, header, data)


# -- the checkpoint reader ----------------------------------------------------------------

def test_a_truncated_file_is_refused_naming_the_file_and_the_missing_bytes(tmp_path):
    d = _copy(tmp_path)
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(raw[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: its header places tensor .* "
                                              r"up to data byte \d+, but the file holds only \d+ data bytes "
                                              r"\(1000 missing\)"):
        Checkpoint(d)


def test_a_file_cut_inside_its_header_or_its_length_is_refused(tmp_path):
    d = _copy(tmp_path)
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(raw[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors declares a header of \d+ bytes, but the file "
                                              r"holds 92 bytes"):
        Checkpoint(d)
    (d / WEIGHTS).write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match=r"is 5 bytes long, too short to hold the 8-byte header length"):
        Checkpoint(d)


@pytest.mark.parametrize("length", [2 ** 64 - 1, 2 ** 40, MAX_HEADER_BYTES + 1])
def test_a_huge_header_length_is_refused_without_reading_it(tmp_path, length):
    d = _copy(tmp_path)
    header, data = _split(d / WEIGHTS)
    _write(d / WEIGHTS, header, data, length=length)
    with pytest.raises(CheckpointError, match=rf"declares a header of {length} bytes.* at most {MAX_HEADER_BYTES}"):
        Checkpoint(d)


def _first(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


@pytest.mark.parametrize("lie, message", [
    ("dtype", r"tensor '.*' \(F16, shape \(384, 64\)\) needs 49152 bytes, but its data_offsets \[0, 98304\] span "
              r"98304: the header lies about its dtype, shape or offsets"),
    ("shape", r"tensor '.*' \(F32, shape \(384, 65\)\) needs 99840 bytes, but its data_offsets"),
    ("unknown dtype", r"tensor '.*' has dtype 'F33', which safetensors does not define \(known: BOOL, "),
    ("overlap", r"tensor '.*' starts at data byte 98300, inside tensor '.*' \(which ends at 98304\): "
                r"the header's data_offsets overlap"),
    ("hole", r"4 data bytes before tensor '.*' \(at 98304\.\.98308\) belong to no tensor"),
    ("negative offset", r"has data_offsets \[-4, 98300\]; \[begin, end\] with 0 <= begin <= end expected"),
    ("shape not a list", r"has shape 'big'; a list of integers >= 0 expected"),
    ("entry not a dict", r"the header entry of tensor '.*' is 7; expected"),
    ("trailing bytes", r"has 16 bytes after the last tensor's data that the header does not account for"),
])
def test_a_header_that_lies_is_refused_naming_the_tensor(tmp_path, lie, message):
    d = _copy(tmp_path)

    def mutate(header):
        names = _first(header)
        first, second = header[names[0]], header[names[1]]
        _, data = _split(d / WEIGHTS)
        if lie == "dtype":
            first["dtype"] = "F16"
        elif lie == "shape":
            first["shape"] = [384, 65]
        elif lie == "unknown dtype":
            first["dtype"] = "F33"
        elif lie == "overlap":
            second["data_offsets"] = [second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]
        elif lie == "hole":
            for name in names[1:]:
                header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
            return data + b"\0" * 4
        elif lie == "negative offset":
            first["data_offsets"] = [-4, first["data_offsets"][1] - 4]
        elif lie == "shape not a list":
            first["shape"] = "big"
        elif lie == "entry not a dict":
            header[names[0]] = 7
        elif lie == "trailing bytes":
            return data + b"\0" * 16
        return None
    _rewrite(d, mutate)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(d)
    assert f"safetensors file {d / WEIGHTS}" in str(info.value)


def test_a_header_that_is_not_json_is_refused(tmp_path):
    d = _copy(tmp_path)
    header, data = _split(d / WEIGHTS)
    text = b"\xff" + json.dumps(header).encode()[1:]
    (d / WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + data)
    with pytest.raises(CheckpointError, match=r"has a header that is not UTF-8 JSON"):
        Checkpoint(d)
    text = b"[1, 2]"
    (d / WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + data)
    with pytest.raises(CheckpointError, match=r"has a header that is a JSON list, not an object"):
        Checkpoint(d)


def test_random_damage_is_refused_with_a_checkpoint_error_or_harmless(tmp_path):
    """Seeded fuzz: flipped header bytes and random cuts never escape as another exception."""
    rng = random.Random(16)
    raw = (golden_dir("llama") / WEIGHTS).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    d = _copy(tmp_path)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(60):
        damaged = bytearray(raw)
        if case % 3 == 0:
            damaged = damaged[:rng.randrange(0, len(raw))]
        else:
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(0, 8 + n)] = rng.randrange(256)
        (d / WEIGHTS).write_bytes(bytes(damaged))
        try:
            Checkpoint(d)
            outcomes["loaded"] += 1              # e.g. a flip inside the metadata's "pt"
        except CheckpointError as e:
            assert "model.safetensors" in str(e) or "tensor" in str(e), f"case {case}: {e}"
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 40, outcomes


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_nonfinite_values_are_found_in_every_float_dtype(dtype):
    x = np.linspace(-3, 3, 3_000_001).astype(dtype)
    assert not has_nonfinite(x)
    assert not has_nonfinite(np.array([np.finfo(np.float16).max, -np.finfo(np.float16).max]).astype(dtype))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2_500_000] = bad                      # beyond the first chunk of the check
        assert has_nonfinite(y), (dtype, bad)
    assert not has_nonfinite(np.arange(10, dtype=np.int8))


def test_nan_or_inf_in_a_slice_is_refused_naming_tensor_counts_and_slice():
    x = np.ones((8, 4), np.float32)
    x[1, 2], x[5, 0], x[6, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(CheckpointError, match=r"tensor w in model\.safetensors holds 1 NaN and 2 inf values "
                                              r"\(in the slice \[0:8, :4\] this rank reads\): the checkpoint "
                                              r"is corrupt .* refuses to load it"):
        check_finite(x, "w", "/x/model.safetensors", (slice(0, 8), slice(None, 4)))


def _with_nan(tmp_path, name="model.layers.1.mlp.down_proj.weight", row=3, value=np.nan):
    d = _copy(tmp_path)
    tensors = load_file(str(d / WEIGHTS))
    tensors[name][row, 0] = value
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})
    return d


def test_a_checkpoint_with_nan_opens_but_its_tensor_is_refused_when_read(tmp_path):
    d = _with_nan(tmp_path, value=np.inf)
    ckpt = Checkpoint(d)                         # headers only: the data is checked as it is read
    ckpt.read("layers.1.w_down", (slice(None), slice(8, 16)))   # another part of the tensor is clean
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight in model\.safetensors "
                                              r"holds 0 NaN and 1 inf"):
        ckpt.read("layers.1.w_down")


def test_a_tokenizer_that_yields_ids_beyond_the_model_is_refused_on_the_client(tmp_path):
    from daskllm.engine.validate import check_prompt
    from daskllm.io.tokenizer import Tokenizer
    from daskllm.model.config import ModelConfig
    d = _copy(tmp_path)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": 384, "content": "<extra>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": False})
    (d / "tokenizer.json").write_text(json.dumps(spec))
    cfg = ModelConfig.from_file(d / "config.json")
    with pytest.raises(RequestError, match=r"the tokenizer turned the prompt into token id 384, outside the "
                                           r"model's vocabulary \(0\.\.383\): tokenizer.json does not match"):
        check_prompt("hi <extra>", Tokenizer.from_dir(d), cfg, 4)


# -- a served model: bad checkpoints and bad requests leave the workers serving ------------

@pytest.fixture(scope="module")
def llm(client):
    with LLM(golden_dir("llama"), client=client) as model:
        yield model


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate([[5, 6, 7, 8]], max_new_tokens=8, ignore_eos=True)[0].token_ids


def _still_serving(llm, reference):
    assert llm.generate([[5, 6, 7, 8]], max_new_tokens=8, ignore_eos=True)[0].token_ids == reference
    assert not llm.router.lost, f"a replica was lost: {llm.router.lost}"


@pytest.mark.cluster
def test_nan_weights_fail_the_load_naming_tensor_and_rank_and_the_workers_serve_on(client, llm, reference, tmp_path):
    d = _with_nan(tmp_path)
    with pytest.raises(Exception, match=r"rank 0 \(replica 0\) on worker .* failed in load: CheckpointError: "
                                        r"tensor model\.layers\.1\.mlp\.down_proj\.weight in model\.safetensors "
                                        r"holds 1 NaN and 0 inf values \(in the slice \[:, 0:48\] this rank reads\)"):
        LLM(d, tp=2, client=client)
    _still_serving(llm, reference)


@pytest.mark.cluster
@pytest.mark.parametrize("prompt, message", [
    ([384], r"token id 384 is outside the vocabulary \(ids must be in 0\.\.383\)"),
    ([-1, 5], r"token id -1 is outside the vocabulary"),
    ([5, 2 ** 64], r"token id 18446744073709551616 is outside the vocabulary"),
    ([1.5, 2], r"a prompt is a str or a list of int token ids; found float"),
    ([], r"empty prompt: give at least one token"),
    ("", r"empty prompt: give at least one token"),
    (b"\x00\xff\x10", r"a prompt is a str or a list of int token ids; got bytes: decode text first"),
    ("\udcff lone surrogate", r"prompt text is not valid Unicode: surrogates not allowed \('\\udcff' at position 0\)"),
    ([7] * 300, r"prompt of 300 tokens \+ max_new_tokens 4 = 304 exceeds the model's context of 256 tokens"),
])
def test_bad_prompts_are_refused_before_any_worker_is_touched(llm, reference, prompt, message):
    steps = sum(e.steps for e in llm.router.engines)
    with pytest.raises(RequestError, match=message):
        llm.generate([prompt], max_new_tokens=4)        # a list of one prompt: no ambiguity about []
    assert sum(e.steps for e in llm.router.engines) == steps
    _still_serving(llm, reference)


@pytest.mark.cluster
@pytest.mark.parametrize("stop, message", [
    ("", r"stop strings must not be empty"),
    ([""], r"stop strings must not be empty"),
    ([b"x"], r"stop strings must be str, got bytes"),
])
def test_bad_stop_strings_are_refused(llm, reference, stop, message):
    with pytest.raises(RequestError, match=message):
        llm.generate("Hello", max_new_tokens=4, stop=stop)
    _still_serving(llm, reference)


@pytest.mark.cluster
def test_stop_strings_longer_than_any_output_are_served_to_the_length_limit(llm, reference):
    plain = llm.generate("Hello there", max_new_tokens=12, ignore_eos=True)[0]
    for stop in ["x" * 10_000, ["\x00" * 50, "\u202e" * 3 + plain.text + "!"], plain.text + plain.text]:
        out = llm.generate("Hello there", max_new_tokens=12, ignore_eos=True, stop=stop)[0]
        assert (out.text, out.token_ids, out.finish_reason) == (plain.text, plain.token_ids, "length")
        assert "".join(llm.stream("Hello there", max_new_tokens=12, ignore_eos=True, stop=stop)) == plain.text
    _still_serving(llm, reference)


def _random_text(rng, n):
    """Control characters, NULs, escape sequences, right-to-left marks, emoji, CJK, combining marks."""
    pool = ([chr(c) for c in range(0, 32)] + ["\x7f", "\x1b[31m", "\u202e", "\u200b", "\ufeff", "\U0001F600",
            "漢字", "e\u0301", "\r\n", "\t"] + [chr(rng.randrange(0x20, 0x2FFF)) for _ in range(20)])
    return "".join(rng.choice(pool) for _ in range(n))


@pytest.mark.cluster
def test_random_text_and_ids_are_served_or_refused_and_the_workers_serve_on(llm, reference):
    rng = random.Random(1616)
    served = refused = 0
    for case in range(40):
        kind = case % 4
        if kind == 0:
            prompt = _random_text(rng, rng.randint(1, 60))
        elif kind == 1:     # random bytes, decoded the way a careless caller would
            prompt = bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))).decode("utf-8", "replace")
        elif kind == 2:
            prompt = [rng.randrange(-5, 400) for _ in range(rng.randint(0, 40))]
        else:
            prompt = [rng.randrange(384) for _ in range(rng.randint(1, 250))]
        try:
            out = llm.generate(prompt, max_new_tokens=4, stop=[_random_text(rng, 2)])[0]
        except RequestError as e:
            assert str(e), f"case {case}: an empty message"
            refused += 1
            continue
        assert 1 <= len(out.token_ids) <= 4 and out.finish_reason in ("eos", "stop", "length"), f"case {case}"
        assert all(0 <= t < 384 for t in out.token_ids), f"case {case}"
        served += 1
    assert served >= 20 and refused >= 5, (served, refused)
    _still_serving(llm, reference)

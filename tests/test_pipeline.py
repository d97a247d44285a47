"""Pipeline parallelism: stages of whole layers give the single rank's logits and tokens, alone and
composed with tp, sp and ep (in process), on a cluster with dp, with many requests in flight at
once (the stages overlap), and a lost middle stage is named and recovered."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import dask

import numpy as np
import pytest
from conftest import DENSE, MOE, golden_dir
from numpy.testing import assert_allclose
from safetensors.numpy import load_file, save_file

from daskllm import LLM
from daskllm.engine.router import NoReplicaError
from daskllm.io.checkpoint import Checkpoint
from daskllm.io.tokenizer import Tokenizer
from daskllm.model.sampling import SamplingParams
from daskllm.parallel.compose import check, full_plan
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh, MeshError
from daskllm.parallel.pipeline import stage_bounds
from daskllm.parallel.plan import Staged, rank_slices

PROMPTS = [[5, 17, 240, 3, 99, 12, 7], [300], [42, 42, 8]]
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
FAULTS = {"daskllm.step-timeout": 8, "daskllm.comm-timeout": 3, "daskllm.rebuild-timeout": 180}


def deepen(family: str, layers: int, path) -> Checkpoint:
    """The golden `family` checkpoint grown to `layers` layers: layer i is the golden layer i % n with
    its matrices scaled by 1 + 0.1 i (so that a stage running the wrong layers gives other logits)."""
    src = golden_dir(family)
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    tensors = load_file(str(src / "model.safetensors"))
    out = {k: v for k, v in tensors.items() if not LAYER.match(k)}
    for i in range(layers):
        for name, value in tensors.items():
            m = LAYER.match(name)
            if m and int(m.group(1)) == i % n:
                scale = 1.0 if value.ndim == 1 else 1 + 0.1 * i
                out[f"model.layers.{i}.{m.group(2)}"] = (value.astype(np.float32) * scale).astype(value.dtype)
    cfg["num_hidden_layers"] = layers
    if cfg.get("mlp_only_layers"):
        cfg["mlp_only_layers"] = [i for i in range(layers) if i % n in cfg["mlp_only_layers"]]
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).exists():
            shutil.copy(src / extra, path / extra)
    return Checkpoint(str(path))


def run(checkpoint, mesh, params=SamplingParams()):
    with InProcessReplica(checkpoint, mesh) as replica:
        return replica.logits(PROMPTS), replica.generate(PROMPTS, 6, params)


def assert_same(checkpoint, mesh, params=SamplingParams()):
    want_logits, want_tokens = run(checkpoint, Mesh(), params)
    got_logits, got_tokens = run(checkpoint, mesh, params)
    for g, w in zip(got_logits, want_logits):
        assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()), err_msg=str(mesh))
    assert got_tokens == want_tokens, mesh


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Five-layer versions of the golden checkpoints, written once per module."""
    made = {}

    def get(family, layers=5):
        if (family, layers) not in made:
            made[family, layers] = deepen(family, layers, tmp_path_factory.mktemp(f"{family}-{layers}"))
        return made[family, layers]
    return get


# -- the stage cut and the plan -------------------------------------------------------------

def test_stages_are_contiguous_cover_every_layer_and_balance_bytes():
    cfg = Checkpoint(str(golden_dir("llama"))).config.with_(n_layers=7)
    for pp in (1, 2, 3, 7):
        bounds = stage_bounds(cfg, pp)
        assert len(bounds) == pp and bounds[0][0] == 0 and bounds[-1][1] == 7
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:] + [(7, 8)]))



def test_the_cut_minimises_the_largest_stage_read_per_step():
    """Every contiguous cut, tried: none has a smaller largest stage (layers, plus the LM head on
    the last; the embedding, one row per token, does not count)."""
    from itertools import combinations

    from daskllm.io.names import expected_shapes
    cfg = Checkpoint(str(golden_dir("llama"))).config
    layer = sum(int(np.prod(shape)) for name, shape in expected_shapes(cfg).items() if name.startswith("layers.0."))
    heavy = cfg.with_(n_layers=10, vocab_size=3 * layer // cfg.hidden_size)      # an LM head of three layers
    head = heavy.vocab_size * heavy.hidden_size
    for pp in (2, 3, 4):
        def worst(bounds):
            return max((hi - lo) * layer + head * (p == pp - 1) for p, (lo, hi) in enumerate(bounds))
        best = min(worst(list(zip((0,) + cuts, cuts + (10,)))) for cuts in combinations(range(1, 10), pp - 1))
        bounds = stage_bounds(heavy, pp)
        assert worst(bounds) == best, (pp, bounds)
        sizes = [hi - lo for lo, hi in bounds]
        assert sizes[-1] < sizes[0], sizes                   # the last stage makes room for the head


def test_plan_places_layers_on_stages_and_a_tied_table_on_both_ends():
    cfg = Checkpoint(str(golden_dir("llama_mha_tied"))).config
    plan = full_plan(cfg, Mesh(pp=2, tp=2))
    assert plan["embed"] == Staged((0, 1), plan["embed"].inner)                      # tied: also the LM head
    assert plan["norm"].stages == (1,) and plan["layers.0.wq"].stages == (0,) and plan["layers.1.wq"].stages == (1,)
    assert "Split(dim=0, axis='tp'" in str(plan["layers.1.wq"]) and str(plan["layers.1.wq"]).endswith("on stage 1")
    shapes = {n: Checkpoint(str(golden_dir("llama_mha_tied"))).shape(n) for n in plan}
    stage0 = rank_slices(plan, shapes, Mesh(pp=2, tp=2).coords(1))
    assert "layers.0.wq" in stage0 and "layers.1.wq" not in stage0 and "norm" not in stage0
    stage1 = rank_slices(plan, shapes, Mesh(pp=2, tp=2).coords(2))
    assert "layers.1.wq" in stage1 and "embed" in stage1 and "layers.0.wq" not in stage1


def test_mesh_numbers_stages_outermost_and_pp_groups_across_them():
    mesh = Mesh(dp=2, tp=2, pp=3)
    assert mesh.replica_size == 6 and mesh.world_size == 12 and mesh.sampling_rank == 4
    assert mesh.coords(9) == {"dp": 1, "tp": 1, "sp": 0, "ep": 0, "pp": 1}
    assert mesh.group(9, "pp") == [7, 9, 11] and mesh.group(9, "tp") == [8, 9] and mesh.group(9, "replica") == list(range(6, 12))
    assert "  pp" in mesh.table().splitlines()[0]


def test_more_stages_than_layers_is_refused_before_any_rank():
    cfg = Checkpoint(str(golden_dir("llama"))).config
    with pytest.raises(MeshError, match=r"pp \(3\) must be at most the model's 2 layers"):
        check(cfg, Mesh(pp=3), {})
    with pytest.raises(MeshError, match="pp must be an integer >= 1"):
        Mesh(pp=0)


# -- exact against one rank, in process -------------------------------------------------------

@pytest.mark.parametrize("family", DENSE + MOE)
def test_two_stages_give_the_single_rank_logits_and_tokens(family):
    assert_same(Checkpoint(str(golden_dir(family))), Mesh(pp=2))


@pytest.mark.parametrize("family", ["llama", "llama_mha_tied", "qwen3", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("pp", [2, 3])
def test_uneven_stages_of_five_layers(deep, family, pp):
    assert_same(deep(family), Mesh(pp=pp))


@pytest.mark.parametrize("family, mesh", [("llama", Mesh(pp=2, tp=2)), ("qwen2", Mesh(pp=3, tp=2)),
                                          ("qwen2_moe", Mesh(pp=2, ep=2)), ("mixtral", Mesh(pp=2, tp=2, ep=2)),
                                          ("llama", Mesh(pp=2, sp=2)), ("qwen3", Mesh(pp=2, tp=2, sp=2))],
                         ids=str)
def test_stages_compose_with_tp_ep_and_sp(deep, family, mesh):
    assert_same(deep(family), mesh)


def test_sampled_tokens_match_through_the_stages(deep):
    assert_same(deep("llama"), Mesh(pp=3), SamplingParams(0.8, 20, 0.9, seed=7))


# -- on a cluster -------------------------------------------------------------------------

@pytest.mark.cluster
def test_sixteen_requests_in_flight_through_two_stages_on_workers(client, deep):
    """The driver keeps two micro-batches in flight; every request gets the single rank's tokens,
    and only the stage boundary's hidden states cross between the stages."""
    ckpt = deep("llama")
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, 380, size=int(rng.integers(1, 20)))] for _ in range(16)]
    with InProcessReplica(ckpt, Mesh()) as one:
        want = one.generate(prompts, 8)
    with LLM(ckpt.path, pp=2, client=client) as llm:
        assert llm.replicas[0].pipeline_depth == 2
        got = [o.token_ids for o in llm.generate(prompts, max_new_tokens=8, ignore_eos=True)]
        stats = llm.comm_stats()[0]
        (lo, hi), _ = stage_bounds(ckpt.config, 2)
        assert f"stage 0: layers {lo}-{hi - 1}" in llm.plan()
        steps = llm.router.engines[0].steps
    assert got == want
    fed = sum(len(p) for p in prompts) + 16 * 7          # every token but the last goes through the model
    assert stats["pp"]["send"]["bytes_sent"] == ckpt.config.hidden_size * 4 * fed   # hidden x 4 B x tokens x (pp-1)
    assert steps >= 2 * 8                                # two micro-batches per decode round


@pytest.mark.cluster
def test_logits_from_another_thread_wait_for_the_pipeline_to_drain(client, deep):
    """A driver call from another thread gets between pipelined steps only once none is in flight:
    its logits and the generation's tokens both stay exact."""
    ckpt = deep("llama")
    prompts = [[int(t) for t in np.random.default_rng(i).integers(1, 380, size=12)] for i in range(8)]
    with InProcessReplica(ckpt, Mesh()) as one:
        want_tokens, want_logits = one.generate(prompts, 24), one.logits(PROMPTS[:1])
    with LLM(ckpt.path, pp=2, client=client) as llm:
        requests = llm.submit(prompts, max_new_tokens=24, ignore_eos=True)
        got_logits = []
        while not all(r.finished for r in requests):
            got_logits.append(llm.logits(PROMPTS[:1])[0])
        assert [r.wait(timeout=60).token_ids for r in requests] == want_tokens
    assert got_logits
    for got in got_logits:
        assert_allclose(got, want_logits[0], rtol=1e-5, atol=1e-5 * float(np.abs(want_logits[0]).max()))


@pytest.mark.cluster
def test_data_parallel_pipelines(client, deep):
    ckpt = deep("llama_mha_tied")
    with InProcessReplica(ckpt, Mesh()) as one:
        want = one.generate(PROMPTS, 6)
    with LLM(ckpt.path, dp=2, pp=2, client=client) as llm:
        assert len(llm.replicas) == 2
        assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)] == want


@pytest.mark.cluster
def test_two_stages_of_tensor_and_expert_parallel_ranks_on_workers(client, deep):
    ckpt = deep("qwen2_moe")
    with InProcessReplica(ckpt, Mesh()) as one:
        want = one.generate(PROMPTS, 6)
    with LLM(ckpt.path, pp=2, tp=2, ep=2, client=client) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)] == want
        stats = llm.comm_stats()
    assert all(stats[r]["tp"]["all_reduce"]["calls"] > 0 for r in range(4))
    assert stats[0]["pp"]["send"]["calls"] > 0 and stats[3]["pp"]["recv"]["calls"] > 0


@pytest.mark.cluster
def test_on_actor_calls_a_pipeline_steps_one_at_a_time(client, deep):
    """daskllm.control='actor' (no control connections): one step in flight, the same tokens."""
    ckpt = deep("llama")
    with InProcessReplica(ckpt, Mesh()) as one:
        want = one.generate(PROMPTS, 6)
    with dask.config.set({"daskllm.control": "actor"}), LLM(ckpt.path, pp=2, client=client) as llm:
        assert llm.replicas[0].pipeline_depth == 1
        assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)] == want
        with pytest.raises(RuntimeError, match="pipelined steps need the control connections"):
            llm.replicas[0].submit_step([])


@pytest.mark.cluster
def test_the_cli_runs_a_pipeline(deep):
    ckpt = deep("llama")
    tok = Tokenizer.from_dir(ckpt.path)
    with InProcessReplica(ckpt, Mesh()) as one:
        expected = tok.decode(one.generate([tok.encode("Hello world")], 8)[0])
    out = subprocess.run([sys.executable, "-m", "daskllm.cli", "generate", "--model", str(ckpt.path), "--pp", "2",
                          "--max-new-tokens", "8", "--ignore-eos", "Hello world"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected.strip()


@pytest.fixture
def cluster4():
    """A private cluster of 4 workers: pp=3 and a spare; these tests kill one."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, direct_to_workers=True) as client:
        yield client


def _kill_middle_stage(client, llm, prompts):
    requests = llm.submit(prompts, max_new_tokens=40, ignore_eos=True)
    while not any(r.generated for r in requests):
        time.sleep(0.005)
    victim = llm.replicas[0].workers[1]                  # local rank 1: the middle stage of three
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    return requests, victim


@pytest.mark.cluster
def test_a_killed_middle_stage_is_named_within_the_timeout(cluster4, deep):
    with dask.config.set({**FAULTS, "daskllm.rebuild-timeout": 0}), LLM(deep("llama").path, pp=3, client=cluster4) as llm:
        start = time.monotonic()
        requests, victim = _kill_middle_stage(cluster4, llm, PROMPTS)
        with pytest.raises(NoReplicaError, match=re.escape(victim)):
            requests[0].wait(timeout=60)
        assert time.monotonic() - start < FAULTS["daskllm.step-timeout"] + 5


@pytest.mark.cluster
def test_a_killed_middle_stage_is_rebuilt_and_its_requests_replayed(cluster4, deep):
    ckpt = deep("llama")
    with InProcessReplica(ckpt, Mesh()) as one:
        want = one.generate(PROMPTS, 40)
    with dask.config.set(FAULTS), LLM(ckpt.path, pp=3, client=cluster4) as llm:
        requests, victim = _kill_middle_stage(cluster4, llm, PROMPTS)
        assert [r.wait(timeout=120).token_ids for r in requests] == want
        assert llm.router.recovery.rebuilt == 1 and victim not in llm.replicas[0].workers

"""Expert parallelism, in process: every MoE family and mesh gives the single-rank logits and tokens."""
import importlib.util
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose
from safetensors.numpy import load_file, save_file

from daskllm.comm.threads import ThreadHub
from daskllm.io.checkpoint import Checkpoint
from daskllm.parallel import expert
from daskllm.parallel.build import build_runner
from daskllm.parallel.compose import axis_communicators, check, full_plan, rank_setup
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh, MeshError
from daskllm.parallel.plan import Experts, Replicated, rank_slices

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
PROMPTS = [[5, 17, 240, 3, 99, 12, 7], [300], [42, 42, 8]]   # uneven lengths: uneven token shares


def mesh_or_skip(**axes) -> Mesh:
    """The mesh, or a skip naming what this version lacks (mesh rule or strategy module)."""
    for axis, module in (("tp", "tensor"), ("sp", "sequence")):
        if axes.get(axis, 1) > 1 and importlib.util.find_spec(f"daskllm.parallel.{module}") is None:
            pytest.skip(f"daskllm/parallel/{module}.py does not exist yet ({axis} > 1 with ep)")
    try:
        return Mesh(**axes)
    except MeshError as e:
        pytest.skip(f"parallel/mesh.py refuses {axes}: {e}")


_REFERENCE = {}


def reference(family, sequences=None, checkpoint=None):
    """(logits, greedy tokens) of the single-rank forward (cached per family)."""
    key = family if sequences is None else None
    if key not in _REFERENCE:
        with InProcessReplica(checkpoint or Checkpoint(GOLDEN / family), Mesh()) as rep:
            result = rep.logits(sequences or golden_tokens(family)), rep.generate(PROMPTS, 8)
        if key is None:
            return result
        _REFERENCE[key] = result
    return _REFERENCE[key]


def golden_tokens(family):
    g = load_file(GOLDEN / family / "golden.safetensors")
    return [g[f"tokens_{i}"].tolist() for i in range(4)]


def assert_same_as_reference(checkpoint, mesh, expected, sequences, label):
    ref_logits, ref_tokens = expected
    with InProcessReplica(checkpoint, mesh) as rep:
        logits = rep.logits(sequences)
        tokens = rep.generate(PROMPTS, 8)
    for i, (got, want) in enumerate(zip(logits, ref_logits)):
        scale = np.abs(want).max()
        assert_allclose(got / scale, want / scale, rtol=0, atol=2e-6, err_msg=f"{label}: sequence {i}")
    assert tokens == ref_tokens, f"{label}: greedy tokens"


@pytest.mark.parametrize("ep", [2, 3, 4])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_ep_alone_matches_single_rank(family, ep):
    mesh = mesh_or_skip(ep=ep)
    assert_same_as_reference(Checkpoint(GOLDEN / family), mesh, reference(family),
                             golden_tokens(family), f"{family} {mesh}")


@pytest.mark.parametrize("axes", [dict(tp=2, ep=2), dict(sp=2, ep=2), dict(tp=2, sp=2, ep=2),
                                  dict(tp=2, sp=2, ep=4), dict(tp=4, ep=2), dict(tp=2, sp=3, ep=3)], ids=str)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_ep_with_tp_and_sp_matches_single_rank(family, axes):
    """tp=4, ep=2: two ep groups share one tp group; tp=2, sp=3, ep=3: a group straddles sp ranks."""
    mesh = mesh_or_skip(**axes)
    assert_same_as_reference(Checkpoint(GOLDEN / family), mesh, reference(family),
                             golden_tokens(family), f"{family} {mesh}")


def write_skewed_copy(family, tmp_path) -> Path:
    """A copy of the fixture whose routers are zero: all experts tie, so every token picks 0..A-1."""
    src, dst = GOLDEN / family, tmp_path / family
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "golden.json":
            shutil.copy(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    routers = [n for n in tensors if n.endswith("mlp.gate.weight") or n.endswith("block_sparse_moe.gate.weight")]
    assert routers, f"{family}: no router tensor found"
    for name in routers:
        tensors[name] = np.zeros_like(tensors[name])
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_all_tokens_to_one_rank_is_still_exact(family, tmp_path):
    ckpt = Checkpoint(write_skewed_copy(family, tmp_path))
    sequences = golden_tokens(family)
    expected = reference(family, sequences, ckpt)
    for axes in (dict(ep=2), dict(ep=4), dict(sp=2, ep=2)):
        mesh = mesh_or_skip(**axes)                   # experts 0 and 1 both live on ep rank 0
        assert_same_as_reference(ckpt, mesh, expected, sequences, f"skewed {family} {mesh}")
    with InProcessReplica(ckpt, mesh) as rep:         # sp=2, ep=2: tokens travel to their experts
        rep.logits(sequences)
        received = [c["ep"].stats.ops["all_to_all"].bytes_received for c in rep.comms]
    assert received[0] == max(received) > 0, f"{mesh}: rank 0 should receive the most: {received}"


@pytest.mark.parametrize("ep", [2, 3])
def test_rank_holds_only_its_experts(ep):
    mesh = mesh_or_skip(ep=ep)
    ckpt = Checkpoint(GOLDEN / "mixtral")
    cfg = ckpt.config
    ranges = expert.expert_ranges(cfg.moe.n_experts, ep)
    expert_bytes = sum(ckpt.nbytes(n) for n in ckpt.entries if ".experts." in n)
    one_expert = expert_bytes // (cfg.moe.n_experts)
    with InProcessReplica(ckpt, Mesh()) as rep:
        dense = rep.runners[0].model.weights.nbytes() - expert_bytes
    with InProcessReplica(ckpt, mesh) as rep:
        for p, runner in enumerate(rep.runners):
            held = sorted(runner.model.weights.layers[0]["experts"])
            assert held == list(range(*ranges[p])), f"rank {p} holds experts {held}"
            assert runner.model.weights.nbytes() == dense + (ranges[p][1] - ranges[p][0]) * one_expert, \
                f"rank {p}: resident bytes"


def test_plan_spreads_experts_contiguously_and_unevenly():
    cfg = Checkpoint(GOLDEN / "qwen3_moe").config                      # 8 experts, layers 0 and 2 sparse
    assert expert.expert_ranges(8, 3) == [(0, 3), (3, 6), (6, 8)]
    plan = expert.plan(cfg, Mesh(tp=3, ep=3))
    assert plan["layers.0.experts.2.w_down"] == Experts(axis="ep", owner=0)
    assert plan["layers.2.experts.3.w_gate"] == Experts(axis="ep", owner=1)
    assert plan["layers.2.experts.7.w_up"] == Experts(axis="ep", owner=2)
    assert plan["layers.0.router"] == Replicated()
    assert not any(k.startswith("layers.1.") for k in plan), "layer 1 is dense"
    full = {n: s for n, s in full_plan(cfg, Mesh()).items()}
    full.update(plan)
    shapes = {n: (1,) for n in full}
    read = rank_slices(full, shapes, {"ep": 2})
    assert sorted({n.split(".")[3] for n in read if ".experts." in n}) == ["6", "7"]
    assert "layers.0.router" in read and "layers.1.w_down" in read, "router and dense MLP on every rank"


def test_check_refuses_dense_models_and_too_many_ranks():
    dense = Checkpoint(GOLDEN / "llama").config
    with pytest.raises(MeshError, match=r"ep \(2\).*dense.*0 experts"):
        expert.check(dense, Mesh(tp=2, ep=2), {})
    moe = Checkpoint(GOLDEN / "mixtral").config
    with pytest.raises(MeshError, match=r"ep \(16\).*number of experts per layer \(8\).*ep <= 8"):
        expert.check(moe, Mesh(tp=16, ep=16), {})
    mesh = mesh_or_skip(ep=9)
    with pytest.raises(MeshError, match=r"ep \(9\).*\(8\)"):
        check(moe, mesh)


def test_load_per_rank_and_share_bounds():
    assert expert.load_per_rank([5, 1, 0, 2, 2, 0, 0, 6], 3).tolist() == [6, 4, 6]
    shares = [expert.share_bounds(7, 3, i) for i in range(3)]
    assert shares == [(0, 3), (3, 5), (5, 7)]
    assert expert.share_bounds(1, 4, 3) == (1, 1)


def replica_logits(checkpoint, mesh, sequences, xp):
    """Full logits of one replica whose ranks (threads) hold their weights on `xp`."""
    hub = ThreadHub(mesh.replica_size)

    def rank(r):
        comms = axis_communicators(hub.transport(r), mesh, r, 60.0)
        setup = rank_setup(checkpoint.config, mesh, r, comms)
        runner = build_runner(checkpoint, setup.plan, setup.coords, setup.seams, setup.tp_comm,
                              setup.vocab_start, xp=xp)
        return runner.full_logits(sequences)
    with ThreadPoolExecutor(mesh.replica_size) as pool:
        futures = [pool.submit(rank, r) for r in range(mesh.replica_size)]
        return [f.result(timeout=120) for f in futures][0]


@pytest.mark.gpu
@pytest.mark.parametrize("axes", [dict(ep=2), dict(ep=3), dict(tp=2, ep=2), dict(tp=2, sp=2, ep=4)], ids=str)
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_ep_on_cupy_matches_numpy_reference(family, axes):
    cupy = pytest.importorskip("cupy")
    mesh = mesh_or_skip(**axes)
    sequences = golden_tokens(family)
    got = replica_logits(Checkpoint(GOLDEN / family), mesh, sequences, cupy)
    for i, (g, want) in enumerate(zip(got, reference(family)[0])):
        scale = np.abs(want).max()
        assert_allclose(g / scale, want / scale, rtol=0, atol=1e-5, err_msg=f"{family} {mesh} on cupy: sequence {i}")

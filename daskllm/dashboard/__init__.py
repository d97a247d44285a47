"""What a person watches: the /daskllm page on the scheduler's dashboard, HTML tables in
Jupyter, progress bars, and drawings for notebooks.

The page is served by a scheduler plugin registered from the client (plugin.py) and fed by
a publisher thread per LLM (publisher.py); it reads statistics, it never drives the ranks.
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets

_count = itertools.count()


def attach(llm, interval: float):
    """Serve the page on `llm`'s cluster and start publishing its statistics; the Publisher, or
    None when `interval` is 0 (turned off) or the scheduler refused the plugin (logged)."""
    if not interval:
        return None
    from .plugin import install
    from .publisher import Publisher
    try:
        install(llm.client)
    except Exception as e:   # noqa: BLE001 - no page is no reason to refuse to serve the model
        logging.getLogger("daskllm.dashboard").warning("daskllm: the /daskllm dashboard page is not available: %s", e)
        return None
    m = llm.mesh
    axes = " ".join(f"{a}={getattr(m, a)}" for a in ("dp", "tp", "sp", "ep") if getattr(m, a) > 1) or "one rank"
    name = f"{os.path.basename(llm.path)} ({axes}) #{next(_count)}-{secrets.token_hex(2)}"
    return Publisher(llm, name, interval)


def page_link(client) -> str | None:
    """The address of the daskllm page on `client`'s dashboard (None without a dashboard)."""
    link = client.dashboard_link
    if not link:
        return None
    return link.rsplit("/status", 1)[0].rstrip("/") + "/daskllm"

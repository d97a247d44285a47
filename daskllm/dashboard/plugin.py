"""DashboardPlugin: the scheduler plugin that serves the daskllm page at /daskllm.

Registered from the client at run time (`install(client)`), so any cluster gets the page
(LocalCluster, dask-ssh, SLURM): on start it adds a small tornado application to the
scheduler's HTTP server and a scheduler handler, `daskllm_publish`, through which each
LLM's publisher (publisher.py) hands in snapshots of its statistics. The page reads
`/daskllm/data.json`, built from the snapshots kept here (view.py); nothing here talks to
the workers or drives the scheduler.
"""
from __future__ import annotations

import json
import time
from collections import deque
from importlib import resources

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from .view import view

NAME = "daskllm-dashboard"
HISTORY = 60          # snapshots kept per LLM (about a minute at one a second)
PAGE_TITLE = "Daskllm"   # the name dask-labextension lists the page under


class DashboardPlugin(SchedulerPlugin):
    """Keeps each LLM's latest snapshots and serves the page; one per scheduler (idempotent)."""

    idempotent = True
    name = NAME

    def __init__(self):
        self.history = {}             # LLM name -> deque of snapshots, oldest first
        self._app = None
        self._listing = None          # (rule, original target) of /individual-plots.json

    async def start(self, scheduler):
        self.scheduler = scheduler
        prefix, listing = _prefix_and_listing(scheduler.http_application)
        self._app = web.Application([
            (rf"{prefix}daskllm/?", PageHandler, {"data_url": f"{prefix}daskllm/data.json"}),
            (rf"{prefix}daskllm/data.json", DataHandler, {"plugin": self}),
        ])
        scheduler.http_application.add_application(self._app)
        if listing is not None:       # list the page for dask-labextension
            self._listing = (listing, listing.target)
            listing.target = _with_daskllm(listing.target, f"{prefix}daskllm")
        scheduler.handlers["daskllm_publish"] = self.publish

    def publish(self, name: str, snapshot: dict) -> bool:
        """Scheduler handler, called by an LLM's publisher with a fresh snapshot."""
        self.history.setdefault(name, deque(maxlen=HISTORY)).append(snapshot)
        return True

    def data(self) -> dict:
        """What /daskllm/data.json answers: one view per LLM, in the order they appeared."""
        now = time.time()
        return {"time": now, "llms": [view(list(h), now) for h in self.history.values() if h]}

    async def close(self):
        if self._app is not None and self._app in self.scheduler.http_application.applications:
            self.scheduler.http_application.applications.remove(self._app)
        if self._listing is not None:
            rule, target = self._listing
            rule.target = target
        self.scheduler.handlers.pop("daskllm_publish", None)


class PageHandler(web.RequestHandler):
    """The page: plain HTML with its script inline (no CDN: clusters often have no internet)."""

    def initialize(self, data_url: str):
        self.data_url = data_url

    def get(self):
        page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(page.replace("__DATA_URL__", json.dumps(self.data_url)))


class DataHandler(web.RequestHandler):
    def initialize(self, plugin: DashboardPlugin):
        self.plugin = plugin

    def get(self):
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(self.plugin.data()))


def _prefix_and_listing(app) -> tuple:
    """The dashboard's URL prefix and the routing rule of /individual-plots.json (or None).

    Both are read off the rule distributed registers for individual-plots.json: its pattern
    is the prefix followed by that name.
    """
    for rule in app.wildcard_router.rules:
        pattern = getattr(rule.matcher, "regex", None)
        if pattern is not None and pattern.pattern.endswith("individual-plots.json$"):
            return pattern.pattern[:-len("individual-plots.json$")], rule
    return "/", None


def _with_daskllm(handler_class, path: str):
    """A subclass of distributed's individual-plots handler whose answer also names our page."""

    class WithDaskllm(handler_class):
        def write(self, chunk):
            if isinstance(chunk, dict):
                chunk = {**chunk, PAGE_TITLE: path}
            return super().write(chunk)

    return WithDaskllm


def install(client) -> None:
    """Register the plugin on `client`'s scheduler (a no-op if it is there already)."""
    client.register_plugin(DashboardPlugin(), name=NAME)

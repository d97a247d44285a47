"""Plan and RankStats: what `LLM.plan()` and `LLM.stats()` return, printing as before and
rendering as HTML tables in Jupyter (`_repr_html_`).

Plan is a str (the text of parallel.plan.format_plan); RankStats is a list of the ranks'
stats dicts. Both only add a view, so callers that print, slice or index them are unchanged.
"""
from __future__ import annotations

import html
import re

from ..parallel.mesh import Mesh
from ..parallel.plan import Experts, Replicated, Split, Staged, format_plan

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"experts\.(\d+)\.(.+)")


def _table(head: list, rows: list, caption: str = "") -> str:
    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{cap}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class Plan(str):
    """The plan as text (`text`, default: one line per tensor); in Jupyter a table of what each
    rank of a replica holds.

    `.specs` is the plan itself ({tensor: spec}), `.shapes` the full shapes, `.mesh` the mesh,
    `.rank_bytes` the weight bytes of each rank of a replica (in `.dtype`), when known.
    """

    def __new__(cls, text: str | None, specs: dict, shapes: dict, mesh: Mesh, rank_bytes=None, dtype=None):
        self = super().__new__(cls, format_plan(specs) if text is None else text)
        self.specs, self.shapes, self.mesh, self.rank_bytes, self.dtype = specs, shapes, mesh, rank_bytes, dtype
        return self

    def rows(self) -> list:
        """(tensor, shape, spec, [what local rank r holds]): layers that split alike fold into one
        `layers.*.<part>` row, and the experts of a layer into one `experts.*.<part>` row."""
        coords = [self.mesh.replica().coords(r) for r in range(self.mesh.replica_size)]
        groups = {}                  # part -> {layer (None outside layers): [(expert, name, spec)]}
        for name, spec in self.specs.items():
            part, layer, expert = name, None, None
            m = _LAYER.fullmatch(name)
            if m:
                layer, part = int(m.group(1)), m.group(2)
                e = _EXPERT.fullmatch(part)
                if e:
                    expert, part = int(e.group(1)), f"experts.*.{e.group(2)}"
            groups.setdefault(part, {}).setdefault(layer, []).append((expert, name, spec))
        rows = []
        for part, by_layer in groups.items():
            signatures = {tuple((e, str(s)) for e, _, s in members) for members in by_layer.values()}
            if None not in by_layer and len(by_layer) > 1 and len(signatures) == 1:
                shown = {"layers.*." + part: next(iter(by_layer.values()))}
            else:
                shown = {(part if layer is None else f"layers.{layer}.{part}"): members
                         for layer, members in by_layer.items()}
            for label, members in shown.items():
                _, name, spec = members[0]
                text = "Experts(...)" if isinstance(spec, Experts) else str(spec)
                rows.append((label, self.shapes[name], text, [_held(members, self.shapes, c) for c in coords]))
        return rows

    def _repr_html_(self) -> str:
        head = ["tensor", "shape", "spec"] + [f"rank {r}" for r in range(self.mesh.replica_size)]
        rows = [[html.escape(label), html.escape(str(tuple(shape))), html.escape(spec)] + cells
                for label, shape, spec, cells in self.rows()]
        if self.rank_bytes is not None:
            rows.append(["<b>weight bytes</b>", "", html.escape(str(self.dtype or ""))] +
                        [f"<b>{_bytes(b)}</b>" for b in self.rank_bytes])
        return _table(head, rows, f"{self.mesh}: what each rank of a replica holds (every replica alike)")


def _held(members: list, shapes: dict, coords: dict) -> str:
    """What the rank at `coords` holds of a group of tensors: all, a range of rows, or its experts."""
    _, name, spec = members[0]
    if isinstance(spec, Staged):                  # pipeline: held by the ranks of some stages only
        if coords.get("pp", 0) not in spec.stages:
            return "none"
        members = [(e, n, s.inner) for e, n, s in members]
        spec = spec.inner
    if isinstance(spec, Replicated):
        return "all"
    if isinstance(spec, Split):
        lo, hi = spec.bounds(coords.get(spec.axis, 0))
        return f"dim {spec.dim}: {lo}:{hi} of {shapes[name][spec.dim]}"
    owned = sorted(e for e, _, s in members if isinstance(s, Experts) and coords.get(s.axis, 0) == s.owner)
    return f"experts {_ranges(owned)}" if owned else "none"


def _ranges(ids: list) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


class RankStats(list):
    """The ranks' stats dicts in rank order (a list, as before); in Jupyter, two tables:
    memory and step time per rank, and bytes and seconds per collective per rank."""

    def _repr_html_(self) -> str:
        ranks = []
        for r, s in enumerate(self):
            mem = s.get("memory", {})
            coll = sum(op["seconds"] for ops in s.get("comm", {}).values() for op in ops.values())
            steps = s.get("steps", 0)
            ranks.append([r, _bytes(mem.get("weights_bytes", 0)), _bytes(mem.get("cache_bytes", 0)),
                          mem.get("live_sequences", 0), steps,
                          f"{1e3 * s.get('compute_seconds', 0.0) / steps:.2f}" if steps else "–",
                          f"{1e3 * coll / steps:.2f}" if steps else "–"])
        collectives = [[r, html.escape(f"{axis}.{name}"), op["calls"], _bytes(op["bytes_sent"]),
                        _bytes(op["bytes_received"]), f"{1e3 * op['seconds']:.1f}"]
                       for r, s in enumerate(self) for axis, ops in s.get("comm", {}).items()
                       for name, op in ops.items()]
        out = _table(["rank", "weights", "KV cache", "sequences", "steps", "ms per step", "ms in collectives per step"],
                     ranks, "per rank (since the last reset_stats)")
        if collectives:
            out += _table(["rank", "collective", "calls", "sent", "received", "ms in all"], collectives,
                          "per collective")
        if any(s.get("expert_load") for s in self):
            out += "<p>MoE: tokens routed per expert are in each rank's <code>expert_load</code> " \
                   "(<code>daskllm.dashboard.draw.expert_load</code> draws them).</p>"
        return out

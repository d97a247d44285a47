"""Drawings for notebooks (matplotlib, the `notebook` extra): what text cannot show.

Each function draws one picture from plain data (a plan, the ranks' stats) on a given or new
Axes and returns the Axes; none of them talks to the cluster.
"""
from __future__ import annotations

import re

from ..parallel.plan import Experts, Replicated, Split, Staged

_EXPERT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(.+)")


def _axes(ax, size):
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=size)
    return ax


def _colour(rank: int):
    import matplotlib.pyplot as plt
    return plt.get_cmap("tab10")(rank % 10)


def plan(plan, layer: int = 0, ax=None):
    """The plan as a picture: one bar per tensor of `layer` (plus embed, norm, lm_head), cut
    along its split dimension into the pieces each rank of a replica holds."""
    mesh, specs, shapes = plan.mesh, plan.specs, plan.shapes
    coords = [mesh.replica().coords(r) for r in range(mesh.replica_size)]
    rows = [n for n in specs if not n.startswith("layers.")] + \
           [n for n in specs if n.startswith(f"layers.{layer}.") and not _EXPERT.fullmatch(n)]
    experts = {}
    for n, s in specs.items():
        m = _EXPERT.fullmatch(n)
        if m and int(m.group(1)) == layer:
            experts.setdefault(m.group(3), []).append((int(m.group(2)), s))
    ax = _axes(ax, (9, 0.32 * (len(rows) + len(experts)) + 1.2))
    labels = []
    for y, name in enumerate(rows):
        spec = specs[name]
        labels.append(f"{name}  {tuple(shapes[name])}")
        ranks = range(len(coords))
        if isinstance(spec, Staged):              # pipeline: only the ranks of its stages hold it
            ranks = [r for r in ranks if coords[r].get("pp", 0) in spec.stages]
            spec = spec.inner
        if isinstance(spec, Replicated):
            ax.barh(y, 1.0, color="0.85", edgecolor="0.5", hatch="//")
            every = "every rank" if len(ranks) == len(coords) else f"ranks {', '.join(map(str, ranks))}"
            ax.text(0.5, y, every, ha="center", va="center", fontsize=8)
        elif isinstance(spec, Split):
            n = shapes[name][spec.dim]
            for r in ranks:
                lo, hi = spec.bounds(coords[r].get(spec.axis, 0))
                if any(spec.bounds(coords[q].get(spec.axis, 0)) == (lo, hi) for q in ranks if q < r):
                    continue                      # already drawn for a rank holding the same piece
                holders = [q for q in ranks if spec.bounds(coords[q].get(spec.axis, 0)) == (lo, hi)]
                ax.barh(y, (hi - lo) / n, left=lo / n, color=_colour(r), edgecolor="white")
                ax.text((lo + hi) / 2 / n, y, f"rank {','.join(map(str, holders))}  dim {spec.dim} {lo}:{hi}",
                        ha="center", va="center", fontsize=7, color="white")
    for i, (leaf, owned) in enumerate(sorted(experts.items())):
        y = len(rows) + i
        labels.append(f"experts.*.{leaf}  ({len(owned)} experts)")
        for e, spec in sorted(owned, key=lambda pair: pair[0]):
            spec = spec.inner if isinstance(spec, Staged) else spec
            owner = spec.owner if isinstance(spec, Experts) else 0
            rank = next(r for r, c in enumerate(coords) if c.get(spec.axis, 0) == owner) \
                if isinstance(spec, Experts) else 0
            ax.barh(y, 1 / len(owned), left=e / len(owned), color=_colour(rank), edgecolor="white")
            ax.text((e + 0.5) / len(owned), y, str(e), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the split dimension (experts: expert id), coloured by rank")
    ax.set_title(f"{mesh}: what each rank of a replica holds (layer {layer}; every layer alike)")
    return ax


def collectives(stats, ax=None):
    """Bytes sent and seconds spent per collective, one group of bars per rank (two panels)."""
    import matplotlib.pyplot as plt
    ops = sorted({f"{a}.{o}" for s in stats for a, v in s.get("comm", {}).items() for o in v})
    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(11, 3.2))
    width = 0.8 / max(1, len(ops))
    for i, op in enumerate(ops):
        axis, name = op.split(".", 1)
        sent = [s.get("comm", {}).get(axis, {}).get(name, {}).get("bytes_sent", 0) for s in stats]
        secs = [s.get("comm", {}).get(axis, {}).get(name, {}).get("seconds", 0.0) for s in stats]
        xs = [r + i * width for r in range(len(stats))]
        ax[0].bar(xs, sent, width, label=op)
        ax[1].bar(xs, [1e3 * t for t in secs], width, label=op)
    for a, unit in zip(ax, ("bytes sent", "ms inside the collective")):
        a.set_xticks([r + 0.4 - width / 2 for r in range(len(stats))], [f"rank {r}" for r in range(len(stats))])
        a.set_ylabel(unit)
    ax[0].legend(fontsize=8)
    ax[0].set_title("bytes per collective per rank")
    ax[1].set_title("time per collective per rank")
    return ax


def expert_load(load: dict, ax=None):
    """Heatmap of tokens routed to each expert (columns) in each MoE layer (rows).

    load: {"layers": [...], "total": (L, E)}, e.g. daskllm.dashboard.publisher.expert_heatmap
    or one rank's `stats()[r]["expert_load"]`."""
    ax = _axes(ax, (8, 0.35 * len(load["layers"]) + 1.5))
    image = ax.imshow(load["total"], aspect="auto", cmap="Reds")
    ax.set_yticks(range(len(load["layers"])), [f"layer {i}" for i in load["layers"]])
    ax.set_xticks(range(len(load["total"][0])))
    ax.set_xlabel("expert")
    ax.figure.colorbar(image, ax=ax, label="tokens routed")
    ax.set_title("expert load")
    return ax


def step_split(stats, ax=None):
    """Per rank, ms per step inside the rank, split into compute and waiting in collectives."""
    ax = _axes(ax, (6, 0.4 * len(stats) + 1.2))
    for r, s in enumerate(stats):
        steps = s.get("steps", 0) or 1
        inside = 1e3 * s.get("compute_seconds", 0.0) / steps
        coll = min(inside, 1e3 * sum(o["seconds"] for ops in s.get("comm", {}).values() for o in ops.values()) / steps)
        ax.barh(r, inside - coll, color="#3b78b5", label="compute" if r == 0 else None)
        ax.barh(r, coll, left=inside - coll, color="#e08a2c", label="waiting in collectives" if r == 0 else None)
    ax.set_yticks(range(len(stats)), [f"rank {r}" for r in range(len(stats))])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step")
    ax.legend(fontsize=8)
    return ax


def mesh(mesh, workers=None, ax=None):
    """The rank table as a picture: one row per replica, one cell per rank with its coordinates
    (and worker, if `workers` lists them in rank order)."""
    from matplotlib.patches import Rectangle
    ax = _axes(ax, (2.4 * mesh.replica_size, 1.1 * mesh.dp + 0.8))
    for rank in range(mesh.world_size):
        c = mesh.coords(rank)
        x, y = rank % mesh.replica_size, c["dp"]
        ax.add_patch(Rectangle(
            (x + 0.05, y + 0.05), 0.9, 0.9, color=_colour(c["tp"]), alpha=0.35 + 0.3 * c["sp"]))
        text = f"rank {rank}\ntp {c['tp']}  sp {c['sp']}  ep {c['ep']}"
        if workers is not None:
            text += f"\n{workers[rank].split('://')[-1]}"
        ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, mesh.replica_size)
    ax.set_ylim(mesh.dp, 0)
    ax.set_xticks([])
    ax.set_yticks([d + 0.5 for d in range(mesh.dp)], [f"replica {d}" for d in range(mesh.dp)])
    ax.set_title(f"{mesh}: colour = tp index, shade = sp index")
    return ax

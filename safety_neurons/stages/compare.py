"""``stage=compare compare.sets=[A,B,...]``: Jaccard overlap of neuron sets per layer and kind, and
overall, as a table and a heatmap (seeds, prompt sets, modes, harmful vs harmless, models)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pandas as pd

from ..config import KINDS
from ..errors import UserError
from ..identity import artifact_hash
from ..io import atomic_write, write_csv
from ..neurons import NeuronSet
from .common import note_artifact, set_path, tracked


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else float("nan")


def resolve_set(cfg, ref: str) -> NeuronSet:
    """A set named as every stage names one: a store tag, a path, or latest."""
    path = set_path(cfg, ref, ref)
    note_artifact(f"neuron set {ref}", path, artifact_hash(path))
    return NeuronSet.load(path)


def compare_sets(sets: dict[str, NeuronSet]) -> pd.DataFrame:
    """One row per pair and (layer, kind) with a neuron in either set, plus per-kind and overall rows."""
    rows = []
    for (na, a), (nb, b) in combinations(sets.items(), 2):
        sa, sb = set(a.ranking), set(b.ranking)
        keys = sorted({(n[0], n[1]) for n in sa | sb})
        for layer, kind in keys:
            xa = {n for n in sa if n[0] == layer and n[1] == kind}
            xb = {n for n in sb if n[0] == layer and n[1] == kind}
            rows.append({"a": na, "b": nb, "layer": layer, "kind": kind, "n_a": len(xa), "n_b": len(xb),
                         "both": len(xa & xb), "jaccard": jaccard(xa, xb)})
        for kind in KINDS:
            xa = {n for n in sa if n[1] == kind}
            xb = {n for n in sb if n[1] == kind}
            rows.append({"a": na, "b": nb, "layer": "all", "kind": kind, "n_a": len(xa), "n_b": len(xb),
                         "both": len(xa & xb), "jaccard": jaccard(xa, xb)})
        rows.append({"a": na, "b": nb, "layer": "all", "kind": "all", "n_a": len(sa), "n_b": len(sb),
                     "both": len(sa & sb), "jaccard": jaccard(sa, sb)})
    return pd.DataFrame(rows)


def plot_compare(df: pd.DataFrame, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = df[["a", "b"]].drop_duplicates().values.tolist()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 4.5), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        d = df[(df.a == a) & (df.b == b) & (df.layer != "all")]
        layers = sorted({int(x) for x in d.layer}) or [0]
        grid = np.full((max(layers) + 1, len(KINDS)), np.nan)
        for _, r in d.iterrows():
            grid[int(r.layer), KINDS.index(r.kind)] = r.jaccard
        im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(KINDS)), KINDS)
        tot = df[(df.a == a) & (df.b == b) & (df.layer == "all") & (df.kind == "all")].jaccard.iloc[0]
        ax.set_title(f"{a} vs {b}\noverall Jaccard {tot:.2f}", fontsize=8)
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    p = out / "jaccard.png"
    atomic_write(p, lambda t: fig.savefig(t, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return p


def run(cfg) -> dict:
    refs = list(cfg.compare.sets)
    if len(refs) < 2:
        raise UserError("stage=compare needs at least two sets: compare.sets=[TAG_OR_PATH,TAG_OR_PATH]")
    labels = list(cfg.compare.labels) if cfg.compare.labels else [Path(r).parent.name if Path(r).exists() else r
                                                                     for r in refs]
    if len(labels) != len(refs) or len(set(labels)) != len(labels):
        raise UserError("compare.labels must name every set once, with distinct labels")
    sets = {lab: resolve_set(cfg, r) for lab, r in zip(labels, refs)}
    sigs = {lab: s.meta.get("model_signature") for lab, s in sets.items()}
    known = [s for s in sigs.values() if s]
    if known and any(s != known[0] for s in known):
        raise UserError(f"the sets come from models of different architectures ({sigs}); "
                        "compare sets of one architecture")
    with tracked(cfg) as (tr, box):
        df = compare_sets(sets)
        overall = df[(df.layer == "all") & (df.kind == "all")][["a", "b", "n_a", "n_b", "both", "jaccard"]]
        if tr.main:
            write_csv(tr.dir / "jaccard.csv", df)
            p = plot_compare(df, tr.dir)
            tr.log_image("jaccard", p)
        tr.log_table("jaccard", overall)
        print(overall.to_string(index=False))
        by_kind = df[(df.layer == "all") & (df.kind != "all")].pivot_table(index=["a", "b"], columns="kind",
                                                                           values="jaccard")
        print(by_kind.to_string())
        box["results"] = {"overall": overall.to_dict("records")}
    return box["results"]

"""Sweep tables and plots: gather result rows, plot ASR vs count (with the random band) and ASR vs
utility; a bar chart for fine-tuning sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import UserError
from .io import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda t: fig.savefig(t, dpi=120, format="png", bbox_inches="tight"))
    return path


def gather_rows(root: str | Path, stage: str | None = None) -> pd.DataFrame:
    """All result rows below ``root``: each run's sweep.csv if it has one, else its results.json; with
    ``stage``, only the runs of that stage (a study's folder holds runs of several)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"report directory {root} does not exist")
    frames = []
    for res in sorted(root.rglob("results.json")):
        run = res.parent
        obj = json.loads(res.read_text())
        if stage is not None and obj.get("stage", stage) != stage:
            continue
        if (run / "sweep.csv").exists():
            df = pd.read_csv(run / "sweep.csv")
            if "model" not in df and obj.get("model"):  # the run's model, for the report's titles
                df["model"] = obj["model"]
        else:
            obj = {k: v for k, v in obj.items() if not isinstance(v, (list, dict))}
            df = pd.DataFrame([obj])
        df["run_dir"] = str(run)
        frames.append(df)
    if not frames:
        raise UserError(f"no {stage + ' ' if stage else ''}results.json below {root}; run the sweep first "
                        f"(python -m safety_neurons --multirun ...)")
    return pd.concat(frames, ignore_index=True)


def plot_deactivation(df: pd.DataFrame, out: Path, title: str | None = None) -> list[Path]:
    """ASR vs count (safety sets as lines, random baseline as mean with a min-max band), ASR vs utility;
    ``title`` names what was deactivated (default: the rows' model)."""
    plt = _plt()
    if title is None:
        models = sorted(df["model"].dropna().astype(str).unique()) if "model" in df else []
        title = ", ".join(models) or "deactivation"
    out = Path(out)
    paths = []
    df = df.copy()
    df["group"] = df.get("set", "set").astype(str) + " " + df.get("split", "").astype(str)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x0 = df["n"].replace(0, 0.8)
    flagged = False
    for (grp, base), d in df.assign(x=x0).groupby(["group", "baseline"]):
        d = d.sort_values("n")
        if base == "random":
            seeds = int(d["seeds"].max()) if "seeds" in d and d["seeds"].notna().any() else None
            ax.plot(d["x"], d["asr"], "--", color="0.4", label=f"random, mean ({grp})")
            if "asr_min" in d:
                ax.fill_between(d["x"], d["asr_min"].fillna(d["asr"]), d["asr_max"].fillna(d["asr"]),
                                color="0.7", alpha=0.4,
                                label=f"random, min-max{f' of {seeds} seeds' if seeds else ''} ({grp})")
        else:
            ax.plot(d["x"], d["asr"], "o-", label=f"safety ({grp})")
            broken = d[d["breaks_model"].astype(bool)]
            ax.scatter(broken["x"], broken["asr"], marker="x", color="red", zorder=5,
                       label="breaks the model" if len(broken) and not flagged else None)
            flagged = flagged or bool(len(broken))
    ax.set_xscale("log")
    ax.set_xlabel("neurons deactivated (0 plotted at 0.8)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1.03)  # a rate: nothing below 0 (points at 0 drawn over the axis)
    for line in ax.lines:
        line.set_clip_on(False)
    ax.set_title(f"{title}: attack success vs neurons switched off", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "asr_vs_count.png"))
    plt.close(fig)
    if "nll_ratio" in df:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for (grp, base), d in df.groupby(["group", "baseline"]):
            ax.scatter(d["nll_ratio"], d["asr"], marker="s" if base == "random" else "o", label=f"{base} ({grp})")
            for _, r in d.iterrows():
                ax.annotate(str(int(r["n"])), (r["nll_ratio"], r["asr"]), fontsize=6)
        ax.axvline(2.0, color="red", lw=0.8, ls=":", label="NLL x2: breaks the model")
        ax.axvline(1.5, color="orange", lw=0.8, ls=":", label="NLL x1.5")
        ax.set_xscale("log")
        ax.set_xlabel("utility NLL / intact NLL (harmless answers)")
        ax.set_ylabel("attack success rate")
        ax.set_ylim(0, 1.03)
        ax.set_title(f"{title}: attack success vs utility (labels: neurons switched off)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "asr_vs_utility.png"))
        plt.close(fig)
    return paths


def plot_finetune(df: pd.DataFrame, out: Path) -> list[Path]:
    plt = _plt()
    labels = df["target"].astype(str) + "-" + df["set"].astype(str)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, (col, title) in zip(axes, [("after_harmful_refusal", "harmful refusal (after)"),
                                       ("after_over_refusal", "harmless refusal (after)"),
                                       ("after_nll_ratio", "utility NLL / base")]):
        if col in df:
            ax.bar(labels, df[col], color="C0")
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", rotation=45, labelsize=7)
    if "before_harmful_refusal" in df:
        axes[0].axhline(float(df["before_harmful_refusal"].iloc[0]), color="red", ls=":", label="before")
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = _save(fig, Path(out) / "finetune.png")
    plt.close(fig)
    return [p]


def plot_benchmark(df: pd.DataFrame, rocs: dict | None, out: Path, title: str) -> list[Path]:
    """Planted benchmark: ROC curves of every scorer on one axis, and recovery (AUC) against effect
    (harmful refusal after deactivating the top |S*|; colour: the NLL ratio), with S*
    and random sets marked. Effect only (no ``rocs``): harmful refusal against the number deactivated,
    per scorer, with the random sets' range as a band."""
    plt = _plt()
    out = Path(out)
    paths = []
    if rocs:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        for name, (fpr, tpr) in rocs.items():
            auc = df.loc[df.method == name.split(" ")[0], "auc"]
            label = f"{name} (AUC {float(auc.iloc[0]):.2f})" if len(auc) else name
            ax.plot(fpr, tpr, label=label, lw=1.4, ls="--" if "ceiling" in name else "-")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="chance")
        ax.set_xlabel("false positive rate (unplanted neurons)")
        ax.set_ylabel("true positive rate (share of S* found)")
        ax.set_title(f"{title}: recovery of the planted set", fontsize=9)
        ax.legend(fontsize=6.5, loc="lower right")
        paths.append(_save(fig, out / "roc.png"))
        plt.close(fig)
        if "harmful_refusal" in df:
            paths.append(_plot_recovery_vs_effect(plt, df, out, title))
    elif "n" in df and "harmful_refusal" in df:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        shared = df[(df.role == "baseline") & df.method.str.endswith(" neurons)")]  # random_shape=count
        for name, d in df[df.role == "scorer"].groupby("method"):
            ax.plot(d.n, d.harmful_refusal, marker="o", label=name)
            rnd = df[(df.role == "baseline") & (df.method == f"random ({name} shape)")]
            if len(rnd) and "harmful_refusal_min" in rnd:
                ax.fill_between(rnd.n, rnd.harmful_refusal_min, rnd.harmful_refusal_max, alpha=0.12)
        if len(shared):
            ax.plot(shared.n, shared.harmful_refusal, color="0.3", ls="--", marker=".", label="random n neurons")
            if "harmful_refusal_min" in shared:
                ax.fill_between(shared.n, shared.harmful_refusal_min, shared.harmful_refusal_max, color="0.5",
                                alpha=0.15)
        intact = df[df.role == "intact"]
        if len(intact):
            ax.axhline(float(intact.harmful_refusal.iloc[0]), color="0.6", ls=":", lw=0.8, label="intact")
        ax.set_xscale("log")
        ax.set_xlabel("neurons deactivated (top n of each scorer)")
        ax.set_ylabel("harmful refusal")
        ax.set_ylim(-0.03, 1.03)
        bands = "random n neurons" if len(shared) else "random sets of the same shape"
        ax.set_title(f"{title}: deactivation by scorer (bands: {bands})", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "effect_vs_count.png"))
        plt.close(fig)
    return paths


def plot_benchmark_sweep(sweep: pd.DataFrame, path: Path, title: str) -> Path:
    """A planted benchmark's deactivation sweep on one figure: harmful refusal (left) and NLL ratio
    (right) against the number of neurons switched off, for S* (the positive control), each scorer's
    top n and random sets of S*'s shape (mean, and the seeds' range as a band in the legend)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.8))
    for ax, col, label in ((axes[0], "harmful_refusal", "harmful refusal"), (axes[1], "nll_ratio", "NLL ratio (answer utility)")):
        for name, d in sweep.groupby("method", sort=False):
            d = d.sort_values("n")
            if name == "random":
                seeds = int(d.seeds.max()) if "seeds" in d else 0
                if f"{col}_min" in d:
                    ax.fill_between(d.n, d[f"{col}_min"], d[f"{col}_max"], color="0.5", alpha=0.25,
                                    label=f"random sets, range of {seeds} seeds")
                ax.plot(d.n, d[col], color="0.4", ls="--", marker=".", label="random sets, mean")
            else:
                star = name == "planted_set"
                ax.plot(d.n, d[col], marker="*" if star else "o", ms=9 if star else 5, lw=1.4,
                        color="k" if star else None, label="S* (planted set)" if star else name)
        ax.set_xlabel("neurons switched off (top n)")
        ax.set_ylabel(label)
        if col == "harmful_refusal":
            ax.set_ylim(0, 1.03)
        else:
            ax.set_ylim(bottom=0)
            ax.axhline(1.0, color="0.6", ls=":", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: deactivation sweep (top n of each scorer against S* and random sets)", fontsize=9)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def _plot_recovery_vs_effect(plt, df: pd.DataFrame, out: Path, title: str) -> Path:
    """Rank-AUC against harmful refusal after deactivating each method's top |S*|; colour: NLL ratio."""
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    d = df[df.harmful_refusal.notna() & df.auc.notna()]
    # colour, not area, carries the NLL ratio: ratios run from 1 to 30+, areas that far apart hide the rest
    norm = LogNorm(vmin=1.0, vmax=max(4.0, float(d.nll_ratio.max() or 1.0)))
    for r in d.itertuples():
        nll = float(r.nll_ratio) if r.nll_ratio == r.nll_ratio else 1.0
        marker = {"control": "*", "baseline": "s"}.get(r.role, "o")
        if r.role == "baseline" and "harmful_refusal_min" in df:
            ax.vlines(r.auc, r.harmful_refusal_min, r.harmful_refusal_max, color="0.5", lw=1)
        sc = ax.scatter(r.auc, r.harmful_refusal, s=110 if marker == "*" else 55, marker=marker,
                        c=[[max(nll, 1.0)]], cmap="viridis", norm=norm, edgecolors="k", linewidths=0.5)
        ax.annotate(f"{r.method} (x{nll:.2f})", (r.auc, r.harmful_refusal), fontsize=6,
                    xytext=(4, 4), textcoords="offset points")
    intact = df[df.role == "intact"]
    if len(intact):
        ax.axhline(float(intact.harmful_refusal.iloc[0]), color="0.6", ls=":", lw=0.8, label="intact")
        ax.legend(fontsize=6, loc="lower left")
    if len(d):
        fig.colorbar(sc, ax=ax, label="NLL ratio after deactivation (log)")
    ax.set_xlabel("rank-AUC of S* (recovery)")
    ax.set_ylabel("harmful refusal after deactivating the top |S*|")
    ax.set_xlim(0.45, 1.15)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{title}: recovery against effect", fontsize=9)
    path = _save(fig, out / "recovery_vs_effect.png")
    plt.close(fig)
    return path


def claims_plot_data(tuning: pd.DataFrame | None, benign: pd.DataFrame | None) -> pd.DataFrame:
    """What the claims figure shows, one row per bar: claim 3's harmful refusal and over-refusal after
    tuning per target (mean and sample sd over seeds, with the intact model's as ``before``), claim 4's
    harmful refusal before and after benign fine-tuning per arm."""
    rows = []
    if tuning is not None and len(tuning):
        for t, d in tuning.groupby("target", sort=False):
            for col, what in (("after_harmful_refusal", "harmful refusal"), ("after_over_refusal", "over-refusal")):
                v = d[col].astype(float)
                rows.append({"claim": 3, "label": str(t), "measure": what, "value": float(v.mean()),
                             "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                             "before": float(d[col.replace("after_", "before_")].astype(float).iloc[0])})
    if benign is not None and len(benign):
        for r in benign.itertuples(index=False):
            rows.append({"claim": 4, "label": str(r.arm), "measure": "harmful refusal",
                         "value": float(r.after_harmful_refusal), "sd": 0.0, "n": 1,
                         "before": float(r.before_harmful_refusal)})
    return pd.DataFrame(rows, columns=["claim", "label", "measure", "value", "sd", "n", "before"])


def plot_claims(data: pd.DataFrame, path: Path, title: str) -> Path:
    """The claims figure from :func:`claims_plot_data`: one panel per claim and measure, a bar per target
    or arm with its seed spread, the state before tuning as a dotted line (claim 4: per arm, a marker)."""
    plt = _plt()
    panels = list(data.groupby(["claim", "measure"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, ((claim, what), d) in zip(axes[0], panels):
        x = range(len(d))
        ax.bar(x, d.value, yerr=d.sd if claim == 3 else None, capsize=3, color="C0" if claim == 3 else "C2",
               label="after")
        if claim == 3:
            ax.axhline(float(d.before.iloc[0]), color="red", ls=":", label="before tuning")
            ax.set_title(f"claim 3: {what} after tuning\n(mean ± sd over {int(d.n.max())} seeds)", fontsize=9)
        else:
            ax.scatter(list(x), d.before, color="red", marker="_", s=300, zorder=3, label="before")
            ax.set_title(f"claim 4: {what}, before/after benign tuning", fontsize=9)
        ax.set_xticks(list(x), d.label, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate", fontsize=8)
        ax.legend(fontsize=7, loc="upper right" if claim == 3 else "lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    p = _save(fig, Path(path))
    plt.close(fig)
    return p

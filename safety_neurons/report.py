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


def gather_rows(root: str | Path) -> pd.DataFrame:
    """All result rows below ``root``: each run's sweep.csv if it has one, else its results.json."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"report directory {root} does not exist")
    frames = []
    for res in sorted(root.rglob("results.json")):
        run = res.parent
        if (run / "sweep.csv").exists():
            df = pd.read_csv(run / "sweep.csv")
        else:
            obj = json.loads(res.read_text())
            obj = {k: v for k, v in obj.items() if not isinstance(v, (list, dict))}
            df = pd.DataFrame([obj])
        df["run_dir"] = str(run)
        frames.append(df)
    if not frames:
        raise UserError(f"no results.json below {root}; run the sweep first (python -m safety_neurons --multirun ...)")
    return pd.concat(frames, ignore_index=True)


def plot_deactivation(df: pd.DataFrame, out: Path) -> list[Path]:
    """ASR vs count (safety sets as lines, random baseline as mean with a min-max band), ASR vs utility."""
    plt = _plt()
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
            ax.plot(d["x"], d["asr"], "--", color="0.4", label=f"random ({grp})")
            if "asr_min" in d:
                ax.fill_between(d["x"], d["asr_min"].fillna(d["asr"]), d["asr_max"].fillna(d["asr"]),
                                color="0.7", alpha=0.4)
        else:
            ax.plot(d["x"], d["asr"], "o-", label=f"safety ({grp})")
            broken = d[d["breaks_model"].astype(bool)]
            ax.scatter(broken["x"], broken["asr"], marker="x", color="red", zorder=5,
                       label="breaks the model" if len(broken) and not flagged else None)
            flagged = flagged or bool(len(broken))
    ax.set_xscale("log")
    ax.set_xlabel("neurons deactivated (0 plotted at 0.8)")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.03, 1.03)
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

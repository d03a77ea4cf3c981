"""``make check-repro``: run the demo again and check its headline numbers against the committed ones.

    python -m safety_neurons.repro                 # run experiment=demo, compare with docs/demo-headline.json
    python -m safety_neurons.repro --run DIR       # compare a finished demo study folder instead
    python -m safety_neurons.repro --run DIR --write   # record DIR's numbers as the expected ones

Headline numbers: per planted benchmark, the rank-AUC, harmful refusal and NLL ratio of each method
(scorers, S*, random sets, the intact model); per finetune step, the refusal, over-refusal and utility
NLL after tuning. Everything is greedy and seeded, so on the same CPU and versions the numbers repeat
exactly; the tolerances (``TOLERANCE``: AUC +-0.02, refusal rates +-0.09, i.e. two of 24 prompts, NLL
ratio +-15%, utility NLL +-10%) allow for other hardware, where a different kernel can flip a near-tie token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ROOT / "docs" / "demo-headline.json"
# (absolute tolerance, relative tolerance) by the metric a key ends with
TOLERANCE = {"auc": (0.02, 0.0), "harmful_refusal": (0.09, 0.0), "over_refusal": (0.09, 0.0),
             "nll_ratio": (0.0, 0.15), "utility_nll": (0.0, 0.10)}
BENCH_METHODS = ("plnd", "activation_diff_rel", "planted_set", "random", "none")


def headline(study_dir: str | Path) -> dict[str, float]:
    """The headline numbers of a finished study folder (``study.csv`` and each step's files)."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.csv").exists():
        raise SystemExit(f"error: {study_dir} has no study.csv; give the folder of a finished experiment=demo run")
    out: dict[str, float] = {}
    for r in pd.read_csv(study_dir / "study.csv", dtype={"run_dir": str}).to_dict("records"):
        folder = Path(r["run_dir"]) if isinstance(r["run_dir"], str) and r["run_dir"] else None
        if r["stage"] == "benchmark" and folder is not None:
            df = pd.read_csv(folder / "benchmark.csv")
            for row in df[df.method.isin(BENCH_METHODS)].to_dict("records"):
                for col in ("auc", "harmful_refusal", "nll_ratio"):
                    v = row.get(col)
                    if v is not None and v == v and not (row["method"] in ("none", "planted_set", "random") and col == "auc"):
                        out[f"{row['organism']}/{row['method']}/{col}"] = float(v)
        elif r["stage"] == "finetune":
            res = json.loads((folder / "results.json").read_text()) if folder is not None else r
            for col in ("harmful_refusal", "over_refusal", "utility_nll"):
                out[f"finetune-{res['target']}/after_{col}"] = float(res[f"after_{col}"])
    return out


def tolerance(key: str) -> tuple[float, float]:
    for metric, tol in TOLERANCE.items():
        if key.endswith(metric):
            return tol
    return (0.0, 0.0)


def compare(expected: dict[str, float], got: dict[str, float]) -> pd.DataFrame:
    """One row per expected key: expected, got, the difference, the allowed difference, ok."""
    rows = []
    for key, want in expected.items():
        a, r = tolerance(key)
        allowed = a + r * abs(want)
        have = got.get(key)
        diff = None if have is None else have - want
        rows.append({"key": key, "expected": want, "got": have, "diff": diff, "allowed": allowed,
                     "ok": diff is not None and abs(diff) <= allowed + 1e-12})
    return pd.DataFrame(rows, columns=["key", "expected", "got", "diff", "allowed", "ok"])


def run_demo(run_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "SAFETY_NEURONS_RUN_DIR": str(run_dir)}
    # the benchmark, the tunings and the untuned model's evaluation are run again, not taken from a run
    # before (the demo reuses them); the conversion, the plant, the set and the self-distilled answers
    # come from the store as they are
    p = subprocess.run([sys.executable, "-m", "safety_neurons", "experiment=demo", "logger=none", "benchmark.reuse=false",
                        "finetune.reuse=false"], env=env)
    if p.returncode != 0:
        raise SystemExit(f"error: the demo run failed (exit {p.returncode}); see its output above")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a finished experiment=demo folder (default: run the demo now)")
    ap.add_argument("--expected", default=str(EXPECTED), help="the committed headline numbers (JSON)")
    ap.add_argument("--write", action="store_true", help="record the run's numbers as the expected ones")
    args = ap.parse_args(argv)
    if args.run:
        run = Path(args.run)
    else:
        run = Path(tempfile.mkdtemp(prefix="check-repro-"))
        run_demo(run)
    got = headline(run)
    if args.write:
        Path(args.expected).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(got)} headline numbers of {run} to {args.expected}")
        return 0
    exp_path = Path(args.expected)
    if not exp_path.exists():
        raise SystemExit(f"error: no expected numbers at {exp_path}; pass --expected FILE or record them with --write")
    table = compare(json.loads(exp_path.read_text()), got)
    bad = table[~table.ok]
    pd.set_option("display.width", 160)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if len(bad):
        print(f"\n{len(bad)} of {len(table)} headline numbers differ beyond their tolerance: "
              + ", ".join(f"{r.key} {'missing' if pd.isna(r.got) else f'{r.got:.4f}'} vs {r.expected:.4f}"
                          for r in bad.itertuples()))
        return 1
    print(f"\nall {len(table)} headline numbers of {run} within tolerance of {exp_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

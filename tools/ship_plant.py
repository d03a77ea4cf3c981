"""Ship planted models with the package: copy each plant's slice delta, provenance and S* from a store
into safety_neurons/data/planted/<name>/, where stage=plant rebuilds it (plant.from_shipped) instead
of training it. Machine-specific paths are left out of the shipped provenance.

    python tools/ship_plant.py --store outputs/store planted-ffn1pct-s0 planted-attn1pct-s0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safety_neurons.io import write_json  # noqa: E402
from safety_neurons.stages.plant import PROVENANCE, SHIPPED  # noqa: E402


def portable(obj):
    """``obj`` with every absolute path string cut to its file name (a source file's name says which file;
    where it lay on the machine that planted it does not)."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/") and "\n" not in obj:
        return Path(obj).name
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True, help="the store the plants were made in")
    ap.add_argument("names", nargs="+", help="plant names (their save_as)")
    args = ap.parse_args()
    for name in args.names:
        model_dir = args.store / "models" / name
        truth = args.store / "neurons" / name / "planted" / "truth" / "neurons.json"
        missing = [str(f) for f in (model_dir / PROVENANCE, model_dir / "delta.safetensors", truth) if not f.exists()]
        if missing:
            sys.exit(f"error: {name} is not a finished plant in {args.store}: missing {', '.join(missing)}")
        prov = json.loads((model_dir / PROVENANCE).read_text())
        if prov.get("shipped"):
            sys.exit(f"error: {name} in {args.store} was itself rebuilt from a shipped delta; ship a trained plant")
        dest = SHIPPED / name
        dest.mkdir(parents=True, exist_ok=True)
        write_json(dest / PROVENANCE, portable({k: v for k, v in prov.items() if k not in ("model_dir", "truth")}))
        shutil.copyfile(model_dir / "delta.safetensors", dest / "delta.safetensors")
        shutil.copyfile(truth, dest / "neurons.json")
        size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
        print(f"shipped {name} ({size:.1f} MB) -> {dest}")


if __name__ == "__main__":
    main()

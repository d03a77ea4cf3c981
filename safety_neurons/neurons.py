"""The neuron address ``(layer, kind, index)``, ranked neuron sets with provenance, and selection.

A :class:`NeuronSet` is always ranked (METHOD 4): "the top n" means the first n of ``ranking``.
"""

from __future__ import annotations

import ast
import json
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import KINDS
from .errors import UserError
from .io import write_json

Neuron = tuple[int, str, int]
ATTN = ("q", "k", "v", "o")


def resolve_k(value: float, width: int, what: str) -> int:
    """topk value -> neuron count: an int >= 1 is a count, a float in (0, 1) a share of ``width``."""
    if 0 < value < 1:
        return max(1, int(round(value * width)))
    k = int(value)
    if k != value or k < 1:
        raise UserError(f"{what}={value} must be a count >= 1 or a share in (0, 1)")
    if k > width:
        raise UserError(f"{what}={k} is larger than the layer's width {width}; use at most {width} or a share in (0, 1)")
    return k


def _is_index(x) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def resolve_set_path(path: str | Path) -> Path:
    """``path`` as a neurons.json where it names one: a set folder's neurons.json, or the set a run
    folder's ``set.json`` points at (detect keeps the set itself only in the store)."""
    path = Path(path)
    if path.is_dir() and (path / "neurons.json").exists():
        return path / "neurons.json"
    pointer = path / "set.json" if path.is_dir() else path
    if pointer.name == "set.json" and pointer.is_file():
        try:
            return Path(json.loads(pointer.read_text())["neurons_json"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{pointer} is not a run's set pointer ({e}); give the set's neurons.json") from None
    return path


@dataclass
class NeuronSet:
    ranking: list[Neuron]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for n in self.ranking:  # a negative index would wrap around, a fraction would be truncated
            if any(isinstance(x, bool) or not _is_index(x) or operator.index(x) < 0 for x in (n[0], n[2])):
                raise UserError(f"neuron {tuple(n)} in set: layer and index must be whole numbers >= 0")
        self.ranking = [(int(layer), str(kind), int(i)) for layer, kind, i in self.ranking]
        for n in self.ranking:
            if n[1] not in KINDS:
                raise UserError(f"unknown neuron kind {n[1]!r} in set; known kinds are {', '.join(KINDS)}")
        if len(set(self.ranking)) != len(self.ranking):
            raise UserError("neuron set lists a neuron twice")

    def __len__(self) -> int:
        return len(self.ranking)

    def layers(self) -> dict[int, dict[str, list[int]]]:
        out: dict[int, dict[str, list[int]]] = defaultdict(lambda: {k: [] for k in KINDS})
        for layer, kind, i in self.ranking:
            out[layer][kind].append(i)
        return dict(sorted(out.items()))

    def index_map(self) -> dict[tuple[int, str], torch.Tensor]:
        """{(layer, kind): LongTensor of indices} for hooks and masks."""
        d: dict[tuple[int, str], list[int]] = defaultdict(list)
        for layer, kind, i in self.ranking:
            d[(layer, kind)].append(i)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in d.items()}

    def counts(self) -> dict[tuple[int, str], int]:
        d: dict[tuple[int, str], int] = defaultdict(int)
        for layer, kind, _ in self.ranking:
            d[(layer, kind)] += 1
        return dict(d)

    def top(self, n: int, per_layer: bool = False) -> NeuronSet:
        """The top ``n`` in rank order, over all layers or per layer."""
        if n < 0:
            raise UserError(f"count {n} must be >= 0")
        if not per_layer:
            if n > len(self.ranking):
                raise UserError(f"count {n} is larger than the set ({len(self.ranking)} neurons); use at most that")
            return NeuronSet(self.ranking[:n], {**self.meta, "top": n})
        seen: dict[int, int] = defaultdict(int)
        out = []
        for nr in self.ranking:
            if seen[nr[0]] < n:
                out.append(nr)
                seen[nr[0]] += 1
        return NeuronSet(out, {**self.meta, "top_per_layer": n})

    def filter(self, keep) -> NeuronSet:
        return NeuronSet([n for n in self.ranking if keep(n)], dict(self.meta))

    def minus(self, other: NeuronSet) -> NeuronSet:
        o = set(other.ranking)
        return self.filter(lambda n: n not in o)

    def check_compatible(self, signature: dict) -> None:
        sig = self.meta.get("model_signature")
        if sig is None:
            return
        diff = {k: (sig.get(k), v) for k, v in signature.items() if k in sig and sig[k] != v}
        if diff:
            raise UserError(
                f"this neuron set was made for another model ({self.meta.get('model', '?')}): "
                f"{', '.join(f'{k} set={a} model={b}' for k, (a, b) in diff.items())}; detect on this model first"
            )

    def to_json(self) -> dict:
        layers = {str(k): v for k, v in self.layers().items()}
        return {"meta": self.meta, "layers": layers, "ranking": [list(n) for n in self.ranking]}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass detect.overwrite=true or choose another detect.save_as=")
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> NeuronSet:
        """The set at ``path``: a neurons.json, its folder, or a run folder (or its ``set.json``) that
        points at the set the run wrote to the store."""
        path = resolve_set_path(path)
        if path.is_dir():
            raise UserError(f"{path} holds no neurons.json; for released-format files use import_released()")
        if not path.exists():
            raise UserError(f"neuron set {path} does not exist")
        try:
            obj = json.loads(path.read_text())
            return cls([tuple(n) for n in obj["ranking"]], obj.get("meta", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is not a neuron set ({e}); expected keys meta, layers, ranking") from None


# ----------------------------------------------------------------------------------------- selection
class TopkStats:
    """Running per-(layer, kind) sums over prompts: score sum and top-k membership count.

    ``update`` takes per-prompt scores (P, width); the statistics reduce by plain addition, so
    processes of a distributed run sum them.
    """

    def __init__(self, k_of: dict[str, int]):
        self.k_of = k_of
        self.score_sum: dict[tuple[int, str], torch.Tensor] = {}
        self.count: dict[tuple[int, str], torch.Tensor] = {}
        self.n = 0

    def update(self, layer: int, kind: str, scores: torch.Tensor) -> None:
        scores = scores.detach().to(torch.float64).cpu()
        k = self.k_of[kind]
        top = scores.topk(k, dim=1).indices
        hit = torch.zeros_like(scores, dtype=torch.float64).scatter_(1, top, 1.0)
        key = (layer, kind)
        if key in self.score_sum:
            self.score_sum[key] += scores.sum(0)
            self.count[key] += hit.sum(0)
        else:
            self.score_sum[key] = scores.sum(0)
            self.count[key] = hit.sum(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``<layer>.<kind>.mean`` and ``.freq`` (float32), as in scores.safetensors."""
        out = {}
        for (layer, kind), s in sorted(self.score_sum.items()):
            out[f"{layer}.{kind}.mean"] = (s / self.n).float()
            out[f"{layer}.{kind}.freq"] = (self.count[(layer, kind)] / self.n).float()
        return out


def split_scores(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    mean, freq = {}, {}
    for name, t in tensors.items():
        layer, kind, what = name.split(".")
        (mean if what == "mean" else freq)[(int(layer), kind)] = t
    return mean, freq


def select(mean: dict[tuple[int, str], torch.Tensor], freq: dict[tuple[int, str], torch.Tensor],
           consistency: float, exclude: set[Neuron] | None = None) -> list[Neuron]:
    """Neurons with top-k frequency >= consistency, minus ``exclude``, ranked by (freq, mean) desc."""
    if not 0 < consistency <= 1:
        raise UserError(f"topk.consistency={consistency} must be in (0, 1]")
    return _ranked(mean, freq, consistency, exclude)


def rank_all(mean: dict[tuple[int, str], torch.Tensor], freq: dict[tuple[int, str], torch.Tensor]) -> list[Neuron]:
    """Every neuron, ranked as :func:`select` ranks the ones it keeps (freq, then mean, desc; ties by
    address): what "the top n of a scorer" means without a consistency threshold."""
    return _ranked(mean, freq, 0.0, None)


def _ranked(mean, freq, consistency: float, exclude) -> list[Neuron]:
    cands = []
    eps = 1e-9
    for (layer, kind), f in freq.items():
        idx = torch.nonzero(f >= consistency - eps).flatten().tolist()
        m = mean[(layer, kind)]
        for i in idx:
            n = (layer, kind, i)
            if exclude and n in exclude:
                continue
            cands.append((float(f[i]), float(m[i]), n))
    cands.sort(key=lambda c: (-c[0], -c[1], c[2][0], c[2][1], c[2][2]))
    return [c[2] for c in cands]


# ------------------------------------------------------------------------------------ released files
RELEASED_ORDER = ("up", "down", "q", "k", "v")


def import_released(path: str | Path, n_heads: int, n_kv: int, head_dim: int) -> NeuronSet:
    """Read the released code's neuron file: five lines ``{layer: {indices}}`` for up, down, q, k, v.

    Parsed with ``ast.literal_eval`` (no code runs). up and down both index the MLP channel and
    become ``ffn``; k and v indices were in query-head space and map to key/value-head space with
    ``i -> (i // d_h // (H/G)) * d_h + i % d_h`` (METHOD 1). The files carry no ranking: the order
    is layer, kind, index, and ``meta.ranked`` is False.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"released neuron file {path} does not exist")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) != 5:
        raise UserError(f"{path}: expected 5 lines (up, down, q, k, v), found {len(lines)}")
    group = n_heads // n_kv
    sets: dict[tuple[int, str], set[int]] = defaultdict(set)
    for name, line in zip(RELEASED_ORDER, lines):
        try:
            obj = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError) as e:
            raise UserError(f"{path}: line for {name!r} is not a literal dict of sets ({e})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line for {name!r} is not a dict")
        for layer, idxs in obj.items():
            for i in idxs:
                i = int(i)
                if name in ("up", "down"):
                    sets[(int(layer), "ffn")].add(i)
                elif name == "q":
                    sets[(int(layer), "q")].add(i)
                else:
                    sets[(int(layer), name)].add((i // head_dim // group) * head_dim + i % head_dim)
    ranking = [(layer, kind, i) for (layer, kind) in sorted(sets, key=lambda x: (x[0], KINDS.index(x[1])))
               for i in sorted(sets[(layer, kind)])]
    return NeuronSet(ranking, {"source": str(path), "format": "released", "ranked": False})


def is_path(name: str) -> bool:
    """A set name is a path when it has a folder separator, a file suffix or names something on disk;
    otherwise it is a store tag (tags are folder names, so they have neither)."""
    p = Path(name).expanduser()
    return "/" in name or "\\" in name or p.suffix in (".json", ".pt", ".safetensors") or p.exists()

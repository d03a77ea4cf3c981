"""Config helpers: the config directory, resolvers, and composing a config without the CLI."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from .config import register

# the config tree ships inside the package, so a non-editable install has it too
CONF_DIR = Path(__file__).resolve().parent / "conf"


def output_root() -> Path:
    """Where ``outputs/`` goes: ``$SAFETY_NEURONS_ROOT``, else the directory the command runs in
    (never beside an installed package)."""
    return Path(os.environ.get("SAFETY_NEURONS_ROOT") or Path.cwd()).resolve()


def setup() -> None:
    register()
    if not OmegaConf.has_resolver("sn_root"):
        OmegaConf.register_new_resolver("sn_root", lambda: str(output_root()))


def compose(overrides: list[str] | None = None):
    """The composed config for ``overrides`` (as the CLI would build it), outside a Hydra run.

    ``run_dir`` must be given in the overrides (there is no Hydra run directory here).
    """
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    setup()
    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        return hcompose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def check_overrides(argv: list[str]) -> None:
    """Compose ``argv`` as the CLI will and turn a composition error (an unknown key, a value outside an
    enum's choices, a wrong type) into one UserError line naming the override and what is allowed.
    Sweeps and Hydra flags (``-m``, ``--cfg``, ...) are left to Hydra."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .errors import UserError

    if any(a.startswith("-") for a in argv):
        return
    try:
        compose(argv)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(composition_error(e)) from None


# keys whose job another key does now, and how to say the same thing
RENAMED = {
    "detect.reference": "subtract a reference prompt set with dataset@reference=NAME (e.g. dataset@reference=harmless)",
    "deactivate.means_from": "choose mean ablation's prompts with dataset@means=NAME",
    "deactivate.set_tag": "name the set with deactivate.neurons=TAG (a store tag, a path or latest)",
    "finetune.set_tag": "name the set with finetune.neurons=TAG (a store tag, a path or latest)",
}


def composition_error(e: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error: the override, what is wrong, what is allowed."""
    head = [x.strip() for x in str(e).splitlines() if x.strip()]
    cause = [x.strip() for x in str(e.__cause__).splitlines() if x.strip()] if e.__cause__ else []
    if head and head[0].startswith("Error merging override ") and cause:  # a bad value
        return f"{head[0].removeprefix('Error merging override ')}: {cause[0]}"
    if head and head[0].startswith("Could not override") and cause:  # an unknown key
        key = head[0].split("'")[1] if head[0].count("'") >= 2 else head[0]
        if key in RENAMED:
            return f"{key} is not a config key; {RENAMED[key]}"
        return f"{key} is not a config key ({cause[0]}); check its spelling"
    if head and "Available options in" in str(e):  # an unknown group option
        opts = str(e).split("Available options in", 1)[1].split("Config search path", 1)[0].splitlines()[1:]
        names = [o.strip() for o in opts if o.strip() and not o.strip().startswith("base_")]
        first = head[0].removeprefix("In 'config': ")
        return f"{first}; available: {', '.join(names)}"
    return head[0] if head else type(e).__name__


def dataset_config(name: str):
    """The ``dataset`` group option ``name`` as a typed DatasetConfig (for reference corpora)."""
    from .config import DatasetConfig
    from .errors import UserError

    if not (CONF_DIR / "dataset" / f"{name}.yaml").exists():
        known = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
        raise UserError(f"unknown dataset {name!r}; known datasets are {', '.join(known)}")
    return group_config("dataset", name, DatasetConfig)


def model_config(name_or_path: str):
    """A typed ModelConfig for a ``model`` group option name, or for a model folder or ``.gguf`` path
    (named after it), e.g. ``detect.reference_model=smollm2`` or ``=/models/base``."""
    from omegaconf import OmegaConf

    from .config import ModelConfig
    from .errors import UserError

    if (CONF_DIR / "model" / f"{name_or_path}.yaml").exists():
        return group_config("model", name_or_path, ModelConfig)
    p = Path(name_or_path).expanduser()
    if p.exists():
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": p.stem or p.name, "path": str(p)})
    known = sorted(q.stem for q in (CONF_DIR / "model").glob("*.yaml") if q.stem != "local")
    raise UserError(f"{name_or_path!r} is neither a model preset ({', '.join(known)}) nor an existing folder "
                    f"or .gguf file")


def group_config(group: str, name: str, schema):
    """A group option (``plant/ffn1.yaml``) as a typed config, its in-group defaults merged first
    (``defaults: [default]``); the ``base_*`` schema entries are the schema itself."""
    from omegaconf import OmegaConf

    from .errors import UserError

    f = CONF_DIR / group / f"{name}.yaml"
    if not f.exists():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise UserError(f"unknown {group} option {name!r}; known options are {', '.join(known)}")
    raw = OmegaConf.load(f)
    parents = [d for d in raw.pop("defaults", []) if isinstance(d, str) and not d.startswith("base_")]
    out = OmegaConf.structured(schema)
    for parent in parents:
        out = OmegaConf.merge(out, group_config(group, parent, schema))
    return OmegaConf.merge(out, raw)


def dataset_preset(name: str, **over):
    """The dataset preset ``conf/dataset/<name>.yaml`` as a config, outside a composition (``over``
    replaces its fields, e.g. ``path``)."""
    from .config import DatasetConfig
    from .errors import UserError

    f = CONF_DIR / "dataset" / f"{name}.yaml"
    if not f.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
        raise UserError(f"no dataset preset {name!r}; known: {', '.join(known)}")
    raw = OmegaConf.load(f)
    raw.pop("defaults", None)
    over = {k: v for k, v in over.items() if v is not None}
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), raw, over)

"""The organism cache records the recipe that made it: a changed recipe or training prompt file is
reported when the cached organism is reused, never silently."""

from __future__ import annotations

import json

from safety_neurons.cfg import compose
from safety_neurons.io import Store
from safety_neurons.models import model_source
from safety_neurons.organism import check_organism, recipe_fingerprint


def _cfg(tmp_path, *over):
    return compose(["experiment=align", f"store_dir={tmp_path / 'store'}", f"run_dir={tmp_path / 'run'}",
                    "logger=none", *over])


def test_fingerprint_follows_settings_and_training_prompts(tmp_path):
    base = recipe_fingerprint(_cfg(tmp_path))
    assert base == recipe_fingerprint(_cfg(tmp_path))  # deterministic
    assert base == recipe_fingerprint(_cfg(tmp_path, "finetune.overwrite=true"))  # not part of the recipe
    assert base == recipe_fingerprint(_cfg(tmp_path, "finetune.pack=false"))  # same updates up to rounding
    assert base != recipe_fingerprint(_cfg(tmp_path, "finetune.steps=65"))
    assert base != recipe_fingerprint(_cfg(tmp_path, "finetune.form_matched_repeat=1"))
    other = tmp_path / "harmless.jsonl"
    other.write_text("\n".join(json.dumps({"prompt": f"name a fruit number {i}"}) for i in range(40)) + "\n")
    assert base != recipe_fingerprint(_cfg(tmp_path, f"harmless.path={other}"))


def test_reusing_a_stale_organism_warns(tmp_path, capsys):
    store = Store(tmp_path / "store")
    d = store.model_dir("smollm2-refusing")
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    cfg = compose(["model=smollm2_refusing", f"store_dir={store.root}", f"run_dir={tmp_path / 'run'}"])
    # no organism.json: an unrecorded recipe
    assert model_source(cfg.model, store) == (str(d), None)
    assert "unrecorded recipe" in capsys.readouterr().err
    (d / "organism.json").write_text(json.dumps({"recipe_hash": "0123456789abcdef"}))
    msg = check_organism("smollm2-refusing", store)
    assert msg and "another recipe" in msg and "0123456789abcdef" in msg and str(d) in msg
    assert "warning: " in capsys.readouterr().err
    # the current recipe's hash: silent
    now = recipe_fingerprint(_cfg(tmp_path, "model=smollm2", "finetune.save_as=smollm2-refusing"))
    (d / "organism.json").write_text(json.dumps({"recipe_hash": now}))
    assert check_organism("smollm2-refusing", store) is None
    model_source(cfg.model, store)
    assert "warning" not in capsys.readouterr().err
    # the folder is used as it is: nothing in it was touched
    assert json.loads((d / "organism.json").read_text()) == {"recipe_hash": now}

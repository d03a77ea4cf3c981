"""Every study recipe composes: the ``experiment`` group's files, and every command line the shell
scripts in experiments/ run (recorded by stand-ins for ``python`` and ``accelerate``, with each sweep
value composed on its own). Each plain ``key=value`` override must land in the composed config."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from safety_neurons.cfg import CONF_DIR, compose

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "experiments").glob("*.sh"))
RECORD = '#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$SN_RECORD"\necho >> "$SN_RECORD"\n'


def recorded_commands(script: Path, tmp: Path) -> list[list[str]]:
    """The argument lists ``script`` passes to ``python -m safety_neurons``, without running anything."""
    shims = tmp / "bin"
    shims.mkdir(exist_ok=True)
    for name in ("python", "accelerate"):
        f = shims / name
        f.write_text(RECORD)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    log = tmp / f"{script.stem}.log"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SN_RECORD": str(log)}
    for k in ("MODEL", "LAUNCH", "LOGGER", "MODEL_NAME"):
        env.pop(k, None)
    subprocess.run(["bash", str(script)], cwd=tmp, env=env, check=True, timeout=60)
    out = []
    for line in log.read_text().splitlines():
        args = line.split("\037")[:-1]
        if "-m" in args and args[args.index("-m") + 1] == "safety_neurons":
            out.append(args[args.index("-m") + 2:])
    return out


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (the other sweeps at their first value); --multirun dropped."""
    overrides = [o for o in overrides if o != "--multirun"]
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [o.input_line] for o in parsed]
    first = [v[0] for v in values]
    points = [first]
    for i, vs in enumerate(values):
        points += [first[:i] + [v] + first[i + 1:] for v in vs[1:]]
    return points


def check_composes(overrides: list[str], tmp: Path) -> None:
    cfg = compose([*overrides, f"run_dir={tmp / 'run'}", f"store_dir={tmp / 'store'}"])
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if o.package is not None or key.startswith("hydra"):
            continue
        if (CONF_DIR / key).is_dir():  # a group choice: its file was found, or compose had failed
            continue
        got = OmegaConf.select(cfg, key, throw_on_missing=False)
        want = o.value()
        if isinstance(got, (list, tuple)) or OmegaConf.is_list(got):
            got = list(got)
        assert got == want or str(got) == str(want), (key, got, want)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_experiment_files_compose(name, tmp_path):
    cfg = compose([f"experiment={name}", f"run_dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}"])
    assert cfg.stage.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_commands_compose(script, tmp_path):
    commands = recorded_commands(script, tmp_path)
    assert commands, f"{script.name} runs no safety_neurons command"
    for cmd in commands:
        for point in sweep_points(cmd):
            check_composes(point, tmp_path)


def test_recorder_sees_every_command(tmp_path):
    """The stand-in records quoted arguments whole and every command of a loop."""
    s = tmp_path / "s.sh"
    s.write_text("set -eu\nfor t in a b; do python -m safety_neurons stage=x 'deactivate.n=[1,2]' t=$t; done\n")
    assert recorded_commands(s, tmp_path) == [["stage=x", "deactivate.n=[1,2]", "t=a"],
                                              ["stage=x", "deactivate.n=[1,2]", "t=b"]]


def test_sweep_points_and_a_bad_recipe(tmp_path):
    assert sweep_points(["--multirun", "a=1,2", "b=x", "c=[3,4]"]) == [["a=1", "b=x", "c=[3,4]"],
                                                                        ["a=2", "b=x", "c=[3,4]"]]
    with pytest.raises(Exception, match="no_such_key"):
        check_composes(["stage=finetune", "finetune.no_such_key=1"], tmp_path)

"""A finished artifact (a neuron set, a tuned model) is written whole or not at all: real stage runs on a
tiny llama in forked processes that are interrupted (SIGINT), killed (SIGKILL) or raced at a known point."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.io import ArtifactDir, Store, atomic_write
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages import get_stage
from tests.builders import HARMLESS, stage_files

FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return stage_files(tmp_path_factory.mktemp("artifacts"), 4, 3, HARMLESS)


def ov(fx, run, *extra):
    return [f"run_dir={run}", f"store_dir={fx['store']}", "model=local", f"model.path={fx['model']}",
            f"dataset.path={fx['hb']}", f"harmless.path={fx['harmless']}", "eval.n_harmful=2", "eval.n_harmless=2",
            "eval.max_new_tokens=2", "logger=none", "device=cpu", "detect.batch_size=4", *extra]


FT = ["stage=finetune", "finetune.target=all", "finetune.steps=1", "finetune.batch_size=2", "finetune.n_harmful=2",
      "finetune.n_harmless=2", "finetune.max_new_tokens_distill=2"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def debris(folder: Path) -> list[str]:
    """What writers leave beside their artifacts: temporary folders and lock files."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name
                  or p.name.endswith(".lock")) if folder.exists() else []


def _wait_for(path: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.05)


def _child(args: list[str], stage: str, pause: str, marker: Path, release: Path) -> None:
    """Run ``stage`` and stop at ``pause`` (touch ``marker``, then wait for ``release``): ``score`` before the
    detection's scoring, ``store_plots`` when detect writes the plots of the store's copy (its scores are
    written by then), ``provenance`` when finetune writes the model's organism.json."""
    import safety_neurons.stages.detect as det
    import safety_neurons.stages.finetune as ft

    # a suite started in the background of a non-interactive shell inherits SIGINT ignored; the test
    # is about what a Ctrl-C does, so the child takes Python's own handler whatever started the suite
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def hold():
        marker.touch()
        _wait_for(release, 300)

    run_dir = Path(next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1])
    if pause == "score":
        orig_score = det.score_prompts

        def score(*a, **k):
            hold()
            return orig_score(*a, **k)

        det.score_prompts = score
    elif pause == "store_plots":
        orig_plot = det.plot_set

        def plot(ns, ad, mean, out, title):
            if Path(out) != run_dir:
                hold()
            return orig_plot(ns, ad, mean, out, title)

        det.plot_set = plot
    elif pause == "provenance":
        orig_json = ft.write_json

        def wj(path, obj):
            if Path(path).name == "organism.json":
                hold()
            return orig_json(path, obj)

        ft.write_json = wj
    get_stage(stage)(compose(args))


def start(args, stage, pause, tmp_path):
    marker, release = tmp_path / f"at-{pause}", tmp_path / f"go-{pause}"
    p = FORK.Process(target=_child, args=(args, stage, pause, marker, release))
    p.start()
    try:
        _wait_for(marker)
    except TimeoutError:
        p.kill()
        raise
    return p, release


def finish(p, sig=None) -> int:
    if sig is not None:
        os.kill(p.pid, sig)
    p.join(120)
    assert not p.is_alive()
    return p.exitcode


def test_a_second_writer_fails_at_once_and_leaves_the_first_alone(fx, tmp_path, monkeypatch):
    args = ov(fx, tmp_path / "a", "stage=detect", "detect.save_as=race")
    dest = fx["store"] / "neurons" / "local" / "harmbench" / "race"
    p, release = start(args, "detect", "score", tmp_path)
    try:
        import safety_neurons.stages.detect as det

        def no_load(cfg):
            raise AssertionError("the second writer loaded a model")

        monkeypatch.setattr(det, "load", no_load)
        t0 = time.time()
        with pytest.raises(UserError, match=rf"being written by another run \(pid {p.pid}") as e:
            get_stage("detect")(compose(ov(fx, tmp_path / "b", "stage=detect", "detect.save_as=race")))
        assert time.time() - t0 < 5 and "\n" not in str(e.value)
        assert not dest.exists()  # nothing of the loser's in the destination
        monkeypatch.undo()
    finally:
        release.touch()
    assert finish(p) == 0
    files = snapshot(dest)
    assert {"neurons.json", "scores.safetensors", "summary.csv", "config.json"} <= set(files)
    assert debris(dest.parent) == []


def test_ctrl_c_during_an_overwrite_leaves_the_previous_set_whole(fx, tmp_path):
    base = ov(fx, tmp_path / "r0", "stage=detect", "detect.save_as=ctrlc", "topk.attn=0.5", "topk.ffn=0.5")
    get_stage("detect")(compose(base))
    dest = fx["store"] / "neurons" / "local" / "harmbench" / "ctrlc"
    before = snapshot(dest)
    args = ov(fx, tmp_path / "r1", "stage=detect", "detect.save_as=ctrlc", "detect.overwrite=true",
              "topk.attn=0.25", "topk.ffn=0.25", "topk.consistency=0.25")
    p, release = start(args, "detect", "store_plots", tmp_path)
    assert finish(p, signal.SIGINT) != 0
    assert snapshot(dest) == before  # not one new file beside the old neurons.json
    assert debris(dest.parent) == []
    # stage=select on it reproduces the old set: its scores are the old ones
    sel = get_stage("select")(compose(ov(fx, tmp_path / "s", "stage=select", f"detect.scores={dest}",
                                         "topk.attn=0.5", "topk.ffn=0.5", "detect.save_as=ctrlc-again")))
    assert NeuronSet.load(sel["neurons_json"]).ranking == NeuronSet.load(dest).ranking


def test_a_killed_detection_leaves_no_set_and_the_next_run_removes_its_leftovers(fx, tmp_path, capsys):
    dest = fx["store"] / "neurons" / "local" / "harmbench" / "killed"
    args = ov(fx, tmp_path / "k", "stage=detect", "detect.save_as=killed")
    p, _ = start(args, "detect", "store_plots", tmp_path)
    finish(p, signal.SIGKILL)
    assert not dest.exists()  # no set folder holding only its scores
    left = [n for n in debris(dest.parent) if ".partial-" in n]
    assert left == [f".killed.partial-{p.pid}"]
    capsys.readouterr()
    get_stage("detect")(compose(ov(fx, tmp_path / "k2", "stage=detect", "detect.save_as=killed")))
    assert f"removed {dest.parent / left[0]}, left by an interrupted run" in capsys.readouterr().out
    assert debris(dest.parent) == [] and (dest / "neurons.json").exists()


def test_overwrite_replaces_the_whole_set(fx, tmp_path):
    dest = fx["store"] / "neurons" / "local" / "harmbench" / "whole"
    get_stage("detect")(compose(ov(fx, tmp_path / "w1", "stage=detect", "detect.save_as=whole",
                                   "detect.save_prompt_scores=true")))
    assert (dest / "prompt_scores.safetensors").exists()
    get_stage("detect")(compose(ov(fx, tmp_path / "w2", "stage=detect", "detect.save_as=whole",
                                   "detect.save_prompt_scores=false", "detect.overwrite=true")))
    assert set(snapshot(dest)) == {"neurons.json", "scores.safetensors", "summary.csv", "heatmap.png",
                                   "scores.png", "config.json"}
    assert debris(dest.parent) == []


def test_ctrl_c_while_saving_a_tuned_model_keeps_the_old_one(fx, tmp_path):
    get_stage("finetune")(compose(ov(fx, tmp_path / "f0", *FT, "finetune.save_as=ft-int")))
    out = fx["store"] / "models" / "ft-int"
    before = snapshot(out)
    p, _ = start(ov(fx, tmp_path / "f1", *FT, "finetune.save_as=ft-int", "finetune.overwrite=true",
                    "finetune.lr=1e-2"), "finetune", "provenance", tmp_path)
    assert finish(p, signal.SIGINT) != 0
    assert snapshot(out) == before
    assert debris(out.parent) == []


def test_a_killed_save_is_cleaned_up_by_the_next_run(fx, tmp_path, capsys):
    p, _ = start(ov(fx, tmp_path / "g0", *FT, "finetune.save_as=ft-kill"), "finetune", "provenance", tmp_path)
    finish(p, signal.SIGKILL)
    out = fx["store"] / "models" / "ft-kill"
    assert not out.exists() and [n for n in debris(out.parent) if ".partial-" in n]
    capsys.readouterr()
    get_stage("finetune")(compose(ov(fx, tmp_path / "g1", *FT, "finetune.save_as=ft-kill")))
    assert "left by an interrupted run" in capsys.readouterr().out
    assert debris(out.parent) == [] and (out / "config.json").exists()


def test_slice_tuning_puts_the_delta_inside_the_renamed_model(fx, tmp_path):
    get_stage("detect")(compose(ov(fx, tmp_path / "d", "stage=detect", "detect.save_as=for-delta")))
    res = get_stage("finetune")(compose(ov(fx, tmp_path / "t", *FT, "finetune.target=safety",
                                           "finetune.neurons=for-delta", "finetune.save_as=ft-delta")))
    out = fx["store"] / "models" / "ft-delta"
    assert (out / "delta.safetensors").exists() and not list((tmp_path / "t").rglob("*.safetensors"))
    assert res["delta_bytes"] == (out / "delta.safetensors").stat().st_size
    assert debris(out.parent) == []


def test_files_and_folders_get_the_users_umask(fx, tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write(tmp_path / "x.txt", lambda p: p.write_text("x"))
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
        get_stage("detect")(compose(ov(fx, tmp_path / "u", "stage=detect", "detect.save_as=umask")))
    finally:
        os.umask(old)
    dest = fx["store"] / "neurons" / "local" / "harmbench" / "umask"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()} == \
        {p.name: 0o644 for p in dest.iterdir()}


def test_the_latest_set_is_never_a_writers_temporary_folder(tmp_path):
    store = Store(tmp_path)
    done = store.neuron_dir("m", "d", "done")
    done.mkdir(parents=True)
    (done / "neurons.json").write_text("{}")
    partial = done.with_name(".later.partial-1")
    partial.mkdir()
    (partial / "neurons.json").write_text("{}")
    os.utime(done / "neurons.json", (1, 1))
    assert store.find_neurons("m", "d", None) == done / "neurons.json"


def test_a_lock_of_a_dead_writer_is_not_held(tmp_path):
    dest = tmp_path / "a" / "set"
    p = FORK.Process(target=lambda: (ArtifactDir(dest).__enter__(), os._exit(0)))
    p.start()
    p.join(30)
    assert (dest.parent / ".set.lock").exists()  # the killed writer's lock file and temporary folder remain
    with ArtifactDir(dest) as art:
        (art.tmp / "f").write_text("new")
        art.commit()
    assert (dest / "f").read_text() == "new" and debris(dest.parent) == []

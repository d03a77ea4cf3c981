"""Two CPU processes (gloo) under ``accelerate launch`` train exactly like one process with the same
global batch. ``--multi_gpu`` with ``Accelerator(cpu=True)`` is what gives two gloo ranks; ``--cpu
--num_processes 2`` would start a single process (STYLE.md, "Hydra with Accelerate: known traps")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dist_train_script.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    multi = tmp_path / "multi.safetensors"
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(free_port()), str(SCRIPT), str(multi)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads(multi.with_suffix(".json").read_text())
    assert info["world"] == 2 and info["backend"] == "gloo" and info["distributed_type"] == "DistributedType.MULTI_CPU"

    single = tmp_path / "single.safetensors"
    p1 = subprocess.run([sys.executable, str(SCRIPT), str(single)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    assert p1.returncode == 0, p1.stderr[-3000:]
    info1 = json.loads(single.with_suffix(".json").read_text())
    assert info1["world"] == 1

    # the logged losses are the global-batch token means: the same in both runs
    assert info["losses"] == pytest.approx(info1["losses"], rel=1e-5)
    a, b = load_file(str(single)), load_file(str(multi))
    assert a.keys() == b.keys()
    from tests.tiny import tiny_model

    start = tiny_model("llama").state_dict()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
        moved += int(not torch.equal(a[k], start[k]))
    assert moved == len(a)  # every tensor trained (not a comparison of two untouched models)


def test_two_process_detect_equals_one_process(tmp_path):
    """`accelerate launch` with 2 gloo ranks: each scores a shard of the prompts, the shards are gathered,
    and the saved per-prompt scores, statistics and ranked set are bit-identical to a single-process run's
    (the ranks score whole batches of the one-process batching, so no near-tie can swap places)."""
    from tests.builders import write_harmbench
    from tests.tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    hb = write_harmbench(tmp_path / "hb", n_test=7, n_val=2)  # 7 prompts: the two shards differ in size
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    args = ["stage=detect", "model=local", f"model.path={model_dir}", f"dataset.path={hb}", "logger=none",
            "detect.batch_size=2", "topk.attn=0.5", "topk.ffn=0.5", "topk.consistency=0.5"]

    def run(name, launcher):
        store, run_dir = tmp_path / f"store-{name}", tmp_path / f"run-{name}"
        e = {**env, "SAFETY_NEURONS_RUN_DIR": str(run_dir)}
        p = subprocess.run([*launcher, "-m", "safety_neurons", *args, f"store_dir={store}"], cwd=ROOT, env=e,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert json.loads((run_dir / "results.json").read_text())["processes"] == (2 if name == "multi" else 1)
        return store / "neurons" / "local" / "harmbench" / "exact"

    # the shipped two-rank config, as the README tells users to launch it
    multi = run("multi", [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(ROOT / "experiments" / "accelerate_cpu2.yaml"), "--main_process_port", str(free_port())])
    single = run("single", [sys.executable])
    ps1, ps2 = load_file(str(single / "prompt_scores.safetensors")), load_file(str(multi / "prompt_scores.safetensors"))
    assert ps1.keys() == ps2.keys() and len(ps1) == 2 * 5  # 2 layers x 5 kinds
    for k in ps1:
        assert ps1[k].shape[0] == 7  # every prompt once, in prompt order
        assert torch.equal(ps2[k], ps1[k]), k
    s1, s2 = load_file(str(single / "scores.safetensors")), load_file(str(multi / "scores.safetensors"))
    for k in s1:
        assert torch.equal(s2[k], s1[k]), k
    n1, n2 = (json.loads((d / "neurons.json").read_text()) for d in (single, multi))
    assert n1["ranking"] == n2["ranking"] and len(n1["ranking"]) > 0
    assert n2["meta"]["n_prompts"] == 7
    # `--cpu --num_processes 2` starts one process: the run says so instead of passing for two ranks
    e = {**env, "SAFETY_NEURONS_RUN_DIR": str(tmp_path / "run-cpu")}
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m",
                        "safety_neurons", *args, f"store_dir={tmp_path / 'store-cpu'}"], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning: accelerate launch was asked for 2 processes and started 1; on CPU use --config_file " \
           "experiments/accelerate_cpu2.yaml" in p.stdout
    assert json.loads((tmp_path / "run-cpu" / "results.json").read_text())["processes"] == 1


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_score_the_one_process_batches(world):
    """Each rank scores whole batches of the one-process batching: the ranks' batches together are exactly
    one process's, so no prompt gets other neighbours or padding (the source of near-tie swaps)."""
    from safety_neurons.scoring import rank_batches

    prompts = ["x" * n for n in (5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1)]
    one = rank_batches(prompts, 3)
    assert [len(prompts[i]) for b in one for i in b] == sorted(map(len, prompts))
    parts = [rank_batches(prompts, 3, r, world) for r in range(world)]
    assert sorted(b for p in parts for b in p) == sorted(one)
    assert sorted(i for p in parts for b in p for i in b) == list(range(len(prompts)))

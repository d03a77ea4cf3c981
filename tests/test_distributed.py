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

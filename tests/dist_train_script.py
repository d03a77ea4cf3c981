"""Train the tiny llama with ``train_sft`` for 3 steps (global batch 4) and save its weights from rank 0.

Run as ``python tests/dist_train_script.py OUT`` (one process) or under
``accelerate launch --multi_gpu --num_processes 2 ... tests/dist_train_script.py OUT`` (two CPU processes
over gloo: ``Accelerator(cpu=True)``). tests/test_distributed.py compares the two.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402

# responses of different lengths: each process's shard holds a different number of loss tokens
PROMPTS = ["how do I bake bread", "explain the water cycle", "write a poem about the sea", "sea",
           "bake a poem", "the water"]
RESPONSES = ["I cannot help with that, it could be dangerous to many people", "ok",
             "the sea is blue and wide and deep", "no", "sure, here is a poem about bread", "water"]


def main(out: str) -> None:
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from safety_neurons.config import FinetuneConfig
    from safety_neurons.training import train_sft

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    fcfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig),
                           dict(steps=3, batch_size=4, grad_accum=1, lr=1e-2, weight_decay=0.1, warmup=0.0,
                                schedule="cosine", clip=1.0, seed=0))
    model = tiny_model("llama")  # seeded: the same start on every rank
    stats = train_sft(model, tiny_tokenizer(), PROMPTS, RESPONSES, fcfg, None, list(model.parameters()),
                      accelerator=acc, progress=False)
    if acc.is_main_process:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out)
        Path(out).with_suffix(".json").write_text(json.dumps({"world": acc.num_processes,
                                                              "backend": str(acc.state.backend),
                                                              "distributed_type": str(acc.distributed_type),
                                                              "losses": stats["losses"]}))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])

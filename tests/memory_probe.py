"""Measure the peak RSS of real CPU training steps, for tests/test_plan.py (run in a fresh interpreter).

    python -m tests.memory_probe llama|bert full|lora|subspace BATCH SEQ   -> prints one JSON line
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from torch import nn

from idlab.config.run import RunConfig

#: the two small models of the plan-vs-measured test: (factory name, keyword arguments)
MODELS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 2000, "hidden_size": 384, "layers": 4, "heads": 6, "kv_heads": 2,
              "intermediate_size": 1024, "num_labels": 2},
    "bert": {"vocab_size": 2000, "hidden_size": 384, "layers": 4, "heads": 6, "intermediate_size": 1536,
             "num_labels": 2},
}
TARGETS = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value")}


def build(name: str) -> nn.Module:
    """The model, freshly initialised (seed 0)."""
    from idlab.models import tiny_bert, tiny_llama

    return (tiny_llama if name == "llama" else tiny_bert)(**MODELS[name])


def run_config(name: str, method: str) -> RunConfig:
    """The probe's run: LoRA r=8 on the attention's query/value projections, SAID d = 1,000 with the
    streamed Fastfood engine (layout "blocks", head trained), or full fine-tuning."""
    from idlab.methods.lora import LoraAxes
    from idlab.methods.subspace import SubspaceAxes

    if method == "lora":
        return RunConfig(method="lora", axes=LoraAxes(r=8, lora_alpha=16.0, target_modules=TARGETS[name]))
    if method == "subspace":
        return RunConfig(method="subspace", axes=SubspaceAxes(d=1000, projection="fastfood", said=True, head="train",
                                                              layout="blocks"))
    return RunConfig(method="full")


def main(argv: list[str]) -> None:
    from idlab import methods
    from idlab.data.base import ClassificationTask
    from idlab.training.loop import TrainConfig, train

    name, method, batch, seq = argv[0], argv[1], int(argv[2]), int(argv[3])
    g = torch.Generator().manual_seed(0)
    n = 4 * batch

    def inputs(k: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(3, MODELS[name]["vocab_size"], (k, seq), generator=g),
                "attention_mask": torch.ones(k, seq, dtype=torch.long)}

    task = ClassificationTask(inputs(n), torch.randint(0, 2, (n,), generator=g), inputs(8),
                              torch.randint(0, 2, (8,), generator=g), name="probe")
    run = run_config(name, method)
    prep = methods.get(run.method).prepare(build(name), run.axes, run.seed)
    cfg = TrainConfig(lr=1e-4, steps=2, batch_size=batch, eval_batch_size=8, progress=False, precision="fp32",
                      device="cpu")
    before = _rss()
    res = train(prep.model, task, cfg)
    print(json.dumps({"peak_rss": res.peak_memory_bytes, "rss_before_train": before, "steps": res.steps}))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])

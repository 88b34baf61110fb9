"""``idlab plan``: parameter counts and projected peak memory of every run of a study, from shapes.

The model is built on the ``meta`` device (no weights are read or allocated: planning
Llama-2-7B costs a config file), wrapped for its method (LoRA adapters through PEFT on meta,
``requires_grad`` as the method trains), and one forward + loss runs on meta tensors of the
step's shape (``train.batch_size`` x ``task.max_length`` tokens) under
``torch.autograd.graph.saved_tensors_hooks``: the activations are the bytes autograd keeps for the
backward pass, counted once per storage, parameters excluded. Then, in bytes
(P: parameters, T: trainable ones, b(.) their bytes in the precision they train in):

    weights     = b(P)                      (bf16-mixed: trainable in fp32, frozen as loaded;
                                             bf16: all in bf16; autocast adds a bf16 copy of fp32
                                             nn.Linear weights)
    grads       = b(T)
    optimizer   = 2 b(T) (adam, adamw)  or  b(T) (sgd with momentum)
    method      = `subspace_memory` (subspace runs: one weight at a time when streamed), else 0
    activations = saved tensors of one forward (meta), + 2 x the largest of them (the backward's
                  transient gradient buffers)
    peak        = the sum                   (comparable to result.json peak_memory_bytes on CUDA)
    device total= peak + runtime            (CPU: the interpreter with torch/transformers/peft
                                             loaded, `CPU_RUNTIME_BYTES`; CUDA: `CUDA_CONTEXT_BYTES`)

and the host memory a Slurm task needs (``mem_gb``): on a CUDA node the interpreter, the weights
as loaded (``from_pretrained`` reads them on the host first), full FT's host copy of W_0, and
Delta W in float32 (full / subspace: every 2-D linear weight; LoRA: the factors); on a CPU node the
device total plus the same copies plus once more the activations: glibc's malloc keeps freed blocks
(peak RSS of the probe models in tests/memory_probe.py exceeded live tensors by 0.3-1.3 x their
activations; with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` it does not, and the
device total matches the measured peak RSS within 5%, tests/test_plan.py). ``mem_gb`` = that x `SLURM_HEADROOM`, in GiB, rounded up.

Over N devices (``idlab plan --device-memory-gb G``, `RunPlan.per_device_bytes`, `devices_table`): under
FSDP2 (a shardable method: full fine-tuning) weights + grads + optimizer are divided by N; under DDP they
stay whole on every device; each rank's activations are those of ceil(batch / N) examples. The
smallest N whose per-device total fits G GB is reported. A projection, not a measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from idlab import methods
from idlab.config.run import RunConfig
from idlab.config.schema import is_causal_lm_task, is_text_task
from idlab.methods import Axes

#: RSS of a fresh interpreter after ``import torch, transformers, peft, idlab.methods, idlab.training.loop,
#: idlab.data.text`` (398 MB measured on the 2-core CPU box with torch 2.13.0+cpu, transformers 5.24):
#: the fallback when `cpu_runtime_bytes` cannot measure this environment.
CPU_RUNTIME_BYTES = 400 * 10**6
#: what `cpu_runtime_bytes` imports in a fresh interpreter before a method's own `runtime_imports`
_RUNTIME_BASE = ("torch", "transformers", "idlab.methods", "idlab.training.loop")


def cpu_runtime_bytes(extra: tuple[str, ...] = ()) -> int:
    """Peak RSS of a fresh interpreter holding a run's imports in THIS environment, measured once per
    process (about 5 s), else `CPU_RUNTIME_BYTES`. ``extra``: what the method loads during a run
    (`idlab.methods.Method.runtime_imports`: PEFT, and through it torch's compiler stack, which loads
    Triton where it is installed, +80-300 MB)."""
    return _measure_runtime(tuple(extra))


@functools.lru_cache(maxsize=8)
def _measure_runtime(extra: tuple[str, ...]) -> int:
    import subprocess
    import sys

    # the peak is reset first: Linux keeps a forked parent's peak RSS across exec in ru_maxrss
    code = ("try:\n    open('/proc/self/clear_refs', 'w').write('5')\nexcept OSError:\n    pass\n"
            f"import resource, {', '.join((*_RUNTIME_BASE, *extra))}\n"
            "try:\n    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
            "    print(int(hwm[0].split()[1]) * 1024)\n"
            "except (OSError, IndexError):\n"
            "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             check=True)
        return max(CPU_RUNTIME_BYTES, int(out.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return CPU_RUNTIME_BYTES
#: CUDA context + cuBLAS/cuDNN workspaces beside the allocator's peak: an ASSUMPTION (~1 GB is typical),
#: not yet measured here (the GPU run of issue 16 is pending).
CUDA_CONTEXT_BYTES = 10**9
#: Slurm asks for this much more host memory than the plan projects.
SLURM_HEADROOM = 1.25

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}


@dataclass(frozen=True)
class RunPlan:
    """What one run needs: parameter counts and projected memory in bytes (see the module doc)."""

    run_id: str
    label: str
    method: str
    device: str
    precision: str
    total_parameters: int
    trainable_parameters: int
    tokens_per_step: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    method_bytes: int
    activation_bytes: int
    runtime_bytes: int
    host_bytes: int
    batch_size: int = 1
    shardable: bool = False

    @property
    def peak_bytes(self) -> int:
        """Projected peak of tensors on the device (CUDA: comparable to max_memory_allocated)."""
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.method_bytes
                + self.activation_bytes)

    @property
    def device_total_bytes(self) -> int:
        """Peak plus the runtime (CPU: the comparable of peak RSS; CUDA: what must fit on the GPU)."""
        return self.peak_bytes + self.runtime_bytes

    @property
    def slurm_mem_gb(self) -> int:
        """Host memory to ask Slurm for, GiB (`SLURM_HEADROOM` x the host projection, rounded up)."""
        return max(1, math.ceil(SLURM_HEADROOM * self.host_bytes / 2**30))

    def per_device_bytes(self, n: int) -> int:
        """Projected bytes on each of ``n`` devices of one run (`sharded_strategy`): under FSDP2 the
        weights, gradients and optimizer state divided by ``n``; under DDP (not shardable) each device
        holds them whole; the activations of ceil(batch / n) examples per rank; the method's own
        bytes and the runtime per device. Not counted: FSDP2's transient all-gather of one block's
        full weights (a block of Llama-2-7B: 0.2 B parameters, 0.4 GB in bf16)."""
        state = self.weights_bytes + self.grads_bytes + self.optimizer_bytes
        if self.shardable:
            state = math.ceil(state / n)
        per_rank = math.ceil(self.batch_size / n) / max(1, self.batch_size)
        return state + self.method_bytes + math.ceil(self.activation_bytes * per_rank) + self.runtime_bytes

    def smallest_world(self, device_bytes: int, limit: int = 4096) -> int | None:
        """The smallest number of devices whose `per_device_bytes` fit ``device_bytes`` (None: none up to
        ``limit``, or not below the batch size, where more ranks stop shrinking anything but the state)."""
        top = limit if self.shardable else max(1, self.batch_size)
        for n in range(1, top + 1):
            if self.per_device_bytes(n) <= device_bytes:
                return n
        return None

    def sharded_strategy(self) -> str:
        """What ``train.distributed: auto`` picks on several devices: fsdp2 (shardable) or ddp."""
        return "fsdp2" if self.shardable else "ddp"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes, "device_total_bytes": self.device_total_bytes,
                "slurm_mem_gb": self.slurm_mem_gb}


# --------------------------------------------------------------------------- the terms


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _train_dtype(p: nn.Parameter, loaded: torch.dtype, precision: str) -> torch.dtype:
    if not p.is_floating_point():
        return loaded
    if precision == "bf16":
        return torch.bfloat16
    if p.requires_grad:
        return torch.float32
    return loaded


def activation_bytes(model: nn.Module, inputs: Tensor | Mapping[str, Tensor], targets: Tensor,
                     loss: Literal["classification", "causal-lm"] = "classification") -> tuple[int, int]:
    """(total, largest) bytes autograd saves for the backward of one forward + loss on meta tensors.

    ``model`` and the inputs must be on the ``meta`` device; parameters are excluded (counted as
    weights), and each storage is counted once (a tensor several ops save, or views of it).
    """
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in param_storages:
            sizes[key] = max(sizes.get(key, 0), t.untyped_storage().nbytes())
        return t

    from idlab.data.base import call_model

    model.train()  # as in the training loop: dropout masks count
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = call_model(model, dict(inputs) if isinstance(inputs, Mapping) else inputs)
        if loss == "causal-lm":
            v = logits.shape[-1]
            tgt = F.pad(targets[:, 1:], (0, 1), value=-100)
            F.cross_entropy(logits.reshape(-1, v).float(), tgt.reshape(-1), ignore_index=-100, reduction="sum")
        else:
            F.cross_entropy(logits.float(), targets)
    return sum(sizes.values()), max(sizes.values(), default=0)


def plan_memory(model: nn.Module, inputs: Tensor | Mapping[str, Tensor], targets: Tensor, *,
                method: str, axes: Axes | None = None, precision: str, device: str = "cpu",
                optimizer: str = "adamw", loss: Literal["classification", "causal-lm"] = "classification",
                run_id: str = "", label: str = "", runtime_bytes: int | None = None) -> RunPlan:
    """The `RunPlan` of ``model`` (on ``meta``, from ``Method.plan_model``) for one step of ``inputs``.

    Args:
        model: on the meta device, with ``requires_grad`` as the method's `plan_model` left it
            (the LoRA-wrapped model; every float parameter for full and subspace runs).
        inputs, targets: one step's batch on meta (ids (B, T) or a dict of them; labels (B,)
            for classification, ids (B, T) for causal-LM).
        method, axes: the registered method and the run's axes (default: the method's empty
            axes); the method adds its own terms (`idlab.methods.Method.plan_terms`).
        precision: fp32, tf32, bf16-mixed or bf16 (already resolved).
        device: cpu or cuda (the runtime term and where the copies live).
        runtime_bytes: overrides `cpu_runtime_bytes()` / `CUDA_CONTEXT_BYTES`.
    """
    m = methods.get(method)
    axes = axes if axes is not None else m.axes_type()
    params = _unique_params(model)
    orig = {id(p): p.dtype for p in params}  # as loaded (the forward below may run in bf16)
    if precision in ("bf16", "bf16-mixed"):  # autocast: matmuls and what follows them in bf16
        for p in params:
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    act, act_largest = activation_bytes(model, inputs, targets, loss)
    terms = m.plan_terms(model, axes, precision, orig)  # may turn requires_grad off (subspace)
    total = sum(p.numel() for p in params)
    weights = sum(p.numel() * _BYTES.get(_train_dtype(p, orig[id(p)], precision), 4) for p in params)
    trainable = [p for p in params if p.requires_grad]
    t_bytes = sum(p.numel() * _BYTES.get(_train_dtype(p, orig[id(p)], precision), 4) for p in trainable)
    t_bytes += terms.extra_trainable_bytes
    n_trainable = sum(p.numel() for p in trainable) + terms.extra_trainable
    if precision == "bf16-mixed":  # autocast keeps a bf16 copy of every fp32 linear weight it casts
        weights += sum(2 * mod.weight.numel() for mod in model.modules()
                       if isinstance(mod, nn.Linear) and orig.get(id(mod.weight)) == torch.float32)
    grads = t_bytes
    opt = {"adam": 2, "adamw": 2, "sgd": 1}.get(optimizer, 2) * t_bytes
    activations = act + 2 * act_largest
    runtime = runtime_bytes if runtime_bytes is not None else (CUDA_CONTEXT_BYTES if device == "cuda"
                                                               else cpu_runtime_bytes(m.runtime_imports))
    loaded = sum(p.numel() * _BYTES.get(orig[id(p)], 4) for p in params)
    copies = terms.host_copies
    if device == "cuda":
        host = CPU_RUNTIME_BYTES + loaded + copies
    else:  # + glibc's retention of freed blocks (its mmap threshold grows): up to ~1.3 x the activations
        host = weights + grads + opt + terms.method_bytes + activations + runtime + copies + activations  # measured
    tokens = int(math.prod(next(iter(inputs.values())).shape if isinstance(inputs, Mapping) else inputs.shape[:1]))
    return RunPlan(run_id=run_id, label=label, method=method, device=device, precision=precision,
                   total_parameters=total, trainable_parameters=n_trainable, tokens_per_step=tokens,
                   weights_bytes=weights, grads_bytes=grads, optimizer_bytes=opt, method_bytes=terms.method_bytes,
                   activation_bytes=activations, runtime_bytes=runtime, host_bytes=host)


# --------------------------------------------------------------------------- from a study


def plan_precision(precision: str, device: str, model_dtype: str) -> str:
    """``auto`` for a target device without asking that device (bf16-mixed on CUDA, as on any GPU with
    bfloat16; on the CPU fp32, or bf16-mixed for a bf16/fp16 model), else as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if device == "cuda" or model_dtype in ("bfloat16", "float16") else "fp32"


def target_device(study: Any, device: str | None = None) -> str:
    """cpu or cuda: ``device`` if given, else the study's device, where ``auto`` is cuda when the runs go to
    Slurm GPU nodes (`idlab.sweep.slurm.gpu_request`) or this host has CUDA."""
    dev = device or study.device
    if dev != "auto":
        return "cuda" if str(dev).startswith("cuda") else "cpu"
    if study.executor == "slurm":
        from idlab.errors import ConfigError
        from idlab.sweep.slurm_env import gpu_request

        try:
            gpus, gres, _ = gpu_request(study)
            return "cuda" if gpus or (gres and "gpu" in gres) else "cpu"
        except ConfigError:  # auto without an answer from sinfo: as this host
            pass
    return "cuda" if torch.cuda.is_available() else "cpu"


#: Architecture of the recipes' hub models (their published config.json values), used only when the
#: hub cannot be reached: planning then needs no network. The test checks the parameter counts.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                 "vocab_size": 32000, "max_position_embeddings": 4096},
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048},
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {  # the same architecture as the intermediate checkpoint
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048},
    "FacebookAI/roberta-large": {"model_type": "roberta", "hidden_size": 1024, "intermediate_size": 4096,
                                 "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 50265,
                                 "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1},
}


@functools.lru_cache(maxsize=16)
def model_config(name: str) -> tuple[Any, str]:
    """(transformers config, source) of a model name: its config.json (alias, folder, hub or cache), else
    `KNOWN_CONFIGS` when the hub cannot be reached."""
    from transformers import AutoConfig

    from idlab.models import resolve_model_name

    try:
        return AutoConfig.from_pretrained(resolve_model_name(name)), "config.json"
    except (OSError, FileNotFoundError, ValueError):
        if name not in KNOWN_CONFIGS:
            raise
    fields = dict(KNOWN_CONFIGS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields), "idlab.sweep.plan.KNOWN_CONFIGS (hub unreachable)"


def _meta_pretrained(name: str, task: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from idlab.sweep.build import GLUE_LABELS

    config, _ = model_config(name)
    with torch.device("meta"):
        if task.startswith("glue/"):
            config.num_labels = GLUE_LABELS.get(task.split("/", 1)[1].lower(), 2)
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = 0
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def meta_model(run: RunConfig) -> nn.Module:
    """The base model of ``run`` on the ``meta`` device (shapes, no weights), as `plan_run` measures it."""
    return _meta_run(run)[0]


def _meta_run(run: RunConfig) -> tuple[nn.Module, Tensor | dict[str, Tensor], Tensor,
                                       Literal["classification", "causal-lm"], str]:
    """(base model, one step's inputs and targets, loss, model dtype) of ``run``, all on ``meta``."""
    from idlab.sweep.build import build_task_and_model

    tname, mname = run.task.name, run.model.name
    bs = run.train.batch_size
    model_dtype = run.model.dtype
    loss: Literal["classification", "causal-lm"] = "classification"
    if is_text_task(tname) and ":" not in mname:
        model = _meta_pretrained(mname, tname, getattr(torch, model_dtype))
        seq = run.task.max_length
        inputs: Tensor | dict[str, Tensor] = {"input_ids": torch.ones(bs, seq, dtype=torch.long, device="meta")}
        if is_causal_lm_task(tname):
            loss, targets = "causal-lm", torch.ones(bs, seq, dtype=torch.long, device="meta")
        else:
            targets = torch.zeros(bs, dtype=torch.long, device="meta")
    else:  # models built from scratch: small, built for real, then moved to meta with a real batch's shape
        task, model = build_task_and_model(run)
        x, y = task.train_batch(torch.arange(min(bs, task.num_train)))
        model = model.to("meta")
        inputs = {k: v.to("meta") for k, v in x.items()} if isinstance(x, dict) else x.to("meta")
        targets = y.to("meta")
        model_dtype = "float32"
    return model, inputs, targets, loss, model_dtype


def plan_run(run: RunConfig, rid: str = "", device: str = "cpu") -> RunPlan:
    """The `RunPlan` of one run (as `idlab.sweep.grid.expand` yields) on ``device``."""
    model, inputs, targets, loss, model_dtype = _meta_run(run)
    precision = plan_precision(run.train.precision, device, model_dtype)
    method = methods.get(run.method)
    model = method.plan_model(model, run.axes, run.seed)
    plan = plan_memory(model, inputs, targets, method=run.method, axes=run.axes, precision=precision,
                       device=device, optimizer=run.train.optimizer, loss=loss, run_id=rid, label=_label(run))
    return dataclasses.replace(plan, batch_size=run.train.batch_size, shardable=method.shardable)


def _label(run: RunConfig) -> str:
    """The run's shape without lr and seed (plans are shared across those)."""
    return f"{run.method} {run.axes.label()}".strip()


def plan_runs(study: Any, runs: Sequence[tuple[str, RunConfig]] | None = None,
              device: str | None = None) -> list[RunPlan]:
    """One `RunPlan` per run of ``study`` (or of ``runs``), on `target_device`; one per distinct shape
    of run (seeds and learning rates share theirs). Raises ConfigError where ``idlab sweep`` would refuse
    a method's block against the model (`idlab.methods.Method.check_model`: d above D, a missing LoRA target)."""
    from idlab.sweep.grid import expand

    runs = list(runs) if runs is not None else expand(study)
    if runs:
        model = meta_model(runs[0][1])
        for name in dict.fromkeys(cfg.method for _, cfg in runs):
            methods.get(name).check_model(study.settings(name), model, f"study {study.name!r} (model {study.model.name!r})")
    dev = target_device(study, device)
    cache: dict[str, RunPlan] = {}
    out = []
    for rid, cfg in runs:
        key = repr(sorted((k, repr(v)) for k, v in cfg.to_dict().items() if k not in ("seed", "lr")))
        if key not in cache:
            cache[key] = plan_run(cfg, rid, dev)
        out.append(RunPlan(**{**asdict(cache[key]), "run_id": rid}))
    return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def devices_table(plans: Sequence[RunPlan], device_memory_gb: float) -> str:
    """Per distinct run shape: the smallest number of devices of ``device_memory_gb`` (GB = 1e9 bytes) that
    its projected per-device memory fits (`RunPlan.smallest_world`), under the strategy auto picks."""
    budget = int(device_memory_gb * 1e9)
    lines = [f"{'run':<28} {'strategy':>8} {'1 device':>9} {'N':>5} {'per device at N':>16}"]
    seen: dict[str, RunPlan] = {}
    for p in plans:
        seen.setdefault(p.label, p)
    for label, p in seen.items():
        n = p.smallest_world(budget)
        at = f"{_gb(p.per_device_bytes(n))}" if n is not None else "-"
        lines.append(f"{label:<28} {p.sharded_strategy():>8} {_gb(p.per_device_bytes(1)):>9} "
                     f"{n if n is not None else 'none':>5} {at:>16}")
    lines.append(f"(projected, not measured: the smallest N devices of {device_memory_gb:g} GB each that one run "
                 "fits on; fsdp2 divides weights, grads and optimizer state by N, ddp keeps them on every device; "
                 "activations of ceil(batch/N) examples per rank)")
    most = max((n for p in seen.values() if (n := p.smallest_world(budget)) is not None), default=None)
    if most is not None and most > 1:
        lines.append(f"(run these with nproc_per_node={most}: executor=torchrun on one {most}-GPU host, or "
                     f"executor=slurm, which asks Slurm for {most} tasks and {most} GPUs on one node per run)")
    return "\n".join(lines)


def plan_table(plans: Sequence[RunPlan]) -> str:
    """One line per distinct run shape: counts, the memory terms (GB) and Slurm mem_gb."""
    lines = [f"{'run':<28} {'runs':>4} {'params':>14} {'trainable':>12} {'prec':>10} {'weights':>7} {'grads':>6} "
             f"{'optim':>6} {'method':>6} {'activ':>6} {'peak':>7} {'device':>7} {'host':>6} {'mem_gb':>6}"]
    seen: dict[str, list[RunPlan]] = {}
    for p in plans:
        seen.setdefault(p.label, []).append(p)
    for label, group in seen.items():
        p = group[0]
        lines.append(
            f"{label:<28} {len(group):>4} {p.total_parameters:>14,} {p.trainable_parameters:>12,} {p.precision:>10} "
            f"{_gb(p.weights_bytes):>7} {_gb(p.grads_bytes):>6} {_gb(p.optimizer_bytes):>6} {_gb(p.method_bytes):>6} "
            f"{_gb(p.activation_bytes):>6} {_gb(p.peak_bytes):>7} {_gb(p.device_total_bytes):>7} "
            f"{_gb(p.host_bytes):>6} {p.slurm_mem_gb:>6}")
    if plans:
        dev = plans[0].device
        lines.append(f"(GB = 1e9 bytes; device {dev}: 'peak' = tensors, 'device' = peak + "
                     f"{'CUDA context (assumed)' if dev == 'cuda' else 'interpreter RSS'}; 'host' = what a Slurm "
                     f"task needs; mem_gb = {SLURM_HEADROOM} x host in GiB; tokens per step "
                     f"{plans[0].tokens_per_step:,}, the padded maximum)")
    return "\n".join(lines)


__all__ = [
    "CPU_RUNTIME_BYTES",
    "CUDA_CONTEXT_BYTES",
    "KNOWN_CONFIGS",
    "SLURM_HEADROOM",
    "RunPlan",
    "activation_bytes",
    "cpu_runtime_bytes",
    "devices_table",
    "meta_model",
    "model_config",
    "plan_memory",
    "plan_precision",
    "plan_run",
    "plan_runs",
    "plan_table",
    "target_device",
]

"""The one training loop: full fine-tuning, LoRA and subspace training alike.

Whatever the method, the model handed to `train` exposes exactly the tensors to
train as parameters with ``requires_grad=True`` (all of them for full
fine-tuning, the adapters for LoRA, theta_d and lambda for a `SubspaceModel`).
The loop optimises those, evaluates on the task's held-out split, tracks the
best and final metric, and stops a run whose loss turns NaN/inf (``diverged``).

Precision (``TrainConfig.precision``, resolved by `idlab.training.devices.resolve_precision` on the
device the run trains on): ``fp32`` (TF32 off), ``tf32`` (CUDA tensor cores for float32
matmuls), ``bf16-mixed`` (trainable parameters -- full-FT weights, LoRA adapters, theta_d,
lambdas, directly trained heads -- their gradients and the optimiser state in float32; forward
and loss under ``torch.autocast(dtype=bfloat16)``), ``bf16`` (pure bfloat16) or ``auto``.

No host round trip per step: the logged loss is summed on the device and read at log points,
and the NaN/inf check is a device-side record of the first bad step, read every
`DIVERGENCE_CHECK_EVERY` steps, at every evaluation and at the end. A diverged run stops at the
first such check (its steps count up to the first bad step; the weights it kept training may be
non-finite, which is why a diverged run writes no Delta W).

Same config and seed on the CPU give bit-identical metrics.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from idlab.data.base import Task, inputs_to
from idlab.jsontypes import JsonObject
from idlab.options import doc
from idlab.training import checkpoint as ckpt
from idlab.training.checkpoint import BatchOrder, CheckpointSpec
from idlab.training.convergence import (
    ConvergenceRule,
    Until,
    check_convergence,
    patience_exhausted,
    validate_until,
)
from idlab.training.devices import Precision, check_precision, resolve_precision
from idlab.training.devices import float32_matmul as float32_matmul
from idlab.training.devices import resolve_device as resolve_device
from idlab.training.distributed import (
    STRATEGIES,
    Strategy,
    all_max,
    all_sum,
    gather_full,
    inner,
    local_device,
    local_slice,
    unit_weight,
    wrap,
)
from idlab.training.distributed import setup as dist_setup
from idlab.training.tracking import Backend, TrackSpec, check_backends, open_trackers

#: Read the device-side divergence flag at least this often (steps); also at every evaluation.
DIVERGENCE_CHECK_EVERY = 100




@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every method (one per run)."""

    lr: float = field(default=1e-3, metadata=doc("peak learning rate"))
    optimizer: Literal["adam", "adamw", "sgd"] = field(
        default="adamw", metadata=doc("optimizer: adam, adamw or sgd (momentum 0.9)")
    )
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=doc("Adam betas"))
    weight_decay: float = field(default=0.0, metadata=doc("decoupled (adamw) or L2 weight decay"))
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata=doc("learning-rate decay after warmup")
    )
    warmup_steps: int = field(default=0, metadata=doc("linear warmup steps"))
    steps: int | None = field(default=None, metadata=doc("optimizer steps (overrides epochs)"))
    epochs: float = field(default=1.0, metadata=doc("passes over the training set if steps is None"))
    batch_size: int = field(default=32, metadata=doc("examples per step"))
    eval_every: int | None = field(
        default=None, metadata=doc("evaluate every N steps (None: only at the end)")
    )
    eval_batch_size: int = field(default=256, metadata=doc("examples per evaluation batch"))
    eval_at_start: bool = field(default=False, metadata=doc("also evaluate before step 1"))
    grad_clip: float | None = field(default=None, metadata=doc("clip the gradient norm to this"))
    seed: int = field(default=0, metadata=doc("seed for data order, dropout and initialisation"))
    device: str = field(default="auto", metadata=doc("auto, cpu, cuda, cuda:1, ..."))
    precision: Precision = field(
        default="auto",
        metadata=doc("auto | fp32 | tf32 | bf16-mixed (fp32 trainable parameters, bf16 autocast) | bf16 (pure); "
                       "auto: bf16-mixed on CUDA GPUs with bfloat16 (and for bf16/fp16 models), else fp32"),
    )
    progress: bool = field(default=True, metadata=doc("show a tqdm progress bar"))
    until: Until = field(
        default="steps",
        metadata=doc("steps: run steps/epochs; converged: stop early by patience, steps/epochs is the cap"),
    )
    patience: int | None = field(
        default=3, metadata=doc("evaluations without a tol improvement that stop an until=converged run")
    )
    tol: float = field(default=0.002, metadata=doc("smallest improvement of the metric that counts (absolute)"))
    plateau_window: float = field(default=0.2, metadata=doc("plateau test: the last fraction of the steps"))
    checkpoint_every: int | None = field(
        default=None, metadata=doc("save the training state every N steps (a killed run resumes there); null: off"))
    checkpoint_every_min: float | None = field(
        default=None, metadata=doc("also save it every N minutes of training (whichever of the two comes first); "
                                   "null: off"))
    keep_checkpoints: bool = field(default=False, metadata=doc("keep the checkpoint after the run finished ok"))
    log_to: tuple[Backend, ...] = field(
        default=(), metadata=doc("stream loss, lr, eval metrics, throughput, memory to: tensorboard, wandb, trackio"))
    distributed: Strategy = field(
        default="auto",
        metadata=doc("none | ddp | fsdp2 | auto (under executor torchrun; auto: none for one process, fsdp2 for a "
                     "shardable method (full fine-tuning), ddp otherwise)"))

    def __post_init__(self) -> None:
        self.convergence_rule()  # validates tol / window / patience
        validate_until(self.until, self.steps, self.epochs, self.eval_every)
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")
        if self.batch_size <= 0:
            raise ValueError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"TrainConfig.steps must be >= 1 or None, got {self.steps}")
        if self.steps is None and self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs must be > 0, got {self.epochs}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(
                f"TrainConfig.optimizer={self.optimizer!r} is unknown; use adam, adamw or sgd"
            )
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"TrainConfig.schedule={self.schedule!r} is unknown; use constant, linear or cosine"
            )
        check_precision(self.precision)
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"TrainConfig.checkpoint_every must be >= 1 or None, got {self.checkpoint_every}")
        if self.checkpoint_every_min is not None and not self.checkpoint_every_min > 0:
            raise ValueError(f"TrainConfig.checkpoint_every_min must be > 0 (minutes) or None, got "
                             f"{self.checkpoint_every_min}")
        check_backends(self.log_to)  # a missing package: `pip install idlab[tracking]`, before any run
        if self.distributed not in STRATEGIES:
            raise ValueError(f"TrainConfig.distributed={self.distributed!r} is unknown; use {', '.join(STRATEGIES)}")

    def convergence_rule(self) -> ConvergenceRule:
        """The `ConvergenceRule` these fields describe."""
        return ConvergenceRule(tol=self.tol, window=self.plateau_window, patience=self.patience)

    def total_steps(self, num_train: int) -> int:
        """Optimizer steps this config runs on a training set of ``num_train`` examples."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_train / self.batch_size))


@dataclass
class TrainResult:
    """What one training run produced (JSON-able through ``to_dict``).

    Attributes:
        metrics: evaluation at the end of training (``metric`` key included).
        best: best value of the task's metric over all evaluations, and its step.
        curve: one dict per log point: step, train_loss, and eval metrics when evaluated.
        steps: optimizer steps completed.
        diverged: the loss became NaN/inf and training stopped.
        error: why it stopped early, if it did.
        wall_time_s: seconds spent in the loop, evaluations included.
        peak_memory_bytes: peak CUDA memory allocated, or on the CPU the peak RSS during this
            run (Linux; elsewhere the process's peak RSS so far).
        trainable_parameters: entries of all parameters that the optimizer updated.
        device: where it ran.
        precision: the precision it trained in (``auto`` resolved), see `TrainConfig.precision`.
        converged: the validation metric plateaued or the run stopped early on patience
            (`idlab.training.convergence`); ``convergence`` holds the verdict's details.
        resumed_from: the checkpoint step this run resumed from (None: it started at step 0).
        distributed: strategy, world size and backend (`idlab.training.distributed.DistContext.record`).
        task_record: what the task records about the trained run (`idlab.data.Task.after_training`:
            e.g. exact match, forgetting); not in ``wall_time_s``.
    """

    metrics: dict[str, float]
    best: dict[str, float]
    curve: list[dict[str, float]]
    steps: int
    diverged: bool
    error: str | None
    wall_time_s: float
    peak_memory_bytes: int
    trainable_parameters: int
    device: str
    precision: str = "fp32"
    converged: bool = False
    convergence: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    distributed: dict[str, Any] = field(default_factory=dict)
    task_record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> JsonObject:
        return asdict(self)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` with requires_grad, each once."""
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    return f


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux VmHWM); False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_memory(device: torch.device) -> int:
    """Peak CUDA memory allocated; on the CPU the peak RSS (VmHWM, reset when the run started,
    so several runs in one process each get their own), else the process's lifetime peak."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(bfloat16)`` for ``bf16-mixed`` / ``bf16``, a no-op context otherwise."""
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cast_for_precision(model: nn.Module, params: list[nn.Parameter], precision: str) -> None:
    """Put parameters in the dtypes ``precision`` trains them in (in place, identity kept).

    ``bf16``: every floating-point parameter in bfloat16. Otherwise: the trainable ones
    (``params``) in float32 -- the master weights of ``bf16-mixed`` -- frozen ones as loaded.
    """
    if precision == "bf16":
        targets, dtype = [p for p in model.parameters() if p.is_floating_point()], torch.bfloat16
    else:
        targets, dtype = params, torch.float32
    for p in targets:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def _task_hook(task: Task, name: str, net: nn.Module, model: nn.Module, precision: str,
               device: torch.device, *args: JsonObject) -> JsonObject:
    """A task's `Task.before_training` / `after_training` (``name``) on ``model`` in eval mode, no_grad, under
    autocast; ``{}`` for a task object that does not define it (a duck-typed task, not a `Task`)."""
    hook: Callable[..., JsonObject] | None = getattr(task, name, None)
    if hook is None:
        return {}
    net.eval()
    with torch.no_grad(), autocast(precision, device):
        out = hook(model, *args)
    net.train()
    return out


def train(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig | None = None,
    *,
    extra_loss: Callable[[], Tensor] | None = None,
    desc: str | None = None,
    checkpoint: CheckpointSpec | None = None,
    shardable: bool = False,
    tracking: TrackSpec | None = None,
) -> TrainResult:
    """Train the ``requires_grad`` parameters of ``model`` on ``task``.

    Args:
        model: any module; its trainable parameters are the ones with requires_grad
            (a `SubspaceModel` exposes theta_d / lambda, a PEFT model its adapters).
        task: data, loss and evaluation (`idlab.data.Task`).
        cfg: optimisation settings; defaults to ``TrainConfig()``.
        extra_loss: optional regulariser added to every step's loss
            (e.g. Li et al.'s L2 on theta_D for subspace training).
        desc: progress-bar label.
        checkpoint: where to save the training state every ``checkpoint.every`` steps and resume
            from (`idlab.training.checkpoint`); None: no checkpoints.
        shardable: the method trains the model's own weights (FSDP2 can shard them); decides
            ``train.distributed: auto`` under torchrun (`idlab.training.distributed`).
        tracking: where ``cfg.log_to`` streams each evaluation (`idlab.training.tracking`).

    Returns:
        A `TrainResult`. A run whose loss becomes NaN/inf stops, with
        ``diverged=True``, and keeps its last finite evaluation. Under FSDP2, rank 0's
        ``model`` holds full tensors afterwards (`idlab.training.distributed.gather_full`).
    """
    cfg = cfg or TrainConfig()
    device = local_device(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device,
                                  [p.dtype for p in model.parameters() if p.is_floating_point()])
    ctx = dist_setup(cfg.distributed, shardable, device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "train: the model has no parameter with requires_grad=True; "
            "wrap it (SubspaceModel, apply_lora) or unfreeze what should be trained"
        )
    cast_for_precision(model, params, precision)
    n_trainable = sum(p.numel() for p in params)
    net = wrap(model, ctx, device, precision)  # what trains: DDP over the model, or the model (FSDP2 in place)
    params = trainable_parameters(net)
    opt = _optimizer(params, cfg)
    total = cfg.total_steps(task.num_train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    batches = BatchOrder(task.num_train, cfg.batch_size, cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()

    curve: list[dict[str, float]] = []
    best: dict[str, float] = {}
    metrics: dict[str, float] = {}
    sign = 1.0 if task.higher_is_better else -1.0
    evaluated = inner(net)

    def evaluate(step: int, train_loss: float) -> None:
        nonlocal metrics, best
        net.eval()
        with autocast(precision, device):
            metrics = task.evaluate(evaluated, cfg.eval_batch_size)
        net.train()
        if task.metric not in metrics:
            raise KeyError(f"{type(task).__name__}.evaluate returned no {task.metric!r}: {metrics}")
        curve.append({"step": float(step), "train_loss": train_loss, **metrics})
        trackers.log({"train/loss": train_loss, "train/lr": float(sched.get_last_lr()[0]),
                      "train/examples_per_s": cfg.batch_size * (step - start) / max(time.perf_counter() - t0, 1e-9),
                      "memory/peak_bytes": float(_peak_memory(device)),
                      **{f"eval/{k}": float(v) for k, v in metrics.items()}}, step)
        v = metrics[task.metric]
        if not best or sign * v > sign * best[task.metric]:
            best = {task.metric: v, "step": float(step)}

    # device-side bookkeeping, read only at log points (no host sync per step)
    running = torch.zeros((), dtype=torch.float32, device=device)  # summed loss since the last log point
    step_dev = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # first step with a NaN/inf loss (0: none)
    bad_loss = torch.zeros((), dtype=torch.float32, device=device)  # that loss
    start, count = 0, 0
    state = ckpt.load(checkpoint) if checkpoint is not None else None
    if state is not None:
        assert checkpoint is not None
        ckpt.restore(checkpoint, state, net, opt)
        sched.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        curve, best, metrics = state["curve"], state["best"], state["metrics"]
        start, count = int(state["step"]), int(state["count"])
        if ctx.rank == 0:  # the saved sum is over all ranks
            running.copy_(state["running"])
        step_dev.fill_(start)
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(step: int) -> None:
        assert checkpoint is not None
        msd: dict[str, Any] = {}
        osd: dict[str, Any] = {}
        shards: str | None = None
        if ctx.strategy == "fsdp2":  # sharded: each rank writes its own shards, nothing gathered
            shards = ckpt.save_shards(checkpoint, net, opt, step, ctx.rank)
        else:
            msd, osd = ckpt.model_state(net, opt)
        ckpt.save(checkpoint, {"step": step, "count": count, "model": msd, "optimizer": osd, "shards": shards,
                               "scheduler": sched.state_dict(), "batches": batches.state_dict(),
                               "curve": curve, "best": best, "metrics": metrics, "running": all_sum(running, ctx).cpu(),
                               "rng": ckpt.rng_state(), "task_before": before}, write=ctx.rank == 0)

    trackers = open_trackers(tracking, ctx.rank)
    before: JsonObject = (dict(state.get("task_before") or {}) if state is not None  # the pretrained model's
                          else _task_hook(task, "before_training", net, evaluated, precision, device))
    t0 = time.perf_counter()
    with float32_matmul(precision, device), contextlib.closing(trackers):
        diverged, error, step = False, None, start
        rule, stopped = cfg.convergence_rule(), False
        every = cfg.eval_every or 0
        if cfg.eval_at_start and state is None:
            evaluate(0, float("nan"))
        net.train()
        bar = tqdm(total=total, initial=start, desc=desc or task.name, disable=not cfg.progress or ctx.rank != 0,
                   leave=False, dynamic_ncols=True)
        try:
            for step in range(start + 1, total + 1):
                idx = next(batches)
                mine = local_slice(idx, ctx)
                x, y = task.train_batch(mine)
                batch = (inputs_to(x, device), y.to(device))
                with autocast(precision, device):
                    loss = task.loss(net, batch)
                    if extra_loss is not None:
                        loss = loss + extra_loss()
                weight = 1.0 if ctx.world == 1 else unit_weight(task.loss_units(batch), ctx, device)
                opt.zero_grad(set_to_none=True)
                (loss * weight if weight != 1.0 else loss).backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                lval = loss.detach().float()
                step_dev += 1
                newly_bad = (first_bad == 0) & ~torch.isfinite(lval)
                first_bad = torch.where(newly_bad, step_dev, first_bad)
                bad_loss = torch.where(newly_bad, lval, bad_loss)
                running += lval * (weight / ctx.world) if ctx.world > 1 else lval  # the global mean
                count += 1
                evaluating = every > 0 and step % every == 0 and step != total
                saving = checkpoint is not None and step != total and checkpoint.due(step, ctx, device)
                if evaluating or saving or step % DIVERGENCE_CHECK_EVERY == 0 or step == total:
                    fb = int(all_max(first_bad, ctx))
                    if fb:
                        diverged, error = True, f"loss became {float(bad_loss)} at step {fb}"
                        step = fb - 1
                        break
                if evaluating:
                    evaluate(step, float(all_sum(running, ctx)) / count)
                    running.zero_()
                    count = 0
                    bar.set_postfix({task.metric: f"{metrics[task.metric]:.4g}"})
                    if cfg.until == "converged" and patience_exhausted(curve, task.metric, task.higher_is_better,
                                                                       rule):
                        stopped = True
                        break
                if saving:
                    save_checkpoint(step)
                bar.update(1)
        finally:
            bar.close()
        if not stopped and (not diverged or not curve):
            mean = float(all_sum(running, ctx)) / count if count and not diverged else float("nan")
            evaluate(step, mean)
        wall = time.perf_counter() - t0
        record = {} if diverged else _task_hook(task, "after_training", net, evaluated, precision, device, before)
    verdict = check_convergence(curve, task.metric, task.higher_is_better, rule, early_stopped=stopped)
    gather_full(model, ctx)
    return TrainResult(
        metrics=metrics,
        best=best,
        curve=curve,
        steps=step,
        diverged=diverged,
        error=error,
        wall_time_s=wall,
        peak_memory_bytes=_peak_memory(device),
        trainable_parameters=n_trainable,
        device=str(device),
        precision=precision,
        converged=verdict.converged and not diverged,
        convergence=verdict.to_dict(),
        resumed_from=start if state is not None else None,
        distributed=ctx.record() if ctx.strategy != "none" else {},
        task_record=record,
    )

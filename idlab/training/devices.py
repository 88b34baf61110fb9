"""Devices and numeric precision, resolved where a run executes.

- `resolve_device`: ``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; an explicit
  ``cuda``/``cuda:N`` that this process cannot use is an error naming the value and the fix.
- `resolve_precision`: ``train.precision`` (`PRECISIONS`) for one device and model. ``auto`` is
  ``bf16-mixed`` on CUDA devices with native bfloat16 (Ampere and later) and for models that hold
  low-precision (bf16 / fp16) weights wherever bfloat16 autocast works, ``fp32`` otherwise.
- `visible_devices` / `worker_devices`: ``CUDA_VISIBLE_DEVICES`` parsed the way CUDA reads it
  (indices, ``GPU-<uuid>``, ``MIG-<uuid>`` / ``MIG-GPU-<uuid>/<gi>/<ci>``), and the entry each
  per-GPU worker gets, so that a worker sees exactly one of the devices its parent sees.
- `cpu_torch_on_gpu_machine`: a CPU-only torch build on a machine whose ``nvidia-smi`` lists GPUs
  (the symptom of a ``.venv`` made on another machine), with the command that fixes it.

Everything here is cheap and has no side effect: an error is raised before any run starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch

from idlab.errors import ConfigError

Precision = Literal["auto", "fp32", "tf32", "bf16-mixed", "bf16"]
#: Allowed values of ``train.precision``.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "tf32", "bf16-mixed", "bf16")
_LOW = (torch.bfloat16, torch.float16)


class DeviceError(ConfigError):
    """A device, precision or CUDA_VISIBLE_DEVICES value this machine cannot honour (a `ConfigError`)."""


# --------------------------------------------------------------------------- devices


def _cuda_build() -> str:
    cuda = torch.version.cuda
    return f"CUDA {cuda}" if cuda else "CPU-only"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` if torch sees a CUDA device, else ``cpu``; anything else as given.

    Raises:
        DeviceError: an unparsable name, or ``cuda``/``cuda:N`` while torch sees fewer devices; for
            ``auto``, a malformed ``CUDA_VISIBLE_DEVICES``, or one that names devices on a machine with
            GPUs (``nvidia-smi``) while torch sees none of them (it would silently run on the CPU).
    """
    if device == "auto":
        raw = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = visible_devices(raw)  # a malformed value raises here
        if torch.cuda.is_available():
            return torch.device("cuda")
        if entries and nvidia_gpus():
            raise DeviceError(
                f"device=auto: CUDA_VISIBLE_DEVICES={raw!r} names no device torch can use, so the runs would "
                "silently go to the CPU; set it to devices that `nvidia-smi -L` lists, unset it, or set it to "
                "'' (or device=cpu) to run on the CPU on purpose"
            )
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(
                f"device={device!r} but torch {torch.__version__} ({_cuda_build()} build) sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use device=auto or cpu, "
                "or install a CUDA build of torch (make install TORCH=torch TORCH_INDEX=...)"
            )
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device={device!r} but torch sees {n} CUDA device(s) (cuda:0..cuda:{n - 1}); "
                              "pick one of those or device=cuda")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (CUDA: compute capability >= 8.0; CPU: always)."""
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the keyword
            return bool(torch.cuda.is_bf16_supported())
    return device.type in ("cpu", "mps", "xpu")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of `PRECISIONS`, else a DeviceError naming it and the allowed values."""
    if precision not in PRECISIONS:
        raise DeviceError(f"train.precision={precision!r} is unknown; allowed values: {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str, device: torch.device, model_dtypes: Sequence[torch.dtype] = ()) -> str:
    """The precision a run trains in on ``device`` (never ``auto``).

    - ``fp32``: every matmul in IEEE float32 (TF32 off); the model must hold float32 weights.
    - ``tf32``: as fp32 but float32 matmuls / convolutions on TF32 tensor cores (CUDA only).
    - ``bf16-mixed``: trainable parameters, their gradients and optimiser state in float32;
      forward and loss under ``torch.autocast(dtype=bfloat16)``; frozen weights as loaded.
    - ``bf16``: pure bfloat16 (every floating parameter, gradient and optimiser state).

    Args:
        precision: one of `PRECISIONS`.
        device: where the run trains.
        model_dtypes: dtypes of the model's floating-point parameters (for ``auto`` and checks).

    Raises:
        DeviceError: unknown value; ``tf32`` off CUDA; ``bf16*`` on a device without bfloat16;
            ``fp32``/``tf32`` with a bf16/fp16 model (names the fix).
    """
    check_precision(precision)
    low = sorted({str(d).removeprefix("torch.") for d in model_dtypes if d in _LOW})
    if precision == "auto":
        if bf16_supported(device) and (device.type == "cuda" or low):
            return "bf16-mixed"
        if low:
            raise DeviceError(f"train.precision=auto: the model holds {', '.join(low)} weights but {device} has "
                              "no bfloat16; load it with model.dtype=float32")
        return "fp32"
    if precision == "tf32" and device.type != "cuda":
        raise DeviceError(f"train.precision='tf32' needs a CUDA GPU (TF32 tensor cores); this run is on {device}; "
                          "use precision=fp32 (or auto)")
    if precision in ("bf16-mixed", "bf16") and not bf16_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise DeviceError(f"train.precision={precision!r} but {device} ({name}) has no native bfloat16 "
                          "(CUDA needs compute capability >= 8.0); use precision=fp32 or tf32 (or auto)")
    if precision in ("fp32", "tf32") and low:
        raise DeviceError(f"train.precision={precision!r} with a model holding {', '.join(low)} weights: its "
                          "matmuls would not run in float32; use precision=bf16-mixed (fp32 trainable "
                          "parameters, bf16 autocast) or load the model with model.dtype=float32")
    return precision


# --------------------------------------------------------------------------- CUDA_VISIBLE_DEVICES

_UUID = r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
_ENTRY = re.compile(rf"^(?:\d+|GPU-{_UUID}|GPU-[0-9a-fA-F-]{{4,}}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+"
                    rf"|MIG-[0-9a-fA-F-]{{4,}})$")


def visible_devices(value: str | None) -> list[str] | None:
    """Entries of a ``CUDA_VISIBLE_DEVICES`` value, in order; None when it is unset (all devices).

    CUDA accepts indices (``4``), GPU UUIDs (``GPU-8f6d...``, also a unique prefix) and MIG
    instances (``MIG-<uuid>``, ``MIG-GPU-<uuid>/<gi>/<ci>``), comma-separated. ``""`` and ``-1``
    hide every device (an empty list). Where CUDA would silently hide an invalid entry *and every
    entry after it*, this raises instead.

    Raises:
        DeviceError: an entry that is none of the above, or a repeated entry.
    """
    if value is None:
        return None
    text = value.strip()
    if text in ("", "-1", "none", "NoDevFiles"):
        return []
    entries = [e.strip() for e in text.split(",")]
    for i, e in enumerate(entries):
        if not _ENTRY.match(e):
            hidden = ", ".join(entries[i:])
            raise DeviceError(
                f"CUDA_VISIBLE_DEVICES={value!r}: entry {e!r} is neither a device index, a GPU-<uuid> nor a "
                f"MIG-<uuid>; CUDA would hide it and every entry after it ({hidden}). Fix the variable, "
                "e.g. CUDA_VISIBLE_DEVICES=0,1 or the UUIDs `nvidia-smi -L` prints"
            )
    dup = sorted({e for e in entries if entries.count(e) > 1})
    if dup:
        raise DeviceError(f"CUDA_VISIBLE_DEVICES={value!r} names {dup} more than once; list each device once")
    return entries


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_devices(gpus: Sequence[int] | None = None, env: Mapping[str, str] | None = None,
                   count: Callable[[], int] = _cuda_count) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each per-GPU worker: one entry of the parent's, each once.

    Worker k sees exactly the device the parent sees as ``cuda:<gpus[k]>`` (``gpus``: indices
    relative to the parent's visible devices, as torch numbers them; None: all of them). With
    ``CUDA_VISIBLE_DEVICES=4,5`` the workers get ``4`` and ``5``; with UUIDs, the UUIDs.

    Args:
        gpus: the study's ``gpus`` (None: every device torch sees).
        env: the environment (default ``os.environ``).
        count: the number of CUDA devices this process sees (default torch's; tests pass a fake).

    Raises:
        DeviceError: no device visible (names CUDA_VISIBLE_DEVICES and the fix), an index out of
            range, or a repeated index.
    """
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    entries = visible_devices(raw)
    n = count()
    if entries is not None:
        # CUDA enumerates the listed devices that exist, in order; torch's count says how many did
        n = min(n, len(entries))
    if n == 0:
        why = (f"CUDA_VISIBLE_DEVICES={raw!r} names no device torch can use" if entries is not None
               else f"torch {torch.__version__} ({_cuda_build()} build) sees no CUDA device")
        raise DeviceError(f"executor=multigpu: {why}; use executor=local (or slurm), or fix "
                          "CUDA_VISIBLE_DEVICES / install a CUDA build of torch")
    names = entries[:n] if entries is not None else [str(i) for i in range(n)]
    if gpus is None:
        return names
    chosen = list(gpus)
    bad = [g for g in chosen if not 0 <= g < n]
    if bad:
        raise DeviceError(f"gpus={chosen}: {bad} out of range; this process sees {n} CUDA device(s), "
                          f"numbered 0..{n - 1} (CUDA_VISIBLE_DEVICES={raw!r})")
    if len(set(chosen)) != len(chosen):
        raise DeviceError(f"gpus={chosen} repeats a device; one worker per device")
    return [names[g] for g in chosen]


# --------------------------------------------------------------------------- torch build check


def nvidia_gpus() -> list[str]:
    """Lines of ``nvidia-smi -L`` (one per GPU) when nvidia-smi exists and works, else []."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("GPU")]


def cpu_torch_on_gpu_machine() -> str | None:
    """A warning when ``nvidia-smi`` lists GPUs but torch cannot use CUDA; None when all is well."""
    gpus = nvidia_gpus()
    if not gpus or torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        why = f"the installed torch {torch.__version__} is a CPU-only build"
    else:
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot initialise CUDA (driver too old?)"
    return (f"warning: nvidia-smi lists {len(gpus)} GPU(s) but {why}, so device=auto runs on the CPU. "
            "Fix: `make install TORCH=torch` (or TORCH=\"torch==X\" TORCH_INDEX=https://download.pytorch.org/"
            "whl/cuXXX for your driver); the install re-installs torch when TORCH/TORCH_INDEX change")


__all__ = [
    "PRECISIONS",
    "DeviceError",
    "Precision",
    "bf16_supported",
    "check_precision",
    "cpu_torch_on_gpu_machine",
    "float32_matmul",
    "nvidia_gpus",
    "resolve_device",
    "resolve_precision",
    "visible_devices",
    "worker_devices",
]


@contextlib.contextmanager
def float32_matmul(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 on for ``tf32``, off for every other precision, on CUDA; restored on exit.

    PyTorch's own defaults differ between matmuls (TF32 off) and cuDNN convolutions (on);
    here ``fp32`` means IEEE float32 everywhere. A no-op off CUDA.
    """
    if device.type != "cuda":
        yield
        return
    want = precision == "tf32"
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(mm, "fp32_precision"):  # torch >= 2.9
        conv = getattr(cudnn, "conv", None)
        old = (mm.fp32_precision, conv.fp32_precision if conv is not None else None)
        mm.fp32_precision = "tf32" if want else "ieee"
        if conv is not None:
            conv.fp32_precision = "tf32" if want else "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old[0]
            if conv is not None and old[1] is not None:
                conv.fp32_precision = old[1]
        return
    old_flags = (mm.allow_tf32, cudnn.allow_tf32)  # pragma: no cover - older torch
    mm.allow_tf32 = cudnn.allow_tf32 = want
    try:
        yield
    finally:
        mm.allow_tf32, cudnn.allow_tf32 = old_flags

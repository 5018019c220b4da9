"""Which precision the image backbone runs in, and how.

In ``bf16``/``fp16`` the backbone (image tower up to the projected patch
features) runs under :func:`torch.autocast`, with its matrix weights (linear
and convolution weights and biases, the projection) stored in that dtype once
at load time: autocast would round them to it on every call anyway (a frozen
model's weights are not in autocast's cache), so the numbers are the same,
each call saves the casts (docs/performance.md) and the backbone's weights
take half the memory. Norms, embeddings and the
text tower stay float32. The head (feature normalisation, cosine logits,
softmax, prompt denoising, key smoothing, upsampling) runs outside it, in
float32. A student's decoder runs under the same autocast when it serves or
is judged; its text classifier stays float32. Near-tied cosine logits
would flip in bf16's 8-bit mantissa; in float32 they do not, so the label map
agrees with a full float32 run wherever the decision is not a near-tie (see
:mod:`maskclip_engine.evaluation.precision_agreement`). Text embeddings are always float32.

``auto`` picks bf16 where the hardware computes it natively: CUDA devices
that support it (else fp16, which every CUDA GPU runs natively) and CPUs with
bf16 instructions (AVX512-BF16 or AMX-BF16 on x86, BF16/SVE-BF16 on Arm).
Elsewhere bf16 would be emulated and slower than float32, so ``auto`` is fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from maskclip_engine.errors import InvalidOptionError

CONCRETE_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}

# CPU feature names (as torch.cpu.get_capabilities() spells them) that compute bf16 natively.
NATIVE_BF16_CPU_FEATURES: tuple[str, ...] = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_native_bf16(capabilities: Mapping[str, Any]) -> bool:
    """True when a CPU with these capabilities has bf16 arithmetic instructions."""
    return any(bool(capabilities.get(name, False)) for name in NATIVE_BF16_CPU_FEATURES)


def choose_precision(
    requested: str, device_type: str, cpu_capabilities: Mapping[str, Any], cuda_bf16: bool = True
) -> str:
    """The concrete precision (``fp32``, ``fp16`` or ``bf16``) for ``requested`` on a device.

    A pure function of its arguments, so the rule is testable on any machine;
    :func:`resolve_precision` feeds it this machine's facts.
    """
    if requested in CONCRETE_PRECISIONS:
        return requested
    if requested != "auto":
        raise InvalidOptionError(
            f"precision {requested!r} is not supported; use auto, {', '.join(CONCRETE_PRECISIONS)}."
        )
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "cpu" and cpu_has_native_bf16(cpu_capabilities):
        return "bf16"
    return "fp32"


def cpu_capabilities() -> Mapping[str, Any]:
    """This machine's CPU features as torch detects them (empty when this torch cannot tell)."""
    try:
        return torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: no detection, no bf16 guess
        return {}


def resolve_precision(requested: str, device: torch.device) -> str:
    """``requested`` made concrete for ``device`` on this machine."""
    # Native bf16 from compute capability 8 (Ampere) on; is_bf16_supported() also says yes where it is emulated.
    cuda_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return choose_precision(requested, device.type, cpu_capabilities() if device.type == "cpu" else {}, cuda_bf16)


def store_matrix_weights(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the matrix weights of ``module`` (a frozen image tower) in ``dtype``; return how many tensors changed.

    These are exactly the tensors autocast rounds to ``dtype`` before its
    matrix products: weights and biases of linear layers, convolutions and
    attention input projections, and a bare ``proj`` matrix. Norm layers,
    positional and class embeddings keep float32.
    """
    changed = 0
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            names: tuple[str, ...] = ("weight", "bias")
        elif isinstance(sub, torch.nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        else:
            names = ("proj",) if sub is module else ()
        for name in names:
            tensor = getattr(sub, name, None)
            if isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
                changed += 1
    return changed


def matrix_weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the image tower's matrix weights are stored in (its first convolution's)."""
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return conv.weight.dtype


def backbone_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context the image backbone runs in: autocast for bf16/fp16, nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

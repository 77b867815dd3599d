"""One antialiased bilinear resize of a (C,h,w) crop, as torchvision's, without its per-call
dispatch: the CPU fast path (:mod:`multimae.data.transforms`) and the device decoder
(:mod:`multimae.data.device_decode`) both resize through it."""
from __future__ import annotations

import platform

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode


def bilinear(x: Tensor, size: int) -> Tensor:
    """``TF.resize(x, [size, size], BILINEAR, antialias=True)`` of a (C,h,w) float32 or uint8 tensor
    (a crop view), the same ``interpolate`` call without torchvision's per-call dispatch; uint8
    only where torchvision resizes uint8 natively (else its own path)."""
    c, h, w = x.shape
    if (h, w) == (size, size):
        return x  # torchvision returns the input unchanged too
    if x.dtype == torch.uint8 and not _NATIVE_UINT8:
        return TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    img = x.reshape(1, c, h, w)
    strides = img.stride()
    if img.is_contiguous(memory_format=torch.channels_last) and img.numel() != strides[0]:
        img = img.as_strided((1, c, h, w), [img.numel(), *strides[1:]])  # as torchvision: keep channels-last
    # interpolate(img, [size, size], "bilinear", antialias=True) calls this kernel, after ~20 us of Python
    out = torch._C._nn._upsample_bilinear2d_aa(img, [size, size], False, None)
    return out.reshape(c, size, size)


# torchvision resizes uint8 bilinear natively on these CPUs (torchvision's _do_native_uint8_resize_on_cpu)
_NATIVE_UINT8 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or \
    platform.machine() in ("aarch64", "arm64")

"""Random distortions of whole training batches: one affine map per image (``elastic``: plus a smooth random
displacement field, Simard et al. 2003), one ``F.grid_sample``; drawn for the global batch, split like the images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import MEAN, SIDE, STD

BACKGROUND = (0.0 - MEAN) / STD  # a black pixel, normalised: what enters from outside the image

# name -> (max rotation in degrees, max relative scale change, max shear, max shift in pixels, elastic)
KINDS = {
    "none": None,
    "shift": (0.0, 0.0, 0.0, 2.0, False),
    "affine": (12.0, 0.12, 0.15, 2.5, False),
    "elastic": (10.0, 0.10, 0.10, 2.0, True),
}
ELASTIC_SIGMA = 5.0  # smoothness of the displacement field, pixels
ELASTIC_ALPHA = 30.0  # its strength, pixels (before smoothing shrinks it)


def draw(kind: str, n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """The random parameters for ``n`` images: affine matrices ``(n, 2, 3)`` (and noise ``(n, 2, 28, 28)``)."""
    rotate, scale, shear, shift, elastic = KINDS[kind]

    def uniform(*shape, bound=1.0):
        return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

    if kind == "shift":  # whole pixels only, so no interpolation blur
        t = torch.randint(-int(shift), int(shift) + 1, (n, 2), generator=generator).float()
        theta = torch.eye(2, 3).repeat(n, 1, 1)
        theta[:, :, 2] = t * (2 / SIDE)
        return (theta,)
    angle = uniform(n, bound=math.radians(rotate))
    s = 1 + uniform(n, bound=scale)
    sh = uniform(n, bound=shear)
    t = uniform(n, 2, bound=shift * 2 / SIDE)  # grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    rows = [torch.stack([cos, -sin + sh * cos, t[:, 0]], 1), torch.stack([sin, cos + sh * sin, t[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    return (theta, uniform(n, 2, SIDE, SIDE)) if elastic else (theta,)


def apply(x: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """Distort the rows of ``x`` (normalised images ``(n, 784)``) with parameters from :func:`draw`."""
    n = x.shape[0]
    theta = params[0].to(x.device, x.dtype)
    grid = F.affine_grid(theta, (n, 1, SIDE, SIDE), align_corners=False)
    if len(params) > 1:  # elastic: add a smoothed random displacement field
        field = _blur(params[1].to(x.device, x.dtype), ELASTIC_SIGMA) * (ELASTIC_ALPHA * 2 / SIDE)
        grid = grid + field.permute(0, 2, 3, 1)
    images = (x - BACKGROUND).view(n, 1, SIDE, SIDE)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(n, -1) + BACKGROUND


def _blur(field: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(n, c, H, W)``, separably, zero-padded."""
    radius = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype) / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = field.shape
    f = field.reshape(n * c, 1, h, w)
    f = F.conv2d(f, k.view(1, 1, 1, -1), padding=(0, radius))
    f = F.conv2d(f, k.view(1, 1, -1, 1), padding=(radius, 0))
    return f.view(n, c, h, w)

"""Comparison backend: torch ``grid_sample``, the way most PyTorch code reprojects panoramas.

Kept to measure against and to cross-check the kernels, not for production: it converts each
panorama to float32 (4x its bytes) and pads a copy of it for the seam and the poles, because
``grid_sample`` can neither wrap nor cross a pole. Plain bilinear only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def project_views(shapes, shape_index, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lon, lat) in radians, yaw 0, of every pixel of every view: two (N, h, w) float32 tensors."""
    params = torch.as_tensor(shapes, dtype=torch.float32, device=device)[torch.as_tensor(shape_index, device=device)]
    rotation, tan_x, tan_y = params[:, :9].view(-1, 3, 3), params[:, 9], params[:, 10]
    cols = (torch.arange(width, device=device) + 0.5) * 2.0 / width - 1.0
    rows = 1.0 - (torch.arange(height, device=device) + 0.5) * 2.0 / height
    cam = torch.stack(
        [
            (tan_x[:, None, None] * cols).expand(-1, height, -1),
            (tan_y[:, None, None] * rows[:, None]).expand(-1, -1, width),
            torch.ones(len(params), height, width, device=device),
        ],
        dim=-1,
    )
    ray = torch.einsum("nij,nhwj->nhwi", rotation, cam)
    lon = torch.atan2(ray[..., 0], ray[..., 2])
    lat = torch.atan2(ray[..., 1], torch.hypot(ray[..., 0], ray[..., 2]))
    return lon, lat


def reproject_grid_sample(panos, shapes, shape_index, yaw, yaw_offsets, scale, bias, out: torch.Tensor) -> None:
    """Fill ``out`` (M, N, 3, h, w) with bilinear samples, one grid_sample call per panorama."""
    n_views, height, width = out.shape[1], out.shape[3], out.shape[4]
    device = out.device
    lon, lat = project_views(shapes, shape_index, height, width, device)
    view_yaw = torch.as_tensor(yaw, dtype=torch.float32, device=device)[:, None, None]
    scale = torch.as_tensor(scale, dtype=torch.float32, device=device)[:, None, None]
    bias = torch.as_tensor(bias, dtype=torch.float32, device=device)[:, None, None]
    for m, pano in enumerate(panos):
        pano_h, pano_w = pano.shape[:2]
        image = pano.permute(2, 0, 1).float()
        half = pano_w // 2
        image = torch.cat([image[:, :1].roll(half, -1), image, image[:, -1:].roll(half, -1)], dim=1)
        image = torch.cat([image[..., -1:], image, image[..., :1]], dim=-1)  # (3, H + 2, W + 2)
        x = ((lon + view_yaw + float(yaw_offsets[m])) / (2 * math.pi) + 0.5) * pano_w
        # Clamped after the wrap, NaN and inf included (remainder(inf) is NaN), like the kernels.
        x = torch.remainder(x, pano_w).nan_to_num_(0.0).clamp_(0, pano_w)
        y = ((0.5 - lat / math.pi) * pano_h).nan_to_num_(0.0).clamp_(0, pano_h)
        # Padded pixel k has its centre at k - 0.5 in panorama coordinates; align_corners maps k.
        grid = torch.stack([(x + 0.5) / (pano_w + 1), (y + 0.5) / (pano_h + 1)], dim=-1) * 2 - 1
        sampled = F.grid_sample(image[None], grid.reshape(1, n_views * height, width, 2), align_corners=True)
        sampled = sampled.view(3, n_views, height, width).transpose(0, 1) * scale + bias
        if out.dtype == torch.uint8:
            sampled = sampled.round().clamp(0, 255)
        out[m].copy_(sampled)

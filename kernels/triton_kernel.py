"""CUDA backend: one Triton launch for every (panorama, view, block of output pixels).

Bytes moved per output pixel: the uint8 panorama pixels under its filter, 3 channels each, read in
place through a table of per-panorama pointers and strides (so a list of panoramas of different
sizes is read where it lies, with no stacking, padding or float copy), plus 3 output values
written once in the output dtype (2 bytes each for fp16). Neighbouring output pixels share most
source pixels, so after the first touch those reads are served from L1/L2; DRAM traffic is close
to the panorama region under the views, read once, plus the output.

Everything per pixel (ray, longitude/latitude, Jacobian footprint) is computed in registers in
float32; ``atan2`` is a Cephes polynomial built from core ``tl`` ops because the Triton
interpreter (used for CPU tests) has no libdevice.

No float can take an index off the panorama: the sample position is clamped after the longitude
wrap (with ``tl.where`` on comparisons, which are false for NaN, so NaN lands on pixel 0 on the GPU
and in the interpreter alike, where ``tl.maximum`` leaves NaN unspecified), and every row and
column index is clamped where it is formed.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _atan2(y, x):
    """Branch-free atan2: Cephes atanf's polynomial on |t| <= tan(pi/8) (max error ~1e-7 rad)."""
    abs_x = tl.abs(x)
    abs_y = tl.abs(y)
    a = tl.minimum(abs_x, abs_y) / tl.maximum(tl.maximum(abs_x, abs_y), 1e-30)
    big = a > 0.41421356237309503
    t = tl.where(big, (a - 1.0) / (a + 1.0), a)
    z = t * t
    r = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    r += tl.where(big, 0.7853981633974483, 0.0)
    r = tl.where(abs_y > abs_x, 1.5707963267948966 - r, r)
    r = tl.where(x < 0.0, 3.141592653589793 - r, r)
    return tl.where(y < 0.0, -r, r)


@triton.jit
def _clamp(value, low, high):
    """``value`` limited to [low, high], and NaN sent to ``low``."""
    value = tl.where(value >= low, value, low)
    return tl.where(value <= high, value, high)


@triton.jit
def _tent_cdf(u):
    """Integral of the unit-half-width tent (triangle) filter from -1 to u."""
    u = tl.minimum(tl.maximum(u, -1.0), 1.0)
    return tl.where(u <= 0.0, 0.5 * (1.0 + u) * (1.0 + u), 1.0 - 0.5 * (1.0 - u) * (1.0 - u))


@triton.jit
def _pixel_weight(edge, center, inv_half, tent):
    """Weight along one axis of the unit pixel [edge, edge + 1) for a filter centred at ``center``:
    the tent's integral over it (half-width 1 / inv_half), or the bilinear weight of its centre."""
    tent_weight = _tent_cdf((edge + 1.0 - center) * inv_half) - _tent_cdf((edge - center) * inv_half)
    return tl.where(tent, tent_weight, tl.maximum(1.0 - tl.abs(edge + 0.5 - center), 0.0))


@triton.jit
def _reproject_kernel(
    panos_ptr, shapes_ptr, shape_index_ptr, yaw_ptr, yaw_offsets_ptr, scale_ptr, bias_ptr, out_ptr,
    out_stride_m, out_stride_n, out_stride_c, out_stride_h, out_stride_w, height, width,
    ANTIALIAS: tl.constexpr, TO_UINT8: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, COLS: tl.constexpr,
):
    # A 2-D tile of output pixels: its footprint on the panorama is compact, so neighbouring
    # lanes reuse the same cache lines (a 1-D strip would smear it along a long thin band).
    tile, n, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tiles_w = tl.cdiv(width, TILE_W)
    i = (tile // tiles_w) * TILE_H + tl.arange(0, TILE_H)[:, None]
    j = (tile % tiles_w) * TILE_W + tl.arange(0, TILE_W)[None, :]
    mask = (i < height) & (j < width)

    # The panorama: read where it lies. Its table row is (pointer, H, W, row, column, channel strides).
    pano_row = panos_ptr + m * 6
    pano = tl.load(pano_row).to(tl.pointer_type(tl.uint8))
    pano_h = tl.load(pano_row + 1).to(tl.int32)  # int32 index math; addresses use the int64 strides
    pano_w = tl.load(pano_row + 2).to(tl.int32)
    stride_h = tl.load(pano_row + 3)
    stride_w = tl.load(pano_row + 4)
    stride_c = tl.load(pano_row + 5)
    pano_hf = pano_h.to(tl.float32)
    pano_wf = pano_w.to(tl.float32)

    # The view: a yaw-free rotation (row-major) and tan of the half-fovs; yaw is a longitude shift.
    p = shapes_ptr + tl.load(shape_index_ptr + n) * 11
    tan_x = tl.load(p + 9)
    tan_y = tl.load(p + 10)
    cam_x = ((j.to(tl.float32) + 0.5) * 2.0 / width - 1.0) * tan_x
    cam_y = (1.0 - (i.to(tl.float32) + 0.5) * 2.0 / height) * tan_y
    r0, r1, r2 = tl.load(p + 0), tl.load(p + 1), tl.load(p + 2)
    r3, r4, r5 = tl.load(p + 3), tl.load(p + 4), tl.load(p + 5)
    r6, r7, r8 = tl.load(p + 6), tl.load(p + 7), tl.load(p + 8)
    d0 = r0 * cam_x + r1 * cam_y + r2
    d1 = r3 * cam_x + r4 * cam_y + r5
    d2 = r6 * cam_x + r7 * cam_y + r8
    rho2 = d0 * d0 + d2 * d2
    rho = tl.sqrt(rho2)
    yaw = tl.load(yaw_ptr + n) + tl.load(yaw_offsets_ptr + m)
    x = ((_atan2(d0, d2) + yaw) / 6.283185307179586 + 0.5) * pano_wf
    # Wrap, then clamp: a huge, infinite or NaN position still lands on the panorama.
    x = _clamp(x - tl.floor(x / pano_wf) * pano_wf, 0.0, pano_wf)
    y = _clamp((0.5 - _atan2(d1, rho) / 3.141592653589793) * pano_hf, 0.0, pano_hf)

    if ANTIALIAS:
        # Footprint from the analytic Jacobian: root-sum-square of the pixel's edge vectors per axis.
        step_x = 2.0 * tan_x / width
        step_y = -2.0 * tan_y / height
        dc0, dc1, dc2 = r0 * step_x, r3 * step_x, r6 * step_x
        dr0, dr1, dr2 = r1 * step_y, r4 * step_y, r7 * step_y
        norm2 = rho2 + d1 * d1
        safe_rho2 = tl.maximum(rho2, 1e-30)
        lon_c = (d2 * dc0 - d0 * dc2) / safe_rho2
        lon_r = (d2 * dr0 - d0 * dr2) / safe_rho2
        foot_x = tl.sqrt(lon_c * lon_c + lon_r * lon_r) * pano_wf / 6.283185307179586
        foot_x = tl.where(rho2 <= 1e-12 * norm2, pano_wf, foot_x)  # on the pole: every longitude
        lat_c = (rho2 * dc1 - d1 * (d0 * dc0 + d2 * dc2)) / (rho * norm2 + 1e-30)
        lat_r = (rho2 * dr1 - d1 * (d0 * dr0 + d2 * dr2)) / (rho * norm2 + 1e-30)
        foot_y = tl.sqrt(lat_c * lat_c + lat_r * lat_r) * pano_hf / 3.141592653589793
        # A footprint of at most one pixel is bilinear; a wider one a tent of half-width foot/sqrt(2).
        tent = (foot_x > 1.0) | (foot_y > 1.0)
        half_x = tl.where(tent, _clamp(foot_x * 0.7071067811865476, 0.7071067811865476, 0.5 * pano_wf), 0.5)
        half_y = tl.where(tent, _clamp(foot_y * 0.7071067811865476, 0.7071067811865476, 0.5 * pano_hf), 0.5)
    else:
        tent = tl.zeros([TILE_H, TILE_W], tl.int1)
        half_x = tl.full([TILE_H, TILE_W], 0.5, tl.float32)
        half_y = tl.full([TILE_H, TILE_W], 0.5, tl.float32)

    c_first = tl.floor(x - half_x)
    r_first = tl.floor(y - half_y)
    if ANTIALIAS:
        max_cols = tl.max(tl.max(tl.where(mask, (tl.ceil(x + half_x) - c_first).to(tl.int32), 0), axis=1), axis=0)
        max_rows = tl.max(tl.max(tl.where(mask, (tl.ceil(y + half_y) - r_first).to(tl.int32), 0), axis=1), axis=0)
    else:
        max_cols = 2
        max_rows = 2
    inv_x = 1.0 / half_x
    inv_y = 1.0 / half_y
    half = pano_w // 2
    acc0 = tl.zeros([TILE_H, TILE_W], tl.float32)
    acc1 = tl.zeros([TILE_H, TILE_W], tl.float32)
    acc2 = tl.zeros([TILE_H, TILE_W], tl.float32)
    # Columns in chunks of COLS taps along a third axis: each chunk's column weights and wrapped columns
    # are computed once, then reused by every row (they used to be recomputed per row, one tap at a
    # time). A 4K -> 224 px footprint spans about 10 columns and 10 rows: 10 + 20 weight evaluations per
    # pixel instead of 10 + 100. One chunk holds most footprints; wider ones (near a pole) take several.
    x3 = x[:, :, None]
    inv_x3 = inv_x[:, :, None]
    tent3 = tent[:, :, None]
    mask3 = mask[:, :, None]
    for c0 in range(0, max_cols, COLS):
        dc = c0 + tl.arange(0, COLS)[None, None, :]
        cf = c_first[:, :, None] + dc.to(tl.float32)
        # Taps past this lane's own count weigh zero (the tent and bilinear weights vanish there).
        weight_c = tl.where(dc < max_cols, _pixel_weight(cf, x3, inv_x3, tent3), 0.0)
        # cf lies within half a panorama of [0, W): wrap without a division.
        col_here = cf.to(tl.int32)
        col_here = tl.where(col_here < 0, col_here + pano_w, col_here)
        col_here = tl.where(col_here >= pano_w, col_here - pano_w, col_here)
        for dr in range(0, max_rows):
            rf = r_first + dr
            weight_r = _pixel_weight(rf, y, inv_y, tent)
            r = rf.to(tl.int32)
            # Past a pole: the same latitude on the opposite meridian.
            shift = tl.where((r < 0) | (r >= pano_h), half, 0)
            row = tl.where(r < 0, -1 - r, tl.where(r >= pano_h, 2 * pano_h - 1 - r, r))
            row = tl.minimum(tl.maximum(row, 0), pano_h - 1)
            col = col_here + shift[:, :, None]
            col = tl.minimum(tl.maximum(tl.where(col >= pano_w, col - pano_w, col), 0), pano_w - 1)
            weight = weight_c * weight_r[:, :, None]
            ok = mask3 & (weight > 0.0)  # taps outside a lane's own support: skip their loads
            src = pano + row[:, :, None] * stride_h + col * stride_w
            acc0 += tl.sum(weight * tl.load(src, mask=ok, other=0).to(tl.float32), axis=2)
            acc1 += tl.sum(weight * tl.load(src + stride_c, mask=ok, other=0).to(tl.float32), axis=2)
            acc2 += tl.sum(weight * tl.load(src + 2 * stride_c, mask=ok, other=0).to(tl.float32), axis=2)

    dst = out_ptr + m.to(tl.int64) * out_stride_m + n.to(tl.int64) * out_stride_n + i * out_stride_h + j * out_stride_w
    v0 = acc0 * tl.load(scale_ptr + 0) + tl.load(bias_ptr + 0)
    v1 = acc1 * tl.load(scale_ptr + 1) + tl.load(bias_ptr + 1)
    v2 = acc2 * tl.load(scale_ptr + 2) + tl.load(bias_ptr + 2)
    if TO_UINT8:
        v0 = tl.minimum(tl.maximum(tl.floor(v0 + 0.5), 0.0), 255.0)
        v1 = tl.minimum(tl.maximum(tl.floor(v1 + 0.5), 0.0), 255.0)
        v2 = tl.minimum(tl.maximum(tl.floor(v2 + 0.5), 0.0), 255.0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(dst, v0.to(out_ty), mask=mask)
    tl.store(dst + out_stride_c, v1.to(out_ty), mask=mask)
    tl.store(dst + 2 * out_stride_c, v2.to(out_ty), mask=mask)


def reproject_triton(panos, shapes, shape_index, yaw, yaw_offsets, scale, bias, out: torch.Tensor, antialias: bool):
    """Fill ``out`` (M, N, 3, h, w), any strides, fp16/fp32/uint8, with one launch.

    The small per-call parameters travel in two host-to-device copies (one of floats, one of
    integers), which the kernel reads through views: at a few microseconds of kernel time per
    panorama, a copy per parameter would cost more than the work.
    """
    device = out.device
    n_panos, n_views, _, height, width = out.shape
    floats = np.concatenate([np.ravel(shapes), yaw, yaw_offsets, scale, bias]).astype(np.float32)
    table = [[p.data_ptr(), p.shape[0], p.shape[1], *p.stride()] for p in panos]
    ints = np.concatenate([np.ravel(table), shape_index]).astype(np.int64)
    floats = torch.from_numpy(floats).to(device, non_blocking=True)
    ints = torch.from_numpy(ints).to(device, non_blocking=True)
    splits = np.cumsum([np.size(shapes), len(yaw), len(yaw_offsets), 3])
    shapes_d, yaw_d, offsets_d, scale_d, bias_d = (floats[a:b] for a, b in zip([0, *splits], [*splits, None], strict=True))
    table_d, shape_index_d = ints[: 6 * n_panos], ints[6 * n_panos :]
    tile_h, tile_w = 16, 16
    grid = (triton.cdiv(height, tile_h) * triton.cdiv(width, tile_w), n_views, n_panos)
    _reproject_kernel[grid](
        table_d, shapes_d, shape_index_d, yaw_d, offsets_d, scale_d, bias_d, out, *out.stride(), height, width,
        ANTIALIAS=bool(antialias), TO_UINT8=out.dtype == torch.uint8, TILE_H=tile_h, TILE_W=tile_w,
        COLS=8 if antialias else 2,  # bilinear reads 2 columns; a tent at 4K -> 224 px about 10
    )

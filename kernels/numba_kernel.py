"""CPU backend: Numba kernels over every (panorama, view, output row), in two parallel passes.

1. Project: for each distinct (pitch, roll, fov, size) the longitude, latitude and angular
   footprint of every output pixel. Yaw is the outermost rotation, so every view of a ring, and
   every panorama, shares one projection shifted in longitude: ring8 computes it once, not 8 * M
   times, and a view set used again (every call of an engine) finds it made (``projection_grid``). Bytes: 4 float64 per output pixel per distinct shape, written once. NumPy's error model:
   a degenerate ray divides to inf or NaN (which pass 2 clamps) instead of raising.
2. Filter: each output pixel reads the panorama pixels under its tent once per channel (uint8, in
   place, any strides) and writes 3 values. On a C-contiguous panorama the whole footprint is
   filtered in float32 vectors (``_filter_run_vectors``: blocks of 8 pixels summed down the rows in
   registers, then weighted by their columns); other strides, and footprints on the seam, are read
   tap by tap. The panorama itself is never padded, copied or
   converted to float. The per-pixel helpers are inlined into the loop (``inline="always"``):
   called out of line, as Numba does otherwise, they cost about as much as the taps.

Both release the GIL, so decoding threads keep working while a kernel runs.

No float can take an index off the panorama: the filter pass clamps each sample position after the
longitude wrap, and each row and column index where it is formed. Its fast-math leaves out
``nnan``/``ninf``, so those clamps compare NaN and inf as IEEE says (false) and send them to a
valid pixel; with ``nnan`` LLVM may assume a NaN away and drop the clamp.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, typed, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# Panoramas are read where they lie: C-contiguous ones get a specialisation that knows the pixel
# stride, any other strides the general one.
_PANO_TYPES = {True: types.Array(types.uint8, 3, "C"), False: types.Array(types.uint8, 3, "A")}
_TWO_PI = 2.0 * math.pi
_TAN_PI_8 = 0.41421356237309503
_SQRT_HALF = math.sqrt(0.5)
# Fast-math for the filter pass: everything but nnan/ninf, which would let LLVM delete the clamps.
_IEEE_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# The tent filter's vectors: _RUN bytes loaded, and float32 lanes, of which a block of _BLOCK whole pixels
# is used, so that the lanes fold into the 3 channels by halving (24 -> 12 -> 6 -> 3).
_RUN = 32
_BLOCK = 8
_RUN_SPAN = -(-(_RUN - 3 * _BLOCK) // 3) + _BLOCK - 1  # the most pixels a run's last load reads past its end


@njit(cache=True, fastmath=True)
def atan2(y, x):
    """Branch-free atan2 (Cephes atanf's polynomial on |t| <= tan(pi/8)), max error 1e-8 rad.

    Free of branches, so the projection loop vectorises; libm's atan2 does not. The Triton kernel
    uses the same polynomial.
    """
    abs_x, abs_y = abs(x), abs(y)
    a = min(abs_x, abs_y) / max(max(abs_x, abs_y), 1e-30)
    big = a > _TAN_PI_8
    t = (a - 1.0) / (a + 1.0) if big else a
    z = t * t
    r = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    r += 0.25 * math.pi if big else 0.0
    r = 0.5 * math.pi - r if abs_y > abs_x else r
    r = math.pi - r if x < 0.0 else r
    return -r if y < 0.0 else r


@njit(cache=True, fastmath=True, error_model="numpy")
def footprint(d0, d1, d2, dc0, dc1, dc2, dr0, dr1, dr2):
    """Angular footprint widths (longitude, latitude) of one output pixel, from the analytic Jacobian.

    d is the pixel's ray, (dc*, dr*) its change per output column and per output row. Each width
    is the root-sum-square of the pixel's two edge vectors along that axis: the marginal spread of
    its footprint. On the pole itself every longitude is under the pixel.
    """
    rho2 = d0 * d0 + d2 * d2
    norm2 = rho2 + d1 * d1
    if rho2 <= 1e-12 * norm2:
        spread_lon = _TWO_PI
    else:
        lon_c = (d2 * dc0 - d0 * dc2) / rho2
        lon_r = (d2 * dr0 - d0 * dr2) / rho2
        spread_lon = math.sqrt(lon_c * lon_c + lon_r * lon_r)
    rho = math.sqrt(rho2)
    lat_c = (rho2 * dc1 - d1 * (d0 * dc0 + d2 * dc2)) / (rho * norm2 + 1e-30)
    lat_r = (rho2 * dr1 - d1 * (d0 * dr0 + d2 * dr2)) / (rho * norm2 + 1e-30)
    return spread_lon, math.sqrt(lat_c * lat_c + lat_r * lat_r)


@njit(cache=True, fastmath=_IEEE_FASTMATH, inline="always")
def clamp(value, low, high):
    """``value`` limited to [low, high], and NaN sent to ``low`` (every comparison with NaN is false)."""
    value = value if value >= low else low
    return value if value <= high else high


@njit(cache=True, fastmath=_IEEE_FASTMATH, inline="always")
def bilinear(pano, x, y):
    """Bilinear interpolation at (x, y), x in [0, W], y in [0, H]: the filter for footprints of one pixel or less."""
    pano_h, pano_w = pano.shape[0], pano.shape[1]
    half = pano_w // 2
    x, y = x - 0.5, y - 0.5  # to pixel-centre coordinates
    c0, r0 = math.floor(x), math.floor(y)
    fx, fy = x - c0, y - r0
    c0 = min(max(c0 + pano_w if c0 < 0 else c0, 0), pano_w - 1)
    c1 = c0 + 1 if c0 + 1 < pano_w else 0
    r1 = r0 + 1
    top0, top1, bottom0, bottom1 = c0, c1, c0, c1
    if r0 < 0:  # past the north pole: the same row on the opposite meridian
        top0, top1 = (c0 + half) % pano_w, (c1 + half) % pano_w
    if r1 >= pano_h:
        bottom0, bottom1 = (c0 + half) % pano_w, (c1 + half) % pano_w
    r0, r1 = min(max(r0, 0), pano_h - 1), min(max(r1, 0), pano_h - 1)
    w00, w01 = (1.0 - fx) * (1.0 - fy), fx * (1.0 - fy)
    w10, w11 = (1.0 - fx) * fy, fx * fy
    v0 = w00 * pano[r0, top0, 0] + w01 * pano[r0, top1, 0] + w10 * pano[r1, bottom0, 0] + w11 * pano[r1, bottom1, 0]
    v1 = w00 * pano[r0, top0, 1] + w01 * pano[r0, top1, 1] + w10 * pano[r1, bottom0, 1] + w11 * pano[r1, bottom1, 1]
    v2 = w00 * pano[r0, top0, 2] + w01 * pano[r0, top1, 2] + w10 * pano[r1, bottom0, 2] + w11 * pano[r1, bottom1, 2]
    return v0, v1, v2


@njit(cache=True, fastmath=_IEEE_FASTMATH, inline="always")
def tent_cdf(u):
    """Integral of the unit-half-width tent (triangle) filter from -1 to u, without branches."""
    u = min(max(u, -1.0), 1.0)
    a = 1.0 - abs(u)
    return 0.5 + math.copysign(0.5 * (1.0 - a * a), u)


@intrinsic
def _filter_run_vectors(typingctx, pano, starts, row_weights, rows, first, inv_half, count):
    """The tent filter over ``rows`` runs of ``count`` pixels of the C-contiguous ``pano``, in float32 vectors:
    (Σ_r row_weights[r] Σ_k col_weights[k] pano[run r, pixel k, c] for c = 0, 1, 2).

    Run r's bytes start at flat offset ``starts[r]``. Each block of _BLOCK pixels is summed down the
    rows in a register (one unaligned _RUN-byte load, widen and multiply-add per row), weighted by
    its columns' weights, widened to one per lane, and added to a second register; halving folds
    that keep each channel in its lanes give the 3 sums. The panorama is read once and nothing is
    stored. LLVM does not vectorise this by itself: the trip counts (7 to 14 pixels at 4K and 8K)
    are below its vector width times its unroll. Vectors stay a power of two wide (LLVM splits a
    24-lane one into scalars); the lanes past a block's 3 * _BLOCK, and past the run, weigh 0
    whatever lies there. The column weights are made here, 8 at a time from the CDF at each pixel's
    edges (``first`` = the first pixel's left edge - x, ``inv_half`` = 1 / half-width), as
    ``_tent_weights`` makes them one by one: past the footprint both CDFs are 1. Made apart and read
    back from memory, they cost as much as the rows. The caller checks the bounds: a run is read up
    to _RUN_SPAN pixels past its end.
    """
    arrays = (pano, starts, row_weights)
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays) or pano.dtype != types.uint8:
        return None

    def codegen(context, builder, signature, args):
        data = lambda k: context.make_array(signature.args[k])(context, builder, args[k]).data  # noqa: E731
        pano_data, starts_data, row_weights_data = data(0), data(1), data(2)
        rows_value, first_value, inv_half_value, count_value = args[3:]
        intp, i32, f32, f64 = rows_value.type, ir.IntType(32), ir.FloatType(), ir.DoubleType()
        floats, ints = ir.VectorType(f32, _RUN), ir.VectorType(i32, _RUN)
        doubles = ir.VectorType(f64, _BLOCK)
        zeros = ir.Constant(floats, [0.0] * _RUN)

        def broadcast(value, vector_type):
            lane = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(lane, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(i32, vector_type.count), [0] * vector_type.count))

        suffix = f"v{_BLOCK}f64"  # llvmlite names no vector intrinsics itself
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(doubles, [doubles]), f"llvm.fabs.{suffix}")
        copysign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(doubles, [doubles, doubles]), f"llvm.copysign.{suffix}")
        one, half = ir.Constant(doubles, [1.0] * _BLOCK), ir.Constant(doubles, [0.5] * _BLOCK)

        def tent_cdf(u):  # as tent_cdf above, on _BLOCK lanes
            u = builder.select(builder.fcmp_ordered(">", u, one), one, u)
            u = builder.select(builder.fcmp_ordered("<", u, builder.fneg(one)), builder.fneg(one), u)
            a = builder.fsub(one, builder.call(fabs, [u]))
            return builder.fadd(half, builder.call(copysign, [builder.fmul(half, builder.fsub(one, builder.fmul(a, a))), u]))

        total, column = cgutils.alloca_once_value(builder, zeros), cgutils.alloca_once_value(builder, zeros)
        block_pixels = ir.Constant(intp, _BLOCK)
        blocks = builder.udiv(builder.add(count_value, ir.Constant(intp, _BLOCK - 1)), block_pixels)
        pixel = ir.Constant(doubles, [float(k) for k in range(_BLOCK)])
        first_edges, step = broadcast(first_value, doubles), broadcast(inv_half_value, doubles)
        with cgutils.for_range(builder, blocks) as block:
            builder.store(zeros, column)
            at = builder.mul(block.index, ir.Constant(intp, 3 * _BLOCK))
            with cgutils.for_range(builder, rows_value) as row:
                start = builder.add(builder.load(builder.gep(starts_data, [row.index])), at)
                source = builder.bitcast(builder.gep(pano_data, [start]), ir.VectorType(ir.IntType(8), _RUN).as_pointer())
                weight = broadcast(builder.fptrunc(builder.load(builder.gep(row_weights_data, [row.index])), f32), floats)
                summed = builder.fadd(builder.load(column), builder.fmul(builder.uitofp(builder.load(source, align=1), floats), weight))
                builder.store(summed, column)
            # The block's column weights, from its pixels' edges: 0 past the footprint, where both CDFs are 1.
            offset = builder.fadd(first_edges, builder.fadd(pixel, broadcast(builder.sitofp(builder.mul(block.index, block_pixels), f64), doubles)))
            left = builder.fmul(offset, step)
            weights = builder.fsub(tent_cdf(builder.fadd(left, step)), tent_cdf(left))
            weights = builder.fptrunc(weights, ir.VectorType(f32, _BLOCK))
            lanes = [lane // 3 if lane < 3 * _BLOCK else _BLOCK for lane in range(_RUN)]  # lane _BLOCK: the zeros
            weights = builder.shuffle_vector(weights, ir.Constant(ir.VectorType(f32, _BLOCK), [0.0] * _BLOCK), ir.Constant(ints, lanes))
            builder.store(builder.fadd(builder.load(total), builder.fmul(builder.load(column), weights)), total)
        folded, width = builder.load(total), 3 * _BLOCK
        while width > 3:  # halves of a multiple of 3 lanes keep each channel in the same lanes
            width //= 2
            size = 1 << (width - 1).bit_length()  # padded to a power of two
            low = builder.shuffle_vector(folded, folded, ir.Constant(ir.VectorType(i32, size), [min(k, width - 1) for k in range(size)]))
            high = builder.shuffle_vector(folded, folded, ir.Constant(ir.VectorType(i32, size), [width + min(k, width - 1) for k in range(size)]))
            folded = builder.fadd(low, high)
        channels = [builder.extract_element(folded, ir.Constant(i32, c)) for c in range(3)]
        return context.make_tuple(builder, signature.return_type, channels)

    return types.UniTuple(types.float32, 3)(pano, starts, row_weights, types.intp, types.float64, types.float64, types.intp), codegen


def _filter_run(pano, starts, row_weights, rows, first, inv_half, count):
    """``_filter_run_vectors``, only where ``_vector_runs(pano)``."""


@overload(_filter_run, inline="always")
def _filter_run_impl(pano, starts, row_weights, rows, first, inv_half, count):
    if pano.layout != "C":  # never called there (see _vector_runs); the vectors need C layout to type
        return lambda pano, starts, row_weights, rows, first, inv_half, count: (np.float32(0.0), np.float32(0.0), np.float32(0.0))
    return lambda pano, starts, row_weights, rows, first, inv_half, count: _filter_run_vectors(
        pano, starts, row_weights, rows, first, inv_half, count)


def _vector_runs(pano):
    """Whether ``pano``'s type lets the tent filter read whole runs of a row as vectors."""


@overload(_vector_runs, inline="always")
def _vector_runs_impl(pano):
    runs = pano.layout == "C"  # pixels known to lie 3 bytes apart, rows W * 3
    return lambda pano: runs


@njit(cache=True, fastmath=_IEEE_FASTMATH, inline="always")
def _tent_weights(first, count, center, inv_half, weights):
    """weights[k]: the tent's integral over pixel first + k, from one CDF per pixel edge."""
    cdf = 0.0
    for k in range(count):
        next_cdf = tent_cdf((first + k + 1.0 - center) * inv_half)
        weights[k] = next_cdf - cdf
        cdf = next_cdf


@njit(cache=True, fastmath=_IEEE_FASTMATH, inline="always")
def tent_filter(pano, x, y, half_x, half_y, col_weights, row_weights, starts):
    """Separable tent filter of half-widths (half_x, half_y) over the piecewise-constant panorama.

    Each weight is the tent's integral over one source pixel, so every pixel under the footprint
    counts by its coverage. Each axis's weights are computed once per output pixel, into
    ``col_weights`` and ``row_weights`` (scratch of at least W + 2 and H + 2; ``starts`` is integer
    scratch as long as ``row_weights``). Columns wrap; rows
    past a pole read the same latitude on the opposite meridian (row reflected, columns shifted by
    W/2). x in [0, W], y in [0, H], and half-widths of at most W/2 and H/2.

    Where the panorama is C-contiguous and the runs are clear of the right edge (every pixel but
    those within a footprint of the seam), each row's start goes into ``starts`` and
    ``_filter_run_vectors`` does the rest in float32 vectors, column weights included. Elsewhere
    each row is reduced tap by tap, in registers, in float64.
    """
    pano_h, pano_w = pano.shape[0], pano.shape[1]
    c_first, r_first = math.floor(x - half_x), math.floor(y - half_y)
    count = min(max(math.ceil(x + half_x) - c_first, 0), pano_w + 2)  # never past the scratch
    rows = min(max(math.ceil(y + half_y) - r_first, 0), pano_h + 2)
    _tent_weights(r_first, rows, y, 1.0 / half_y, row_weights)
    # Where the run starts on this side of the pole and across it (shifted by W/2); c_first lies
    # within half a panorama of [0, W), so a conditional add or subtract wraps it (no modulo),
    # and a clamp keeps it on the panorama whatever it was.
    col_here = c_first + pano_w if c_first < 0 else (c_first - pano_w if c_first >= pano_w else c_first)
    col_here = min(max(col_here, 0), pano_w - 1)
    col_across = col_here + pano_w // 2
    col_across = col_across - pano_w if col_across >= pano_w else col_across
    # A run's last vector may read up to _RUN_SPAN pixels past it: still on the row, and the run
    # does not wrap, if both starting columns leave that much before the right edge.
    runs = _vector_runs(pano) and rows > 0 and max(col_here, col_across) + count + _RUN_SPAN <= pano_w
    if not runs:  # the runs make their column weights in vectors
        _tent_weights(c_first, count, x, 1.0 / half_x, col_weights)
    acc0 = acc1 = acc2 = 0.0
    for dr in range(rows):
        r = r_first + dr
        row, col = r, col_here
        if r < 0:
            row, col = -1 - r, col_across
        elif r >= pano_h:
            row, col = 2 * pano_h - 1 - r, col_across
        row = min(max(row, 0), pano_h - 1)
        if runs:
            starts[dr] = (row * pano_w + col) * 3
            continue
        row0 = row1 = row2 = 0.0
        if col + count <= pano_w:  # one run with no wrap to test per tap
            at_row = np.uintp(row)  # unsigned indices: no negative-index wraparound per tap
            for k in range(count):
                weight_c = col_weights[k]
                at = np.uintp(col + k)
                row0 += weight_c * pano[at_row, at, np.uintp(0)]
                row1 += weight_c * pano[at_row, at, np.uintp(1)]
                row2 += weight_c * pano[at_row, at, np.uintp(2)]
        else:
            for k in range(count):
                weight_c = col_weights[k]
                row0 += weight_c * pano[row, col, 0]
                row1 += weight_c * pano[row, col, 1]
                row2 += weight_c * pano[row, col, 2]
                col = col + 1 if col + 1 < pano_w else 0
        acc0 += row_weights[dr] * row0
        acc1 += row_weights[dr] * row1
        acc2 += row_weights[dr] * row2
    if runs:
        reduced = _filter_run(pano, starts, row_weights, rows, c_first - x, 1.0 / half_x, count)
        return np.float64(reduced[0]), np.float64(reduced[1]), np.float64(reduced[2])
    return acc0, acc1, acc2


@njit(parallel=True, cache=True, fastmath=True, nogil=True, error_model="numpy")
def _project_kernel(shapes, height, width, antialias, grid):
    """grid[u] = (lon, lat, footprint in lon, footprint in lat) in radians for every pixel of shape u, yaw 0."""
    for job in prange(shapes.shape[0] * height):
        u, i = job // height, job % height
        p = shapes[u]
        tan_x, tan_y = p[9], p[10]
        cam_y = (1.0 - (i + 0.5) * 2.0 / height) * tan_y
        for j in range(width):  # straight-line arithmetic: LLVM vectorises this loop
            cam_x = ((j + 0.5) * 2.0 / width - 1.0) * tan_x
            d0 = p[0] * cam_x + p[1] * cam_y + p[2]
            d1 = p[3] * cam_x + p[4] * cam_y + p[5]
            d2 = p[6] * cam_x + p[7] * cam_y + p[8]
            grid[u, 0, i, j] = atan2(d0, d2)
            grid[u, 1, i, j] = atan2(d1, math.sqrt(d0 * d0 + d2 * d2))
        if not antialias:
            continue
        step_x, step_y = 2.0 * tan_x / width, -2.0 * tan_y / height
        for j in range(width):
            cam_x = ((j + 0.5) * 2.0 / width - 1.0) * tan_x
            grid[u, 2, i, j], grid[u, 3, i, j] = footprint(
                p[0] * cam_x + p[1] * cam_y + p[2],
                p[3] * cam_x + p[4] * cam_y + p[5],
                p[6] * cam_x + p[7] * cam_y + p[8],
                p[0] * step_x, p[3] * step_x, p[6] * step_x,
                p[1] * step_y, p[4] * step_y, p[7] * step_y,
            )


@njit(parallel=True, cache=True, fastmath=_IEEE_FASTMATH, nogil=True)
def _filter_kernel(panos, grid, shape_index, yaw, yaw_offsets, scale, bias, out, antialias, to_uint8):
    """out[m, n] = the panorama m filtered under view n's projection, shifted by its yaw."""
    n_panos, n_views, height, width = len(panos), shape_index.shape[0], out.shape[3], out.shape[4]
    for job in prange(n_panos * n_views * height):
        m = job // (n_views * height)
        n = (job // height) % n_views
        i = job % height
        pano = panos[m]
        pano_h, pano_w = pano.shape[0], pano.shape[1]
        g = grid[shape_index[n]]
        x_per_rad, y_per_rad = pano_w / _TWO_PI, pano_h / math.pi
        shift = (yaw[n] + yaw_offsets[m]) * x_per_rad + 0.5 * pano_w
        col_weights = np.empty(pano_w + 2 if antialias else 0)
        row_weights = np.empty(pano_h + 2 if antialias else 0)
        starts = np.empty(pano_h + 2 if antialias else 0, np.intp)
        for j in range(width):
            # Wrap the longitude, then clamp: a huge, infinite or NaN position (from a yaw no check
            # reduced) still lands on the panorama, x in [0, W] and y in [0, H].
            x = g[0, i, j] * x_per_rad + shift
            x = clamp(x - np.floor(x / pano_w) * pano_w, 0.0, pano_w)
            y = clamp((0.5 - g[1, i, j] / math.pi) * pano_h, 0.0, pano_h)
            footprint_x = g[2, i, j] * x_per_rad if antialias else 1.0
            footprint_y = g[3, i, j] * y_per_rad if antialias else 1.0
            if footprint_x <= 1.0 and footprint_y <= 1.0:
                values = bilinear(pano, x, y)
            else:  # tent half-width footprint/sqrt(2), at least 1/sqrt(2), capped at half the panorama
                half_x = clamp(footprint_x * _SQRT_HALF, _SQRT_HALF, 0.5 * pano_w)
                half_y = clamp(footprint_y * _SQRT_HALF, _SQRT_HALF, 0.5 * pano_h)
                values = tent_filter(pano, x, y, half_x, half_y, col_weights, row_weights, starts)
            for c in range(3):
                value = values[c] * scale[c] + bias[c]
                if to_uint8:
                    value = min(max(math.floor(value + 0.5), 0.0), 255.0)
                out[m, n, c, i, j] = value


# Pass 1's grids, by view set: an engine cuts the same views from every panorama, so the projection
# (a fifth of an antialiased call at 4K -> ring8 of 224 px) is made once, not once per call. Yaw is
# not in the key (it is a shift in pass 2), so every ring of the same pitch, fov and size shares one.
# Each grid is 4 float64 per output pixel per shape: 1.6 MB for ring8 at 224 px; a few are kept.
_GRIDS: dict[tuple, np.ndarray] = {}
_GRIDS_KEPT = 16
_GRIDS_LOCK = threading.Lock()


def projection_grid(shapes: np.ndarray, height: int, width: int, antialias: bool) -> np.ndarray:
    """Pass 1 for these view shapes and size, from the cache when it has been made before (read-only by
    convention: pass 2 only reads it)."""
    key = (shapes.tobytes(), shapes.shape, height, width, bool(antialias))
    with _GRIDS_LOCK:
        grid = _GRIDS.get(key)
    if grid is None:
        grid = np.empty((len(shapes), 4, height, width))
        _project_kernel(shapes, height, width, antialias, grid)
        with _GRIDS_LOCK:
            if len(_GRIDS) >= _GRIDS_KEPT:
                _GRIDS.pop(next(iter(_GRIDS)))  # the oldest
            _GRIDS[key] = grid
    return grid


def reproject_numba(panos, shapes, shape_index, yaw, yaw_offsets, scale, bias, out: np.ndarray, antialias: bool):
    """Fill ``out`` (M, N, 3, h, w), any strides, float32 or uint8, from uint8 (H, W, 3) panoramas."""
    pano_list = typed.List.empty_list(_PANO_TYPES[all(p.flags.c_contiguous for p in panos)])
    for pano in panos:
        pano_list.append(pano)
    height, width = out.shape[3], out.shape[4]
    grid = projection_grid(np.ascontiguousarray(shapes, dtype=np.float64), height, width, antialias)
    _filter_kernel(pano_list, grid, shape_index, yaw, yaw_offsets, scale, bias, out, antialias, out.dtype == np.uint8)

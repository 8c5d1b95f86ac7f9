"""Batched equirectangular -> perspective reprojection: Triton on CUDA, Numba on CPU.

    from kernels import ViewSpec, reproject
    out = reproject(panos, views, out_dtype=torch.float16, normalize="clip")   # (M, N, 3, h, w)

Conventions, shared with py360convert and ``DESIGN.md``:

* Angles are degrees in ``ViewSpec`` and ``yaw_offsets``, radians inside the kernels.
* yaw 0 looks at the panorama's centre column; positive yaw turns right, positive pitch looks up;
  positive roll turns the camera clockwise about its line of sight, so the scene appears turned
  counter-clockwise (py360convert's ``in_rot_deg``). ``yaw_offsets[m]`` is added to every view's yaw
  for panorama m (a world-vertical rotation, i.e. a shift in longitude).
* ``fov`` is horizontal, edge to edge (pinhole); the vertical fov follows through tan from the
  output aspect. py360convert measures fov between edge pixel centres instead:
  ``2 * atan(tan(fov / 2) * (n - 1) / n)`` converts ours to theirs.
* Pixel centres sit at +0.5. Panorama pixel (r, c) covers [c, c+1) x [r, r+1) in continuous
  coordinates ``X = (lon / 2pi + 0.5) * W``, ``Y = (0.5 - lat / pi) * H``.
* Seam and poles: longitude wraps inside the filter stencil, and a stencil row past a pole reads
  the same latitude on the opposite meridian (row reflected, columns shifted by W/2). No padded
  copy of the panorama is ever made.

Filtering. Each output pixel is the mean of the panorama, taken as piecewise constant, over a box
centred on the pixel's projection. Its widths along X and Y come from the projection's analytic
Jacobian: the root-sum-square of the pixel's two edge vectors along each axis (the marginal spread
of its footprint), clamped to at least one panorama pixel. With a one-pixel box the filter is
exactly bilinear interpolation, so ``antialias=False`` is the same kernel with the box fixed at one
pixel, and ``antialias=True`` moves smoothly from bilinear (magnification) to area averaging
(minification), much as ``cv2.INTER_AREA`` does for plain resizes. We chose this over:

* a mip pyramid: it must be built and stored per panorama (a copy, which this engine never makes),
  is isotropic while the equirectangular footprint is stretched by 1/cos(latitude), and blurs
  across pyramid levels;
* adaptive supersampling with bilinear taps: it reads each source pixel about four times per
  channel instead of once, for the same box.

The box is axis-aligned in the panorama, so a footprint rotated by roll or near a pole is
approximated by a box of the same marginal spread, which neither aliases nor overblurs by more than
a fraction of an output pixel. The cost is proportional to the footprint's area: every source pixel
under a view is read about once per channel, the least a correct filter can read.
"""

from .geometry import CLIP_MEAN, CLIP_STD, ViewSpec
from .reproject import BACKENDS, reproject

__all__ = ["BACKENDS", "CLIP_MEAN", "CLIP_STD", "ViewSpec", "reproject"]

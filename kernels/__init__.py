"""Batched equirectangular -> perspective reprojection: Triton on CUDA, Numba on CPU.

    from kernels import ViewSpec, reproject
    out = reproject(panos, views, out_dtype=torch.float16, normalize="clip")   # (M, N, 3, h, w)

Conventions, shared with py360convert and ``DESIGN.md``:

* Angles are degrees in ``ViewSpec`` and ``yaw_offsets``, radians inside the kernels. Any finite
  angle is a direction: it counts by its exact float64 remainder mod 360, taken where the kernel
  parameters are built (``geometry.wrap_degrees``), while a ``ViewSpec`` keeps the value it was given.
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

Filtering. Each output pixel's footprint on the panorama is measured from the projection's
analytic Jacobian: along each panorama axis, the root-sum-square of the pixel's two edge vectors
(the footprint's marginal spread), in panorama pixels. A footprint of at most one pixel is sampled
bilinearly, and ``antialias=False`` always does that. A wider one is filtered with a separable
tent (triangle) of half-width footprint/sqrt(2), integrated exactly over each source pixel (the
panorama taken as piecewise constant). That half-width gives the tent, together with the pixel's
own box, the same variance as bilinear at a one-pixel footprint, so blur grows continuously with
minification. We chose this over:

* a mip pyramid: it must be built and stored per panorama (a copy, which this engine never
  makes), it is isotropic while the equirectangular footprint stretches by 1/cos(latitude), and it
  blurs across pyramid levels;
* adaptive supersampling with bilinear taps: it reads each source pixel about four times per
  channel for the same support;
* a box (area) filter: cheaper by half, but its response to fine patterns ripples as 1/width. A
  one-pixel checkerboard through a 4096-wide panorama at 90 degrees into 224 px comes out up to
  12 levels off grey with a box, and under 1 level with the tent;
* the tent of half-width footprint that PIL's and torch's antialiased bilinear resizes use: twice
  the taps of ours and blurrier (0.8 levels from a 24x supersampled render of louvre.jpg, ours
  0.35), for no gain on that checkerboard (0.4 levels off grey either way).

The filter is axis-aligned in the panorama, so a footprint turned by roll or near a pole is
approximated by one of the same marginal spread, which neither aliases nor blurs by more than a
fraction of an output pixel. Its cost is proportional to the footprint's area: every source pixel
under a view is read a small constant number of times.
"""

from .geometry import CLIP_MEAN, CLIP_STD, ViewSpec
from .reproject import BACKENDS, reproject

__all__ = ["BACKENDS", "CLIP_MEAN", "CLIP_STD", "ViewSpec", "reproject"]

"""Any finite angle is a direction: 1e300 degrees reads the panorama at its exact remainder mod 360,
and no float that reaches a kernel, not even NaN or inf, can move an index off the panorama.

A segfault must fail a test, not kill pytest, so whatever crashed before runs in a subprocess.
"""

import io
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import wire
from kernels import ViewSpec, reproject
from kernels.geometry import view_params
from kernels.reference import reproject_reference
from kernels.reproject import _check_yaw_offsets

from .conftest import PANORAMAS, TRITON_DEVICE

REPO_ROOT = Path(__file__).resolve().parents[1]
# Panorama widths: the three of the report (1024 is a 4K JPEG decoded for ring8 at 224 px) and two
# that are not powers of two.
WIDTHS = (256, 704, 1000, 1024)
HUGE = (1e20, -1e20, 1e300, -1e300, 360.0 * 2**40 + 45.0, -(360.0 * 2**44) - 100.0)
TINY = (1e-300, -1e-300, 5e-324, -5e-324)  # the last two are subnormal
NEGATIVE = (-45.0, -725.0, -180.0)
ANGLES = HUGE + TINY + NEGATIVE
VIEW = {"fov": 90.0, "width": 16, "height": 12}  # one 16 x 16 Triton tile


def remainder(angle: float) -> float:
    """The exact float64 remainder, computed here independently of the kernels."""
    return math.fmod(angle, 360.0)


def views_for(angles, reduce=False) -> list[ViewSpec]:
    """One view per (field, angle): each angle once as the yaw, the pitch and the roll of a view."""
    base = {"yaw": 30.0, "pitch": 10.0, "roll": 5.0}
    views = []
    for field in ("yaw", "pitch", "roll"):
        for angle in angles:
            views.append(ViewSpec(**{**base, field: remainder(angle) if reduce else angle}, **VIEW))
    return views


def env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    extra = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_isolated(code: str, timeout: float = 240) -> str:
    """Run ``code`` in a fresh interpreter; a crash or an assertion there fails the calling test."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def louvre_at():
    """louvre.jpg resized to each test width (a real panorama, W x W/2)."""
    with Image.open(PANORAMAS / "louvre.jpg") as im:
        full = im.convert("RGB")
        return {w: np.array(full.resize((w, w // 2), Image.Resampling.BILINEAR)) for w in WIDTHS}


# -- the report, as it was sent ---------------------------------------------------------------------


def test_the_reported_crash_cases_run_and_give_finite_views():
    """yaw 1e20 and yaw_offset 1e20 segfaulted at widths 256, 704 and 1024 (numba)."""
    out = run_isolated(f"""
        import torch
        from kernels import ViewSpec, reproject
        for w in {WIDTHS}:
            pano = torch.randint(0, 256, (w // 2, w, 3), dtype=torch.uint8)
            for views, offsets in (([ViewSpec(yaw=1e20)], None), ([ViewSpec()], [1e20]), ([ViewSpec(yaw=1e300)], [-1e300])):
                for antialias in (False, True):
                    got = reproject([pano], views, yaw_offsets=offsets, antialias=antialias, backend="numba")
                    assert torch.isfinite(got).all(), (w, views, offsets)
            print("ok", w, flush=True)
    """)
    assert out.split() == [word for w in WIDTHS for word in ("ok", str(w))]


# -- the input stage: exact remainders in float64 -------------------------------------------------


def test_view_params_and_yaw_offsets_are_reduced_exactly_and_the_view_keeps_the_caller_s_angle():
    view = ViewSpec(yaw=1e300, pitch=-1e20, roll=360.0 * 2**40 + 45.0)
    assert (view.yaw, view.pitch, view.roll) == (1e300, -1e20, 360.0 * 2**40 + 45.0)  # what views.json shows
    shapes, _, yaw = view_params([view])
    [expected], _, [expected_yaw] = view_params([ViewSpec(yaw=remainder(1e300), pitch=remainder(-1e20), roll=45.0)])
    np.testing.assert_array_equal(shapes[0], expected)
    assert yaw[0] == expected_yaw and -math.pi <= yaw[0] <= math.pi
    # 45 and 45 + 360 k are one projection, shared by the kernels.
    _, index, yaws = view_params([ViewSpec(pitch=p, yaw=y) for p, y in ((10.0, 45.0), (370.0, 405.0), (10.0 - 360 * 2**30, -315.0))])
    assert index.tolist() == [0, 0, 0] and yaws.tolist() == [yaws[0]] * 3
    offsets = _check_yaw_offsets(np.array(ANGLES), len(ANGLES))
    np.testing.assert_array_equal(offsets, _check_yaw_offsets(np.array([remainder(a) for a in ANGLES]), len(ANGLES)))
    assert np.all((offsets >= -math.pi) & (offsets <= math.pi))
    # A plain list is read in float64 too: not rounded to float32 (1e20) nor overflowed to inf (1e300).
    np.testing.assert_array_equal(_check_yaw_offsets([1e20, -1e300], 2), np.radians([remainder(1e20) - 360.0, remainder(-1e300)]))


# -- the same view as the remainder, on every backend ---------------------------------------------


def check_against_remainders(pano: np.ndarray, backend: str, device: str, antialias: bool, angles, reference_angles):
    """Views and yaw offsets at ``angles`` equal those at their remainders, and the float64 reference there."""
    tensor = torch.from_numpy(pano).to(device)

    def cut(views, offsets):
        return reproject([tensor] * len(offsets), views, antialias=antialias, backend=backend,
                         yaw_offsets=torch.tensor(offsets, dtype=torch.float64)).cpu()

    huge = cut(views_for(angles), list(angles))
    assert torch.isfinite(huge).all()
    reduced = cut(views_for(angles, reduce=True), [remainder(a) for a in angles])
    torch.testing.assert_close(huge, reduced, atol=0, rtol=0)  # the very same kernel parameters

    # Against the float64 reference at the remainders: each chosen angle as a yaw, pitch and roll
    # (offset 0), and as the yaw offset of one view.
    chosen = [k for k, view in enumerate(views_for(angles)) if angles[k % len(angles)] in reference_angles]
    got = cut([views_for(angles)[k] for k in chosen], [0.0])[0]
    for row, k in enumerate(chosen):
        view = views_for(angles, reduce=True)[k]
        error = np.abs(got[row].numpy() - reproject_reference(pano, [view], antialias=antialias)[0] / 255).max()
        assert error <= 1e-3, f"{backend}: {views_for(angles)[k]}: max |out - reference| = {error:.2e}"
    view = views_for(angles, reduce=True)[0]
    got = cut([view], list(reference_angles))[:, 0]
    for m, angle in enumerate(reference_angles):
        expected = reproject_reference(pano, [view], antialias=antialias, yaw_offset=remainder(angle))[0] / 255
        error = np.abs(got[m].numpy() - expected).max()
        assert error <= 1e-3, f"{backend}: yaw_offset {angle}: max |out - reference| = {error:.2e}"


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("width", WIDTHS)
def test_numba_reads_every_angle_at_its_remainder(louvre_at, width, antialias):
    check_against_remainders(louvre_at[width], "numba", "cpu", antialias, ANGLES, reference_angles=(1e300, -1e20, 5e-324, -725.0))


@pytest.mark.parametrize("width", WIDTHS)
def test_triton_reads_every_angle_at_its_remainder(louvre_at, width):
    # Bilinear only: pitch -1e20 is 80 degrees, a view over the pole, whose tent the interpreter
    # would run tap by tap for minutes. The angles reach the tent through the same parameters.
    check_against_remainders(louvre_at[width], "triton", TRITON_DEVICE, False, (1e300, -1e20, 5e-324, -725.0),
                             reference_angles=(1e300, -1e20))


@pytest.mark.parametrize("width", WIDTHS)
def test_grid_sample_reads_every_angle_at_its_remainder(louvre_at, width):
    check_against_remainders(louvre_at[width], "torch", "cpu", False, ANGLES, reference_angles=(1e300, -1e20))


# -- the kernels themselves, called past every check ----------------------------------------------

BAD_YAWS = "[float('nan'), float('inf'), -float('inf'), 1e30, -1e30, 3.0e38, -7.0, 0.25]"


def low_level_setup(offsets: str, views: str) -> str:
    """Kernel parameters for valid views, then NaN, inf and 1e30 where the yaws go, and broken geometry."""
    return f"""
    import numpy as np
    import torch
    from kernels import ViewSpec
    from kernels.geometry import output_affine, view_params
    yaws = np.array({BAD_YAWS})
    offsets = np.array({offsets})
    views = [ViewSpec(yaw=0.0, pitch=p, roll=r, fov=f, width=16, height=12) for p, r, f in {views}]
    views = [views[n % len(views)] for n in range(len(yaws))]
    shapes, shape_index, _ = view_params(views)
    scale, bias = output_affine(None, torch.float32)
    # Broken geometry too: NaN where the rotation and the tangents of the fov should be.
    broken = shapes.copy()
    broken[0, 0], broken[1, 9], broken[2, 10] = float("nan"), float("nan"), float("nan")
    """


def test_numba_kernel_stays_on_the_panorama_for_nan_inf_and_huge_yaws():
    views = "((0.0, 0, 90), (89.9, 30, 120), (-90.0, 0, 5), (45.0, -60, 170), (0.0, 0, 2), (-30.0, 10, 60), (90.0, 0, 90))"
    out = run_isolated(low_level_setup("[float('nan'), -float('inf'), 1e30, -1e30, 0.0]", views) + f"""
    broken[3, :9], broken[4, 9] = 1e30, float("inf")
    from kernels.numba_kernel import reproject_numba
    rng = np.random.default_rng(0)
    for width in {WIDTHS}:
        panos = [rng.integers(0, 256, (width // 2, width, 3), dtype=np.uint8) for _ in offsets]
        for geometry in (shapes, broken):
            for antialias in (False, True):
                for dtype in (np.float32, np.uint8):
                    out = np.full((len(panos), len(views), 3, 12, 16), np.nan if dtype == np.float32 else 7, dtype)
                    reproject_numba(panos, geometry, shape_index, yaws, offsets, scale, bias, out, antialias)
                    values = out.astype(np.float64)
                    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 255, (width, antialias, dtype)
        print("ok", width, flush=True)
    """)
    assert out.split() == [word for w in WIDTHS for word in ("ok", str(w))]


def test_triton_kernel_stays_on_the_panorama_for_nan_inf_and_huge_yaws():
    # Narrow views: the interpreter runs every tap of the tent in Python.
    views = "((0.0, 0, 10), (-30.0, 10, 5), (60.0, 0, 2))"
    out = run_isolated(low_level_setup("[float('nan'), 0.0]", views) + f"""
    from kernels.triton_kernel import reproject_triton
    device = "{TRITON_DEVICE}"
    gen = torch.Generator().manual_seed(0)
    panos = [torch.randint(0, 256, (500, 1000, 3), dtype=torch.uint8, generator=gen).to(device) for _ in offsets]
    for geometry in (shapes, broken):
        for antialias in (False, True):
            out = torch.full((len(panos), len(views), 3, 12, 16), float("nan"), device=device)
            reproject_triton(panos, geometry, shape_index, yaws, offsets, scale, bias, out, antialias)
            assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1, antialias
    print("ok")
    """)
    assert out.split() == ["ok"]


def test_grid_sample_backend_stays_finite_for_nan_inf_and_huge_yaws():
    out = run_isolated(low_level_setup("[float('nan'), -float('inf'), 1e30, 0.0]", "((0.0, 0, 90), (89.9, 30, 120), (-90.0, 0, 5))") + """
    from kernels.grid_sample import reproject_grid_sample
    panos = [torch.randint(0, 256, (352, 704, 3), dtype=torch.uint8) for _ in offsets]
    out = torch.full((len(panos), len(views), 3, 12, 16), float("nan"))
    reproject_grid_sample(panos, shapes, shape_index, yaws, offsets, scale, bias, out)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    print("ok")
    """)
    assert out.split() == ["ok"]


# -- over gRPC: a real server in its own process --------------------------------------------------

SERVER = """
    import sys, tempfile
    from engine import Engine, EngineConfig
    from engine.models.tiny import make_tiny_clip
    from engine.serve.server import BackgroundServer, ServerConfig
    model = make_tiny_clip(tempfile.mkdtemp())
    engine = Engine(EngineConfig(clip_model=f"local-dir:{model}", batch_size=16))
    with BackgroundServer(engine, ServerConfig(port=0, max_delay_ms=1)) as server:
        print(server.address, flush=True)
        sys.stdin.read()  # serve until the test closes stdin
"""


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_huge_yaw_and_yaw_offset_over_grpc_answer_ok_and_the_server_lives_on(louvre_at):
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER)], cwd=REPO_ROOT, env=env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip()
        assert address, f"the server did not start: {process.stderr.read()[-3000:]}"
        data = jpeg(louvre_at[1024])

        def ask(k, **fields):
            return pb.EmbedRequest(request_id=f"r{k}", id=f"pano-{k}", image=pb.Image(encoded=data), **fields)

        def views(*yaws):
            return pb.ViewList(views=[pb.View(yaw=y, pitch=5.0) for y in yaws])

        requests = [  # 1e300 is 0 mod 360, -1e20 is -280
            ask(0, views=views(1e300, -1e20)), ask(1, views=views(remainder(1e300), remainder(-1e20))),
            ask(2, view_preset="ring4", yaw_offset=1e20), ask(3, view_preset="ring4", yaw_offset=remainder(1e20)),
        ]
        with grpc.insecure_channel(address) as channel:
            responses = {r.request_id: r for r in pb_grpc.MimeticStub(channel).Embed(iter(requests), timeout=120)}
        assert process.poll() is None, f"the server died: {process.stderr.read()[-3000:]}"
        assert {rid: r.status.code for rid, r in responses.items()} == {f"r{k}": 0 for k in range(4)}, responses
        assert [v.yaw for v in responses["r0"].views] == [1e300, -1e20]  # the caller's angles, echoed
        for huge, reduced in (("r0", "r1"), ("r2", "r3")):
            got = wire.tensor_from_proto(responses[huge].embeddings, torch.float32)
            torch.testing.assert_close(got, wire.tensor_from_proto(responses[reduced].embeddings, torch.float32), atol=0, rtol=0)
        # Still serving: a new call, after the huge angles, is answered.
        with grpc.insecure_channel(address) as channel:
            [after] = list(pb_grpc.MimeticStub(channel).Embed(iter([ask(4)]), timeout=60))
        assert after.status.code == 0 and process.poll() is None
    finally:
        if process.poll() is None:
            process.stdin.close()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

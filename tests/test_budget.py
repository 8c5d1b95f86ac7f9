"""The decoded-bytes budget: FIFO admission, refusal of what can never fit, and the Engine's memory under it."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine import Engine, EngineConfig, Panorama
from engine.budget import BudgetExceededError, DecodeBudget
from engine.decode import ImageTooLargeError, decode_cost, decode_image, read_header
from engine.models.tiny import make_tiny_clip

from .conftest import PANORAMAS, REPO_ROOT


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


def png(width: int, height: int, colour=(90, 120, 200)) -> bytes:
    """A large image that is cheap to send: one colour compresses to a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


# -- the budget itself ------------------------------------------------------------------------------


def test_an_item_over_the_whole_budget_is_refused_at_once_as_too_large():
    budget = DecodeBudget(100)
    with pytest.raises(BudgetExceededError, match=r"^big\.png: decoding it needs") as caught:
        budget.acquire(101, item="big.png")
    assert isinstance(caught.value, ImageTooLargeError)  # RESOURCE_EXHAUSTED on the wire
    assert budget.in_use == 0 and budget.waiting == 0


def test_waiters_are_admitted_first_come_first_served_and_never_over_the_limit():
    budget = DecodeBudget(100)
    first = budget.acquire(60, item="first")
    order: list[str] = []

    def wait(name: str, nbytes: int) -> None:
        with budget.acquire(nbytes, item=name):
            order.append(name)
            assert budget.in_use <= budget.limit
            time.sleep(0.02)

    big = threading.Thread(target=wait, args=("big", 90))
    big.start()
    while budget.waiting < 1:
        time.sleep(0.001)
    small = threading.Thread(target=wait, args=("small", 20))  # would fit now, but is behind "big" (and 90 + 20 > 100)
    small.start()
    while budget.waiting < 2:
        time.sleep(0.001)
    assert budget.try_acquire(1, item="jumper") is None  # nobody jumps the line either
    time.sleep(0.05)
    assert order == []  # 60 + 90 does not fit, and "small" waits its turn
    first.release()
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]
    assert budget.in_use == 0 and budget.peak <= 100


def test_shrink_gives_bytes_back_and_release_is_idempotent():
    budget = DecodeBudget(100)
    held = budget.acquire(80, item="a")
    held.shrink(30)
    assert budget.in_use == 30
    assert budget.try_acquire(70, item="b") is not None
    held.release()
    held.release()
    assert budget.in_use == 70


def test_a_timed_out_waiter_leaves_the_line_and_lets_the_next_in():
    budget = DecodeBudget(100)
    budget.acquire(95, item="holder")
    with pytest.raises(TimeoutError, match="waiter"):
        budget.acquire(50, item="waiter", timeout=0.05)
    assert budget.waiting == 0
    assert budget.try_acquire(5, item="small") is not None


def test_async_waiters_do_not_hold_threads_and_a_cancelled_one_gives_its_bytes_back():
    async def scenario():
        budget = DecodeBudget(100)
        holder = await budget.acquire_async(100, item="holder")
        waiters = [asyncio.create_task(budget.acquire_async(40, item=f"w{k}")) for k in range(50)]
        await asyncio.sleep(0.01)
        assert budget.waiting == 50 and threading.active_count() < 20
        waiters[0].cancel()
        holder.release()
        await asyncio.sleep(0.01)
        granted = [w for w in waiters[1:] if w.done()]
        assert len(granted) == 2 and budget.in_use == 80  # w1 and w2: w0 left the line
        for task in waiters[3:]:
            task.cancel()
        for task in granted:
            task.result().release()
        await asyncio.sleep(0.01)
        assert budget.in_use == 0 and budget.waiting == 0

    asyncio.run(scenario())


# -- the cost read from the header ---------------------------------------------------------------------


def test_the_cost_is_read_from_the_header_and_bounds_the_measured_peak(tmp_path):
    header = read_header(png(4000, 2000))
    assert (header.width, header.height, header.format) == (4000, 2000, "PNG")
    assert decode_cost(header) >= 7 * 4000 * 2000
    louvre = read_header(PANORAMAS / "louvre.jpg")
    # A JPEG decodes at its DCT scale: ring8 at 224 px needs 704 columns, so 1/4 of 4096.
    assert decode_cost(louvre, min_width=704) < decode_cost(louvre) / 10


def test_a_panorama_stays_exactly_two_to_one_at_its_dct_scale():
    """libjpeg rounds a reduced size up: 1000 x 500 at 1/8 would be 125 x 63, which no kernel takes."""
    pano = decode_image(jpeg(1000, 500), min_width=100)
    assert pano.shape == (125, 250, 3)


# -- the Engine under its budget ---------------------------------------------------------------------


def test_the_engine_embeds_everything_within_its_budget_and_refuses_what_can_never_fit(tiny_clip):
    engine = Engine(EngineConfig(clip_model=tiny_clip, batch_size=64, max_decode_mib=100))
    big = png(4000, 2000)  # 77 MiB to decode: one at a time under 100 MiB
    inputs = [Panorama(id=f"big{k}", data=big) for k in range(4)]
    inputs.insert(2, Panorama(id="huge", data=png(6000, 3000)))  # 143 MiB: never fits
    results = engine.embed(inputs)
    assert [r.id for r in results] == ["big0", "big1", "huge", "big2", "big3"]
    assert [r.error is None for r in results] == [True, True, False, True, True]
    assert results[2].error.startswith("huge: decoding it needs") and "can never fit" in results[2].error
    assert engine.decode_budget.peak <= 100 * 2**20
    assert engine.decode_budget.in_use == 0  # every byte given back


def test_an_abandoned_embed_gives_its_budget_back(tiny_clip):
    engine = Engine(EngineConfig(clip_model=tiny_clip, batch_size=8, max_decode_mib=512))
    source = engine.embed_iter(Panorama(id=f"p{k}", data=png(2000, 1000)) for k in range(20))
    next(source)
    source.close()
    time.sleep(0.5)  # decodes already running finish; what they hold is released
    assert engine.decode_budget.in_use == 0


PEAK_SCRIPT = """
import io, json, resource, sys
from PIL import Image
from engine import Engine, EngineConfig, Panorama
engine = Engine(EngineConfig(clip_model=sys.argv[1], batch_size=64, max_decode_mib=int(sys.argv[2]), decode_workers=4))
buffer = io.BytesIO()
Image.new("RGB", (8000, 4000), (90, 120, 200)).save(buffer, format="PNG")
blob = buffer.getvalue()
engine.embed([Panorama(id="warm-up", data=blob)])
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
before, peak_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
results = engine.embed([Panorama(id=f"p{k}", data=blob) for k in range(8)])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - max(before, peak_before), "errors": [r.error for r in results if r.error]}))
"""


def _peak_growth(tiny_clip: str, budget_mib: int) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, tiny_clip, str(budget_mib)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_peak_memory_growth_stays_within_the_budget(tiny_clip):
    """Eight 8000 x 4000 PNGs (224 MB to decode each, 96 MB held): the budget bounds the peak, not the count.

    The warm-up decodes one image first, so the growth measured is what eight more add at once.
    Without a budget (a huge one) four decode at a time and all eight are held until their group runs.
    """
    cost = math.ceil(decode_cost(read_header(png(8000, 4000))) / 2**20)
    bounded = _peak_growth(tiny_clip, cost + 100)  # room for one decode and one decoded panorama
    unbounded = _peak_growth(tiny_clip, 64 * 1024)
    print(f"peak RSS growth: {bounded['growth'] / 2**20:.0f} MiB under a {cost + 100} MiB budget, "
          f"{unbounded['growth'] / 2**20:.0f} MiB without one")
    assert not bounded["errors"] and not unbounded["errors"]
    assert bounded["growth"] <= (cost + 100) * 2**20
    assert unbounded["growth"] > 2 * bounded["growth"]


# -- the input stage: sizes and ids named once -----------------------------------------------------------


def test_a_non_panorama_is_refused_with_the_size_of_the_file_not_of_its_reduced_decode(tiny_clip):
    engine = Engine(EngineConfig(clip_model=tiny_clip, batch_size=16))
    [result] = engine.embed([Panorama(id="bad/x.jpg", data=jpeg(1000, 700))])
    assert result.error == "bad/x.jpg: equirectangular panoramas are 2:1, got 1000x700"


def test_an_input_error_names_the_item_once(tiny_clip):
    engine = Engine(EngineConfig(clip_model=tiny_clip, batch_size=16))
    [result] = engine.embed([Panorama(id="p", data=png(200, 100), yaw_offset=float("nan"))])
    assert result.error == "p: yaw_offset must be a finite number of degrees, got nan"


def test_a_huge_yaw_offset_is_reduced_exactly_and_embeds_like_its_remainder(tiny_clip):
    engine = Engine(EngineConfig(clip_model=tiny_clip, batch_size=16))
    blob = (PANORAMAS / "axes.png").read_bytes()
    huge, reduced, negative = engine.embed([
        Panorama(id="huge", data=blob, yaw_offset=1e20),
        Panorama(id="reduced", data=blob, yaw_offset=math.fmod(1e20, 360.0)),
        Panorama(id="negative", data=blob, yaw_offset=math.fmod(1e20, 360.0) - 3600.0),
    ])
    assert huge.error is None and reduced.error is None and negative.error is None
    np.testing.assert_allclose(huge.embeddings.numpy(), reduced.embeddings.numpy(), atol=1e-5)
    np.testing.assert_allclose(negative.embeddings.numpy(), reduced.embeddings.numpy(), atol=1e-4)


def test_a_wait_cancelled_just_after_its_bytes_were_granted_gives_them_back():
    async def scenario():
        budget = DecodeBudget(100)
        holder = await budget.acquire_async(100, item="holder")
        waiter = asyncio.create_task(budget.acquire_async(50, item="waiter"))
        await asyncio.sleep(0)  # the waiter is in line
        holder.release()  # grants the waiter: its bytes are delivered on the loop
        await asyncio.sleep(0)  # delivered; the waiting task has not resumed yet
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_reading_a_header_decodes_no_pixel(monkeypatch, tmp_path):
    """The header is read for every input before admission: it must cost kilobytes, not the image."""
    from PIL import ImageFile

    path = tmp_path / "wide.png"
    Image.new("RGB", (2000, 1000), (1, 2, 3)).save(path)
    turned = tmp_path / "turned.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned by 90°
    Image.new("RGB", (200, 100)).save(turned, exif=exif)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("read_header decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert (read_header(path).width, read_header(path).height) == (2000, 1000)
    assert (read_header(PANORAMAS / "louvre.jpg").width, read_header(turned).width) == (4096, 100)

"""The gRPC service on loopback, with the tiny model: per-item errors, backpressure, batching across
streams, cancellation, draining, retries and a bounded load test. Health, reflection, auth and limits
are in ``test_server_health_auth``."""

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine, EngineConfig, Panorama
from engine.models.tiny import make_tiny_clip
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import wire
from engine.serve.client import AsyncMimeticClient, MimeticClient
from engine.serve.server import BackgroundServer, ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 20_000  # 128 x 64 panoramas pass, 256 x 128 ones are over the limit
OK, INVALID, EXHAUSTED, DEADLINE = 0, 3, 8, 4  # google.rpc.Code


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(EngineConfig(clip_model=tiny_model, batch_size=64, top_k=3, max_pixels=MAX_PIXELS))


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small(louvre) -> np.ndarray:
    return np.asarray(Image.fromarray(louvre).resize((128, 64), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def blobs(small) -> list[bytes]:
    """Distinct 128 x 64 JPEG panoramas: the Louvre turned to 16 yaws."""
    return [jpeg(np.roll(small, 8 * k, axis=1)) for k in range(16)]


def metrics(server) -> dict:
    """The server's Prometheus endpoint, scraped over HTTP: {(name, labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(server, name: str, **labels) -> float:
    return metrics(server).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stub(server, token: str | None = None, **options) -> pb_grpc.MimeticStub:
    channel = grpc.insecure_channel(server.address, options=list(options.items()))
    return pb_grpc.MimeticStub(channel)


def request(k: int, data: bytes, **fields) -> pb.EmbedRequest:
    return pb.EmbedRequest(request_id=f"r{k}", id=f"pano-{k}", image=pb.Image(encoded=data), **fields)


# -- per-item errors ------------------------------------------------------------------------------


def test_40_panoramas_with_4_bad_give_36_results_and_4_errors_on_one_open_stream(engine, blobs, small):
    big = np.asarray(Image.fromarray(small).resize((256, 128)))  # 32,768 pixels, over MAX_PIXELS
    bad = {
        5: (pb.Image(encoded=b"this is not an image"), INVALID),
        13: (pb.Image(encoded=blobs[0][: len(blobs[0]) // 2]), INVALID),  # truncated JPEG
        22: (pb.Image(encoded=jpeg(big)), EXHAUSTED),
        31: (pb.Image(raw=pb.RawImage(data=big.tobytes(), height=128, width=256, channels=3)), EXHAUSTED),
    }
    requests = []
    for k in range(40):
        image = bad[k][0] if k in bad else pb.Image(encoded=blobs[k % len(blobs)])
        requests.append(pb.EmbedRequest(request_id=f"r{k}", id=f"pano-{k}", image=image, meta=wire.meta_to_struct({"k": k})))
    with BackgroundServer(engine, ServerConfig(port=0, max_in_flight=8)) as server:
        responses = list(stub(server).Embed(iter(requests)))  # the call ends OK: the stream was never closed early
        assert server.in_flight == 0
    assert len(responses) == 40 and len({r.request_id for r in responses}) == 40
    by_id = {r.request_id: r for r in responses}
    for k, (_, code) in bad.items():
        response = by_id[f"r{k}"]
        assert response.status.code == code and response.status.message.startswith(f"pano-{k}: "), response.status
        assert not response.HasField("embeddings") and wire.meta_from_struct(response.meta) == {"k": k}
    assert "over the limit of 20,000" in by_id["r22"].status.message and "truncated" in by_id["r13"].status.message
    good = [k for k in range(40) if k not in bad]
    assert all(by_id[f"r{k}"].status.code == OK for k in good)
    # Items after each bad one were answered: the stream stayed open. And they are the in-process Engine's results.
    local = engine.embed([Panorama(id=f"pano-{k}", data=blobs[k % len(blobs)]) for k in good])
    for k, expected in zip(good, local, strict=True):
        response = by_id[f"r{k}"]
        assert response.id == f"pano-{k}" and wire.meta_from_struct(response.meta) == {"k": k}
        assert [wire.view_from_proto(v) for v in response.views] == expected.views
        embeddings = wire.tensor_from_proto(response.embeddings, torch.float32)
        torch.testing.assert_close(embeddings, expected.embeddings.half().float(), atol=1e-3, rtol=0)
        torch.testing.assert_close(wire.tensor_from_proto(response.pooled, torch.float32), expected.pooled, atol=1e-3, rtol=0)
        readings = wire.readings_from_proto(response.readings)
        assert list(readings) == list(expected.readings) == ["styles", "periods", "urban"]
        for name, reading in readings.items():
            assert [label for label, _ in reading["pooled"]] == [label for label, _ in expected.readings[name]["pooled"]]
            assert np.allclose([p for _, p in reading["pooled"]], [p for _, p in expected.readings[name]["pooled"]], atol=1e-4)
        timings = response.timings
        assert timings.total_ms >= timings.engine_ms > 0 and timings.batch_items >= 1 and timings.batch_views == 8 * timings.batch_items


def test_the_client_gives_the_engine_s_own_results(engine, blobs, small):
    panoramas = [Panorama(id=f"p{k}", data=blobs[k], meta={"k": k, "city": "Paris"}, yaw_offset=10.0 * k) for k in range(6)]
    panoramas.insert(2, Panorama(id="broken", data=b"\x00" * 100, meta={"k": -1}))
    panoramas.insert(4, Panorama(id="raw", data=np.ascontiguousarray(small[..., :1]).squeeze(-1)))  # greyscale array
    panoramas.append(Panorama(id="missing", data="/nonexistent/pano.jpg"))
    local = engine.embed(panoramas)
    with BackgroundServer(engine, ServerConfig(port=0)) as server, MimeticClient(server.address) as client:
        remote = list(client.embed(panoramas))
    assert [r.id for r in remote] == [r.id for r in local]  # input order, as Engine.embed_iter
    for mine, theirs in zip(remote, local, strict=True):
        assert type(mine) is type(theirs) and mine.meta is theirs.meta and mine.error == theirs.error
        assert mine.views == theirs.views
        if theirs.error is None:
            assert mine.embeddings.dtype == theirs.embeddings.dtype == torch.float32  # a CPU engine's dtype
            torch.testing.assert_close(mine.embeddings, theirs.embeddings, atol=1e-3, rtol=0)
            torch.testing.assert_close(mine.pooled, theirs.pooled, atol=1e-3, rtol=0)
            assert [(n, [label for label, _ in r["pooled"]]) for n, r in mine.readings.items()] == [
                (n, [label for label, _ in r["pooled"]]) for n, r in theirs.readings.items()
            ]
    assert [r.error is not None for r in remote] == [False, False, True, False, False, False, False, False, True]
    assert "not a recognised image format" in remote[2].error and "cannot read the file" in remote[-1].error


def test_an_error_in_the_caller_s_iterable_reaches_the_caller_and_frees_the_server(engine, blobs):
    def panoramas():
        yield Panorama(id="first", data=blobs[0])
        raise RuntimeError("the source broke")

    with BackgroundServer(engine, ServerConfig(port=0, metrics_port=0)) as server, MimeticClient(server.address) as client:
        with pytest.raises(RuntimeError, match="the source broke"):
            list(client.embed(panoramas()))
        wait_for(lambda: metric(server, "mimetic_in_flight") == 0 and metric(server, "mimetic_streams") == 0, what="freed")
        assert [r.error for r in client.embed([Panorama(id="again", data=blobs[1])])] == [None]


def test_the_asyncio_client(engine, blobs):
    async def main(address):
        async def panoramas():  # an async source, consumed lazily
            for k in range(5):
                yield Panorama(id=f"a{k}", data=blobs[k])

        async with AsyncMimeticClient(address) as client:
            arrived = [r async for r in client.embed(panoramas(), ordered=False, views="cube6", outputs=["pooled"])]
            text = await client.embed_text(["a street"])
            info = await client.info()
        return arrived, text, info

    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        arrived, text, info = asyncio.run(main(server.address))
    assert sorted(r.id for r in arrived) == [f"a{k}" for k in range(5)] and all(r.error is None for r in arrived)
    assert all(r.embeddings is None and r.pooled.shape == (engine.clip.embed_dim,) and len(r.views) == 6 for r in arrived)
    assert text.shape == (1, engine.clip.embed_dim) and info["views"] == engine.info()["views"]


def test_per_request_views_vocabularies_top_k_thumbnails_and_bad_parameters(engine, tiny_model, blobs):
    good = dict(view_preset="ring4", vocabularies=["styles"], top_k=2, thumbnail_size=48,
                outputs=[pb.OUTPUT_VIEW_EMBEDDINGS, pb.OUTPUT_READINGS, pb.OUTPUT_THUMBNAILS])
    requests = [
        request(0, blobs[0], **good),
        request(1, blobs[1], view_preset="ring5"),
        request(2, blobs[2], vocabularies=["styles", "nonsense"]),
        request(3, blobs[3], top_k=50),
        request(4, blobs[4], views=pb.ViewList(views=[pb.View(yaw=float(y)) for y in range(65)])),
        request(5, blobs[5], views=pb.ViewList(views=[pb.View(yaw=0.0, fov=200.0)])),
        request(6, blobs[6], outputs=[pb.OUTPUT_THUMBNAILS], thumbnail_size=5000),
        pb.EmbedRequest(request_id="r7", id="no-image"),
        pb.EmbedRequest(id="no-request-id", image=pb.Image(encoded=blobs[7])),
        request(9, blobs[9], views=pb.ViewList(views=[pb.View(yaw=30.0, pitch=10.0), pb.View(yaw=-30.0)])),
    ]
    with BackgroundServer(engine, ServerConfig(port=0, max_in_flight=4)) as server:
        responses = {r.request_id: r for r in stub(server).Embed(iter(requests))}
    codes = {rid: r.status.code for rid, r in responses.items()}
    assert codes == {"r0": OK, "r1": INVALID, "r2": INVALID, "r3": INVALID, "r4": EXHAUSTED, "r5": INVALID,
                     "r6": EXHAUSTED, "r7": INVALID, "": INVALID, "r9": OK}
    assert "ring5" in responses["r1"].status.message and "nonsense" in responses["r2"].status.message
    assert "65 views, over the limit of 64" in responses["r4"].status.message
    assert "no image" in responses["r7"].status.message and "request_id is empty" in responses[""].status.message

    ring4 = Engine(EngineConfig(clip_model=tiny_model, views="ring4", top_k=3, max_pixels=MAX_PIXELS))
    [expected] = ring4.embed([Panorama(id="pano-0", data=blobs[0])])
    first = responses["r0"]
    assert [wire.view_from_proto(v) for v in first.views] == ring4.views
    torch.testing.assert_close(wire.tensor_from_proto(first.embeddings, torch.float32), expected.embeddings, atol=1e-3, rtol=0)
    readings = wire.readings_from_proto(first.readings)
    assert not first.HasField("pooled") and list(readings) == ["styles"]
    assert len(readings["styles"]["pooled"]) == 2 and [len(view) for view in readings["styles"]["views"]] == [2] * 4
    assert [label for label, _ in readings["styles"]["pooled"]] == [label for label, _ in expected.readings["styles"]["pooled"][:2]]
    assert len(first.thumbnails) == 4
    for blob in first.thumbnails:
        with Image.open(io.BytesIO(blob)) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.size == (48, 48)
    assert wire.tensor_from_proto(responses["r9"].embeddings).shape == (2, engine.clip.embed_dim)


def test_items_whose_deadline_passes_while_queued_are_dropped_before_the_model(engine, blobs):
    # The batch waits 600 ms for company; items allowed 100 ms expire while they wait and never reach the model.
    config = ServerConfig(port=0, metrics_port=0, max_in_flight=6, max_delay_ms=600)
    requests = [request(k, blobs[k], timeout_ms=100 if k % 2 else 0) for k in range(6)]
    with BackgroundServer(engine, config) as server:
        responses = {r.request_id: r for r in stub(server).Embed(iter(requests))}
        assert metric(server, "mimetic_views_total") == 3 * 8
        assert metric(server, "mimetic_requests_total", method="Embed", code="DEADLINE_EXCEEDED") == 3
    for k in range(6):
        status = responses[f"r{k}"].status
        assert status.code == (DEADLINE if k % 2 else OK), status
    assert "dropped before the model" in responses["r1"].status.message


# -- batching and backpressure --------------------------------------------------------------------


def test_two_streams_are_batched_together(engine, blobs):
    """Each stream has at most K = 2 requests in flight, yet batches hold more: they mix the streams."""
    config = ServerConfig(port=0, metrics_port=0, max_in_flight=2, max_delay_ms=300, max_batch=64)
    with BackgroundServer(engine, config) as server:
        clients = [MimeticClient(server.address) for _ in range(2)]
        for client in clients:
            client.info()  # connected before the race starts
        start = threading.Barrier(2)
        results = {}

        def run(index):
            start.wait()
            results[index] = list(clients[index].embed(Panorama(id=f"s{index}-{k}", data=blobs[k]) for k in range(6)))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for client in clients:
            client.close()
        scraped = metrics(server)
    assert [len(results[i]) for i in range(2)] == [6, 6] and all(r.error is None for r in results[0] + results[1])
    batches = scraped[("mimetic_batch_items_count", ())]
    at_most_k = scraped[("mimetic_batch_items_bucket", (("le", "2.0"),))]
    assert batches > at_most_k, f"no batch held more than one stream's 2 requests ({batches} batches)"
    assert scraped[("mimetic_batch_items_sum", ())] == 12


def test_the_server_reads_at_most_k_requests_ahead_of_its_responses(engine, blobs):
    config = ServerConfig(port=0, metrics_port=0, max_in_flight=3, max_delay_ms=1000, max_batch=64)

    def requests():  # all 6 are sent at once; the server reads 3, then a 4th only once one is answered
        for k in range(6):
            yield request(k, blobs[k])

    with BackgroundServer(engine, config) as server:
        call = stub(server).Embed(requests())
        wait_for(lambda: metric(server, "mimetic_in_flight") == 3, what="3 requests in flight")
        time.sleep(0.3)
        assert metric(server, "mimetic_in_flight") == 3 and server.in_flight == 3  # not a fourth while none is answered
        answers = [response.request_id for response in call]
    assert sorted(answers, key=lambda rid: int(rid[1:])) == [f"r{k}" for k in range(6)]


def test_a_client_that_cancels_mid_stream_frees_its_slots(engine, blobs):
    config = ServerConfig(port=0, metrics_port=0, max_in_flight=4, max_delay_ms=1000, max_batch=64)
    with BackgroundServer(engine, config) as server:
        call = stub(server).Embed(request(k, blobs[k]) for k in range(10))
        wait_for(lambda: metric(server, "mimetic_in_flight") == 4, what="4 requests in flight")
        call.cancel()
        wait_for(lambda: metric(server, "mimetic_in_flight") == 0 and server.in_flight == 0, timeout=1.0, what="slots freed")
        assert metric(server, "mimetic_streams") == 0
        time.sleep(1.2)  # past the batch delay: the cancelled items were dropped, never embedded
        assert metric(server, "mimetic_views_total") == 0 and metric(server, "mimetic_batch_items_count") == 0
        with MimeticClient(server.address) as client:  # and the server goes on
            assert [r.error for r in client.embed([Panorama(id="after", data=blobs[0])])] == [None]


# -- draining, retries, load ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict:
    """The environment for a `mimetic serve` subprocess: this checkout first on its path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def wait_until_serving(process: subprocess.Popen):
    """Read a `mimetic serve` subprocess's stderr until it serves: its address, and an object with its metrics port."""
    lines = []
    while not any("serving" in line for line in lines):
        line = process.stderr.readline()
        assert line, f"the server exited: {''.join(lines)}"
        lines.append(line)
    address = next(line for line in lines if "listening on" in line).split("listening on ")[1].split(",")[0]
    metrics_port = int(next(line for line in lines if "metrics on" in line).rsplit(":", 1)[1].split("/")[0])
    return address, type("Scraped", (), {"metrics_port": metrics_port})


def test_sigterm_drains_in_flight_work(tiny_model, blobs):
    """A subprocess server holds 4 requests (waiting for company); SIGTERM: all 4 are answered, then UNAVAILABLE."""
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.serve.cli", "serve", "--clip-model", tiny_model, "--port", "0", "--metrics-port", "0",
         "--max-in-flight", "4", "--max-delay-ms", "5000", "--max-batch", "1000", "--grace", "20"],
        cwd=REPO_ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True,
    )
    try:
        address, server = wait_until_serving(process)
        hold = threading.Event()

        def requests():  # 6 requests, and the stream stays open: the client has more to say
            yield from (request(k, blobs[k]) for k in range(6))
            hold.wait(30)

        call = pb_grpc.MimeticStub(grpc.insecure_channel(address)).Embed(requests())
        wait_for(lambda: metric(server, "mimetic_in_flight") == 4, what="4 requests in flight")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        answered = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in call:
                answered.append(response)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in ended.value.details()
        assert sorted(r.request_id for r in answered) == ["r0", "r1", "r2", "r3"]  # exactly those it had read
        assert all(r.status.code == OK for r in answered)
        assert process.wait(15) == 0 and time.monotonic() - started < 4.5  # did not sit out the 5 s batch delay
        rest = process.stderr.read()
        assert "draining" in rest and "stopped" in rest and "cut" not in rest
        hold.set()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_stream_cut_by_a_crash_resumes_without_loss_or_duplicates(engine, blobs):
    """The first server holds 3 requests unanswered (waiting for company) and stops dead; the client retries
    on UNAVAILABLE, and the second server gets exactly those 3 again, then the rest."""
    port = free_port()
    first = BackgroundServer(engine, ServerConfig(port=port, metrics_port=0, max_in_flight=3, max_delay_ms=60_000, max_batch=1000))
    received, failures = [], []

    def consume():
        try:
            with MimeticClient(f"127.0.0.1:{port}", backoff_s=0.1) as client:
                received.extend(client.embed(Panorama(id=f"p{k}", data=blobs[k % len(blobs)]) for k in range(20)))
        except Exception as exc:
            failures.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    second = None
    try:
        wait_for(lambda: metric(first, "mimetic_in_flight") == 3, what="3 requests in flight")
        first.call(first.server.stop())  # no drain: the 3 are never answered there
        assert metric_total_views(first) == 0
        first.close()
        second = BackgroundServer(engine, ServerConfig(port=port, metrics_port=0, max_in_flight=3))
        consumer.join(30)
        assert metric(second, "mimetic_requests_total", method="Embed", code="OK") == 20
    finally:
        first.close()
        if second is not None:
            second.close()
    assert not failures
    assert [r.id for r in received] == [f"p{k}" for k in range(20)] and all(r.error is None for r in received)


def metric_total_views(server) -> float:
    return server.server.metrics.registry.get_sample_value("mimetic_views_total")  # the endpoint is down once stopped


def test_load_4_clients_x_200_requests_nothing_lost_nothing_repeated(engine, blobs):
    config = ServerConfig(port=0, metrics_port=0, max_in_flight=8, max_delay_ms=2)
    with BackgroundServer(engine, config) as server:
        received, failures = {}, []

        def run(c):
            try:
                with MimeticClient(server.address) as client:
                    source = (Panorama(id=f"c{c}-{k}", data=blobs[(c + k) % len(blobs)]) for k in range(200))
                    received[c] = [r.id for r in client.embed(source, ordered=False, outputs=["pooled"]) if r.error is None]
            except Exception as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - started
        assert not failures and elapsed < 60
        for c in range(4):
            assert len(received[c]) == 200 and set(received[c]) == {f"c{c}-{k}" for k in range(200)}
        assert metric(server, "mimetic_requests_total", method="Embed", code="OK") == 800
        assert metric(server, "mimetic_views_total") == 800 * 8 and server.in_flight == 0


# -- mimetic call ---------------------------------------------------------------------------------


def test_mimetic_call_embed_prints_readings_and_writes_parquet(engine, blobs, tmp_path):
    files = []
    for k in range(2):
        files.append(tmp_path / f"p{k}.jpg")
        files[-1].write_bytes(blobs[k])
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        out = tmp_path / "out.parquet"
        done = subprocess.run(
            [sys.executable, "-m", "engine.serve.cli", "call", "embed", server.address, *map(str, files), str(tmp_path / "bad.jpg"),
             "--out", str(out)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stderr  # one file failed
    assert f"{files[0]}: styles: " in done.stdout and "2 of 3 panoramas embedded" in done.stdout
    bad = str(tmp_path / "bad.jpg")  # its error names it once
    assert done.stderr.splitlines() == [f"{bad}: not a recognised image format (corrupt, or not an image)"], done.stderr
    table = pq.read_table(out)
    assert table.num_rows == 2 * (8 + 1) + 1  # a row per view and a pooled row per panorama, plus the error row
    # The file records the server engine's settings, so `mimetic query` rebuilds its model and ranks the
    # panoramas as it ranks the same panoramas embedded here.
    from engine.ingest.query import query
    from engine.results import read_engine_config, write_parquet

    assert read_engine_config(out) == engine.info()["config"]
    local = tmp_path / "local.parquet"
    write_parquet(engine.embed([Panorama(id=str(f), data=f) for f in files]), local, engine.config)
    served, here = (query(path, "a grand old museum", top=1) for path in (out, local))
    assert [r["id"] for r in served.positive] == [r["id"] for r in here.positive]
    assert served.positive[0]["score"] == pytest.approx(here.positive[0]["score"], abs=2e-3)

"""Dream over gRPC with the tiny Stable Diffusion and tiny CLIP: the command line's pixels, per-item statuses,
seeds whatever the batch, batching across streams, trajectories, limits, deadlines and cancellation."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from engine import Engine, EngineConfig, Panorama, cli
from engine.dream.params import DreamParams
from engine.models.diffusion import Dreamer
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_sd import make_tiny_sd
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import wire
from engine.serve.client import AsyncMimeticClient, MimeticClient
from engine.serve.generate import parameters
from engine.serve.server import BackgroundServer, ServerConfig

from .test_server import REPO_ROOT, metric, stub, subprocess_env, wait_for, wait_until_serving

OK, INVALID, DEADLINE, EXHAUSTED = 0, 3, 4, 8  # google.rpc.Code
STEPS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"clip": f"local-dir:{make_tiny_clip(folder)}", "sd": str(make_tiny_sd(folder))}


@pytest.fixture(scope="module")
def engine(models) -> Engine:
    return Engine(EngineConfig(clip_model=models["clip"], views="ring4", top_k=3, vocabularies=("styles", "periods")))


@pytest.fixture(scope="module")
def dreamer(models) -> Dreamer:
    return Dreamer(models["sd"])


def dream_request(k, data: bytes, **fields) -> pb.DreamRequest:
    fields = {"prompt": "a street in Rome", "steps": STEPS, "strength": 0.75, **fields}
    return pb.DreamRequest(request_id=f"d{k}", id=f"pano-{k}", image=pb.Image(encoded=data), **fields)


def images(response: pb.DreamResponse) -> list[np.ndarray]:
    return [wire.from_png(d.image) for d in response.dreams]


@pytest.fixture(scope="module")
def server(engine, dreamer):
    config = ServerConfig(port=0, metrics_port=0, max_dream_steps=40, max_dream_views=4, max_dream_delay_ms=200)
    with BackgroundServer(engine, config, dreamer=dreamer) as running:
        yield running


def test_a_tiny_sd_server_gives_the_command_line_s_pixels(models, server, panoramas, tmp_path):
    """`mimetic dream` on a file and a DreamRequest with the same bytes and parameters: the same dreams."""
    path = tmp_path / "louvre.jpg"
    path.write_bytes(panoramas["louvre"])
    out = tmp_path / "cli"
    status = cli.main(["dream", str(path), "--from-labels", "styles,periods", "--steps", "6", "--strength", "0.6", "--seed", "11",
                       "--guidance", "5", "--out", str(out), "--sd-model", models["sd"], "--clip-model", models["clip"],
                       "--views", "ring4", "--vocabularies", "styles,periods", "--top-k", "3", "--quiet"])
    assert status == 0
    record = json.loads((out / "dreams.json").read_text())["panoramas"][0]["dreams"]
    request = dream_request(0, panoramas["louvre"], from_labels=["styles", "periods"], steps=6, strength=0.6, seed=11, guidance=5)
    request.ClearField("prompt")
    [response] = list(stub(server).Dream(iter([request])))
    assert response.status.code == OK, response.status.message
    assert len(response.dreams) == len(record) == 4
    for row, dreamt in zip(record, response.dreams, strict=True):
        assert (dreamt.index, dreamt.prompt, dreamt.seed) == (row["view"], row["prompt"], 11)
        assert dreamt.prompt.startswith("a photograph of ")
        cli_dream = np.asarray(Image.open(out / row["files"]["dream"]))
        cli_view = np.asarray(Image.open(out / row["files"]["view"]))
        assert np.array_equal(wire.from_png(dreamt.source), cli_view)  # the same view, cut the same way
        assert np.abs(wire.from_png(dreamt.image).astype(int) - cli_dream).mean() <= 1.0  # within one level on average
        assert dreamt.scores.keys() == row["scores"].keys()
        assert dreamt.scores["view_dream"] == pytest.approx(row["scores"]["view_dream"], abs=1e-3)
        assert [label.label for label in dreamt.labels[0].labels] == [label for label, _ in row["labels"]["styles"]]


def test_a_bad_item_gets_its_own_status_and_the_stream_goes_on(server, panoramas):
    data = panoramas["pond"]
    requests = [
        dream_request(0, data),
        dream_request(1, b"\xff\xd8 not a jpeg"),
        dream_request(2, data, steps=41),  # over --max-dream-steps
        dream_request(3, data, from_labels=["styles"]),  # a prompt and from_labels
        dream_request(4, data, prompt=None, from_labels=["/etc/passwd"]),  # not a server vocabulary: never read
        dream_request(5, data, view_preset="cube6"),  # 6 views, over --max-dream-views 4
        dream_request(6, data, strength=1.5),
        dream_request(7, data, trajectory_every=4),  # 4 x 0.75 runs 3 steps: no frame would be recorded
        dream_request(8, data, prompt=None),  # neither a prompt nor labels
        dream_request(9, data, seed=2**63),
        dream_request(10, data, seed=5),
    ]
    responses = {r.request_id: r for r in stub(server).Dream(iter(requests))}
    codes = {k: responses[f"d{k}"].status.code for k in range(len(requests))}
    assert codes == {0: OK, 1: INVALID, 2: EXHAUSTED, 3: INVALID, 4: INVALID, 5: EXHAUSTED, 6: INVALID, 7: INVALID, 8: INVALID,
                     9: INVALID, 10: OK}
    messages = {k: responses[f"d{k}"].status.message for k in codes if codes[k] != OK}
    assert messages[2] == "pano-2: 41 steps, over the limit of 40 (--max-dream-steps)"
    assert "not several or none" in messages[3] and "not one of this server's vocabularies (styles, periods)" in messages[4]
    assert "6 views, over the limit of 4" in messages[5] and "strength must be a number in (0, 1]" in messages[6]
    assert "trajectory_every" in messages[7] and "seed" in messages[9]
    assert all(message.startswith(f"pano-{k}:") and message.count(f"pano-{k}") == 1 for k, message in messages.items())
    assert len(responses["d10"].dreams) == 4 and responses["d10"].dreams[0].seed == 5
    assert metric(server, "mimetic_requests_total", method="Dream", code="INVALID_ARGUMENT") >= 7


def test_two_identical_requests_give_identical_images_whatever_else_is_in_the_batch(server, panoramas):
    """Two streams at once, batched into one diffusion call: a seed gives the same pixels alone or in company."""
    louvre, pond = panoramas["louvre"], panoramas["pond"]
    [alone] = list(stub(server).Dream(iter([dream_request(0, louvre, seed=3)])))
    batches_before = metric(server, "mimetic_dream_batch_views_count")
    results, start = {}, threading.Barrier(2)

    def send(name, requests):
        start.wait()
        results[name] = {r.request_id: r for r in stub(server).Dream(iter(requests))}

    threads = [threading.Thread(target=send, args=("a", [dream_request(0, louvre, seed=3)])),
               threading.Thread(target=send, args=("b", [dream_request(1, louvre, seed=3), dream_request(2, pond, seed=9, prompt="a pond")]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    a, b, other = results["a"]["d0"], results["b"]["d1"], results["b"]["d2"]
    assert {a.status.code, b.status.code, other.status.code} == {OK}
    # The same seed and view at another place in the call: the same noise, so the same dream up to the float
    # rounding a different matrix blocking gives (bf16 on AMX reorders sums by batch position; fp32 here rarely
    # does). One level on average, as the command line's pixels are held; another item is far from it.
    for x, y, z, w in zip(images(a), images(b), images(alone), images(other), strict=True):
        assert np.abs(x.astype(int) - y).mean() <= 1.0 and np.abs(x.astype(int) - z).mean() <= 1.0
        assert np.abs(x.astype(int) - w).mean() > 10 * max(1.0, np.abs(x.astype(int) - y).mean())
    # Fewer diffusion calls than items: the streams shared them (8 images per call, 4 views per item).
    assert metric(server, "mimetic_dream_batch_views_count") - batches_before < 3
    assert max(a.timings_ms["batch_items"], b.timings_ms["batch_items"]) >= 2


def test_trajectories_come_back_when_asked_for(server, panoramas):
    [response] = list(stub(server).Dream(iter([dream_request(0, panoramas["louvre"], steps=8, strength=0.5, trajectory_every=2)])))
    assert response.status.code == OK, response.status.message
    assert response.timings_ms["steps_run"] == 4
    for dreamt in response.dreams:
        t = dreamt.trajectory
        assert list(t.steps) == [2, 4] and len(t.frames) == len(t.drift) == len(t.prompt_cosine) == 2
        assert wire.from_png(t.frames[0]).shape == (64, 64, 3) and all(0 <= d <= 2 for d in t.drift)
    [plain] = list(stub(server).Dream(iter([dream_request(0, panoramas["louvre"], steps=8, strength=0.5)])))
    assert not plain.dreams[0].HasField("trajectory")


@pytest.fixture(scope="module")
def long_server(engine, dreamer):
    """Dreams of 200 steps allowed, and no wait for company: a dream starts at once and runs for a while."""
    with BackgroundServer(engine, ServerConfig(port=0, metrics_port=0, max_dream_steps=200, max_dream_delay_ms=0), dreamer=dreamer) as running:
        yield running


def test_a_deadline_stops_a_dream_that_runs_past_it(long_server, panoramas):
    server = long_server
    requests = [dream_request(0, panoramas["pond"], steps=200, strength=1.0, timeout_ms=500)]
    [response] = list(stub(server).Dream(iter(requests)))
    assert response.status.code == DEADLINE and "was stopped" in response.status.message
    assert 0 < metric(server, "mimetic_dream_step_seconds_count") < 200  # it started, and was stopped, not finished


def test_cancelling_a_stream_mid_dream_frees_the_model(long_server, panoramas):
    server = long_server
    steps_before = metric(server, "mimetic_dream_step_seconds_count")
    call = stub(server).Dream(iter([dream_request(0, panoramas["pond"], steps=200, strength=1.0)]))
    wait_for(lambda: metric(server, "mimetic_dream_step_seconds_count") > steps_before, what="the dream to start")
    call.cancel()
    # The call stops at its next step: the steps taken stop growing, far short of the 200 asked for.
    time.sleep(0.5)
    stopped_at = metric(server, "mimetic_dream_step_seconds_count")
    time.sleep(0.5)
    assert metric(server, "mimetic_dream_step_seconds_count") == stopped_at < steps_before + 200
    [after] = list(stub(server).Dream(iter([dream_request(1, panoramas["pond"])])))
    assert after.status.code == OK
    assert metric(server, "mimetic_in_flight") == 0


def test_info_reports_every_model_s_parameters_and_dtype(server, engine, dreamer):
    info = stub(server).GetInfo(pb.GetInfoRequest())
    assert info.dream and not info.caption
    models = {m.name: m for m in info.models}
    assert models["clip"].parameters == parameters(engine.clip.model) and models["clip"].dtype == "float32"
    unet, vae, text = (parameters(getattr(dreamer.pipe_img2img, name)) for name in ("unet", "vae", "text_encoder"))
    assert models["diffusion"].parameters == unet + vae + text and models["diffusion"].dtype == "float32"
    assert models["diffusion"].architecture == "StableDiffusionImg2ImgPipeline"
    defaults = DreamParams()
    assert (info.diffusion.size, info.diffusion.steps, info.diffusion.guidance) == (64, defaults.steps, defaults.guidance)
    assert info.diffusion.strength == pytest.approx(defaults.strength)
    assert (info.limits.max_dream_steps, info.limits.max_dream_views, info.limits.max_dream_batch) == (40, 4, 8)


def test_health_says_not_serving_while_sd_loads(engine, models):
    loading = threading.Event()
    release = threading.Event()

    def slow_dreamer():
        loading.set()
        release.wait(30)
        return Dreamer(models["sd"])

    server = BackgroundServer(engine, ServerConfig(port=0), dreamer=slow_dreamer, wait_loaded=False)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        assert loading.wait(30)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as early:
            list(stub(server).Dream(iter([pb.DreamRequest(request_id="d0", prompt="x")])))
        assert early.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        server.loaded.result(60)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert stub(server).GetInfo(pb.GetInfoRequest()).dream
    finally:
        release.set()
        server.close()


# -- the client and mimetic call --------------------------------------------------------------------


def test_the_client_gives_dream_s_own_results(engine, dreamer, server, panoramas):
    from engine.dream.dream import dream

    params = DreamParams(from_labels=("style=styles",), template="a {style} street", steps=STEPS, strength=0.75, seed=4,
                         trajectory_every=1)
    items = [Panorama(id="louvre", data=panoramas["louvre"], meta={"city": "Paris"}), Panorama(id="bad", data=b"nope"),
             Panorama(id="pond", data=panoramas["pond"])]
    local = dream(engine, dreamer, items, params)
    with MimeticClient(server.address) as client:
        remote = list(client.dream(items, params))
        with pytest.raises(ValueError, match="strength must be a number in"):
            client.dream(items, DreamParams(prompt="x", strength=2.0))
        with pytest.raises(ValueError, match="not among this server's vocabularies"):
            client.dream(items, DreamParams(from_labels=("urban",)))
        with pytest.raises(ValueError, match="over the server's limit of 40"):
            client.dream(items, DreamParams(prompt="x", steps=50))
    assert [r.id for r in remote] == ["louvre", "bad", "pond"] and remote[0].meta == {"city": "Paris"}
    assert remote[1].error and remote[1].error.count("bad") == 1 and local[1].error
    for a, b in zip(local, remote, strict=True):
        assert len(a.dreams) == len(b.dreams)
        for x, y in zip(a.dreams, b.dreams, strict=True):
            assert (x.index, x.view, x.prompt, x.seed, x.nsfw) == (y.index, y.view, y.prompt, y.seed, y.nsfw)
            assert x.prompt.startswith("a ") and x.prompt.endswith(" street")
            assert np.array_equal(x.source, y.source) and np.abs(x.image.astype(int) - y.image).mean() <= 1.0
            assert y.scores == pytest.approx(x.scores, abs=1e-3)
            assert [label for label, _ in x.labels["style"]] == [label for label, _ in y.labels["style"]]
            assert x.trajectory.steps == y.trajectory.steps == [1, 2, 3] and y.trajectory.frames.shape == x.trajectory.frames.shape

    async def main():
        async with AsyncMimeticClient(server.address) as aclient:
            return [r async for r in aclient.dream(items[2:], DreamParams(prompt="a pond", steps=STEPS, seed=1), ordered=False)]

    [pond] = asyncio.run(main())
    assert pond.id == "pond" and len(pond.dreams) == 4 and pond.dreams[0].prompt == "a pond"


def test_mimetic_call_dream_writes_what_mimetic_dream_writes(models, server, panoramas, tmp_path):
    path = tmp_path / "pond.jpg"
    path.write_bytes(panoramas["pond"])
    local, remote = tmp_path / "local", tmp_path / "remote"
    flags = ["--prompt", "a quiet pond", "--steps", "4", "--strength", "0.5", "--seed", "2", "--trajectory-every", "1"]
    assert cli.main(["dream", str(path), *flags, "--out", str(local), "--sd-model", models["sd"], "--clip-model", models["clip"],
                     "--views", "ring4", "--vocabularies", "styles,periods", "--top-k", "3", "--quiet"]) == 0
    assert cli.main(["call", "dream", server.address, str(path), *flags, "--out", str(remote)]) == 0
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in remote.iterdir())
    a, b = (json.loads((folder / "dreams.json").read_text()) for folder in (local, remote))
    assert a.keys() == b.keys() and a["parameters"] == b["parameters"] and a["template"] == b["template"] is None
    assert b["diffusion"]["img2img"] == "StableDiffusionImg2ImgPipeline" and b["clip"]["model"] == a["clip"]["model"]
    for x, y in zip(a["panoramas"][0]["dreams"], b["panoramas"][0]["dreams"], strict=True):
        assert (x["prompt"], x["seed"], x["files"], x["trajectory"]["steps"]) == (y["prompt"], y["seed"], y["files"], y["trajectory"]["steps"])
        dreamt = [np.asarray(Image.open(folder / x["files"]["dream"])).astype(int) for folder in (local, remote)]
        assert np.abs(dreamt[0] - dreamt[1]).mean() <= 1.0
    # A user's mistake is one line and an exit status.
    assert cli.main(["call", "dream", server.address, str(path), "--prompt", "x", "--strength", "0", "--out", str(remote)]) == 2


def test_serving_means_the_dreamer_has_run_once(engine, dreamer, monkeypatch):
    """The warm-up runs one unguided denoising step of one view before health says SERVING, so the first Dream
    does not pay for the kernel's SD specialisation and the models' first calls."""
    calls = []
    real = dreamer.img2img

    def counted(images, **options):
        calls.append((tuple(images.shape), options["steps"], options["guidance"]))
        return real(images, **options)

    monkeypatch.setattr(dreamer, "img2img", counted)
    with BackgroundServer(engine, ServerConfig(port=0), dreamer=dreamer) as running:
        channel = grpc.insecure_channel(running.address)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert calls == [((1, 3, dreamer.size, dreamer.size), 1, 1.0)]
        channel.close()


def test_mimetic_call_dream_records_a_vocabulary_only_the_server_has(models, dreamer, panoramas, tmp_path):
    """--from-labels naming a vocabulary the server read from its own file: the dreams and dreams.json are written
    with that vocabulary as the server has it (it used to be looked up on the calling machine, and nothing was recorded)."""
    from engine.vocab import load_vocabulary

    own = tmp_path / "server" / "lanes.json"
    own.parent.mkdir()
    own.write_text(json.dumps({"name": "lanes", "template": "a photograph of a {label}", "labels": ["narrow lane", "wide avenue"]}))
    engine = Engine(EngineConfig(clip_model=models["clip"], views="ring4", top_k=2, vocabularies=(str(own),)))
    path = tmp_path / "pond.jpg"
    path.write_bytes(panoramas["pond"])
    config = ServerConfig(port=0, metrics_port=0, max_dream_steps=40, max_dream_views=4)
    with BackgroundServer(engine, config, dreamer=dreamer) as running:
        assert cli.main(["call", "dream", running.address, str(path), "--from-labels", "street=lanes", "--steps", "4",
                         "--strength", "0.5", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "dreams.json").read_text())
    expected = load_vocabulary(str(own))
    assert record["placeholders"] == {"street": {"vocabulary": "lanes", "template": expected.template,
                                                 "labels_sha256": expected.labels_hash}}
    assert record["template"] == "a photograph of {street}"
    dreams = record["panoramas"][0]["dreams"]
    assert len(dreams) == 4 and all(d["prompt"] in ("a photograph of narrow lane", "a photograph of wide avenue") for d in dreams)
    assert all((tmp_path / "out" / d["files"]["dream"]).is_file() for d in dreams)


def test_sigterm_finishes_the_dreams_already_started_within_the_grace_period(models, panoramas):
    """`mimetic serve --sd-model` in a subprocess: a dream of 12 steps is running when SIGTERM comes; it is answered
    with its pixels, the next request is never read, and the process exits 0."""
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.serve.cli", "serve", "--clip-model", models["clip"], "--sd-model", models["sd"],
         "--views", "ring4", "--port", "0", "--metrics-port", "0", "--grace", "60", "--max-dream-delay-ms", "0"],
        cwd=REPO_ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True,
    )
    try:
        address, server = wait_until_serving(process)
        hold = threading.Event()

        def requests():
            yield dream_request(0, panoramas["pond"], steps=12, strength=1.0)
            hold.wait(60)  # the stream stays open: the client has more to say
            yield dream_request(1, panoramas["pond"])

        call = pb_grpc.MimeticStub(grpc.insecure_channel(address)).Dream(requests())
        wait_for(lambda: metric(server, "mimetic_dream_step_seconds_count") > 0, timeout=30, what="the dream to start")
        process.send_signal(signal.SIGTERM)
        answered = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in call:
                answered.append(response)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in ended.value.details()
        assert [(r.request_id, r.status.code, len(r.dreams)) for r in answered] == [("d0", OK, 4)]
        assert process.wait(30) == 0
        rest = process.stderr.read()
        assert "stopped" in rest and "cut" not in rest
        hold.set()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

"""Caption over gRPC with the tiny CLIP and BLIP: an answer per view, the command line's rows, per-item statuses,
batching across streams, and the client's Captioned objects."""

import asyncio
import csv
import threading

import pyarrow.parquet as pq
import pytest
import torch

from engine import Engine, EngineConfig, Panorama, cli
from engine.dream.interrogate import interrogate
from engine.models.caption import Captioner
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_caption import make_tiny_caption
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve.client import AsyncMimeticClient, MimeticClient
from engine.serve.generate import parameters
from engine.serve.server import BackgroundServer, ServerConfig

from .test_server import metric, stub

OK, INVALID, EXHAUSTED = 0, 3, 8  # google.rpc.Code
FLAVOURS = ("mediums", "movements", "styles")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"clip": f"local-dir:{make_tiny_clip(folder)}", "caption": str(make_tiny_caption(folder))}


@pytest.fixture(scope="module")
def engine(models) -> Engine:
    return Engine(EngineConfig(clip_model=models["clip"], views="ring4", vocabularies=FLAVOURS))


@pytest.fixture(scope="module")
def captioner(models) -> Captioner:
    return Captioner(models["caption"])


@pytest.fixture(scope="module")
def server(engine, captioner):
    with BackgroundServer(engine, ServerConfig(port=0, metrics_port=0, max_delay_ms=200), captioner=captioner) as running:
        yield running


def caption_request(k, data: bytes, **fields) -> pb.CaptionRequest:
    return pb.CaptionRequest(request_id=f"c{k}", id=f"pano-{k}", image=pb.Image(encoded=data), **fields)


def rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_caption_answers_per_view_and_mimetic_call_writes_what_mimetic_caption_writes(models, server, panoramas, tmp_path):
    path = tmp_path / "louvre.jpg"
    path.write_bytes(panoramas["louvre"])
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    assert cli.main(["caption", str(path), "--out", str(local), "--caption-model", models["caption"], "--clip-model", models["clip"],
                     "--views", "ring4", "--quiet"]) == 0
    assert cli.main(["call", "caption", server.address, str(path), "--out", str(remote)]) == 0
    expected, got = rows(local), rows(remote)
    assert len(expected) == len(got) == 4 and list(expected[0]) == list(got[0])
    for a, b in zip(expected, got, strict=True):
        for name in a:
            if name.endswith("_probability"):
                assert float(b[name]) == pytest.approx(float(a[name]), abs=1e-6)  # float32 on the wire
            else:
                assert a[name] == b[name], name
    # As Parquet, as `mimetic caption` writes it: the same rows, and the engine settings that made them.
    from engine.results import read_engine_config

    local_table, remote_table = tmp_path / "local.parquet", tmp_path / "remote.parquet"
    assert cli.main(["caption", str(path), "--out", str(local_table), "--caption-model", models["caption"], "--clip-model",
                     models["clip"], "--views", "ring4", "--quiet"]) == 0
    assert cli.main(["call", "caption", server.address, str(path), "--out", str(remote_table)]) == 0
    assert read_engine_config(remote_table)["clip_model"] == read_engine_config(local_table)["clip_model"] == models["clip"]
    assert pq.read_table(remote_table).column("caption").to_pylist() == pq.read_table(local_table).column("caption").to_pylist()
    # The response itself: a caption, a prompt and each flavour's label per view, in the order asked.
    [response] = list(stub(server).Caption(iter([caption_request(0, panoramas["louvre"], flavours=["styles", "mediums"])])))
    assert response.status.code == OK and [c.index for c in response.captions] == [0, 1, 2, 3]
    for view, row in zip(response.captions, expected, strict=True):
        assert view.caption == row["caption"] and view.view.yaw == float(row["yaw"])
        assert [f.vocabulary for f in view.flavours] == ["styles", "mediums"]
        assert [f.label for f in view.flavours] == [row["styles"], row["mediums"]]
        assert view.prompt == ", ".join(part for part in (row["caption"], row["styles"], row["mediums"]) if part)
    assert list(response.embeddings.shape) == [4, server.server.service.engine.clip.embed_dim]


def test_a_bad_item_gets_its_own_status_and_the_stream_goes_on(server, panoramas):
    data = panoramas["pond"]
    requests = [
        caption_request(0, data),
        caption_request(1, b"\x89PNG broken"),
        caption_request(2, data, flavours=["periods"]),  # not loaded by this server
        caption_request(3, data, beams=4),  # over the server's 3
        caption_request(4, data, max_tokens=31),  # over the server's 30
        caption_request(5, data, flavours=["styles", "styles"]),
        caption_request(6, data, view_preset="rign8"),
        caption_request(7, data, view_preset="cube6", beams=1),
    ]
    responses = {r.request_id: r for r in stub(server).Caption(iter(requests))}
    codes = {k: responses[f"c{k}"].status.code for k in range(len(requests))}
    assert codes == {0: OK, 1: INVALID, 2: INVALID, 3: EXHAUSTED, 4: EXHAUSTED, 5: INVALID, 6: INVALID, 7: OK}
    assert "unknown flavours ['periods']" in responses["c2"].status.message
    assert responses["c3"].status.message == "pano-3: beams 4 is over the server's 3 (--caption-beams)"
    assert len(responses["c0"].captions) == 4 and len(responses["c7"].captions) == 6
    assert [f.vocabulary for f in responses["c0"].captions[0].flavours] == list(FLAVOURS)  # default: every server vocabulary
    assert metric(server, "mimetic_requests_total", method="Caption", code="INVALID_ARGUMENT") >= 4


def test_captions_are_batched_across_streams_and_the_same_as_alone(server, panoramas):
    [alone] = list(stub(server).Caption(iter([caption_request(0, panoramas["louvre"])])))
    calls_before = metric(server, "mimetic_caption_batch_views_count")
    results, start = {}, threading.Barrier(2)

    def send(name, requests):
        start.wait()
        results[name] = {r.request_id: r for r in stub(server).Caption(iter(requests))}

    threads = [threading.Thread(target=send, args=(name, [caption_request(k, panoramas[p]) for k, p in enumerate(("louvre", "pond"))]))
               for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = [results[name][f"c{k}"] for name in ("a", "b") for k in range(2)]
    assert all(r.status.code == OK for r in answered)
    assert metric(server, "mimetic_caption_batch_views_count") - calls_before < 4  # four items, fewer captioner calls
    assert max(r.timings_ms["batch_items"] for r in answered) >= 2
    for batched in (results["a"]["c0"], results["b"]["c0"]):
        assert [c.caption for c in batched.captions] == [c.caption for c in alone.captions]


def test_the_client_gives_interrogate_s_own_results(engine, captioner, server, panoramas):
    items = [Panorama(id="louvre", data=panoramas["louvre"], meta={"city": "Paris"}), Panorama(id="bad", data=b"nope"),
             Panorama(id="pond", data=panoramas["pond"])]
    local = interrogate(engine, captioner, items, FLAVOURS)
    with MimeticClient(server.address) as client:
        remote = list(client.caption(items))
        with pytest.raises(ValueError, match="unknown flavours"):
            client.caption(items, flavours=["periods"])
        with pytest.raises(ValueError, match="beams must be a whole number from 1 to the server's 3"):
            client.caption(items, beams=9)
        info = client.info()
    assert [r.id for r in remote] == ["louvre", "bad", "pond"]
    assert remote[1].error and remote[1].error.count("bad") == 1 and local[1].error
    for a, b in zip(local, remote, strict=True):
        if a.error:
            continue
        assert (a.captions, a.prompts, a.views) == (b.captions, b.prompts, b.views)
        for x, y in zip(a.flavours, b.flavours, strict=True):
            assert x.keys() == y.keys() and all(x[k][0] == y[k][0] and x[k][1] == pytest.approx(y[k][1], abs=1e-6) for k in x)
        torch.testing.assert_close(b.embeddings, a.embeddings.float(), atol=2e-3, rtol=0)  # float16 on the wire
    models = {m["name"]: m for m in info["server"]["models"]}
    assert info["server"]["caption"] and not info["server"]["dream"]
    assert models["caption"]["parameters"] == parameters(captioner.model) and models["caption"]["dtype"] == "float32"
    assert info["server"]["captioner"]["beams"] == captioner.beams

    async def main():
        async with AsyncMimeticClient(server.address) as aclient:
            return [r async for r in aclient.caption(items[:1], flavours=["styles"])]

    [first] = asyncio.run(main())
    assert first.captions == local[0].captions and list(first.flavours[0]) == ["styles"]

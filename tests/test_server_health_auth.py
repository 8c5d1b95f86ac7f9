"""The gRPC service on loopback, with the tiny model: health, reflection, auth, message limits, Dream,
EmbedText and GetInfo, and TLS. The streams themselves are in ``test_server``."""

import subprocess
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from engine import Engine, EngineConfig, Panorama
from engine.models.tiny import make_tiny_clip
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve.client import MimeticClient
from engine.serve.server import SERVICE_NAME, BackgroundServer, ServerConfig

from .test_server import INVALID, MAX_PIXELS, OK, jpeg, metric, request, stub


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(EngineConfig(clip_model=tiny_model, batch_size=64, top_k=3, max_pixels=MAX_PIXELS))


@pytest.fixture(scope="module")
def small(louvre) -> np.ndarray:
    return np.asarray(Image.fromarray(louvre).resize((128, 64), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def blobs(small) -> list[bytes]:
    """Distinct 128 x 64 JPEG panoramas: the Louvre turned to 16 yaws."""
    return [jpeg(np.roll(small, 8 * k, axis=1)) for k in range(16)]


# -- health, reflection, auth, limits -------------------------------------------------------------


def test_health_moves_through_its_states(engine, blobs):
    loaded = threading.Event()

    def slow_engine():
        loaded.wait(30)
        return engine

    server = BackgroundServer(slow_engine, ServerConfig(port=0, max_delay_ms=1), wait_loaded=False)
    try:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        seen = []
        def follow():
            try:
                seen.extend(response.status for response in watch)
            except grpc.RpcError:  # the server stopped: the watch ends
                pass

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        for name in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as loading:
            pb_grpc.MimeticStub(channel).GetInfo(pb.GetInfoRequest())
        assert loading.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in loading.value.details()

        loaded.set()
        server.loaded.result(10)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING
        assert server.drain(5)
        watcher.join(5)
        serving = health_pb2.HealthCheckResponse
        assert seen == [serving.NOT_SERVING, serving.SERVING, serving.NOT_SERVING]
        with pytest.raises(grpc.RpcError):  # stopped: nothing is accepted any more
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        loaded.set()
        server.close()


def test_reflection_lists_the_service(engine):
    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(server.address))
        services = set(database.get_services())
        assert {"mimetic.v1.Mimetic", "grpc.health.v1.Health"} <= services
        found = database.FindFileContainingSymbol("mimetic.v1.Mimetic")
        assert found.name == "mimetic/v1/mimetic.proto" and [s.name for s in found.service] == ["Mimetic"]


def test_a_missing_or_wrong_token_is_rejected(engine, blobs):
    config = ServerConfig(port=0, metrics_port=0, token="correct horse battery staple")
    with BackgroundServer(engine, config) as server:
        channel = grpc.insecure_channel(server.address)
        mimetic = pb_grpc.MimeticStub(channel)
        for metadata, reason in (((), "no bearer token"), ((("authorization", "Bearer wrong"),), "wrong bearer token"),
                                 ((("authorization", "correct horse battery staple"),), "wrong bearer token")):
            with pytest.raises(grpc.RpcError) as info:
                mimetic.GetInfo(pb.GetInfoRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and reason in info.value.details()
            with pytest.raises(grpc.RpcError) as embed:
                list(mimetic.Embed(iter([request(0, blobs[0])]), metadata=metadata))
            assert embed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open (load balancers probe it); the right token opens the rest.
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with MimeticClient(server.address, token="correct horse battery staple") as client:
            assert [r.error for r in client.embed([Panorama(id="p", data=blobs[0])])] == [None]
        with MimeticClient(server.address, token="wrong") as client, pytest.raises(grpc.RpcError) as refused:
            client.info()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert metric(server, "mimetic_requests_total", method="GetInfo", code="UNAUTHENTICATED") == 4  # no retry of that one
        assert metric(server, "mimetic_views_total") == 8


def test_an_oversized_message_is_refused_and_the_server_survives(engine, blobs):
    assert ServerConfig().max_message_bytes == 64 * 2**20
    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        mimetic = stub(server, **{"grpc.max_send_message_length": -1})
        # Over gRPC's 4 MB default but under 64 MiB: an ordinary per-item answer.
        [answer] = mimetic.Embed(iter([request(0, b"\xff" * (5 * 2**20))]))
        assert answer.status.code == INVALID and "not a recognised image format" in answer.status.message
        # Over 64 MiB: the message is refused with a clear status...
        with pytest.raises(grpc.RpcError) as refused:
            list(mimetic.Embed(iter([request(1, blobs[1]), request(2, b"\x00" * (64 * 2**20 + 1))])))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in refused.value.details()
        # ...and the server goes on serving.
        assert [r.status.code for r in mimetic.Embed(iter([request(3, blobs[3])]))] == [OK]
        # The client checks sizes first: an oversized item fails alone and the stream goes on.
        with MimeticClient(server.address) as client:
            results = list(client.embed([Panorama(id="huge", data=b"\x00" * (64 * 2**20 + 1)), Panorama(id="fine", data=blobs[0])]))
        assert "over the message limit of 67,108,864 bytes" in results[0].error and results[1].error is None


def test_dream_and_caption_are_unimplemented_without_their_models(engine):
    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        with pytest.raises(grpc.RpcError) as dream:
            list(stub(server).Dream(iter([pb.DreamRequest(request_id="d0", prompt="a street in Rome")])))
        assert dream.value.code() == grpc.StatusCode.UNIMPLEMENTED and "diffusion engine" in dream.value.details()
        assert "--sd-model" in dream.value.details()
        with pytest.raises(grpc.RpcError) as caption:
            list(stub(server).Caption(iter([pb.CaptionRequest(request_id="c0")])))
        assert caption.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--caption-model" in caption.value.details()
        with MimeticClient(server.address) as client:
            assert client.info()["server"]["dream"] is False


def test_embed_text_and_info_are_the_engine_s(engine):
    with BackgroundServer(engine, ServerConfig(port=0)) as server, MimeticClient(server.address) as client:
        texts = ["a baroque church", "a quiet pond"]
        remote = client.embed_text(texts)
        assert remote.dtype == torch.float32 and remote.shape == (2, engine.clip.embed_dim)
        torch.testing.assert_close(remote, engine.embed_text(texts), atol=1e-3, rtol=0)
        info = client.info()
        server_part = info.pop("server")
        assert info == engine.info()
        assert server_part["limits"]["max_in_flight"] == ServerConfig().max_in_flight and server_part["limits"]["max_pixels"] == MAX_PIXELS
        assert server_part["labels"]["styles"] == list(engine.vocabularies["styles"].labels)
        with pytest.raises(grpc.RpcError) as empty:
            stub(server).EmbedText(pb.EmbedTextRequest())
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tls(engine, blobs, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True,
    )
    assert made.returncode == 0, made.stderr
    with BackgroundServer(engine, ServerConfig(port=0, tls_cert=str(cert), tls_key=str(key), token="t")) as server:
        with MimeticClient(server.address, token="t", tls=str(cert)) as client:
            assert [r.error for r in client.embed([Panorama(id="p", data=blobs[0])])] == [None]
        with MimeticClient(server.address, token="t", retries=0) as plaintext, pytest.raises(grpc.RpcError) as refused:
            plaintext.info()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

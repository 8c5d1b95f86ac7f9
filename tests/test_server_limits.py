"""The server under attack from outside: decoded-memory amplification, starvation of its slots, a grace
period that must bound the exit, refusals made by grpc itself, and a token that must stay out of `ps`.

Subprocess servers (`python -m engine.serve.cli serve`) are used where the process itself is measured:
its peak RSS, its exit time, its stderr and its command line.
"""

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import engine.serve.server as server_module
from engine import Engine, EngineConfig
from engine.models.tiny import make_tiny_clip
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve.server import BackgroundServer, ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
OK, INVALID, EXHAUSTED = 0, 3, 8  # google.rpc.Code
TOKEN = "correct horse battery staple"
MiB = 2**20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(EngineConfig(clip_model=tiny_model, batch_size=64, top_k=3))


def encode(array_or_image, format="JPEG", **options) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def blob(louvre) -> bytes:
    return encode(np.asarray(Image.fromarray(louvre).resize((128, 64), Image.Resampling.BILINEAR)))


def request(k: int, data: bytes, **fields) -> pb.EmbedRequest:
    return pb.EmbedRequest(request_id=f"r{k}", id=f"pano-{k}", image=pb.Image(encoded=data), **fields)


def counted(server: BackgroundServer, method: str, code: str) -> float:
    value = server.server.metrics.registry.get_sample_value("mimetic_requests_total", {"method": method, "code": code})
    return value or 0.0


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def authorized(token: str = TOKEN) -> tuple:
    return (("authorization", f"Bearer {token}"),)


# -- a server in its own process --------------------------------------------------------------------


class ServeProcess:
    """`mimetic serve` with the tiny model in a subprocess; stderr is collected line by line."""

    def __init__(self, tiny_model: str, *flags: str, env: dict | None = None):
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        environ.pop("MIMETIC_TOKEN", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.serve.cli", "serve", "--clip-model", tiny_model, "--port", "0", "--metrics-port", "0",
             *flags],
            cwd=REPO_ROOT, env={**environ, **(env or {})}, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_line(self, text: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} from the server within {timeout} s: {''.join(self.lines)}") from None
            if line is None:
                raise AssertionError(f"the server exited before {text!r}: {''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line

    def serving(self) -> "ServeProcess":
        listening = self.wait_line("listening on")
        self.address = listening.split("listening on ")[1].split(",")[0].split(";")[0]
        self.metrics_port = int(listening.split("metrics on http://")[1].split("/")[0].rsplit(":", 1)[1])
        self.wait_line("serving")
        return self

    def stderr(self) -> str:
        while (line := self._lines.get(timeout=10)) is not None:
            self.lines.append(line)
        return "".join(self.lines)

    def metric(self, name: str, **labels) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def status(self, field: str) -> int:
        """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- item 2: decoded bytes in flight are bounded by one budget --------------------------------------


def test_peak_memory_of_a_stream_of_large_cheap_pngs_stays_within_the_decode_budget(tiny_model):
    """Six 8000 x 4000 PNGs of one colour are 100 KB each on the wire and 92 MiB each decoded (238 MiB
    while decoding). With --max-decode-mib 300 they wait their turn and the server grows by the budget
    and a fixed allowance at most; with a budget that never binds it grows by several at once."""
    png = encode(Image.new("RGB", (8000, 4000), (90, 120, 200)), format="PNG")
    assert len(png) < 200_000
    if header_decodes(png):
        pytest.xfail("engine.decode.read_header decodes a whole PNG (PIL's PngImageFile.getexif loads the pixels), "
                     "so admission itself amplifies memory; the fix belongs to engine/decode.py")
    budget_mib, allowance_mib = 300, 160
    servers = {mib: ServeProcess(tiny_model, "--max-decode-mib", str(mib), "--decode-workers", "4") for mib in (budget_mib, 100_000)}
    growth = {}
    try:
        for server in servers.values():  # they load side by side; each stream runs alone
            server.serving()
        for mib, server in servers.items():
            Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS, the peak from now on
            baseline = server.status("VmRSS")
            with grpc.insecure_channel(server.address) as channel:
                responses = list(pb_grpc.MimeticStub(channel).Embed(iter([request(k, png) for k in range(6)]), timeout=240))
            assert [r.status.code for r in responses] == [OK] * 6, [r.status.message for r in responses]
            growth[mib] = (server.status("VmHWM") - baseline) / MiB
            assert server.metric("mimetic_decode_limit_bytes") == mib * MiB
            assert server.metric("mimetic_decode_bytes") == 0  # every hold was given back
    finally:
        for server in servers.values():
            server.close()
    print(f"peak RSS growth: {growth[budget_mib]:.0f} MiB with --max-decode-mib {budget_mib}, "
          f"{growth[100_000]:.0f} MiB with a budget that never binds")
    assert growth[budget_mib] < budget_mib + allowance_mib, growth
    assert growth[100_000] > 2 * growth[budget_mib], growth


def header_decodes(blob: bytes) -> bool:
    """Whether reading the image's header decodes its pixels."""
    from PIL import ImageFile

    from engine.decode import read_header

    loads = []
    original = ImageFile.ImageFile.load

    def load(self):
        loads.append(self)
        return original(self)

    ImageFile.ImageFile.load = load
    try:
        read_header(blob)
    finally:
        ImageFile.ImageFile.load = original
    return bool(loads)


@pytest.fixture(scope="module")
def small_budget_engine(tiny_model) -> Engine:
    return Engine(EngineConfig(clip_model=tiny_model, batch_size=64, top_k=3, max_decode_mib=1))


def test_an_item_that_can_never_fit_the_budget_is_refused_alone_and_every_hold_is_given_back(small_budget_engine, blob):
    big = encode(Image.new("RGB", (1024, 512), (10, 200, 30)), format="PNG")  # 3.5 MiB to decode, over 1 MiB
    requests = [request(0, blob), request(1, big), request(2, blob), request(3, blob, timeout_ms=60_000)]
    budget = small_budget_engine.decode_budget
    with BackgroundServer(small_budget_engine, ServerConfig(port=0)) as server:
        with grpc.insecure_channel(server.address) as channel:
            mimetic = pb_grpc.MimeticStub(channel)
            responses = {r.request_id: r for r in mimetic.Embed(iter(requests), timeout=60)}
            limits = mimetic.GetInfo(pb.GetInfoRequest()).limits
        assert {rid: r.status.code for rid, r in responses.items()} == {"r0": OK, "r1": EXHAUSTED, "r2": OK, "r3": OK}
        message = responses["r1"].status.message
        assert message.startswith("pano-1: ") and message.count("pano-1") == 1 and "decode budget of 1 MiB" in message
        assert counted(server, "Embed", "RESOURCE_EXHAUSTED") == 1
        assert limits.max_decode_bytes == MiB and limits.idle_timeout_s == 60.0
        assert budget.in_use == 0 and budget.waiting == 0
        # A stream cancelled with items admitted and in flight gives every byte back too.
        hold = threading.Event()

        def held_open():
            yield from (request(k, blob) for k in range(4))
            hold.wait(10)

        with grpc.insecure_channel(server.address) as channel:
            call = pb_grpc.MimeticStub(channel).Embed(held_open())
            next(call)
            call.cancel()
        hold.set()
        wait_for(lambda: budget.in_use == 0 and server.in_flight == 0, what="the cancelled stream's holds given back")


# -- item 3: nobody can starve the streams, health or reflection ------------------------------------


def test_unauthenticated_watches_and_embeds_starve_nothing_and_the_stream_limit_is_the_service_s(engine, blob):
    config = ServerConfig(port=0, token=TOKEN, max_streams=8)
    with BackgroundServer(engine, config) as server:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        mimetic = pb_grpc.MimeticStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(12)]  # no token needed
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        silent = threading.Event()

        def nothing():
            silent.wait(20)
            yield from ()

        for _ in range(12):  # unauthenticated Embed attempts, each holding its request stream open
            with pytest.raises(grpc.RpcError) as refused:
                list(mimetic.Embed(nothing(), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        [answer] = list(mimetic.Embed(iter([request(0, blob)]), metadata=authorized(), timeout=30))
        assert answer.status.code == OK
        # Eight authenticated streams held open take every slot; the ninth is refused, and counted.
        open_streams = [mimetic.Embed(nothing(), metadata=authorized()) for _ in range(8)]
        wait_for(lambda: server.server.service.open_streams == 8, what="8 open streams")
        with pytest.raises(grpc.RpcError) as ninth:
            list(mimetic.Embed(iter([request(1, blob)]), metadata=authorized(), timeout=10))
        assert ninth.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams 8" in ninth.value.details()
        assert counted(server, "Embed", "RESOURCE_EXHAUSTED") == 1
        # Health and reflection are not streams of the limit.
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert mimetic.GetInfo(pb.GetInfoRequest(), metadata=authorized(), timeout=5).limits.max_streams == 8
        silent.set()
        for call in [*open_streams, *watches]:
            call.cancel()
        channel.close()


def test_health_watches_have_a_bound_of_their_own_and_checks_have_none(engine, monkeypatch):
    monkeypatch.setattr(server_module, "MAX_WATCHES", 3)
    with BackgroundServer(engine, ServerConfig(port=0, token=TOKEN)) as server, grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(3)]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in watches)
        with pytest.raises(grpc.RpcError) as fourth:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5))
        assert fourth.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "health watches" in fourth.value.details()
        assert counted(server, "Watch", "RESOURCE_EXHAUSTED") == 1
        checks = [health.Check.future(health_pb2.HealthCheckRequest()) for _ in range(50)]
        assert all(c.result(10).status == health_pb2.HealthCheckResponse.SERVING for c in checks)
        for watch in watches:
            watch.cancel()


def test_other_calls_have_a_bound_that_a_refused_token_never_takes(engine, monkeypatch):
    monkeypatch.setattr(server_module, "MAX_OTHER_CALLS", 2)
    with BackgroundServer(engine, ServerConfig(port=0, token=TOKEN)) as server, grpc.insecure_channel(server.address) as channel:
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        for _ in range(5):  # unauthenticated: refused by the token check, before any place is taken
            with pytest.raises(grpc.RpcError) as refused:
                list(reflect(iter([b""]), timeout=5))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        silent = threading.Event()

        def nothing():
            silent.wait(20)
            yield from ()

        held = [reflect(nothing(), metadata=authorized()) for _ in range(2)]
        wait_for(lambda: server.server.call_limit.open == 2, what="2 reflection streams")
        with pytest.raises(grpc.RpcError) as third:
            pb_grpc.MimeticStub(channel).GetInfo(pb.GetInfoRequest(), metadata=authorized(), timeout=5)
        assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert counted(server, "GetInfo", "RESOURCE_EXHAUSTED") == 1
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        silent.set()
        for call in held:
            call.cancel()


def test_a_silent_stream_is_ended_after_the_idle_timeout_and_a_busy_one_is_not(engine, blob):
    config = ServerConfig(port=0, idle_timeout_s=1.0, max_delay_ms=1500, max_batch=1000)
    with BackgroundServer(engine, config) as server, grpc.insecure_channel(server.address) as channel:
        silent = threading.Event()

        def one_then_silence():
            yield request(0, blob)  # waits 1.5 s for company in the batch: in flight, so not idle
            silent.wait(20)

        started = time.monotonic()
        answers = []
        with pytest.raises(grpc.RpcError) as ended:
            for response in pb_grpc.MimeticStub(channel).Embed(one_then_silence(), timeout=20):
                answers.append((response.status.code, time.monotonic() - started))
        elapsed = time.monotonic() - started
        silent.set()
        assert [code for code, _ in answers] == [OK] and answers[0][1] > 1.4  # answered after the idle timeout had passed
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle for 1 s" in ended.value.details()
        assert answers[0][1] + 0.9 < elapsed < answers[0][1] + 3.0  # ended about 1 s after its last answer
        assert counted(server, "Embed", "DEADLINE_EXCEEDED") == 1
        wait_for(lambda: server.server.service.open_streams == 0, timeout=2, what="its slot given back")


# -- item 7: --grace bounds the exit -----------------------------------------------------------------


def test_sigterm_under_load_exits_within_grace_plus_one_second_with_the_server_s_own_status(tiny_model, tmp_path):
    """16 slow items (large PNGs) in flight, --grace 1, SIGTERM: the process is gone within 2 s and a
    small allowance, its stderr has no traceback, and the cut stream ends with the server's UNAVAILABLE.
    The token comes from a file, and never shows in the process's command line."""
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    png = encode(Image.new("RGB", (8000, 4000), (200, 80, 40)), format="PNG")
    server = ServeProcess(tiny_model, "--grace", "1", "--max-in-flight", "16", "--max-decode-mib", "1000", "--token-file", str(token_file))
    try:
        server.serving()
        assert TOKEN not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode(errors="replace")
        hold = threading.Event()

        def requests():
            yield from (request(k, png) for k in range(16))
            hold.wait(30)

        channel = grpc.insecure_channel(server.address)
        call = pb_grpc.MimeticStub(channel).Embed(requests(), metadata=authorized())
        outcome = {}

        def consume():
            answers = 0
            try:
                for _ in call:
                    answers += 1
            except grpc.RpcError as exc:
                outcome.update(code=exc.code(), details=exc.details(), answers=answers)

        consumer = threading.Thread(target=consume)
        consumer.start()
        wait_for(lambda: server.metric("mimetic_in_flight") == 16, timeout=60, what="16 requests in flight")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(15)
        exited = time.monotonic() - signalled
        consumer.join(10)
        hold.set()
        channel.close()
        stderr = server.stderr()
    finally:
        server.close()
    print(f"exited {exited:.2f} s after SIGTERM with --grace 1")
    assert status == 0 and exited < 1 + 1 + 0.8, (exited, stderr)
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert "grace period over" in stderr
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE and outcome["answers"] < 16
    assert "grace period of 1 s is over" in outcome["details"], outcome


# -- item 13a: what grpc core refuses is counted --------------------------------------------------


def test_refusals_made_by_grpc_itself_are_counted(engine, blob):
    with BackgroundServer(engine, ServerConfig(port=0, max_message_bytes=MiB)) as server:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            mimetic = pb_grpc.MimeticStub(channel)
            with pytest.raises(grpc.RpcError) as texts:
                mimetic.EmbedText(pb.EmbedTextRequest(texts=["x" * (2 * MiB)]), timeout=10)
            assert texts.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in texts.value.details()
            with pytest.raises(grpc.RpcError) as stream:
                list(mimetic.Embed(iter([request(0, blob), request(1, b"\0" * (2 * MiB))]), timeout=10))
            assert stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in stream.value.details()
            wait_for(lambda: counted(server, "Embed", "CANCELLED") == 1, what="the cut stream counted")
            assert counted(server, "EmbedText", "RESOURCE_EXHAUSTED") == 1
            # The server goes on, and a well-formed call is counted as before.
            before = counted(server, "Embed", "OK")  # r0 may have been answered before its stream was cut
            assert [r.status.code for r in mimetic.Embed(iter([request(2, blob)]), timeout=30)] == [OK]
            assert mimetic.EmbedText(pb.EmbedTextRequest(texts=["a street"]), timeout=10).embeddings.shape
            assert counted(server, "EmbedText", "OK") == 1 and counted(server, "Embed", "OK") == before + 1
            assert counted(server, "EmbedText", "CANCELLED") == 0 and counted(server, "Embed", "RESOURCE_EXHAUSTED") == 0


# -- item 13c: --token-file and $MIMETIC_TOKEN -------------------------------------------------------


def parse(*argv: str):
    import argparse

    from engine.serve.cli import add_parsers

    parser = argparse.ArgumentParser(prog="mimetic")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser, parser.parse_args(list(argv))


def help_of(*command: str) -> str:
    parser, _ = parse("serve")
    for name in command:
        [choices] = [a.choices for a in parser._actions if getattr(a, "choices", None) and name in a.choices]
        parser = choices[name]
    return parser.format_help()


def test_the_token_comes_from_a_file_or_the_environment_and_a_bad_file_is_one_clear_error(tmp_path, monkeypatch):
    from engine.serve.cli import token_from_args

    good, empty, missing = tmp_path / "token", tmp_path / "empty", tmp_path / "missing"
    good.write_text(f"  {TOKEN}  \nsecond line\n")
    empty.write_text("\n")
    monkeypatch.setenv("MIMETIC_TOKEN", "from-the-environment")
    for command in (("serve",), ("call", "info", "127.0.0.1:1")):
        assert token_from_args(parse(*command, "--token-file", str(good))[1]) == TOKEN
        assert token_from_args(parse(*command)[1]) == "from-the-environment"
        assert token_from_args(parse(*command, "--token", "given")[1]) == "given"
        with pytest.raises(ValueError, match=f"--token-file {empty}: its first line is empty"):
            token_from_args(parse(*command, "--token-file", str(empty))[1])
        with pytest.raises(ValueError, match=f"--token-file {missing}: cannot read the token"):
            token_from_args(parse(*command, "--token-file", str(missing))[1])
        with pytest.raises(SystemExit):
            parse(*command, "--token", "a", "--token-file", str(good))
        assert "--token-file" in help_of(*command[:2]) and "MIMETIC_TOKEN" in help_of(*command[:2])
    monkeypatch.delenv("MIMETIC_TOKEN")
    assert token_from_args(parse("serve")[1]) is None


def test_mimetic_call_reads_the_token_from_the_environment_or_a_file(engine, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    empty = tmp_path / "empty"
    empty.write_text("")
    with BackgroundServer(engine, ServerConfig(port=0, token=TOKEN)) as server:
        def call(*flags, **extra):
            return subprocess.run([sys.executable, "-m", "engine.serve.cli", "call", "info", server.address, *flags],
                                  cwd=REPO_ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=120)

        by_env = call(MIMETIC_TOKEN=TOKEN)
        assert by_env.returncode == 0 and '"max_decode_bytes"' in by_env.stdout, by_env.stderr
        refused = call(f"--token-file={empty}")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.splitlines() == [f"mimetic call: error: --token-file {empty}: its first line is empty; write the token there"]


# -- item 11: a server message names its item once --------------------------------------------------


def test_server_messages_name_the_item_once_and_report_the_file_s_own_size(engine):
    not_2_to_1 = encode(np.full((700, 1000, 3), 128, np.uint8))  # decoded at 1/4 it would be 250 x 175
    requests = [
        request(0, not_2_to_1),
        pb.EmbedRequest(request_id="r1", id="pano-1", image=pb.Image(raw=pb.RawImage(data=b"\0" * 300, height=10, width=10, channels=3))),
        request(2, not_2_to_1, views=pb.ViewList(views=[pb.View(yaw=0.0, fov=200.0)])),
    ]
    with BackgroundServer(engine, ServerConfig(port=0)) as server, grpc.insecure_channel(server.address) as channel:
        responses = {r.request_id: r.status for r in pb_grpc.MimeticStub(channel).Embed(iter(requests), timeout=30)}
    assert responses["r0"].message == "pano-0: equirectangular panoramas are 2:1, got 1000x700"
    assert responses["r1"].message == "pano-1: equirectangular panoramas are 2:1, got 10x10"
    assert responses["r2"].message.startswith("pano-2: bad views: ") and responses["r2"].message.count("pano-2") == 1
    assert {s.code for s in responses.values()} == {INVALID}

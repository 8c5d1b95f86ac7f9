"""The wire contract: the checked-in generated code is what protoc makes of the .proto, and the encodings agree."""

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2

from engine.proto import PACKAGE_DIR, PROTO_ROOT, generate, proto_files
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve import wire
from kernels import ViewSpec

GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_the_checked_in_code_is_what_protoc_generates_from_the_proto(tmp_path):
    fresh = {path.name: path.read_bytes() for path in generate(tmp_path)}
    checked_in_dir = PACKAGE_DIR / "mimetic" / "v1"
    checked_in = {p.name: p.read_bytes() for p in checked_in_dir.iterdir() if p.name.endswith(GENERATED)}
    assert sorted(fresh) == sorted(checked_in), "generated files missing or stale: run `python -m engine.proto`"
    for name, content in fresh.items():
        assert content == checked_in[name], f"{name} differs from the .proto's: run `python -m engine.proto`"
    assert [p.name for p in proto_files()] == ["mimetic.proto"]
    assert (PROTO_ROOT / "mimetic" / "v1" / "mimetic.proto").is_file()


def test_the_service_is_the_issue_s_contract():
    service = pb.DESCRIPTOR.services_by_name["Mimetic"]
    assert service.full_name == "mimetic.v1.Mimetic"
    proto = descriptor_pb2.ServiceDescriptorProto()
    service.CopyToProto(proto)
    shapes = {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in proto.method}
    assert shapes == {
        "Embed": (".mimetic.v1.EmbedRequest", ".mimetic.v1.EmbedResponse", True, True),
        "Dream": (".mimetic.v1.DreamRequest", ".mimetic.v1.DreamResponse", True, True),
        "Caption": (".mimetic.v1.CaptionRequest", ".mimetic.v1.CaptionResponse", True, True),
        "EmbedText": (".mimetic.v1.EmbedTextRequest", ".mimetic.v1.EmbedTextResponse", False, False),
        "GetInfo": (".mimetic.v1.GetInfoRequest", ".mimetic.v1.Info", False, False),
    }
    # Embeddings are bytes with a shape, never repeated floats; each response carries a google.rpc.Status.
    tensor = pb.Tensor.DESCRIPTOR.fields_by_name
    assert tensor["data"].type == tensor["data"].TYPE_BYTES and tensor["shape"].is_repeated
    for message in (pb.EmbedResponse, pb.DreamResponse, pb.CaptionResponse):
        assert message.DESCRIPTOR.fields_by_name["status"].message_type.full_name == "google.rpc.Status"
    # Caption's request is shaped like Embed's: the same fields for the image, its views, deadline and meta.
    embed, caption = pb.EmbedRequest.DESCRIPTOR.fields_by_name, pb.CaptionRequest.DESCRIPTOR.fields_by_name
    for name in ("request_id", "id", "image", "view_preset", "views", "yaw_offset", "timeout_ms", "meta"):
        assert (caption[name].type, caption[name].message_type) == (embed[name].type, embed[name].message_type)
    assert pb.DreamRequest.DESCRIPTOR.fields_by_name["prompt"].has_presence  # "" is a prompt; unset is none
    response = pb.EmbedResponse.DESCRIPTOR.fields_by_name
    assert response["embeddings"].message_type is pb.Tensor.DESCRIPTOR
    assert pb.DESCRIPTOR.name == "mimetic/v1/mimetic.proto"  # the canonical name, for reflection and other languages


def test_embeddings_travel_as_little_endian_float16_bytes():
    values = torch.tensor([[1.0, -2.0, 0.5], [0.25, 65504.0, -0.0]])
    message = wire.tensor_to_proto(values)
    assert list(message.shape) == [2, 3] and message.dtype == pb.DTYPE_FLOAT16
    assert message.data[:2] == b"\x00\x3c"  # 1.0 in IEEE half, least significant byte first
    assert message.data == values.numpy().astype("<f2").tobytes()
    back = wire.tensor_from_proto(message, torch.float32)
    assert back.dtype == torch.float32 and torch.equal(back, values)
    rounded = wire.tensor_from_proto(wire.tensor_to_proto(torch.tensor([0.1])), torch.float32)
    assert rounded.item() == float(np.float16(0.1))  # fp16 rounding, nothing worse


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused():
    message = wire.tensor_to_proto(torch.ones(4, 8))
    message.shape[:] = [4, 9]
    with pytest.raises(ValueError, match=r"needs 72 bytes of float16, got 64"):
        wire.tensor_from_proto(message)
    message.dtype = pb.DTYPE_UNSPECIFIED
    with pytest.raises(ValueError, match="expected a float16 tensor"):
        wire.tensor_from_proto(message)


def test_views_readings_and_meta_round_trip():
    view = ViewSpec(yaw=-30.5, pitch=12.0, roll=3.0, fov=75.0, width=224, height=160)
    assert wire.view_from_proto(wire.view_to_proto(view)) == view
    readings = {"styles": {"pooled": [("Baroque", 0.5), ("Gothic", 0.25), ("Modern", 0.125)], "views": [[("Gothic", 0.75), ("Baroque", 0.125)]]}}
    sent = wire.readings_to_proto(readings, ["styles"], top_k=2)
    assert wire.readings_from_proto(sent) == {"styles": {"pooled": [("Baroque", 0.5), ("Gothic", 0.25)], "views": [[("Gothic", 0.75), ("Baroque", 0.125)]]}}
    meta = {"city": "Rome", "lat": 41.9, "tags": ["a", "b"], "source": {"year": 2024}, "ok": True, "none": None}
    assert wire.meta_from_struct(wire.meta_to_struct(meta)) == meta  # JSON numbers: 2024 comes back as 2024.0 == 2024
    with pytest.raises(TypeError, match=r"meta\['blob'\] cannot go over the wire as JSON"):
        wire.meta_to_struct({"blob": b"\x00"})

"""The Engine's Python objects <-> the wire messages of ``proto/mimetic/v1/mimetic.proto``.

The one module that knows both sides, so that ``server`` and ``client`` convert the same way:

    tensor_to_proto(t) / tensor_from_proto(msg)      (N, D) tensors as raw little-endian float16 bytes
    view_to_proto(v) / view_from_proto(msg)          kernels.ViewSpec <-> View
    readings_to_proto(...) / readings_from_proto(m)  {vocabulary: {"pooled": [(label, p)], "views": [[...]]}}
    meta_to_struct(d) / meta_from_struct(s)          the metadata dict, echoed back (JSON values)
    info_to_proto(info, ...) / info_from_proto(msg)  Engine.info() plus the server's limits
    result_from_response(msg, ...)                   an EmbedResponse -> the EmbedResult the Engine gives
    image_from_proto(msg, item) / views_from_proto(m) a request's image and views, as the Engine takes them
    dream_to_proto(d) / dream_result_from_response(m) a Dream <-> ViewDream (PNG images); a DreamResponse -> DreamResult
    caption_to_proto(c, f) / captioned_from_response  a Captioned <-> ViewCaptions; a CaptionResponse -> Captioned
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import torch
from google.protobuf import json_format, struct_pb2

from engine.decode import DecodeError
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.types import EmbedResult
from engine.vocab import Vocabulary
from kernels import ViewSpec

_FLOAT16 = np.dtype("<f2")

OUTPUTS = {
    "view_embeddings": pb.OUTPUT_VIEW_EMBEDDINGS,
    "pooled": pb.OUTPUT_POOLED,
    "readings": pb.OUTPUT_READINGS,
    "thumbnails": pb.OUTPUT_THUMBNAILS,
}
DEFAULT_OUTPUTS = frozenset({pb.OUTPUT_VIEW_EMBEDDINGS, pb.OUTPUT_POOLED, pb.OUTPUT_READINGS})


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Any float tensor -> float16 bytes, little-endian, row-major, with its shape."""
    array = tensor.detach().to("cpu", torch.float16).contiguous().numpy()
    return pb.Tensor(data=array.astype(_FLOAT16, copy=False).tobytes(), shape=list(array.shape), dtype=pb.DTYPE_FLOAT16)


def tensor_from_proto(message: pb.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A float16 ``Tensor`` message -> a CPU tensor of ``dtype``; a size that does not match the shape is a ValueError."""
    if message.dtype != pb.DTYPE_FLOAT16:
        raise ValueError(f"expected a float16 tensor, got dtype {pb.DType.Name(message.dtype)}")
    shape = tuple(message.shape)
    count = int(np.prod(shape)) if shape else 1
    if len(message.data) != 2 * count:
        raise ValueError(f"tensor of shape {shape} needs {2 * count} bytes of float16, got {len(message.data)}")
    array = np.frombuffer(message.data, dtype=_FLOAT16).reshape(shape)
    return torch.from_numpy(array.astype(np.float16)).to(dtype)  # astype copies: the tensor owns writable memory


def view_to_proto(view: ViewSpec) -> pb.View:
    return pb.View(yaw=view.yaw, pitch=view.pitch, roll=view.roll, fov=view.fov, width=view.width, height=view.height)


def view_from_proto(message: pb.View) -> ViewSpec:
    return ViewSpec(message.yaw, message.pitch, message.roll, message.fov, message.width, message.height)


def _labels(pairs) -> pb.Labels:
    return pb.Labels(labels=[pb.Label(label=label, p=p) for label, p in pairs])


def readings_to_proto(readings: dict, names, top_k: int) -> list[pb.Reading]:
    """The Engine's readings for ``names``, in that order, each list cut to its ``top_k`` most likely labels."""
    return [
        pb.Reading(
            vocabulary=name,
            pooled=_labels(readings[name]["pooled"][:top_k]),
            views=[_labels(view[:top_k]) for view in readings[name]["views"]],
        )
        for name in names
    ]


def readings_from_proto(readings) -> dict:
    def pairs(labels: pb.Labels) -> list[tuple[str, float]]:
        return [(label.label, label.p) for label in labels.labels]

    return {r.vocabulary: {"pooled": pairs(r.pooled), "views": [pairs(v) for v in r.views]} for r in readings}


def meta_to_struct(meta: dict | None) -> struct_pb2.Struct:
    """A JSON-like dict -> Struct; anything else (bytes, arrays, ...) is a TypeError or ValueError naming the key."""
    struct = struct_pb2.Struct()
    for key, value in (meta or {}).items():
        try:
            struct.update({key: value})
        except (TypeError, ValueError) as exc:
            raise TypeError(f"meta[{key!r}] cannot go over the wire as JSON ({type(value).__name__}: {exc})") from exc
    return struct


def meta_from_struct(struct: struct_pb2.Struct) -> dict:
    return json_format.MessageToDict(struct)


def info_to_proto(info: dict, *, limits: pb.Limits, dream: bool, view_presets, vocabulary_labels: dict) -> pb.Info:
    """``Engine.info()`` -> ``Info``; ``vocabulary_labels`` maps each vocabulary to its labels."""
    clip = info["clip"]
    return pb.Info(
        clip=pb.ClipInfo(
            model=clip["model"], weights=clip["weights"] or "", embed_dim=clip["embed_dim"],
            image_size=clip["image_size"], mean=clip["mean"], std=clip["std"], compiled=clip["compiled"],
        ),
        device=info["device"],
        dtype=info["dtype"],
        attention=info["attention"],
        reprojection=pb.ReprojectionInfo(**info["reprojection"]),
        views=[pb.View(**view) for view in info["views"]],
        engine_config_json=json.dumps(info["config"]),
        vocabularies=[
            pb.VocabularyInfo(name=name, template=v["template"], labels=vocabulary_labels[name])
            for name, v in info["vocabularies"].items()
        ],
        batch_size=info["batch_size"],
        top_k=info["top_k"],
        versions={package: version or "" for package, version in info["versions"].items()},
        limits=limits,
        dream=dream,
        view_presets=list(view_presets),
        seed=info.get("seed"),
        decode_budget_mib=info.get("decode_budget_mib", 0),
        precision=info.get("precision", ""),
        precision_reason=info.get("precision_reason", ""),
        embedding_dtype=info.get("embedding_dtype", ""),
    )


def info_from_proto(message: pb.Info) -> dict:
    """``Info`` -> the dict ``Engine.info()`` gives, plus ``"server"``: limits, view presets, labels, dream."""
    clip = message.clip
    return {
        "clip": {
            "model": clip.model, "weights": clip.weights or None, "embed_dim": clip.embed_dim,
            "image_size": list(clip.image_size), "mean": list(clip.mean), "std": list(clip.std), "compiled": clip.compiled,
        },
        "device": message.device,
        "dtype": message.dtype,
        "attention": message.attention,
        "reprojection": {
            "backend": message.reprojection.backend,
            "antialias": message.reprojection.antialias,
            "min_decode_width": message.reprojection.min_decode_width,
        },
        "views": [asdict(view_from_proto(view)) for view in message.views],
        # labels_sha256 as Vocabulary.labels_hash: what a dream record names a server's vocabulary by
        "vocabularies": {v.name: {"template": v.template, "labels": len(v.labels),
                                  "labels_sha256": Vocabulary(v.name, v.template, tuple(v.labels)).labels_hash}
                         for v in message.vocabularies},
        "seed": message.seed if message.HasField("seed") else None,
        "config": json.loads(message.engine_config_json) if message.engine_config_json else None,
        "decode_budget_mib": message.decode_budget_mib,
        "precision": message.precision,
        "precision_reason": message.precision_reason,
        "embedding_dtype": message.embedding_dtype or message.dtype,
        "batch_size": message.batch_size,
        "top_k": message.top_k,
        "versions": {package: version or None for package, version in message.versions.items()},
        "server": {
            "limits": {f.name: getattr(message.limits, f.name) for f in message.limits.DESCRIPTOR.fields},
            "view_presets": list(message.view_presets),
            "labels": {v.name: list(v.labels) for v in message.vocabularies},
            "dream": message.dream,
            "caption": message.caption,
            "models": [_fields(m) for m in message.models],
            "diffusion": _fields(message.diffusion) if message.HasField("diffusion") else None,
            "captioner": _fields(message.captioner) if message.HasField("captioner") else None,
        },
    }


def _fields(message) -> dict:
    """A flat message -> {field: value}, repeated fields as lists (uint64 stays an int, unlike JSON)."""
    return {f.name: list(getattr(message, f.name)) if f.is_repeated else getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def result_from_response(response: pb.EmbedResponse, *, dtype: torch.dtype, views: list[ViewSpec]) -> EmbedResult:
    """An ``EmbedResponse`` -> ``EmbedResult``: embeddings in ``dtype`` (the server engine's), ``error`` from the status.

    ``views`` are used for a failed item, whose response carries none (the Engine reports its own views).
    """
    meta = meta_from_struct(response.meta)
    if response.status.code != 0:
        return EmbedResult(id=response.id, views=views, meta=meta, error=response.status.message)
    return EmbedResult(
        id=response.id,
        views=[view_from_proto(view) for view in response.views],
        embeddings=tensor_from_proto(response.embeddings, dtype) if response.HasField("embeddings") else None,
        pooled=tensor_from_proto(response.pooled, dtype) if response.HasField("pooled") else None,
        readings=readings_from_proto(response.readings),
        meta=meta,
        thumbnails=list(response.thumbnails),
    )


def image_from_proto(image: pb.Image, item: str) -> bytes | np.ndarray:
    """A request's ``Image`` -> a Panorama's data: the encoded bytes, or a raw image as a uint8 (H, W, C)
    array read in place. Only the message's own consistency is checked here (the Engine checks the
    image): a raw image without pixels or whose data does not match its size is a DecodeError naming the item."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return image.encoded
    if kind != "raw":
        raise DecodeError(item, "no image in the request (set image.encoded or image.raw)")
    raw = image.raw
    height, width, channels = raw.height, raw.width, raw.channels
    if channels not in (1, 3, 4) or not height or not width:
        raise DecodeError(item, f"raw image must be (H, W, C) with H, W > 0 and C in 1, 3, 4, got {height}x{width}x{channels}")
    if len(raw.data) != height * width * channels:
        raise DecodeError(item, f"raw image of {height}x{width}x{channels} needs {height * width * channels} bytes, got {len(raw.data)}")
    return np.frombuffer(raw.data, dtype=np.uint8).reshape(height, width, channels)


def views_from_proto(message: pb.ViewList) -> list[dict]:
    """A request's views -> the dicts ``Engine.with_views`` takes. A field left 0 is left out: the fov is
    then 90°, the size the model's."""
    views = []
    for view in message.views:
        fields = {"yaw": view.yaw, "pitch": view.pitch, "roll": view.roll}
        fields.update({name: getattr(view, name) for name in ("fov", "width", "height") if getattr(view, name)})
        views.append(fields)
    return views


# -- Dream and Caption ----------------------------------------------------------------------------


def png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (lossless: the pixels a client gets are the model's)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def from_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def dream_to_proto(dream) -> pb.ViewDream:
    """An ``engine.dream.dream.Dream`` -> ``ViewDream``: images as PNG, labels per placeholder, the trajectory."""
    message = pb.ViewDream(
        index=dream.index, view=view_to_proto(dream.view), prompt=dream.prompt, seed=dream.seed,
        source=png(dream.source), image=png(dream.image), scores=dream.scores,
        labels=[pb.VocabularyLabels(vocabulary=key, labels=[pb.Label(label=label, p=p) for label, p in top])
                for key, top in dream.labels.items()],
    )
    if dream.nsfw is not None:
        message.nsfw = bool(dream.nsfw)
    if dream.trajectory is not None:
        t = dream.trajectory
        message.trajectory.CopyFrom(pb.Trajectory(steps=t.steps, frames=[png(frame) for frame in t.frames], drift=t.drift,
                                                  prompt_cosine=t.prompt_cosine))
    return message


def dream_result_from_response(response: pb.DreamResponse):
    """A ``DreamResponse`` -> the ``DreamResult`` that ``engine.dream.dream.dream`` gives (``error`` from the status).

    Scores and probabilities cross the wire as float32; the images are the model's pixels (PNG).
    """
    from engine.dream.dream import Dream, DreamResult, Trajectory

    meta = meta_from_struct(response.meta)
    if response.status.code != 0:
        return DreamResult(id=response.id, meta=meta, error=response.status.message)
    dreams = []
    for d in response.dreams:
        trajectory = None
        if d.HasField("trajectory"):
            t = d.trajectory
            frames = np.stack([from_png(f) for f in t.frames]) if t.frames else np.zeros((0, 0, 0, 3), np.uint8)
            trajectory = Trajectory(steps=list(t.steps), frames=frames, drift=list(t.drift), prompt_cosine=list(t.prompt_cosine))
        dreams.append(Dream(
            index=d.index, view=view_from_proto(d.view), prompt=d.prompt, seed=d.seed, source=from_png(d.source),
            image=from_png(d.image), scores=dict(d.scores),
            labels={v.vocabulary: [(label.label, label.p) for label in v.labels] for v in d.labels},
            nsfw=d.nsfw if d.HasField("nsfw") else None, trajectory=trajectory,
        ))
    return DreamResult(id=response.id, dreams=dreams, meta=meta)


def caption_to_proto(captioned, flavours) -> list[pb.ViewCaption]:
    """An ``engine.dream.interrogate.Captioned`` -> a ``ViewCaption`` per view, flavours in ``flavours``' order."""
    return [
        pb.ViewCaption(index=k, view=view_to_proto(view), caption=caption, prompt=prompt,
                       flavours=[pb.Flavour(vocabulary=name, label=labels[name][0], p=labels[name][1]) for name in flavours])
        for k, (view, caption, prompt, labels) in enumerate(
            zip(captioned.views, captioned.captions, captioned.prompts, captioned.flavours, strict=True))
    ]


def captioned_from_response(response: pb.CaptionResponse, dtype: torch.dtype = torch.float32):
    """A ``CaptionResponse`` -> the ``Captioned`` that ``engine.dream.interrogate.interrogate`` gives."""
    from engine.dream.interrogate import Captioned

    if response.status.code != 0:
        return Captioned(id=response.id, error=response.status.message)
    views = list(response.captions)
    return Captioned(
        id=response.id, views=[view_from_proto(v.view) for v in views], captions=[v.caption for v in views],
        prompts=[v.prompt for v in views], flavours=[{f.vocabulary: (f.label, f.p) for f in v.flavours} for v in views],
        embeddings=tensor_from_proto(response.embeddings, dtype) if response.HasField("embeddings") else None,
    )

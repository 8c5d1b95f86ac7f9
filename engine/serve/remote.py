"""The client's side of Dream and Caption: settings -> request templates, checked at the call against the
server's info, and the stand-ins that let ``mimetic call`` write what ``mimetic dream`` writes.

Light: no model is loaded here. A setting error is one ValueError at the call, not one failure per panorama.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import SimpleNamespace

from engine.dream.params import DreamParams
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.types import error_message, item_meta
from engine.views import DEFAULT_SIZE, view_set


def check_dream(params: DreamParams) -> None:
    """``DreamParams.check`` at the call, before any panorama is read. The vocabularies are the server's
    (checked against its info), so here each placeholder stands on a bundled one: the prompt, template,
    strength, steps, guidance, seed and trajectory are checked as the command line checks them."""
    if not isinstance(params, DreamParams):
        raise TypeError(f"dream takes a DreamParams, got {type(params).__name__}")
    keys = tuple(_placeholder(entry) for entry in params.from_labels)
    dataclasses.replace(params, from_labels=tuple(f"{key}=styles" for key in keys)).check()


def _placeholder(entry: str) -> str:
    key, sep, _ = entry.partition("=")
    return key.strip() if sep else entry.strip()


def _vocabulary(entry: str) -> str:
    _, sep, vocabulary = entry.partition("=")
    return (vocabulary if sep else entry).strip()


def check_views(views) -> None:
    """A preset by name (the error lists them), or a list of views under the ViewSpec rules; a dict's size is
    the server's model's, so only its angles are checked here."""
    if views is not None:
        view_set(views if isinstance(views, str) else [
            {**v, "width": DEFAULT_SIZE, "height": DEFAULT_SIZE} if isinstance(v, Mapping) else v for v in views
        ])


def set_views(template, views) -> int | None:
    """The request's view selection (a preset name or a list of views); returns its view count, None for a
    preset or the server's own."""
    if views is None:
        return None
    if isinstance(views, str):
        template.view_preset = views
        return len(view_set(views))
    for v in views:
        v = v if isinstance(v, Mapping) else dataclasses.asdict(v)
        template.views.views.append(pb.View(yaw=v.get("yaw", 0.0), pitch=v.get("pitch", 0.0), roll=v.get("roll", 0.0),
                                            fov=v.get("fov", 0.0)))
    return len(template.views.views)


def _timeout(template, item_timeout_s) -> None:
    if item_timeout_s is not None:
        template.timeout_ms = max(1, round(item_timeout_s * 1e3))


def dream_template(info: pb.Info, params: DreamParams, views, item_timeout_s) -> pb.DreamRequest:
    if not info.dream:
        raise ValueError("this server does not serve Dream (it was started without --sd-model)")
    known = [v.name for v in info.vocabularies]
    unknown = [entry for entry in params.from_labels if _vocabulary(entry) not in known]
    if unknown:
        raise ValueError(f"from_labels {unknown}: not among this server's vocabularies ({', '.join(known) or 'none'})")
    if params.steps > info.limits.max_dream_steps:
        raise ValueError(f"{params.steps} steps, over the server's limit of {info.limits.max_dream_steps}")
    template = pb.DreamRequest(
        from_labels=list(params.from_labels), template=params.template or "", negative_prompt=params.negative_prompt,
        strength=params.strength, steps=params.steps, seed=params.seed, trajectory_every=params.trajectory_every or 0,
        # 0 stands for the server's default: a scale that turns guidance off (<= 1) goes as 1, which is the same.
        guidance=max(1.0, params.guidance),
    )
    if params.prompt is not None:
        template.prompt = params.prompt
    count = set_views(template, views)
    if count is not None and count > info.limits.max_dream_views:
        raise ValueError(f"{count} views, over the server's limit of {info.limits.max_dream_views} per dream")
    _timeout(template, item_timeout_s)
    return template


def caption_template(info: pb.Info, flavours, beams, max_tokens, views, item_timeout_s) -> pb.CaptionRequest:
    if not info.caption:
        raise ValueError("this server does not serve Caption (it was started without --caption-model)")
    known = [v.name for v in info.vocabularies]
    unknown = [name for name in flavours or () if name not in known]
    if unknown:
        raise ValueError(f"unknown flavours {unknown}; this server reads {', '.join(known) or 'none'}")
    for name, value, most in (("beams", beams, info.captioner.beams), ("max_tokens", max_tokens, info.captioner.max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
            raise ValueError(f"{name} must be a whole number from 1 to the server's {most}, got {value!r}")
    template = pb.CaptionRequest(flavours=list(flavours or ()), beams=beams or 0, max_tokens=max_tokens or 0)
    count = set_views(template, views)
    if count is not None and info.limits.max_views and count > info.limits.max_views:
        raise ValueError(f"{count} views, over the server's limit of {info.limits.max_views} per panorama")
    _timeout(template, item_timeout_s)
    return template


def failed_dream(panorama, exc: Exception):
    from engine.dream.dream import DreamResult

    return DreamResult(id=str(getattr(panorama, "id", None)), meta=item_meta(panorama), error=error_message(panorama, exc))


def failed_caption(panorama, exc: Exception):
    from engine.dream.interrogate import Captioned

    return Captioned(id=str(getattr(panorama, "id", None)), error=error_message(panorama, exc))


# -- mimetic call: the writers of mimetic dream and mimetic caption, on the server's info ----------


def server_vocabularies(info: dict, from_labels) -> dict[str, SimpleNamespace]:
    """{placeholder: (name, template, labels_hash)} of ``from_labels`` as the server's info has them: the
    vocabularies the server read, which this machine may not have (a file given to ``mimetic serve``)."""
    found = {}
    for entry in from_labels:
        key, name = _placeholder(entry), _vocabulary(entry)
        vocabulary = info["vocabularies"][name]  # checked against the server's info at the call
        found[key if "=" in entry else name] = SimpleNamespace(name=name, template=vocabulary["template"],
                                                               labels_hash=vocabulary["labels_sha256"])
    return found


def stand_ins(info: dict) -> tuple[SimpleNamespace, SimpleNamespace]:
    """(engine, dreamer) for ``engine.dream.dream.save_dreams``: what its record says of the models, read
    from the server's info (``MimeticClient.info()``) instead of models loaded here."""
    server = info["server"]
    diffusion = next((m for m in server["models"] if m["name"] == "diffusion"), {})
    dream = server.get("diffusion") or {}
    record = {
        "folder": diffusion.get("source"), "img2img": diffusion.get("architecture"), "scheduler": dream.get("scheduler"),
        "device": diffusion.get("device"), "dtype": diffusion.get("dtype"), "attention": dream.get("attention"),
        "size": dream.get("size"), "safety_checker": dream.get("safety_checker"), "server": server.get("address"),
        "versions": {name: info["versions"].get(name) for name in ("diffusers", "transformers", "torch", "xformers")},
    }
    engine = SimpleNamespace(clip=SimpleNamespace(name=info["clip"]["model"], weights=info["clip"]["weights"], attention=info["attention"]))
    return engine, SimpleNamespace(info=lambda: record)

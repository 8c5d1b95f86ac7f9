"""Dream and Caption on the gRPC service: their requests -> Dreamer and Captioner calls, their results -> responses.

Both streams are Embed's (``engine.serve.service``): the same K slots per stream, the same check, admission
against the one decoded-bytes budget and decode in the decode pool, the same deadlines, draining and
per-item statuses. What is theirs is here, one ``Kind`` each:

* **parse**: the request's own parameters become what ``mimetic dream`` / ``mimetic caption`` would be
  given. A Dream request becomes a ``DreamParams`` whose unset fields (0, "") are the dataclass's own
  defaults, the ones the command line uses, and is checked by ``DreamParams.check``. Its ``from_labels``
  name the server's vocabularies only: a client never makes the server read a file, nor changes what
  Embed reads. The server's limits (``--max-dream-steps``, ``--max-dream-views``; the captioner's beams
  and length) give RESOURCE_EXHAUSTED.
* **measure**: the Engine's input stage, at the width the model's views need (``dream_width``,
  ``caption_width``), decoded into host pixels, as the command line decodes them.
* **run**, in the model's own worker thread: a batch from every stream, grouped by what must agree for
  one model call (``engine.dream.dream.diffusion_key``; the captioner's beams and length), through
  ``dream_batch`` / ``caption_batch``. Each view keeps its own generator, so its pixels do not depend
  on the rest of the batch. A dream checks its items at every denoising step: once each one is gone
  (its stream cancelled) or past its deadline, the call stops there and frees the model.
* **respond**: results -> responses (PNG images, made in the worker thread, off the event loop).

Metrics: ``mimetic_requests_total{method="Dream"|"Caption", code}``, ``mimetic_dream_batch_views``,
``mimetic_caption_batch_views`` and ``mimetic_dream_step_seconds`` (see ``Metrics``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from google.rpc import code_pb2

from engine.dream.dream import DreamResult, diffusion_key, dream_batch, dream_width
from engine.dream.interrogate import Captioned, caption_batch, caption_width
from engine.dream.params import DreamParams
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve import wire
from engine.serve.answers import _status, timings_ms
from engine.serve.batching import Batcher
from engine.serve.stream import Item, ItemError
from engine.vocab import load_vocabulary


class _Stopped(Exception):
    """Raised from a dream's progress callback: every item of the call is gone or past its deadline."""


def _float32(value: float) -> float:
    """A float32 from the wire as the decimal it was written as (0.6, not 0.6000000238): the same
    parameters, and the same record, as the command line's float."""
    return float(str(np.float32(value)))


def _sources(engine) -> dict[str, str]:
    """The server's vocabularies by name -> what they were loaded from (a bundled name or a file)."""
    return {load_vocabulary(source).name: str(source) for source in engine.config.vocabularies}


# -- Dream ----------------------------------------------------------------------------------------


def dream_kind(service, dreamer):
    from engine.serve.service import Kind

    config, metrics = service.config, service.metrics
    sources = _sources(service.engine)

    def parse(item: Item) -> None:
        request, name = item.request, item.item_id
        item.engine = service._engine_for(request, name)
        if item.views > config.max_dream_views:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {item.views} views, over the limit of {config.max_dream_views} "
                            "per dream (--max-dream-views)")
        labels = []
        for entry in request.from_labels:
            key, sep, vocabulary = entry.partition("=")
            vocabulary = (vocabulary if sep else entry).strip()
            if vocabulary not in sources:
                raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: from_labels {entry!r}: {vocabulary!r} is not one of this "
                                f"server's vocabularies ({', '.join(sources) or 'none'})")
            labels.append(f"{key.strip() if sep else vocabulary}={sources[vocabulary]}")
        defaults = DreamParams()
        params = DreamParams(
            prompt=request.prompt if request.HasField("prompt") else None, from_labels=tuple(labels),
            template=request.template or None, negative_prompt=request.negative_prompt,
            strength=_float32(request.strength) if request.strength else defaults.strength,
            steps=request.steps or defaults.steps, guidance=_float32(request.guidance) if request.guidance else defaults.guidance,
            seed=request.seed, trajectory_every=request.trajectory_every or None, batch_size=config.max_dream_batch,
        )
        if params.steps > config.max_dream_steps:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {params.steps} steps{'' if request.steps else ' (the default)'}, "
                            f"over the limit of {config.max_dream_steps} (--max-dream-steps)")
        try:
            params.check()
        except ValueError as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: {exc}") from None
        item.params = params

    def measure(item: Item):
        return service._measure(item, min_width=dream_width(item.engine, dreamer), host=True)

    def run(items: list[Item]) -> list:
        last = [time.monotonic()]

        def progress(_done: float) -> None:  # after every denoising step of the call
            now = time.monotonic()
            metrics.dream_step_seconds.observe(now - last[0])
            last[0] = now
            if all(i.finished or (i.deadline is not None and now > i.deadline) for i in items):
                raise _Stopped

        try:
            results = dream_batch(items[0].engine, dreamer, [(i.prepared, i.params) for i in items], progress=progress)
        except _Stopped:
            return [ItemError(code_pb2.DEADLINE_EXCEEDED, f"{i.item_id}: its deadline passed while it was dreamt; the dream "
                              "was stopped there") for i in items]
        return [(result, [wire.dream_to_proto(d) for d in result.dreams]) for result in results]

    def respond(item: Item, outcome: tuple[DreamResult, list], stats: dict, done_at: float) -> pb.DreamResponse | None:
        result, dreams = outcome
        if result.error is not None:
            service._on_error(item, code_pb2.INVALID_ARGUMENT, result.error)
            return None
        response = pb.DreamResponse(request_id=item.request_id, id=item.item_id, status=_status(code_pb2.OK), dreams=dreams)
        response.meta.CopyFrom(item.request.meta)
        response.timings_ms.update(timings_ms(item, stats, done_at))
        response.timings_ms["steps_run"] = 0 if not dreams else float(_steps_run(item.params))
        return response

    batcher = Batcher(
        service.loop, max_batch=config.max_dream_batch, max_delay_s=config.max_dream_delay_ms / 1e3, max_queue=config.max_queue,
        metrics=metrics, on_result=service._on_result, on_error=service._on_error, on_drop=service.holds.release,
        key=lambda item: (id(item.engine), diffusion_key(item.params)), run=run,
        on_batch=lambda items, views: metrics.dream_batch_views.observe(views), on_done=lambda item: None, name="mimetic-dream",
    )
    return Kind("Dream", pb.DreamResponse, parse, measure, respond, batcher,
                "ask for fewer views, or a larger trajectory_every (or none)")


def _steps_run(params: DreamParams) -> int:
    from engine.models.diffusion import img2img_steps

    return img2img_steps(params.steps, params.strength)


# -- Caption --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSettings:
    flavours: tuple[str, ...]
    beams: int
    max_tokens: int


def caption_kind(service, captioner):
    from engine.serve.service import Kind

    config, metrics = service.config, service.metrics

    def parse(item: Item) -> None:
        request, name = item.request, item.item_id
        item.engine = service._engine_for(request, name)
        if item.views > config.max_views:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {item.views} views, over the limit of {config.max_views} per item")
        known = service.engine.vocabularies
        unknown = [v for v in request.flavours if v not in known]
        if unknown:
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: unknown flavours {unknown}; this server reads {sorted(known) or 'none'}")
        flavours = tuple(request.flavours) or tuple(known)
        if len(set(flavours)) != len(flavours):
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: a flavour is given twice in {list(flavours)}")
        for field, asked, most in (("beams", request.beams, captioner.beams), ("max_tokens", request.max_tokens, captioner.max_tokens)):
            if asked > most:
                raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {field} {asked} is over the server's {most} "
                                f"(--caption-{'beams' if field == 'beams' else 'max-tokens'})")
        item.params = CaptionSettings(flavours, request.beams or captioner.beams, request.max_tokens or captioner.max_tokens)

    def measure(item: Item):
        return service._measure(item, min_width=caption_width(item.engine, captioner), host=True)

    def run(items: list[Item]) -> list[Captioned]:
        settings = items[0].params
        return caption_batch(items[0].engine, captioner, [i.prepared for i in items], [i.params.flavours for i in items],
                             beams=settings.beams, max_tokens=settings.max_tokens)

    def respond(item: Item, captioned: Captioned, stats: dict, done_at: float) -> pb.CaptionResponse | None:
        if captioned.error is not None:
            service._on_error(item, code_pb2.INVALID_ARGUMENT, captioned.error)
            return None
        response = pb.CaptionResponse(request_id=item.request_id, id=item.item_id, status=_status(code_pb2.OK),
                                      captions=wire.caption_to_proto(captioned, item.params.flavours))
        response.embeddings.CopyFrom(wire.tensor_to_proto(captioned.embeddings))
        response.meta.CopyFrom(item.request.meta)
        response.timings_ms.update(timings_ms(item, stats, done_at))
        return response

    batcher = Batcher(
        service.loop, max_batch=config.max_caption_batch, max_delay_s=config.max_delay_ms / 1e3, max_queue=config.max_queue,
        metrics=metrics, on_result=service._on_result, on_error=service._on_error, on_drop=service.holds.release,
        key=lambda item: (id(item.engine), item.params.beams, item.params.max_tokens), run=run,
        on_batch=lambda items, views: metrics.caption_batch_views.observe(views), on_done=lambda item: None, name="mimetic-caption",
    )
    return Kind("Caption", pb.CaptionResponse, parse, measure, respond, batcher, "ask for fewer views")


# -- GetInfo --------------------------------------------------------------------------------------


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_infos(engine, dreamer=None, captioner=None) -> list[dict]:
    """Each loaded model: name, architecture, source, parameter count, dtype, device (for GetInfo and the
    README's memory statement). Counted once, when the server loads."""
    clip = engine.clip
    models = [{"name": "clip", "architecture": clip.name, "source": str(clip.weights or ""), "parameters": parameters(clip.model),
               "dtype": str(clip.dtype).removeprefix("torch."), "device": str(engine.device)}]
    if dreamer is not None:
        modules = [m for m in dreamer.pipe_img2img.components.values() if isinstance(m, torch.nn.Module)]
        info = dreamer.info()
        models.append({"name": "diffusion", "architecture": info["img2img"], "source": info["folder"],
                       "parameters": sum(parameters(m) for m in modules), "dtype": info["dtype"], "device": info["device"]})
    if captioner is not None:
        info = captioner.info()
        models.append({"name": "caption", "architecture": info["architecture"], "source": info["folder"],
                       "parameters": parameters(captioner.model), "dtype": info["dtype"], "device": info["device"]})
    return models


def add_info(info: pb.Info, dreamer, captioner, models: list[dict]) -> None:
    """The Dreamer's and the Captioner's part of ``Info``: every model's size and dtype, and their settings."""
    info.models.extend(pb.ModelInfo(**model) for model in models)
    if dreamer is not None:
        d, defaults = dreamer.info(), DreamParams()
        info.diffusion.CopyFrom(pb.DreamInfo(size=d["size"], scheduler=d["scheduler"], attention=d["attention"],
                                             strength=defaults.strength, steps=defaults.steps, guidance=defaults.guidance,
                                             safety_checker=d["safety_checker"]))
    if captioner is not None:
        info.caption = True
        info.captioner.CopyFrom(pb.CaptionInfo(image_size=list(captioner.image_size), beams=captioner.beams,
                                               max_tokens=captioner.max_tokens))

"""The Engine: panoramas -> views -> CLIP embeddings and zero-shot readings, batched and overlapped.

    from engine import Engine, EngineConfig, Panorama
    eng = Engine(EngineConfig(clip_model="local-dir:models/clip"))
    results = eng.embed([Panorama(id="p1", data="rome/p1.jpg"), ...])

Read top to bottom, one batch is: decode (a bounded thread pool, running ahead of the model) ->
reproject every view of a group of panoramas in one kernel launch, normalised with the model's own
mean and std at the model's own input size -> one model call -> per-panorama embeddings, pooled
embedding and readings. Decoding is prefetched while the kernel and the model run (both release
the GIL), so on the CPU the model is the only thing the caller waits for. On CUDA the panoramas
are pinned, copied without blocking and reprojected on a stream of their own.

The input stage is ``prepare`` (every check an input gets, once, from its header: its fields, the 2:1
shape, the pixel limit, the decode cost) and ``decode``. ``embed_iter`` runs both on each Panorama;
a shell that decodes in threads of its own (the gRPC server) calls them itself and hands the Engine
the Prepared items, which it checks no more. ``with_views`` gives the same Engine with other views.

One bad item never fails the others: it comes back as an ``EmbedResult`` with ``error`` set, in
its place in the input order.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from engine.budget import DecodeBudget
from engine.config import EngineConfig
from engine.decode import (
    DecodeError,
    check_pixels,
    decode_cost,
    decode_image,
    decode_jpeg_batch_cuda,
    read_header,
    required_width,
)
from engine.models.caption import Captioner
from engine.models.clip import ZERO_SHOT_LOGIT_SCALE, ClipModel, load_clip
from engine.models.device import package_versions
from engine.types import (
    EmbedResult,
    InvalidPanoramaError,
    Panorama,
    Prepared,
    array_header,
    check_equirectangular,
    check_panorama,
    error_message,
    item_meta,
    read_bytes,
)
from engine.views import view_set
from engine.vocab import TextEmbeddingCache, Vocabulary, load_vocabulary
from kernels import ViewSpec, reproject
from kernels.geometry import wrap_degrees

# The plain data lives in engine.types; these names stay importable from here too.
__all__ = [
    "EmbedResult", "Engine", "InvalidPanoramaError", "Panorama", "Prepared", "check_equirectangular", "read_bytes",
]

_ENCODED = (bytes, bytearray, memoryview, str, os.PathLike)
_END = object()
THUMBNAIL_QUALITY = 85  # JPEG quality of the thumbnails


def _failed_future(exc: Exception) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def _done_future(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _check_thumbnail_size(size) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"thumbnails must be a width in pixels (a positive int) or None, got {size!r}")


def _as_tensor(pano) -> torch.Tensor:
    if isinstance(pano, torch.Tensor):
        return pano
    with warnings.catch_warnings():  # a read-only caller array is fine: the kernel only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(pano)


class Engine:
    """One loaded model, one view set, the vocabularies' text embeddings; ``embed`` runs the pipeline."""

    def __init__(self, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if config.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {config.batch_size}")
        if isinstance(config.max_decode_mib, bool) or not isinstance(config.max_decode_mib, int) or config.max_decode_mib <= 0:
            raise ValueError(f"max_decode_mib must be a positive number of MiB, got {config.max_decode_mib!r}")
        # One budget of decoded bytes for everything decoding for this Engine: its own pool, and a
        # server's streams (engine.serve.server), which share it through the Engine.
        self.decode_budget = DecodeBudget(config.max_decode_mib * 2**20)
        self.clip: ClipModel = load_clip(
            config.clip_model,
            config.clip_weights,
            random_weights=config.random_weights,
            device=config.device,
            attention=config.attention,
            compile=config.compile,
            seed=config.seed,
            precision=config.precision,
        )
        self.device = self.clip.device
        height, width = self.clip.image_size
        self.views = [
            ViewSpec(v.yaw, v.pitch, v.roll, v.fov, width, height) for v in view_set(config.views, size=width)
        ]
        # Decode large JPEGs at the smallest DCT scale that still gives each view's centre pixel a
        # full panorama pixel (libjpeg's 1/2, 1/4, 1/8): 3x faster for a 4096-wide panorama and 224 px
        # views. Towards the view edges pixels are up to 2-3x denser and sample it slightly magnified.
        self.min_decode_width = required_width(self.views)
        self.normalize = (self.clip.mean, self.clip.std)
        self._text_cache = TextEmbeddingCache()
        self.vocabularies: dict[str, Vocabulary] = {}
        self._label_embeddings: dict[str, torch.Tensor] = {}
        for name in config.vocabularies:
            self.add_vocabulary(name)
        self._prep_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # On CUDA, JPEGs are decoded by nvJPEG, a group at a time; elsewhere by libjpeg with DCT scaling.
        self.decode_on_device = self.device.type == "cuda"

    # -- text ---------------------------------------------------------------------------------

    def add_vocabulary(self, name_or_path: str) -> Vocabulary:
        """Load a bundled or user vocabulary and cache its label embeddings for this model."""
        vocabulary = load_vocabulary(name_or_path)
        model_key = f"{self.clip.name}|{self.clip.weights}|{self.clip.precision}"  # bf16 labels differ from fp32 ones
        embeddings = self._text_cache.get(model_key, vocabulary, self.clip.encode_text)
        self.vocabularies[vocabulary.name] = vocabulary
        self._label_embeddings[vocabulary.name] = embeddings.to(self.device, torch.float32)
        return vocabulary

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) L2-normalised text embeddings, on the CPU."""
        if not texts:
            raise ValueError("embed_text needs at least one text")
        return self.clip.encode_text(list(texts)).cpu()

    # -- views --------------------------------------------------------------------------------

    def with_views(self, views: str | Sequence[ViewSpec | Mapping]) -> Engine:
        """This Engine with other views: the same model, vocabularies, decode budget and settings, its own
        ``views`` and ``min_decode_width``. Returns this Engine itself when the views are its own.

        ``views``: a preset name, or ViewSpecs and/or dicts (a dict without a size gets the model's input
        size). Views are cut at the model's input size; a view of another size is a ValueError.
        """
        height, width = self.clip.image_size
        if isinstance(views, str):
            resolved = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, width, height) for v in view_set(views, size=width)]
        elif isinstance(views, Sequence):
            resolved = view_set([{"width": width, "height": height, **v} if isinstance(v, Mapping) else v for v in views])
            for index, view in enumerate(resolved):
                if (view.width, view.height) != (width, height):
                    raise ValueError(
                        f"view {index} is {view.width}x{view.height}: views are cut at the model's input size {width}x{height}"
                    )
        else:
            raise ValueError(f"views must be a preset name or a list of views, got {type(views).__name__}")
        if resolved == self.views:
            return self
        variant = copy.copy(self)  # shares the model, the vocabularies, the budget, the CUDA stream
        variant.views = resolved
        variant.min_decode_width = required_width(resolved)
        return variant

    # -- the input stage ----------------------------------------------------------------------

    def prepare(self, panorama: Panorama, *, thumbnails: int | None = None, min_width: int | None = None,
                host: bool = False) -> Prepared:
        """Check one input and read what decoding it will cost from its header: no pixel is decoded.

        The one place an input is checked: its fields (``check_panorama``), the 2:1 shape and the pixel
        limit of the image's full size, before any reduced decoding. Raises TypeError for anything but a
        Panorama and DecodeError (a ValueError) naming the item otherwise: ``ImageTooLargeError`` over
        ``max_pixels``, ``InvalidPanoramaError`` for its fields.

        ``thumbnails``: the width of a JPEG per view in its result. ``min_width``: decode a JPEG at least
        this wide (default: what this Engine's views need). ``host``: decode it into a NumPy array on the
        CPU whatever the device, for a caller that uses the pixels itself.
        """
        check_panorama(panorama)
        _check_thumbnail_size(thumbnails)
        data = panorama.data
        header = read_header(data, name=panorama.id) if isinstance(data, _ENCODED) else array_header(data)
        check_equirectangular(panorama.id, (header.height, header.width))
        check_pixels(panorama.id, header.width, header.height, self.config.max_pixels)
        on_device = self.decode_on_device and not host and header.format is not None
        min_width = self.min_decode_width if min_width is None else min_width
        # nvJPEG has no DCT scaling: decoded there, a JPEG costs its full size.
        cost = decode_cost(header, min_width=None if on_device else min_width)
        return Prepared(panorama, wrap_degrees(panorama.yaw_offset), header, cost, min_width, on_device, host, thumbnails)

    def decode(self, prepared: Prepared) -> Prepared:
        """Decode a prepared input (any thread: PIL releases the GIL) into ``prepared.pixels``, and return it.

        A JPEG is decoded at the smallest DCT scale that keeps ``min_width`` columns. With nvJPEG in use
        (``on_device``) it is only read here, and decoded with its whole group on the GPU. The Engine's own
        hold in its budget shrinks to the array it keeps. ``prepare`` checked the pixel limit from the
        header; a file is held to it again, since it may have changed since.
        """
        item, data = prepared.panorama, prepared.panorama.data
        if prepared.on_device:
            prepared.pixels = read_bytes(data, item.id)
            return prepared
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        max_pixels = self.config.max_pixels if isinstance(data, (str, os.PathLike)) else None
        pano = decode_image(data, name=item.id, max_pixels=max_pixels, min_width=prepared.min_width)
        if prepared.reservation is not None:
            prepared.reservation.shrink(pano.nbytes)  # the decoder's scratch is gone
        if self._prep_stream is not None and not prepared.host:
            pano = _as_tensor(pano).pin_memory()  # lets the copy to the GPU run asynchronously
        prepared.pixels = pano
        return prepared

    # -- images -------------------------------------------------------------------------------

    def embed(self, panoramas: Iterable[Panorama | Prepared], *, thumbnails: int | None = None,
              captioner: Captioner | None = None) -> list[EmbedResult]:
        """Embed every panorama; results in input order, failures in place with ``error`` set."""
        return list(self.embed_iter(panoramas, thumbnails=thumbnails, captioner=captioner))

    def embed_iter(self, panoramas: Iterable[Panorama | Prepared], *, thumbnails: int | None = None,
                   captioner: Captioner | None = None) -> Iterator[EmbedResult]:
        """Like ``embed``, but yields each result, in input order, as soon as its batch is done.

        Each input is a Panorama, or a Prepared (``prepare``, perhaps ``decode`` too), which is checked
        no more. ``thumbnails``: a JPEG per view, this many pixels wide, in each result (``EmbedResult.thumbnails``).
        ``captioner``: also caption every view (``EmbedResult.captions``), cut by the kernel at the
        captioner's size from the same decoded panorama, which is then decoded as wide as either needs.

        Memory: each encoded input is admitted against ``decode_budget`` (its cost read from its header)
        before it is decoded, and holds its decoded size until its group has been embedded. When the
        budget is short, what is already decoded is embedded first, to make room. An array, or a
        Prepared already decoded, is the caller's memory: nothing is held for it.
        """
        _check_thumbnail_size(thumbnails)  # at the call, not at the first result
        return self._embed_iter(panoramas, thumbnails, captioner)

    def _embed_iter(self, panoramas: Iterable, thumbnails: int | None, captioner) -> Iterator[EmbedResult]:
        min_width = self.min_decode_width
        if captioner is not None:
            min_width = max(min_width, required_width(captioner.views(self.views)))
        flush = functools.partial(self._flush, captioner=captioner)
        views_per_pano = len(self.views)
        group_size = max(1, self.config.batch_size // views_per_pano)
        workers = max(1, self.config.decode_workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="mimetic-decode")
        window: deque[tuple[object, Future]] = deque()  # decoding, in input order
        group: list[Prepared] = []  # decoded, waiting for the kernel and the model
        waiting: Prepared | None = None  # checked, not yet admitted: no room in the budget
        try:
            # Bounded prefetch: one group plus one image per worker ahead, so memory stays flat.
            ahead = group_size + workers
            source = iter(panoramas)
            exhausted = False
            while True:
                while not exhausted and len(window) < ahead:
                    if waiting is None:
                        item = next(source, _END)
                        if item is _END:
                            exhausted = True
                            break
                        if isinstance(item, Prepared) and item.pixels is not None:
                            window.append((item, _done_future(item)))  # decoded by the caller
                            continue
                        try:
                            waiting = item if isinstance(item, Prepared) else self.prepare(item, thumbnails=thumbnails, min_width=min_width)
                        except (DecodeError, ValueError, TypeError) as exc:
                            window.append((item, _failed_future(exc)))  # answered in its place
                            continue
                    try:
                        # Wait for room only when nothing of ours holds any: else make room first.
                        if not self._reserve(waiting, wait=not window and not group):
                            break
                    except DecodeError as exc:  # it can never fit
                        window.append((waiting, _failed_future(exc)))
                        waiting = None
                        continue
                    window.append((waiting, pool.submit(self.decode, waiting)))
                    waiting = None
                if not window:
                    if waiting is None:
                        break
                    yield from flush(group)  # the budget is held by our own group: embed it
                    group = []
                    continue
                entry, future = window.popleft()
                try:
                    group.append(future.result())
                except (DecodeError, ValueError, TypeError) as exc:
                    if isinstance(entry, Prepared):
                        entry.release()
                    yield from flush(group)  # keep input order: flush what came before
                    group = []
                    yield self._failed(entry, exc)
                    continue
                if len(group) == group_size:
                    yield from flush(group)
                    group = []
            yield from flush(group)
        finally:
            # A generator abandoned half-way is closed wherever it is collected, possibly inside
            # another thread's start-up: never block there. Pending decodes are cancelled.
            pool.shutdown(wait=False, cancel_futures=True)
            for entry in [e for e, _ in window] + group + [waiting]:
                if isinstance(entry, Prepared):
                    entry.release()

    def _reserve(self, prepared: Prepared, *, wait: bool) -> bool:
        """Hold the input's cost in the decode budget; False when there is no room and ``wait`` is off."""
        if not prepared.encoded:
            return True  # an array: the caller's memory, already spent
        budget = self.decode_budget
        if wait:
            prepared.reservation = budget.acquire(prepared.cost, item=prepared.id)
        else:
            prepared.reservation = budget.try_acquire(prepared.cost, item=prepared.id)
        return prepared.reservation is not None

    def _decode_on_device(self, group: list[Prepared]) -> list:
        """Each item's panorama: its pixels, or the group's encoded ones decoded in one batched nvJPEG call
        (a failure stays with its item, as its DecodeError)."""
        panos = [p.pixels for p in group]
        encoded = [k for k, pano in enumerate(panos) if isinstance(pano, bytes)]
        if not encoded:
            return panos
        from_file = any(isinstance(group[k].panorama.data, (str, os.PathLike)) for k in encoded)  # see ``decode``
        decoded = decode_jpeg_batch_cuda(
            [panos[k] for k in encoded], [group[k].id for k in encoded],
            device=self.device, max_pixels=self.config.max_pixels if from_file else None,
        )
        for k, pano in zip(encoded, decoded, strict=True):
            panos[k] = pano
        return panos

    def _failed(self, item, exc: Exception) -> EmbedResult:
        """The item's result with its error: the message names the item once."""
        if isinstance(item, Prepared):
            item = item.panorama
        return EmbedResult(id=str(getattr(item, "id", None)), views=self.views, meta=item_meta(item), error=error_message(item, exc))

    def _flush(self, group: list[Prepared], captioner=None) -> list[EmbedResult]:
        """Embed a group, then give its decode budget back."""
        try:
            return self._run_group(group, captioner)
        finally:
            for prepared in group:
                prepared.release()

    def _run_group(self, group: list[Prepared], captioner=None) -> list[EmbedResult]:
        """Reproject a group of panoramas in one launch, embed all their views in one model call (and caption
        them in the captioner's batches)."""
        panos = self._decode_on_device(group)
        ready = [k for k, pano in enumerate(panos) if not isinstance(pano, DecodeError)]
        embedded = {}
        if ready:
            items = [group[k] for k in ready]
            views = self._reproject([panos[k] for k in ready], [p.yaw_offset for p in items])
            count = len(self.views)
            flat = views.reshape(len(items) * count, *views.shape[2:])
            embeddings = torch.cat(
                [self.clip.encode_images(chunk) for chunk in flat.split(self.config.batch_size)]
            ).view(len(items), count, -1)
            thumbnails = [self._thumbnails(panos[k], group[k]) if group[k].thumbnail_size else [] for k in ready]
            results = self._results(items, embeddings, thumbnails)
            if captioner is not None:
                cut = captioner.render([panos[k] for k in ready], self.views, [p.yaw_offset for p in items],
                                       antialias=self.config.antialias)
                captions = captioner.caption(cut.reshape(-1, *cut.shape[2:]))
                for m, result in enumerate(results):
                    result.captions = captions[m * count : (m + 1) * count]
            embedded = dict(zip(ready, results, strict=True))
        return [embedded[k] if k in embedded else self._failed(p, panos[k]) for k, p in enumerate(group)]

    def _reproject(self, panos: list, yaw_offsets: list[float]) -> torch.Tensor:
        """(M, N, 3, h, w) views in the model's dtype, normalised with its mean and std, on its device."""
        kwargs = {
            "out_dtype": self.clip.dtype,
            "normalize": self.normalize,
            "antialias": self.config.antialias,
            "yaw_offsets": torch.tensor(yaw_offsets, dtype=torch.float64),
        }
        tensors = [_as_tensor(p) for p in panos]
        if self._prep_stream is None:
            return reproject(tensors, self.views, **kwargs)
        # CUDA: copy and reproject on the prep stream, so the next group's copy overlaps the model.
        with torch.cuda.stream(self._prep_stream):
            on_device = [p.to(self.device, non_blocking=True) for p in tensors]
            views = reproject(on_device, self.views, **kwargs)
        torch.cuda.current_stream(self.device).wait_stream(self._prep_stream)
        for tensor in (*on_device, views):
            tensor.record_stream(torch.cuda.current_stream(self.device))
        return views

    def view_images(self, prepared: Prepared, views: Sequence[ViewSpec]) -> np.ndarray:
        """``views`` of a decoded input as uint8 (N, h, w, 3) images, cut by the kernel with the Engine's
        antialiasing and the input's yaw offset: what a caller that shows or re-reads a view uses."""
        return self._cut(prepared.pixels, prepared.yaw_offset, views)

    def _cut(self, pano, yaw_offset: float, views: Sequence[ViewSpec]) -> np.ndarray:
        out = reproject([_as_tensor(pano).to(self.device)], list(views), out_dtype=torch.uint8, layout="NHWC",
                        antialias=self.config.antialias, yaw_offsets=torch.tensor([yaw_offset], dtype=torch.float64))
        return out[0].cpu().numpy()

    def _thumbnails(self, pano, prepared: Prepared) -> list[bytes]:
        """A JPEG per view, ``thumbnail_size`` pixels wide (its height by the view's aspect), cut by the kernel
        from the same decoded panorama as the views the model sees."""
        size = prepared.thumbnail_size
        small = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, size, max(1, round(size * v.height / v.width))) for v in self.views]
        thumbnails = []
        for view in self._cut(pano, prepared.yaw_offset, small):
            buffer = io.BytesIO()
            Image.fromarray(view).save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
            thumbnails.append(buffer.getvalue())
        return thumbnails

    def _results(self, items: list[Prepared], embeddings: torch.Tensor, thumbnails: list[list[bytes]]) -> list[EmbedResult]:
        """(M, N, D) view embeddings -> M results. Readings for the whole group are computed on the
        model's device and copied back once, not once per panorama."""
        views = embeddings.float()
        pooled = torch.nn.functional.normalize(views.mean(dim=1), dim=1)
        readings = {name: self._read(name, views, pooled) for name in self.vocabularies}
        embeddings, pooled_out = embeddings.cpu(), pooled.to(self.clip.embedding_dtype).cpu()
        return [
            EmbedResult(
                id=item.id,
                views=self.views,
                embeddings=embeddings[m],
                pooled=pooled_out[m],
                readings={name: {"pooled": r["pooled"][m], "views": r["views"][m]} for name, r in readings.items()},
                meta=item.meta,
                thumbnails=thumbnails[m],
            )
            for m, item in enumerate(items)
        ]

    def _read(self, name: str, views: torch.Tensor, pooled: torch.Tensor) -> dict:
        """Top-k (label, probability) per view and pooled: softmax(100 * cos) over the vocabulary.

        ``views`` is (M, N, D) and ``pooled`` (M, D); returns {"pooled": M lists, "views": M x N lists}.
        """
        labels = self.vocabularies[name].labels
        text = self._label_embeddings[name]
        k = min(self.config.top_k, len(labels))

        def top(probabilities: torch.Tensor) -> list[list[tuple[str, float]]]:
            values, indices = probabilities.reshape(-1, len(labels)).topk(k, dim=-1)  # one copy back each
            return [
                [(labels[i], p) for p, i in zip(row_values, row_indices, strict=True)]
                for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
            ]

        count = views.shape[1]
        per_view = top((ZERO_SHOT_LOGIT_SCALE * views @ text.T).softmax(dim=-1))
        overall = top((ZERO_SHOT_LOGIT_SCALE * pooled @ text.T).softmax(dim=-1))
        return {"pooled": overall, "views": [per_view[m * count : (m + 1) * count] for m in range(len(overall))]}

    # -- introspection ------------------------------------------------------------------------

    def info(self) -> dict:
        """Everything needed to reproduce or compare a run: models, dims, device, backends, views, versions."""
        versions = package_versions(("mimetic", "torch", "open_clip_torch", "triton", "numba", "numpy", "pillow"))
        return {
            "clip": {
                "model": self.clip.name,
                "weights": self.clip.weights,
                "embed_dim": self.clip.embed_dim,
                "image_size": list(self.clip.image_size),
                "mean": list(self.clip.mean),
                "std": list(self.clip.std),
                "compiled": self.clip.compiled,
            },
            "device": str(self.device),
            "dtype": str(self.clip.dtype).removeprefix("torch."),
            "precision": self.clip.precision,  # what --precision resolved to, and why
            "precision_reason": self.clip.precision_reason,
            "embedding_dtype": str(self.clip.embedding_dtype).removeprefix("torch."),
            "attention": self.clip.attention,
            "reprojection": {
                "backend": "triton" if self.device.type == "cuda" else "numba",
                "antialias": self.config.antialias,
                "min_decode_width": self.min_decode_width,
            },
            "views": [asdict(view) for view in self.views],
            "vocabularies": {
                name: {"template": v.template, "labels": len(v.labels), "labels_sha256": v.labels_hash}
                for name, v in self.vocabularies.items()
            },
            "seed": self.config.seed if self.config.random_weights else None,  # of the untrained weights
            # The settings as given, as JSON has them (lists, not tuples): what a results file records, so that
            # `mimetic query` and `mimetic report` rebuild this model from a file made here or by a server.
            "config": json.loads(json.dumps(asdict(self.config), default=str)),
            "decode_budget_mib": self.config.max_decode_mib,
            "batch_size": self.config.batch_size,
            "top_k": self.config.top_k,
            "versions": versions,
        }

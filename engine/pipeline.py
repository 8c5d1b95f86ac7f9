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

One bad item never fails the others: it comes back as an ``EmbedResult`` with ``error`` set, in
its place in the input order.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from engine.budget import DecodeBudget, Reservation
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
from engine.models.clip import ZERO_SHOT_LOGIT_SCALE, ClipModel, load_clip
from engine.views import view_set
from engine.vocab import TextEmbeddingCache, Vocabulary, load_vocabulary
from kernels import ViewSpec, reproject
from kernels.geometry import wrap_degrees


@dataclass
class Panorama:
    """One input: an id, the image (encoded bytes, a path, or a uint8 array), and metadata echoed back.

    ``yaw_offset`` (degrees) is added to every view's yaw, e.g. to point views at compass bearings.
    """

    id: str
    data: bytes | str | os.PathLike | np.ndarray | torch.Tensor
    meta: dict = field(default_factory=dict)
    yaw_offset: float = 0.0


@dataclass
class EmbedResult:
    """What the engine saw in one panorama; ``error`` names the item and the reason when it failed."""

    id: str
    views: list[ViewSpec]
    embeddings: torch.Tensor | None = None  # (N, D), L2-normalised; fp16 on CUDA, fp32 on CPU
    pooled: torch.Tensor | None = None  # (D,), the normalised mean of the view embeddings
    readings: dict = field(default_factory=dict)  # vocabulary -> {"pooled": [(label, p)], "views": [[(label, p)]]}
    meta: dict = field(default_factory=dict)
    error: str | None = None


def read_bytes(data, item_id: str) -> bytes:
    """Encoded bytes of a path or bytes input; an unreadable or empty file is a DecodeError naming the item."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        blob = bytes(data)
    else:
        try:
            with open(data, "rb") as stream:
                blob = stream.read()
        except OSError as exc:
            raise DecodeError(item_id, f"cannot read the file ({exc.strerror or exc})") from exc
    if not blob:
        raise DecodeError(item_id, "empty input (0 bytes)")
    return blob


def check_equirectangular(item_id: str, shape: tuple) -> None:
    """A 2:1 (height, width, ...) shape, or a DecodeError naming the item and the size it has."""
    height, width = shape[:2]
    if width != 2 * height:
        raise DecodeError(item_id, f"equirectangular panoramas are 2:1, got {width}x{height}")


class InvalidPanoramaError(DecodeError):
    """A Panorama whose fields (not its image) are wrong: an empty id, a yaw_offset that is not a finite number."""


@dataclass
class _Admitted:
    """An input that passed the checks: its decode cost, and the bytes held for it in the decode budget."""

    item: Panorama
    cost: int
    yaw_offset: float  # reduced to [-180, 180) exactly (kernels.geometry.wrap_degrees)
    reservation: Reservation | None = None

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


def _failed_future(exc: Exception) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


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
        model_key = f"{self.clip.name}|{self.clip.weights}"
        embeddings = self._text_cache.get(model_key, vocabulary, self.clip.encode_text)
        self.vocabularies[vocabulary.name] = vocabulary
        self._label_embeddings[vocabulary.name] = embeddings.to(self.device, torch.float32)
        return vocabulary

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) L2-normalised text embeddings, on the CPU."""
        if not texts:
            raise ValueError("embed_text needs at least one text")
        return self.clip.encode_text(list(texts)).cpu()

    # -- images -------------------------------------------------------------------------------

    def embed(self, panoramas: Iterable[Panorama]) -> list[EmbedResult]:
        """Embed every panorama; results in input order, failures in place with ``error`` set."""
        return list(self.embed_iter(panoramas))

    def embed_iter(self, panoramas: Iterable[Panorama]) -> Iterator[EmbedResult]:
        """Like ``embed``, but yields each result, in input order, as soon as its batch is done.

        Memory: each input is admitted against ``decode_budget`` (its cost read from its header)
        before it is decoded, and holds its decoded size until its group has been embedded. When the
        budget is short, what is already decoded is embedded first, to make room.
        """
        views_per_pano = len(self.views)
        group_size = max(1, self.config.batch_size // views_per_pano)
        workers = max(1, self.config.decode_workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="mimetic-decode")
        window: deque[tuple[_Admitted | Panorama, Future]] = deque()  # decoding, in input order
        group: list[tuple[_Admitted, object]] = []  # decoded, waiting for the kernel and the model
        waiting: _Admitted | None = None  # checked, not yet admitted: no room in the budget
        try:
            # Bounded prefetch: one group plus one image per worker ahead, so memory stays flat.
            ahead = group_size + workers
            source = iter(panoramas)
            exhausted = False
            while True:
                while not exhausted and len(window) < ahead:
                    if waiting is None:
                        item = next(source, None)
                        if item is None:
                            exhausted = True
                            break
                        try:
                            waiting = self._check(item)
                        except (DecodeError, ValueError, TypeError) as exc:
                            window.append((item, _failed_future(exc)))  # answered in its place
                            continue
                    try:
                        # Wait for room only when nothing of ours holds any: else make room first.
                        if not self._reserve(waiting, wait=not window and not group):
                            break
                    except DecodeError as exc:  # it can never fit
                        window.append((waiting.item, _failed_future(exc)))
                        waiting = None
                        continue
                    window.append((waiting, pool.submit(self._decode, waiting)))
                    waiting = None
                if not window:
                    if waiting is None:
                        break
                    yield from self._flush(group)  # the budget is held by our own group: embed it
                    group = []
                    continue
                admitted, future = window.popleft()
                try:
                    group.append((admitted, future.result()))
                except (DecodeError, ValueError, TypeError) as exc:
                    if isinstance(admitted, _Admitted):
                        admitted.release()
                    yield from self._flush(group)  # keep input order: flush what came before
                    group = []
                    yield self._failed(getattr(admitted, "item", admitted), exc)
                    continue
                if len(group) == group_size:
                    yield from self._flush(group)
                    group = []
            yield from self._flush(group)
        finally:
            # A generator abandoned half-way is closed wherever it is collected, possibly inside
            # another thread's start-up: never block there. Pending decodes are cancelled.
            pool.shutdown(wait=False, cancel_futures=True)
            for admitted in [a for a, _ in window] + [a for a, _ in group] + [waiting]:
                if isinstance(admitted, _Admitted):
                    admitted.release()

    def _check(self, item: Panorama) -> _Admitted:
        """Validate an input and read what decoding it will cost, from its header: no pixel is decoded.

        A panorama that is not 2:1 is refused here, with the size its file has.
        """
        if not isinstance(item, Panorama):
            raise TypeError(f"expected a Panorama, got {type(item).__name__}")
        if not isinstance(item.id, str) or not item.id:
            raise InvalidPanoramaError(repr(item.id), "panorama id must be a non-empty string")
        offset = item.yaw_offset
        if isinstance(offset, bool) or not isinstance(offset, (int, float, np.integer, np.floating)) or not math.isfinite(offset):
            raise InvalidPanoramaError(item.id, f"yaw_offset must be a finite number of degrees, got {offset!r}")
        data = item.data
        if isinstance(data, (np.ndarray, torch.Tensor)):
            return _Admitted(item, 0, wrap_degrees(offset))  # the caller's memory, already spent
        if not isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike)):
            raise InvalidPanoramaError(item.id, f"data must be a path, bytes or a uint8 array, got {type(data).__name__}")
        header = read_header(data, name=item.id)
        check_equirectangular(item.id, (header.height, header.width))
        check_pixels(item.id, header.width, header.height, self.config.max_pixels)
        min_width = None if self.decode_on_device else self.min_decode_width
        return _Admitted(item, decode_cost(header, min_width=min_width), wrap_degrees(offset))

    def _reserve(self, admitted: _Admitted, *, wait: bool) -> bool:
        """Hold the input's cost in the decode budget; False when there is no room and ``wait`` is off."""
        if admitted.cost == 0:
            return True
        budget = self.decode_budget
        if wait:
            admitted.reservation = budget.acquire(admitted.cost, item=admitted.item.id)
        else:
            admitted.reservation = budget.try_acquire(admitted.cost, item=admitted.item.id)
        return admitted.reservation is not None

    def _decode(self, admitted: _Admitted) -> np.ndarray | torch.Tensor | bytes:
        """In a worker thread: a 2:1 uint8 (H, W, 3) panorama; the reservation shrinks to what it holds.

        With nvJPEG in use, encoded input is only read here (bytes) and decoded on the GPU for the
        whole group at once, in ``_decode_on_device``.
        """
        item = admitted.item
        data = item.data
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        if self.decode_on_device and isinstance(data, (bytes, bytearray, memoryview, str, os.PathLike)):
            return read_bytes(data, item.id)
        pano = decode_image(data, name=item.id, max_pixels=self.config.max_pixels, min_width=self.min_decode_width)
        check_equirectangular(item.id, pano.shape)
        if admitted.reservation is not None:
            admitted.reservation.shrink(pano.nbytes)  # the decoder's scratch is gone
        if self.device.type == "cuda":
            return torch.from_numpy(pano).pin_memory()  # lets the copy to the GPU run asynchronously
        return pano

    def _decode_on_device(self, group: list[tuple[_Admitted, object]]) -> list[tuple[_Admitted, object]]:
        """Decode the group's encoded panoramas in one batched nvJPEG call; a failure stays with its item."""
        encoded = [k for k, (_, payload) in enumerate(group) if isinstance(payload, bytes)]
        if not encoded:
            return group
        decoded = decode_jpeg_batch_cuda(
            [group[k][1] for k in encoded], [group[k][0].item.id for k in encoded],
            device=self.device, max_pixels=self.config.max_pixels,
        )
        group = list(group)
        for k, pano in zip(encoded, decoded, strict=True):
            if not isinstance(pano, DecodeError):
                try:
                    check_equirectangular(group[k][0].item.id, tuple(pano.shape))
                except DecodeError as exc:
                    pano = exc
            group[k] = (group[k][0], pano)
        return group

    def _failed(self, item, exc: Exception) -> EmbedResult:
        """The item's result with its error: the message names the item once."""
        item_id = getattr(item, "id", None)
        message = str(exc) if isinstance(exc, DecodeError) else f"{item_id}: {exc}"
        meta = getattr(item, "meta", {}) if isinstance(getattr(item, "meta", None), dict) else {}
        return EmbedResult(id=str(item_id), views=self.views, meta=meta, error=message)

    def _flush(self, group: list[tuple[_Admitted, object]]) -> list[EmbedResult]:
        """Embed a group, then give its decode budget back."""
        try:
            return self._run_group(group)
        finally:
            for admitted, _ in group:
                admitted.release()

    def _run_group(self, group: list[tuple[_Admitted, object]]) -> list[EmbedResult]:
        """Reproject a group of panoramas in one launch, embed all their views in one model call."""
        group = self._decode_on_device(group)
        ready = [(admitted, pano) for admitted, pano in group if not isinstance(pano, DecodeError)]
        embedded = {}
        if ready:
            items = [admitted.item for admitted, _ in ready]
            views = self._reproject([pano for _, pano in ready], [admitted.yaw_offset for admitted, _ in ready])
            count = len(self.views)
            flat = views.reshape(len(items) * count, *views.shape[2:])
            embeddings = torch.cat(
                [self.clip.encode_images(chunk) for chunk in flat.split(self.config.batch_size)]
            ).view(len(items), count, -1)
            embedded = {id(item): result for item, result in zip(items, self._results(items, embeddings), strict=True)}
        return [
            embedded[id(admitted.item)] if id(admitted.item) in embedded else self._failed(admitted.item, pano)
            for admitted, pano in group
        ]

    def _reproject(self, panos: list, yaw_offsets: list[float]) -> torch.Tensor:
        """(M, N, 3, h, w) views in the model's dtype, normalised with its mean and std, on its device."""
        kwargs = {
            "out_dtype": self.clip.dtype,
            "normalize": self.normalize,
            "antialias": self.config.antialias,
            "yaw_offsets": torch.tensor(yaw_offsets, dtype=torch.float64),
        }
        if self._prep_stream is None:
            with warnings.catch_warnings():  # a read-only caller array is fine: the kernel only reads it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tensors = [p if isinstance(p, torch.Tensor) else torch.from_numpy(p) for p in panos]
            return reproject(tensors, self.views, **kwargs)
        # CUDA: copy and reproject on the prep stream, so the next group's copy overlaps the model.
        with torch.cuda.stream(self._prep_stream):
            on_device = [p.to(self.device, non_blocking=True) for p in panos]
            views = reproject(on_device, self.views, **kwargs)
        torch.cuda.current_stream(self.device).wait_stream(self._prep_stream)
        for tensor in (*on_device, views):
            tensor.record_stream(torch.cuda.current_stream(self.device))
        return views

    def _results(self, items: list[Panorama], embeddings: torch.Tensor) -> list[EmbedResult]:
        """(M, N, D) view embeddings -> M results. Readings for the whole group are computed on the
        model's device and copied back once, not once per panorama."""
        views = embeddings.float()
        pooled = torch.nn.functional.normalize(views.mean(dim=1), dim=1)
        readings = {name: self._read(name, views, pooled) for name in self.vocabularies}
        embeddings, pooled_out = embeddings.cpu(), pooled.to(self.clip.dtype).cpu()
        return [
            EmbedResult(
                id=item.id,
                views=self.views,
                embeddings=embeddings[m],
                pooled=pooled_out[m],
                readings={name: {"pooled": r["pooled"][m], "views": r["views"][m]} for name, r in readings.items()},
                meta=item.meta,
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
        versions = {}
        for package in ("mimetic", "torch", "open_clip_torch", "triton", "numba", "numpy", "pillow"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
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
            "attention": self.clip.attention,
            "reprojection": {
                "backend": "triton" if self.device.type == "cuda" else "numba",
                "antialias": self.config.antialias,
                "min_decode_width": self.min_decode_width,
            },
            "views": [asdict(view) for view in self.views],
            "vocabularies": {
                name: {"template": v.template, "labels": len(v.labels)} for name, v in self.vocabularies.items()
            },
            "seed": self.config.seed if self.config.random_weights else None,  # of the untrained weights
            "decode_budget_mib": self.config.max_decode_mib,
            "batch_size": self.config.batch_size,
            "top_k": self.config.top_k,
            "versions": versions,
        }

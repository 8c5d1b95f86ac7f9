"""Captions through transformers: ``Captioner`` loads a local folder and turns batches of views into text.

    from engine.models.caption import Captioner
    captioner = Captioner("models/caption")            # a transformers folder: config.json, weights, processor files
    pixels = captioner.render(panos, views)             # (M, N, 3, S, S), normalised with the processor's mean and std
    captioner.caption(pixels[0])                        # ['a street with a church', ...], one per view

Loading (DESIGN.md, "Weights"): the folder is read with ``local_files_only``; nothing is downloaded.
BLIP (the blip-image-captioning-base and -large architecture) loads as ``BlipForConditionalGeneration``;
any other architecture goes through ``AutoModelForImageTextToText`` and ``AutoProcessor``, and one that
neither knows is a ``CaptionModelError`` that says what to pass.

Views reach the model the way CLIP's do: the reprojection kernel cuts them at the processor's input
size and normalises them with the processor's own mean and std, in the model's dtype, in one launch.
There is no PIL resize in between, so the pixels the captioner reads are the ones CLIP reads, at
another size. Plain (non-panoramic) images are resized once with antialiasing (``pixels_of``).

Decoding is deterministic: beam search (``beams``, 1 is greedy) without sampling, at most
``max_tokens`` new tokens. A batch's captions do not depend on what else is in the batch beyond the
floating-point rounding of batched matrix products.

``precision`` (default auto): fp16 on CUDA, bf16 on a CPU with native bf16, fp32 elsewhere (``dtype`` overrides it).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import DEFAULT_CAPTION_BEAMS, DEFAULT_CAPTION_MAX_TOKENS
from engine.models.device import DTYPES, package_versions, resolve_device, resolve_precision
from kernels import ViewSpec, reproject

DEFAULT_BEAMS, DEFAULT_MAX_TOKENS = DEFAULT_CAPTION_BEAMS, DEFAULT_CAPTION_MAX_TOKENS
_HOW = (
    "Pass a local transformers folder with the captioner's config.json, weights and processor files "
    "(preprocessor_config.json and the tokenizer), such as one written by save_pretrained of "
    "Salesforce/blip-image-captioning-base; `mimetic models make-tiny DIR` writes a tiny untrained one "
    "to DIR/caption for tests and offline demonstrations."
)


class CaptionModelError(ValueError):
    """The captioner folder is missing, incomplete or of an unsupported architecture; the message says what to pass."""


class Captioner:
    """An image-to-text model from a local folder, ready for batched, deterministic captions of views."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str | torch.device = "auto",
        beams: int = DEFAULT_BEAMS,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
        precision: str = "auto",
    ):
        check_generation(beams, max_tokens)
        self.folder = check_folder(folder)
        self.device = resolve_device(device)
        if dtype is not None:  # an explicit dtype wins, as before precision existed
            self.precision = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))
            self.precision_reason = "asked for (dtype)"
        else:
            self.precision, self.precision_reason = resolve_precision(precision, self.device)
        self.dtype = dtype or DTYPES[self.precision]
        self.beams, self.max_tokens, self.batch_size = beams, max_tokens, batch_size
        self.model, self.processor = _load(self.folder, self.dtype)
        self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        image_processor = getattr(self.processor, "image_processor", self.processor)
        self.image_size = _input_size(image_processor, self.folder)
        self.mean = tuple(float(v) for v in image_processor.image_mean)
        self.std = tuple(float(v) for v in image_processor.image_std)
        self.architecture = type(self.model).__name__

    def info(self) -> dict:
        """What runs: folder, architecture, device, dtype, input size, normalisation, decoding, versions."""
        versions = package_versions(("transformers", "torch"))
        return {
            "folder": str(self.folder),
            "architecture": self.architecture,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "beams": self.beams,
            "max_tokens": self.max_tokens,
            "versions": versions,
        }

    # -- pixels ------------------------------------------------------------------------------------

    def views(self, views: Sequence[ViewSpec]) -> list[ViewSpec]:
        """The same directions and fovs at this model's input size."""
        height, width = self.image_size
        return [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, width, height) for v in views]

    def render(
        self, panos: Sequence, views: Sequence[ViewSpec], yaw_offsets: Sequence[float] | None = None, *, antialias: bool = True
    ) -> torch.Tensor:
        """Cut ``views`` from uint8 (H, W, 3) panoramas with the kernel at the model's input size, normalised
        with the processor's mean and std: (M, N, 3, h, w) in the model's dtype, on its device."""
        with warnings.catch_warnings():  # a read-only caller array is fine: the kernel only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [torch.as_tensor(p).to(self.device) for p in panos]
        offsets = None if yaw_offsets is None else torch.tensor(list(yaw_offsets), dtype=torch.float64)
        return reproject(
            tensors, self.views(views), out_dtype=self.dtype, normalize=(self.mean, self.std), antialias=antialias, yaw_offsets=offsets
        )

    def pixels_of(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Plain uint8 (H, W, 3) images -> (B, 3, h, w) model input: resized once (bicubic, antialiased), normalised."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        out = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            out.append((x - mean) / std)
        return torch.cat(out).to(self.device, self.dtype)

    # -- text --------------------------------------------------------------------------------------

    def caption(self, pixels: torch.Tensor) -> list[str]:
        """(B, 3, h, w) model input (``render`` or ``pixels_of``) -> B captions, in batches of ``batch_size``.

        A model that stops at once gives an empty caption: it is returned as "", not an error.
        """
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, *self.image_size):
            raise ValueError(f"expected (B, 3, {self.image_size[0]}, {self.image_size[1]}) pixels, got {tuple(pixels.shape)}")
        captions: list[str] = []
        options = {"num_beams": self.beams, "max_new_tokens": self.max_tokens, "do_sample": False}
        if self.beams > 1:
            options["early_stopping"] = True
        with torch.inference_mode():
            for chunk in pixels.split(self.batch_size):
                tokens = self.model.generate(pixel_values=chunk.to(self.device, self.dtype), **options)
                texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
                captions.extend(" ".join(text.split()) for text in texts)
        return captions


def check_generation(beams: int, max_tokens: int) -> None:
    """Beam count and caption length, checked before any model loads."""
    if isinstance(beams, bool) or not isinstance(beams, int) or not 1 <= beams <= 16:
        raise ValueError(f"caption beams (--caption-beams) must be an integer from 1 to 16, got {beams!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 512:
        raise ValueError(f"caption length (--caption-max-tokens) must be an integer from 1 to 512, got {max_tokens!r}")


def check_folder(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CaptionModelError(f"caption model not found: {path}. {_HOW}")
    if not (path / "config.json").is_file():
        raise CaptionModelError(f"caption model {path} has no config.json. {_HOW}")
    # transformers >= 5 saves the processor as processor_config.json; folders from the hub have preprocessor_config.json
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise CaptionModelError(f"caption model {path} has no preprocessor_config.json (or processor_config.json). {_HOW}")
    return path


def _load(folder: Path, dtype: torch.dtype):
    """The model and its processor, from ``folder`` only; a clear error for anything transformers cannot load."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BlipForConditionalGeneration

    from engine.models.diffusion import quiet_hf

    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise CaptionModelError(f"caption model {folder}: config.json is not readable JSON ({exc}). {_HOW}") from exc
    try:
        with quiet_hf():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            if model_type == "blip":
                model = BlipForConditionalGeneration.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
            else:
                model = AutoModelForImageTextToText.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; say which folder and what it was
        kind = f"a {model_type!r} model" if model_type else "a model"
        raise CaptionModelError(f"cannot load {kind} as a captioner from {folder}: {type(exc).__name__}: {_first_line(exc)}. {_HOW}") from exc
    return model, processor


def _input_size(image_processor, folder: Path) -> tuple[int, int]:
    """(height, width) the image encoder reads, from the processor's config."""
    size = getattr(image_processor, "size", None) or {}
    if not isinstance(size, dict):
        size = dict(size)
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise CaptionModelError(f"caption model {folder}: its processor gives no input size (size={size!r}). {_HOW}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

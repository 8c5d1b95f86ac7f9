"""CLIP through open_clip: ``load_clip`` finds the weights, ``ClipModel`` encodes views and texts.

Where the weights come from, in this order (DESIGN.md, "Weights"):

1. ``weights`` is a local checkpoint file (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with
   ``torch.load(weights_only=True)``): build the architecture ``model_name`` names (a built-in open_clip
   name, or the config of a ``local-dir:``) untrained, then load the file strictly.
2. ``model_name`` is ``local-dir:PATH``: open_clip's own local-dir loading (``PATH/open_clip_config.json``
   with ``model_cfg`` + ``preprocess_cfg``, and the checkpoint beside it).
3. ``weights`` is any other string: an open_clip pretrained tag, taken from the local cache (HF hub cache,
   or ``~/.cache/clip`` for URL tags). The hub is the last resort and is tried only when asked for
   (``MIMETIC_DOWNLOAD_WEIGHTS=1``, and ``HF_HUB_OFFLINE`` not set): without a network, huggingface_hub's
   retries take minutes to give up, so by default a missing tag is an immediate ``WeightsError``.
4. ``random_weights=True``: the real architecture, untrained, initialised from ``seed`` (so two runs
   build the same model, and the caller's RNG is left as it was), with one loud warning line every time.
5. none of these: ``WeightsError`` saying what to pass.

Precision (DESIGN.md, "Precision"; ``engine.models.device.resolve_precision``): ``precision="auto"``
runs fp16 on CUDA, bf16 on a CPU with native bf16 (AMX-BF16 or AVX512-BF16, detected at run time) and
fp32 elsewhere; "fp32", "bf16" and "fp16" ask for one. fp16 is open_clip's ``precision="fp16"`` (weights
fp16, LayerNorm in fp32), bf16 its ``"pure_bf16"`` (``OPEN_CLIP_PRECISION`` says why). Embeddings are
L2-normalised in fp32 and handed back in fp16 (fp32 when the model runs fp32): bf16's 8-bit mantissa
would cost a unit vector ~3e-3 per component, fp16's ~5e-4.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.models.attention import configure_attention
from engine.models.device import DTYPES, resolve_device, resolve_precision

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RANDOM = "RANDOM"  # how ClipModel.weights starts for --random-weights: "RANDOM (untrained, seed N)"
# How open_clip builds each precision. fp16: its mixed mode, LayerNorm weights and arithmetic in fp32, as
# OpenAI's CLIP runs. bf16: "pure_bf16", every weight bf16: bf16 has fp32's range, and torch's CPU LayerNorm
# already reduces in fp32 inside the kernel, so the mixed mode's casts around each LayerNorm buy no
# accuracy and cost 15% of the tower's time (ViT-B-32, batch 64, 2-core Xeon with AMX: 2.5x fp32, not 2.15x).
OPEN_CLIP_PRECISION = {"fp32": "fp32", "fp16": "fp16", "bf16": "pure_bf16"}
ZERO_SHOT_LOGIT_SCALE = 100.0  # "softmax(100 * cos)", CLIP's zero-shot convention
DOWNLOAD_ENV = "MIMETIC_DOWNLOAD_WEIGHTS"  # =1: a pretrained tag missing from the local cache may be downloaded

_OPTIONS = (
    "Pass one of: a local checkpoint file (--clip-weights PATH.safetensors or .bin), "
    "an open_clip local directory (--clip-model local-dir:PATH, holding open_clip_config.json and the weights), "
    "a pretrained tag that is already in the local cache (--clip-weights TAG), "
    "or --random-weights to build the architecture untrained (embeddings are then meaningless). "
    "For an offline test model, `mimetic models make-tiny DIR` writes one to DIR/clip "
    "(then --clip-model local-dir:DIR/clip)."
)


class WeightsError(ValueError):
    """The CLIP weights could not be found or loaded; the message says what to pass instead."""


@dataclass
class ClipModel:
    """An open_clip CLIP, in eval mode, on its device, with what it needs to read views and texts."""

    model: torch.nn.Module  # open_clip CLIP, eval mode, on device
    tokenizer: Callable  # open_clip tokenizer: list[str] -> LongTensor (T, context_length)
    name: str  # architecture name or "local-dir:PATH"
    weights: str  # where the weights came from: a path, "local-dir:PATH", "pretrained:TAG (path)", or RANDOM + seed
    image_size: tuple[int, int]  # (h, w) the image tower expects
    mean: tuple[float, float, float]  # the model's own normalisation (open_clip preprocess cfg)
    std: tuple[float, float, float]
    embed_dim: int
    device: torch.device
    dtype: torch.dtype  # the model's own: float16 on CUDA, bfloat16 on a CPU with native bf16, else float32
    attention: str  # "sdpa" or "xformers": the backend in use
    compiled: bool
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16": what --precision resolved to
    precision_reason: str = ""  # why (e.g. "bf16: this CPU has AMX-BF16 and AVX512-BF16")
    _encode_image: Callable | None = field(default=None, repr=False)  # the (compiled) image tower

    @property
    def embedding_dtype(self) -> torch.dtype:
        """What embeddings come back in: float32 from an fp32 model, float16 from a reduced-precision one."""
        return torch.float32 if self.dtype == torch.float32 else torch.float16

    def encode_images(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) views, already normalised with ``mean``/``std`` -> (B, D) unit embeddings, ``embedding_dtype``."""
        if views.dim() != 4 or views.shape[1] != 3:
            raise ValueError(f"views must be (B, 3, h, w), got {tuple(views.shape)}")
        if tuple(views.shape[-2:]) != self.image_size:
            raise ValueError(f"views are {tuple(views.shape[-2:])}, the image tower expects {self.image_size} (h, w)")
        encode = self._encode_image if self._encode_image is not None else self.model.visual
        with torch.inference_mode():
            features = encode(views.to(device=self.device, dtype=self.dtype))
            return _unit(features, self.embedding_dtype)

    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (T, D) unit embeddings, ``embedding_dtype``."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
                out.append(_unit(self.model.encode_text(tokens), self.embedding_dtype))
            if not out:
                return torch.empty(0, self.embed_dim, dtype=self.embedding_dtype, device=self.device)
            return torch.cat(out)

    def embed_pixels(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1], any size -> (B, D) unit embeddings, float32 on the CPU.

        For images that are not views cut to the tower's size by the kernel (dreams, loop frames, captioned
        rounds): each is resized to ``image_size`` (bicubic, antialiased, as open_clip's own preprocessing
        resizes) and normalised with the model's ``mean`` and ``std``. Images of several origins embedded
        this way differ only in what they show, not in how they were resampled.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = [torch.empty(0, self.embed_dim)]
        for chunk in images.split(batch_size) if len(images) else ():  # split gives an empty tensor one chunk
            x = chunk.to(self.device, torch.float32)
            if tuple(x.shape[-2:]) != tuple(self.image_size):
                x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            out.append(self.encode_images((x - mean) / std).float().cpu())
        # Normalised again in fp32: in reduced precision encode_images stores its unit vectors in fp16.
        return F.normalize(torch.cat(out), dim=1)


def _unit(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalise in fp32 (an fp16 norm is off by ~1e-3), then store in ``dtype``."""
    return F.normalize(features.float(), dim=-1).to(dtype)


# ---------------------------------------------------------------------------------------------------


def load_clip(
    model_name: str,
    weights: str | None = None,
    *,
    random_weights: bool = False,
    device: str | torch.device = "auto",
    attention: str = "auto",
    compile: bool = False,
    seed: int = 0,
    precision: str = "auto",
) -> ClipModel:
    """Build ``model_name`` with its weights (see the module docstring for the order), ready to encode.

    ``device``: "auto" (CUDA if there is one), "cpu", "cuda", "cuda:N". ``attention``: "auto" | "sdpa" |
    "xformers" (see ``engine.models.attention``). ``compile``: ``torch.compile`` the image tower.
    ``seed``: the initialisation of ``random_weights`` (recorded in ``weights``); unused otherwise.
    ``precision``: "auto" | "fp32" | "bf16" | "fp16" (see the module docstring).
    """
    import open_clip

    weights = os.fspath(weights) if weights is not None else None  # a Path works too
    dev = resolve_device(device)
    precision, precision_reason = resolve_precision(precision, dev)
    is_local_dir = model_name.startswith(LOCAL_DIR)
    if is_local_dir:
        _check_local_dir(model_name)
    elif model_name.startswith("hf-hub:"):
        raise WeightsError(
            f"{model_name}: models are not fetched from the hub at load time; put the repository's files "
            f"(open_clip_config.json and the weights) in a folder and pass local-dir:PATH. {_OPTIONS}"
        )
    elif open_clip.get_model_config(model_name.replace("/", "-")) is None:
        raise WeightsError(
            f"--clip-model {model_name}: unknown open_clip architecture (open_clip.list_models() lists them, "
            "e.g. ViT-B-32, ViT-L-14); or pass --clip-model local-dir:PATH"
        )
    if weights is not None and random_weights:
        raise WeightsError(
            f"both weights={weights!r} and random_weights=True were given: pass one or the other. {_OPTIONS}"
        )

    if weights is not None and _looks_like_file(weights):
        # (1) a local checkpoint into the named architecture.
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"--clip-weights {weights}: checkpoint file not found ({path}). {_OPTIONS}")
        state = read_state_dict(path)
        model = _create(open_clip, model_name, precision, dev, load_weights=False)
        _load_strict(model, state, path)
        source = str(path)
    elif is_local_dir and not random_weights:
        # (2) open_clip's local-dir: config + preprocess cfg + the checkpoint in the folder.
        from open_clip.factory import _find_checkpoint_in_dir

        folder = Path(model_name[len(LOCAL_DIR) :]).expanduser()
        checkpoint = _find_checkpoint_in_dir(folder)
        if checkpoint is None:
            raise WeightsError(
                f"{model_name}: no checkpoint (*.safetensors, *.bin, *.pth) in {folder}, only a config. {_OPTIONS}"
            )
        model = _create(open_clip, model_name, precision, dev, load_weights=False)
        try:  # open_clip's own reader and fix-ups (weights_only, wrappers, third-party layouts), strict
            open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
        except Exception as e:
            raise WeightsError(f"cannot load checkpoint {checkpoint} into the architecture in {folder}: {e}") from e
        source = model_name
    elif weights is not None:
        # (3) an open_clip pretrained tag, from the local cache first.
        if is_local_dir:
            raise WeightsError(
                f"{model_name} takes its weights from its folder or a checkpoint file; "
                f"{weights!r} is neither an existing file nor usable as a tag here. {_OPTIONS}"
            )
        path = _resolve_pretrained_tag(open_clip, model_name, weights)
        state = read_state_dict(path)
        model = _create(open_clip, model_name, precision, dev, load_weights=False, tag=weights)
        _load_strict(model, state, path)
        source = f"pretrained:{weights} ({path})"
    elif random_weights:
        # (4) the real architecture, untrained and seeded: loud, every time, as one plain line (a log
        # record: with no logging set up, Python prints just the message on stderr).
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise WeightsError(f"--seed must be an integer >= 0, got {seed!r}")
        log.warning(
            "CLIP %s is built with RANDOM, UNTRAINED weights (--random-weights, --seed %d): its embeddings and "
            "zero-shot readings are MEANINGLESS. Use this for benchmarks and offline demonstrations only.",
            model_name, seed,
        )
        # Built on the CPU (open_clip moves it to the device after), so the CPU generator is the one that
        # draws the weights; fork_rng puts the caller's RNG state back afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            model = _create(open_clip, model_name, precision, dev, load_weights=False)
        source = f"{RANDOM} (untrained, seed {seed})"
    else:
        # (5)
        raise WeightsError(f"no weights given for CLIP {model_name}. {_OPTIONS}")

    model.eval()
    backend = configure_attention(model, attention)
    tokenizer = open_clip.get_tokenizer(model_name)
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    encode_image = None
    if compile:
        encode_image = torch.compile(model.visual)
    clip = ClipModel(
        model=model,
        tokenizer=tokenizer,
        name=model_name,
        weights=source,
        image_size=image_size,
        mean=tuple(float(m) for m in pp["mean"]),
        std=tuple(float(s) for s in pp["std"]),
        embed_dim=_embed_dim(model),
        device=dev,
        dtype=DTYPES[precision],
        attention=backend,
        compiled=compile,
        precision=precision,
        precision_reason=precision_reason,
        _encode_image=encode_image,
    )
    log.info(
        "CLIP %s (%s) on %s %s, image %s, attention %s%s",
        model_name,
        source,
        dev,
        clip.dtype,
        image_size,
        backend,
        ", compiled" if compile else "",
    )
    return clip


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's state dict, on CPU: ``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with
    ``weights_only=True``. A ``{"state_dict": ...}`` wrapper is unwrapped and a ``module.`` prefix stripped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    from open_clip.convert import convert_state_dict

    state = convert_state_dict(model, state)  # open_clip's fix-ups for third-party layouts (MobileCLIP)
    own = model.state_dict()
    if "text.transformer.embeddings.position_ids" not in own:  # dropped by transformers >= 4.31
        state.pop("text.transformer.embeddings.position_ids", None)
    # open_clip's own fix-up: logit_scale saved as a scalar vs a 1-d parameter.
    for key in ("logit_scale", "logit_bias"):
        if (
            key in state
            and key in own
            and state[key].shape != own[key].shape
            and state[key].numel() == own[key].numel()
        ):
            state[key] = state[key].reshape(own[key].shape)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsError(f"checkpoint {path} does not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)  # copies into the model's own dtypes (fp16 / fp32 LayerNorm)


def _create(open_clip, model_name: str, precision: str, device: torch.device, *, load_weights: bool, tag=None):
    """open_clip's ``create_model`` in ``precision`` (see ``OPEN_CLIP_PRECISION``), wrapping a bad name."""
    kwargs = {}
    if tag is not None:
        # the tag's own preprocess cfg (mean/std/size/quick_gelu), without downloading through open_clip
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        if pp:
            kwargs["force_preprocess_cfg"] = pp
        if cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
    with _QuietOpenClipRandomInit():
        return open_clip.create_model(
            model_name, pretrained=None, load_weights=load_weights, precision=OPEN_CLIP_PRECISION[precision], device=device, **kwargs
        )


class _QuietOpenClipRandomInit(logging.Filter):
    """Drop open_clip's root-logger "Model initialized randomly" line while we build an architecture whose
    weights we load right after (random weights get their own, louder warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def _resolve_pretrained_tag(open_clip, model_name: str, tag: str) -> Path:
    """The local file for open_clip pretrained ``tag`` of ``model_name``; the hub only as a last resort."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsError(
            f"{tag!r} is neither a checkpoint file nor a pretrained tag open_clip knows for {model_name} "
            f"(known tags: {', '.join(known) or 'none'}). {_OPTIONS}"
        )
    if "file" in cfg and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    tried = []
    if hub:
        repo, filename = os.path.split(hub)
        filenames = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            filenames.insert(0, filename[:-4] + ".safetensors")
        local = _hf_cached(repo, filenames)
        if local is not None:
            return local
        tried.append(f"the Hugging Face cache for {repo} ({', '.join(filenames)})")
    if url:
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return cached
        tried.append(str(cached))
    where = " and ".join(tried) or "nowhere (the tag names no source)"
    if os.environ.get(DOWNLOAD_ENV, "") != "1" or _hub_offline():
        raise WeightsError(
            f"pretrained weights {model_name}/{tag} were not found locally (looked in {where}); "
            f"nothing is downloaded unless {DOWNLOAD_ENV}=1 is set (and HF_HUB_OFFLINE is not). {_OPTIONS}"
        )
    try:  # last resort, asked for: the hub (or the tag's URL), through open_clip
        from open_clip.pretrained import download_pretrained

        log.warning("CLIP %s/%s is not in the local cache; downloading it (%s=1)", model_name, tag, DOWNLOAD_ENV)
        path = download_pretrained(cfg)
    except Exception as e:
        raise WeightsError(
            f"pretrained weights {model_name}/{tag} were not found locally (looked in {where}) "
            f"and could not be downloaded ({type(e).__name__}: {e}). {_OPTIONS}"
        ) from e
    if not path or not Path(path).is_file():
        raise WeightsError(f"pretrained weights {model_name}/{tag} could not be found. {_OPTIONS}")
    return Path(path)


def _hf_cached(repo: str, filenames: list[str]) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=name, local_files_only=True))
        except Exception:
            continue
    return None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them only at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _looks_like_file(weights: str) -> bool:
    p = Path(weights).expanduser()
    return p.suffix in CHECKPOINT_SUFFIXES or os.sep in weights or p.exists()


def _check_local_dir(model_name: str) -> None:
    folder = Path(model_name[len(LOCAL_DIR) :]).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"{model_name}: no such directory {folder}. {_OPTIONS}")
    if not (folder / "open_clip_config.json").is_file():
        raise WeightsError(f"{model_name}: {folder} has no open_clip_config.json. {_OPTIONS}")


def _embed_dim(model: torch.nn.Module) -> int:
    out = getattr(model.visual, "output_dim", None)
    if isinstance(out, int):
        return out
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Parameter):
        return proj.shape[1]
    raise ValueError("cannot tell the embedding width of this model")

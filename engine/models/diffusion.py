"""Stable Diffusion through diffusers: ``Dreamer`` loads a local folder and runs img2img and text2img in batches.

    from engine.models.diffusion import Dreamer
    dreamer = Dreamer("models/sd")                      # a diffusers folder: model_index.json, unet/, vae/, ...
    views = dreamer.render(panos, views)                # (M, N, 3, S, S) in [-1, 1], the kernel's normalize="sd"
    out = dreamer.img2img(views[0], prompts=[...], strength=0.5, steps=30, guidance=7.5, seeds=[0] * 8)
    out.images                                          # (B, 3, S, S) float32 in [0, 1], on the CPU

Loading (DESIGN.md, "Weights"): the folder goes through ``AutoPipelineForImage2Image`` (and the
text2img pipeline is made from it with ``from_pipe``, sharing every module), so whatever the folder's
``model_index.json`` names is what runs: SD 1.x, SD 2.x, SD-Turbo, SDXL. Files are read with
``local_files_only``; nothing is downloaded. Optional components the index names but the folder lacks
(a safety checker, its feature extractor, an image encoder) are left out rather than fetched: the
folder has what it has. A safety checker that is in the folder runs, and its flags are reported.

On CUDA: fp16 weights, channels_last UNet and VAE, optionally ``torch.compile`` of the UNet, and
attention through xformers (``enable_xformers_memory_efficient_attention``) when it is installed,
otherwise PyTorch SDPA (diffusers' ``AttnProcessor2_0``). ``Dreamer.attention`` says which one is
installed, read back from the UNet's processors. On the CPU: SDPA, in bf16 where the CPU has
native bf16 and fp32 elsewhere (``precision``, default auto: ``engine.models.device.resolve_precision``).

Seeds: every item of a batch has its own ``torch.Generator`` (on the CPU, so a seed gives the same
noise on any device), so an item's image depends on its seed, not on what else is in the batch.
The view's latent is the VAE posterior's mean (no sampling): a pure function of the view.

Not thread-safe: one Dreamer serves one caller at a time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.models.attention import BACKENDS as ATTENTION_BACKENDS
from engine.models.attention import xformers_available
from engine.models.device import DTYPES, package_versions, resolve_device, resolve_precision
from kernels import ViewSpec, reproject

log = logging.getLogger(__name__)

OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
PROMPT_EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_HOW = (
    "Pass a local diffusers folder (model_index.json beside unet/, vae/, text_encoder/, tokenizer/, scheduler/), "
    "such as one written by a pipeline's save_pretrained; `mimetic models make-tiny DIR` writes a tiny untrained "
    "one to DIR/sd for tests and offline demonstrations."
)


class DiffusionModelError(ValueError):
    """The Stable Diffusion folder is missing or cannot be loaded; the message says what to pass."""


# -- parameter checks: one place, used before any work starts --------------------------------------


def check_strength(strength) -> float:
    """img2img strength: the fraction of the schedule re-noised, in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


def check_steps(steps, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    return steps


def check_guidance(guidance) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0 (classifier-free guidance is off at <= 1), got {guidance!r}")
    return float(guidance)


def check_size(size, multiple: int = 8) -> int:
    """Image side in pixels: a positive multiple of the VAE's downsampling factor (8 for every SD)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple} (the VAE works on {multiple}x{multiple} blocks), got {size!r}")
    return size


def img2img_steps(steps: int, strength: float) -> int:
    """The denoising steps img2img runs: diffusers skips the first ``steps * (1 - strength)`` of the schedule."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(
            f"steps x strength must allow at least one denoising step: {steps} x {strength} runs {run}; "
            f"raise steps to at least {math.ceil(1 / strength)} or raise strength"
        )
    return run


# -- the model -------------------------------------------------------------------------------------


@dataclass
class DiffusionOutput:
    """One batch's result. ``trajectory`` holds (step, images) for every k-th step when asked for."""

    images: torch.Tensor  # (B, 3, S, S) float32 in [0, 1], CPU
    nsfw: list[bool] | None  # the folder's safety checker's flags, or None when there is none
    steps_run: int  # denoising steps actually run (img2img runs steps x strength of them)
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (1-based step, (B, 3, S, S) [0, 1])


class Dreamer:
    """A Stable Diffusion pipeline from a local folder, ready for batched img2img and text2img."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str | torch.device = "auto",
        attention: str = "auto",
        compile: bool | str = False,
        size: int | None = None,
        precision: str = "auto",
    ):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, not {attention!r}")
        if size is not None:
            check_size(size)
        self.folder = _check_folder(folder)
        self.device = resolve_device(device)
        # fp16 on CUDA, bf16 on a CPU with native bf16, fp32 elsewhere (engine.models.device.resolve_precision)
        self.precision, self.precision_reason = resolve_precision(precision, self.device)
        self.dtype = DTYPES[self.precision]
        options = _absent_optional(self.folder)
        if importlib.util.find_spec("accelerate") is None:
            options["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, without its warning
        try:
            with quiet_hf():
                self.pipe_img2img = AutoPipelineForImage2Image.from_pretrained(
                    self.folder, torch_dtype=self.dtype, local_files_only=True, **options
                )
        except Exception as exc:  # diffusers raises many kinds; say which folder and what it was
            raise DiffusionModelError(f"cannot load a Stable Diffusion pipeline from {self.folder}: {type(exc).__name__}: {exc}. {_HOW}") from exc
        self.pipe_img2img.to(self.device)
        self.pipe_img2img.set_progress_bar_config(disable=True)
        self.pipe_txt2img = AutoPipelineForText2Image.from_pipe(self.pipe_img2img)  # the same modules, not a copy
        self.pipe_txt2img.set_progress_bar_config(disable=True)
        self.unet, self.vae, self.scheduler = self.pipe_img2img.unet, self.pipe_img2img.vae, self.pipe_img2img.scheduler
        self.vae_scale_factor = int(self.pipe_img2img.vae_scale_factor)
        native = int(self.unet.config.sample_size) * self.vae_scale_factor
        self.size = check_size(size if size is not None else native, self.vae_scale_factor)
        self.latent_channels = int(self.unet.config.in_channels)
        if self.device.type == "cuda":  # NHWC convolutions: the tensor-core layout for fp16 convs
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.attention = self._set_attention(attention)
        self.compiled = self._compile(compile)

    # -- set-up ------------------------------------------------------------------------------------

    def _set_attention(self, backend: str) -> str:
        """xformers where asked for (or auto) and possible, else SDPA; return what is installed."""
        if backend in ("auto", "xformers"):
            ok, why = xformers_available()
            if ok and self.device.type != "cuda":
                ok, why = False, f"the model is on {self.device}, and xformers runs on CUDA only"
            if ok:
                try:
                    self.pipe_img2img.enable_xformers_memory_efficient_attention()
                except Exception as exc:  # a wheel that imports but cannot run this head size or dtype
                    ok, why = False, f"enable_xformers_memory_efficient_attention failed: {exc}"
            if not ok and backend == "xformers":
                log.warning("diffusion attention: xformers was asked for but %s; using PyTorch SDPA instead", why)
        if attention_in_use(self.unet) == "xformers":
            return "xformers"
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(AttnProcessor2_0())
        return attention_in_use(self.unet)

    def _compile(self, compile: bool | str) -> str | None:
        """``torch.compile`` the UNet (the module every denoising step runs); return the mode, or None."""
        if not compile:
            return None
        # CUDA graphs ("reduce-overhead") remove the per-kernel launch cost that dominates at small batch.
        mode = compile if isinstance(compile, str) else ("reduce-overhead" if self.device.type == "cuda" else "default")
        compiled = torch.compile(self.unet, mode=mode)
        self.pipe_img2img.unet = compiled
        self.pipe_txt2img.unet = compiled
        return mode

    def info(self) -> dict:
        """What runs: folder, pipeline classes, scheduler, dtype, device, attention, compile mode, size, versions."""
        versions = package_versions(("diffusers", "transformers", "torch", "xformers"))
        return {
            "folder": str(self.folder),
            "img2img": type(self.pipe_img2img).__name__,
            "txt2img": type(self.pipe_txt2img).__name__,
            "scheduler": type(self.scheduler).__name__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "attention": self.attention,
            "compile": self.compiled,
            "size": self.size,
            "vae_scale_factor": self.vae_scale_factor,
            "safety_checker": getattr(self.pipe_img2img, "safety_checker", None) is not None,
            "versions": versions,
        }

    # -- views, latents, prompts -------------------------------------------------------------------

    def views(self, views: Sequence[ViewSpec]) -> list[ViewSpec]:
        """The same directions and fovs at this model's square size."""
        return [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, self.size, self.size) for v in views]

    def render(
        self, panos: Sequence, views: Sequence[ViewSpec], yaw_offsets: Sequence[float] | None = None, *, antialias: bool = True
    ) -> torch.Tensor:
        """Cut ``views`` (any size: they are re-sized to the model's) from uint8 (H, W, 3) panoramas with the
        reprojection kernel, normalised for SD (``normalize="sd"``, [-1, 1]): (M, N, 3, S, S), model dtype, device."""
        with warnings.catch_warnings():  # a read-only caller array is fine: the kernel only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [torch.as_tensor(p).to(self.device) for p in panos]
        offsets = None if yaw_offsets is None else torch.tensor(list(yaw_offsets), dtype=torch.float64)
        return reproject(tensors, self.views(views), out_dtype=self.dtype, normalize="sd", antialias=antialias, yaw_offsets=offsets)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, C, S/8, S/8) latents scaled as the UNet sees them (the posterior mean)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        with torch.inference_mode(), self._vae_precision() as dtype:
            latents = retrieve_latents(self.vae.encode(images.to(self.device, dtype)), sample_mode="argmax")
            mean, std = self._latent_stats(latents)
            latents = (latents - mean) * self.vae.config.scaling_factor / std
        return latents.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, S, S) float32 images in [0, 1], on the CPU."""
        with torch.inference_mode(), self._vae_precision() as dtype:
            latents = latents.to(self.device, dtype)
            mean, std = self._latent_stats(latents)
            images = self.vae.decode(latents * std / self.vae.config.scaling_factor + mean, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def _latent_stats(self, latents: torch.Tensor) -> tuple:
        """SDXL-style VAEs carry per-channel latent statistics; SD's do not (mean 0, std 1)."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return 0.0, 1.0
        shape = (1, -1, 1, 1)
        as_tensor = lambda values: torch.tensor(values, device=latents.device, dtype=latents.dtype).view(shape)  # noqa: E731
        return as_tensor(config.latents_mean), as_tensor(config.latents_std)

    @contextlib.contextmanager
    def _vae_precision(self):
        """fp32 for a VAE that asks for it (``force_upcast``: SDXL's overflows in fp16), as diffusers does."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield self.vae.dtype
        finally:
            if upcast:
                self.vae.to(torch.float16)

    def encode_prompt(self, prompts: list[str], negative_prompt: str = "") -> dict[str, torch.Tensor]:
        """Prompt embeddings as the pipelines take them (``prompt_embeds``, ``negative_prompt_embeds``, and
        SDXL's pooled pair): interpolate these, then pass them to ``img2img`` / ``txt2img`` as ``embeds``."""
        with torch.inference_mode():
            out = self.pipe_txt2img.encode_prompt(
                prompt=list(prompts),
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[negative_prompt] * len(prompts),
            )
        return {name: tensor for name, tensor in zip(PROMPT_EMBEDS, out, strict=False) if tensor is not None}

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """(B, C, S/8, S/8) float32 start noise on the CPU, one generator per seed."""
        side = self.size // self.vae_scale_factor
        return torch.cat([torch.randn(1, self.latent_channels, side, side, generator=_generator(s)) for s in seeds])

    # -- generation --------------------------------------------------------------------------------

    def img2img(
        self,
        images: torch.Tensor,
        *,
        prompts: list[str] | None = None,
        embeds: dict[str, torch.Tensor] | None = None,
        negative_prompt: str = "",
        strength: float,
        steps: int,
        guidance: float,
        seeds: Sequence[int],
        every: int | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> DiffusionOutput:
        """img2img of (B, 3, S, S) images in [-1, 1] with one prompt (or one row of ``embeds``) and one seed each.

        ``every=k`` also returns the predicted clean image of every k-th denoising step, decoded.
        ``progress``, if given, is called after each denoising step with the fraction of this call it
        completes (1 / steps run), for a progress bar.
        """
        strength, steps, guidance = check_strength(strength), check_steps(steps), check_guidance(guidance)
        steps_run = img2img_steps(steps, strength)
        count = images.shape[0]
        if len(seeds) != count or (prompts is not None and len(prompts) != count):
            raise ValueError(f"{count} images need {count} seeds and prompts, got {len(seeds)} and {len(prompts or [])}")
        text = {"prompt": list(prompts), "negative_prompt": [negative_prompt] * count} if embeds is None else embeds
        return self._run(
            self.pipe_img2img,
            every,
            steps_run,
            progress,
            image=self.encode(images),  # 4-channel input: the pipelines take it as the initial latents
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[_generator(s) for s in seeds],
            **text,
        )

    def txt2img(
        self, embeds: dict[str, torch.Tensor], latents: torch.Tensor, *, steps: int, guidance: float, every: int | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> DiffusionOutput:
        """text2img from given prompt embeddings and start noise ((B, C, S/8, S/8), unit Gaussian); ``every``
        and ``progress`` as for ``img2img``."""
        steps, guidance = check_steps(steps), check_guidance(guidance)
        return self._run(
            self.pipe_txt2img,
            every,
            steps,
            progress,
            latents=latents.to(self.device, self.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=self.size,
            width=self.size,
            **embeds,
        )

    def _run(self, pipe, every: int | None, steps_run: int, progress, **kwargs) -> DiffusionOutput:
        trajectory: list[tuple[int, torch.Tensor]] = []
        recorder = None
        if every is not None:
            check_steps(every, "trajectory step (every)")
            recorder = _CleanImageRecorder(self.scheduler)
        if every is not None or progress is not None:

            def on_step_end(_pipe, index: int, _timestep, _tensors) -> dict:
                if recorder is not None and (index + 1) % every == 0:
                    trajectory.append((index + 1, self.decode(recorder.last)))
                if progress is not None:
                    progress(1 / steps_run)
                return {}

            kwargs["callback_on_step_end"] = on_step_end
        with torch.inference_mode(), recorder or contextlib.nullcontext():
            out = pipe(output_type="pt", return_dict=True, **kwargs)
        images = out.images.float().clamp(0, 1).cpu()
        nsfw = getattr(out, "nsfw_content_detected", None)
        return DiffusionOutput(images=images, nsfw=list(nsfw) if nsfw is not None else None, steps_run=steps_run, trajectory=trajectory)


def attention_in_use(unet: torch.nn.Module) -> str:
    """"xformers" or "sdpa" when every attention processor of the UNet is of that kind, else their class names."""
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    if names and all("XFormers" in n for n in names):
        return "xformers"
    if names and all(n.endswith("2_0") for n in names):
        return "sdpa"
    return "+".join(names) or "none"


class _CleanImageRecorder:
    """While active, wraps ``scheduler.step`` so that the last step's predicted clean latents (x0) are kept.

    Schedulers that report ``pred_original_sample`` (DDIM, DDPM, Euler, LMS, ...) give it directly. For
    the others (PNDM, DPM-Solver, UniPC: no input scaling, ``init_noise_sigma`` 1) x0 is recovered from the
    guided model output the step received, through the schedule's ``alphas_cumprod``.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.last: torch.Tensor | None = None

    def __enter__(self):
        original = self.scheduler.step

        def step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            self.last = x0 if x0 is not None else clean_from_model_output(self.scheduler, model_output, timestep, sample)
            return out if return_dict else out.to_tuple()

        self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        del self.scheduler.step  # the instance attribute: the class's own method shows through again
        return False


def clean_from_model_output(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """x0 from x_t and the model output at ``timestep``: eps, v or x0 prediction on a DDPM schedule."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(
            f"{type(scheduler).__name__} neither reports the predicted clean image nor uses an unscaled DDPM schedule; "
            "trajectories need one of those (DDIM, Euler, DPM-Solver, PNDM, UniPC all work)"
        )
    a = alphas.to(sample.device)[int(timestep)].to(torch.float32)
    x, out = sample.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unknown prediction_type {kind!r} in {type(scheduler).__name__}'s config")
    return x0.to(sample.dtype)


@contextlib.contextmanager
def quiet_hf():
    """No diffusers/transformers progress bars while loading or saving, and no warning for ``torch_dtype``
    (newer diffusers call it ``dtype``; older ones know only ``torch_dtype``, the spelling every version reads)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_on = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in was_on:
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        for lib, on in was_on:
            if on:
                lib.enable_progress_bar()


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"a seed must be an integer in [0, 2**63), got {seed!r}")
    return torch.Generator("cpu").manual_seed(seed)


def _check_folder(folder) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DiffusionModelError(f"Stable Diffusion folder not found: {path}. {_HOW}")
    if not (path / "model_index.json").is_file():
        raise DiffusionModelError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder. {_HOW}")
    return path


def _absent_optional(folder: Path) -> dict:
    """``{name: None}`` for optional components the index names but the folder lacks: never fetched."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiffusionModelError(f"{folder}/model_index.json cannot be read: {exc}. {_HOW}") from exc
    absent = {}
    for name in OPTIONAL_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and entry and entry[0] is not None and not (folder / name).is_dir():
            absent[name] = None
    if "safety_checker" in absent and "requires_safety_checker" in index:
        absent["requires_safety_checker"] = False
    return absent


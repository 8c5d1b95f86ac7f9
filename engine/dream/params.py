"""The parameters of ``dream``, ``walk``, ``loop`` and ``translate``: checked before any model is loaded, recorded
with every result, and the defaults of their flags; and the prompts made from CLIP's labels, through a template."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from engine.vocab import Vocabulary, load_vocabulary

# The checks come from engine.models.diffusion inside each check(): it imports torch, and the CLI builds
# its parser from these dataclasses' defaults without loading torch.

# ---------------------------------------------------------------------------------------------------
# Parameters: checked before any model is loaded, recorded with every result.

PROMPT_SOURCES = ("caption",)  # DreamParams.prompt_from


@dataclass
class DreamParams:
    """What ``dream`` does. One of ``prompt``, ``from_labels`` and ``prompt_from``; ``template`` goes with
    ``from_labels``, ``flavours`` with ``prompt_from``."""

    prompt: str | None = None
    # Vocabularies (bundled names or files) whose top label per view fills the template; "key=vocabulary"
    # names the placeholder ("style=styles" for "{style}"), otherwise it is the vocabulary's name.
    from_labels: tuple[str, ...] = ()
    template: str | None = None  # default: "a photograph of {key1}, {key2}, ..."
    # "caption": each view's interrogator prompt (its caption, then the top label of each flavour
    # vocabulary, in order: engine.dream.interrogate) is its dream prompt. Needs a captioner.
    prompt_from: str | None = None
    flavours: tuple[str, ...] = ()
    negative_prompt: str = ""
    strength: float = 0.5  # fraction of the schedule re-noised: 0+ keeps the view, 1 ignores it
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0  # every view's generator starts from it: the same noise for every place
    trajectory_every: int | None = None  # k: keep the predicted clean image of every k-th step
    batch_size: int = 8  # images per diffusion call, views of several panoramas together

    def check(self) -> dict[str, Vocabulary]:
        """Raise ``ValueError`` on a bad parameter; return {placeholder: vocabulary} for ``from_labels``."""
        from engine.models.diffusion import check_guidance, check_steps, check_strength, img2img_steps

        if sum((self.prompt is not None, bool(self.from_labels), self.prompt_from is not None)) != 1:
            raise ValueError("give one of a prompt, from_labels (vocabularies whose top labels make the prompt) and "
                             "prompt_from='caption' (each view's caption and flavours), not several or none")
        if self.prompt_from is not None and self.prompt_from not in PROMPT_SOURCES:
            raise ValueError(f"prompt_from (--prompt-from) must be one of {', '.join(PROMPT_SOURCES)}, got {self.prompt_from!r}")
        if self.flavours and self.prompt_from is None:
            raise ValueError("flavours follow a caption: they need prompt_from='caption' (--prompt-from caption)")
        flavour_vocabularies(self.flavours)  # an unknown one: ValueError naming it, before any model loads
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.template is not None and not self.from_labels:
            raise ValueError("a template fills in labels: it needs from_labels")
        steps_run = img2img_steps(check_steps(self.steps), check_strength(self.strength))
        check_guidance(self.guidance)
        _check_seed(self.seed)
        check_steps(self.batch_size, "batch_size")
        if self.trajectory_every is not None:
            check_steps(self.trajectory_every, "trajectory_every")
            if self.trajectory_every > steps_run:  # it would record no step at all, and say nothing
                raise ValueError(
                    f"trajectory_every (--trajectory-every) is {self.trajectory_every}, more than the {steps_run} denoising "
                    f"steps img2img runs (steps {self.steps} x strength {self.strength}), so no step would be recorded; "
                    f"give at most {steps_run}"
                )
        vocabularies = label_vocabularies(self.from_labels)
        if vocabularies:
            check_template(self.resolved_template(vocabularies), list(vocabularies))
        return vocabularies

    def resolved_template(self, vocabularies: dict[str, Vocabulary]) -> str | None:
        if not vocabularies:
            return None
        return self.template if self.template is not None else default_template(list(vocabularies))


@dataclass
class WalkParams:
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str = ""
    batch_size: int = 8
    fps: int = 12

    def check(self) -> None:
        from engine.models.diffusion import check_guidance, check_steps

        check_steps(self.steps)
        check_guidance(self.guidance)
        check_steps(self.batch_size, "batch_size")
        check_steps(self.fps, "fps")


@dataclass
class LoopParams:
    iterations: int = 100
    strength: float = 0.3
    steps: int = 30
    guidance: float = 7.5
    prompt: str = ""  # "" is pure reflection: the model's unconditioned idea of the image
    negative_prompt: str = ""
    seed: int = 0  # iteration i (1-based) uses seed + i - 1
    batch_size: int = 8
    fps: int = 12  # of each image's MP4

    def check(self) -> None:
        from engine.models.diffusion import check_guidance, check_steps, check_strength, img2img_steps

        check_steps(self.iterations, "iterations")
        check_steps(self.fps, "fps")
        img2img_steps(check_steps(self.steps), check_strength(self.strength))
        check_guidance(self.guidance)
        _check_seed(self.seed)
        _check_seed(self.seed + self.iterations - 1)
        check_steps(self.batch_size, "batch_size")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")


MODES = ("txt2img", "img2img")  # how translate makes an image from a caption


@dataclass
class TranslateParams:
    """What ``engine.dream.translate.translate`` does: image -> caption -> image rounds."""

    rounds: int = 10
    mode: str = "txt2img"
    strength: float = 0.6  # img2img only
    steps: int = 30
    guidance: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        from engine.models.diffusion import check_guidance, check_steps, check_strength

        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds (--rounds) must be a positive integer, got {self.rounds!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode (--mode) must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_strength(self.strength)
        check_steps(self.steps)
        check_guidance(self.guidance)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


# ---------------------------------------------------------------------------------------------------
# Prompts from CLIP: the top zero-shot label per vocabulary, through a template.


def label_vocabularies(from_labels: Sequence[str]) -> dict[str, Vocabulary]:
    """``["styles", "place=urban", "my.txt"]`` -> {"styles": styles, "place": urban, "<name in my.txt>": ...}."""
    found: dict[str, Vocabulary] = {}
    for entry in from_labels:
        key, sep, source = entry.partition("=")
        vocabulary = load_vocabulary(source.strip() if sep else entry)  # unknown: ValueError naming it
        key = key.strip() if sep else vocabulary.name
        if not key.isidentifier():
            raise ValueError(f"{entry!r}: the placeholder {key!r} must be a plain name (letters, digits, _); write KEY=VOCABULARY")
        if key in found:
            raise ValueError(f"{entry!r}: the placeholder {{{key}}} is given twice in from_labels")
        found[key] = vocabulary
    return found


def flavour_vocabularies(flavours: Sequence[str]) -> dict[str, Vocabulary]:
    """{name: vocabulary} for the interrogator's flavours, in order; an unknown or repeated one is a ValueError."""
    found: dict[str, Vocabulary] = {}
    for entry in flavours:
        vocabulary = load_vocabulary(entry.strip())
        if vocabulary.name in found:
            raise ValueError(f"flavour vocabulary {vocabulary.name!r} is given twice")
        found[vocabulary.name] = vocabulary
    return found


def default_template(names: Sequence[str]) -> str:
    return "a photograph of " + ", ".join("{" + name + "}" for name in names)


def check_template(template: str, names: Sequence[str]) -> None:
    """Every ``{placeholder}`` must name one of the vocabularies, and every vocabulary must be used."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for name, spec, conversion in fields:
        if name not in names:
            raise ValueError(
                f"template {template!r}: {{{name}}} is not one of the vocabularies given ({', '.join(names)}); "
                "placeholders are vocabulary names, or the KEY of KEY=VOCABULARY"
            )
        if spec or conversion:
            raise ValueError(f"template {template!r}: write {{{name}}} plainly, without a format spec or conversion")
    missing = [n for n in names if n not in {f for f, _, _ in fields}]
    if missing:
        raise ValueError(f"template {template!r} has no placeholder for {', '.join('{' + n + '}' for n in missing)}")


def prompt_from_labels(template: str, labels: dict[str, str]) -> str:
    """``template`` with each ``{vocabulary}`` replaced by that vocabulary's label."""
    return template.format_map(labels)

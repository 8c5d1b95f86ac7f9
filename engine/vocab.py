"""Label vocabularies for zero-shot CLIP readings, and a cache of their text embeddings.

    from engine.vocab import load_vocabulary, bundled_vocabularies, TextEmbeddingCache
    styles = load_vocabulary("styles")              # bundled: engine/vocabularies/styles.json
    styles.prompts()[8]                             # 'a photo of Baroque architecture'
    mine = load_vocabulary("my-labels.txt")         # or .json (same schema) or .csv (a `label` column)
    bundled_vocabularies()                          # ['furniture', 'materials', 'periods', 'styles', 'urban']

    cache = TextEmbeddingCache(cache_dir="~/.cache/mimetic/text")   # cache_dir optional: memory only
    text = cache.get("ViT-B-32/openai", styles, encode_fn)         # encode_fn(list[str]) -> (T, D) tensor

A vocabulary is a name, a template holding ``{label}``, and labels. Its prompts are the template with
``{label}`` replaced by each label, literally (no ``str.format``: other braces are kept as they are).
No grammar is added: the bundled vocabularies are phrased so that every prompt reads as English
(``urban``'s labels carry their own article, ``furniture``'s template supplies ``a`` and its labels all
start with a consonant).

File formats (``load_vocabulary(path)``), all UTF-8:

* ``.json``: ``{"labels": [...], "template": ..., "name": ..., "description": ..., "values": [...]}``;
  only ``labels`` is required, and no other key is accepted (a misspelt key is an error, not ignored).
* ``.txt``: one label per line; blank lines are skipped. Lines starting with ``#`` are comments,
  except ``# template: ...``, ``# name: ...`` and ``# description: ...``, which set those fields.
* ``.csv``: a header row with a ``label`` column and optionally a ``value`` column (other columns are
  ignored); rows with a blank label are skipped.

Values. A vocabulary may give each label a number (``values``, one per label, in label order; in a CSV
every row's ``value`` cell): a scale on which a reading has an expected value, Σ p(label) · value(label)
(``mimetic report --scale``). ``periods`` gives each label its representative year: the middle of its
century (``15th century`` is 1450), the middle of the 21st century's years so far (2013) for the 21st,
950 for ``medieval period`` (the 5th to the 14th century) and AD 100 for ``ancient Roman period``
(the imperial building of the 1st and 2nd centuries, which is most of what survives in a street).
Values are all given or none; each must be a finite number.

The name defaults to the file's stem and the template to ``DEFAULT_TEMPLATE``. Labels are stripped of
surrounding whitespace. Bad input is a ``ValueError`` that names the file (or the vocabulary): an
unknown bundled name (the message lists the bundled ones), no labels, an empty label, duplicate labels
(compared case-insensitively with whitespace collapsed, because CLIP's tokenizer lowercases: "Gothic"
and "gothic" would be the same prompt), or a template without ``{label}``.

This module imports torch only when the cache encodes or reads embeddings, so listing vocabularies
stays light.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PLACEHOLDER = "{label}"
DEFAULT_TEMPLATE = "a photo of {label}"
_PACKAGE = "engine.vocabularies"
_JSON_KEYS = frozenset({"name", "template", "description", "labels", "values"})
_SUFFIXES = (".json", ".txt", ".csv")


@dataclass(frozen=True)
class Vocabulary:
    """A named set of labels and the template that turns each label into a CLIP prompt.

    ``labels`` is stored as a tuple (a list is accepted and converted). Construction checks the same
    rules as the loaders: a template with ``{label}``, at least one label, no empty or duplicate ones.
    """

    name: str
    template: str
    labels: tuple[str, ...]
    description: str = ""
    values: tuple[float, ...] | None = None  # a number per label (a scale, e.g. periods' years), or None

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.values is not None:
            object.__setattr__(self, "values", tuple(self.values))
        problem = _problem(self.name, self.template, self.labels, self.description) or _values_problem(self.labels, self.values)
        if problem:
            raise ValueError(f"vocabulary {self.name!r}: {problem}")

    def prompts(self) -> list[str]:
        """The template with ``{label}`` replaced by each label, in label order."""
        return [self.template.replace(PLACEHOLDER, label) for label in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labels_hash(self) -> str:
        """sha256 (hex) of the labels in order: identifies the label set whatever its name."""
        return _sha256_lines(self.labels)


def _problem(name, template, labels: Sequence, description) -> str | None:
    """What is wrong with these fields, or None."""
    if not isinstance(name, str) or not name.strip():
        return f"name must be a non-empty string, got {name!r}"
    if not isinstance(template, str):
        return f"template must be a string, got {type(template).__name__}"
    if PLACEHOLDER not in template:
        return f"template {template!r} has no {PLACEHOLDER} placeholder"
    if not isinstance(description, str):
        return f"description must be a string, got {type(description).__name__}"
    if not labels:
        return "no labels (the label list is empty)"
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if not isinstance(label, str):
            return f"label {index} is not a string: {label!r}"
        if not label.strip():
            return f"label {index} is empty"
        if label != label.strip():
            return f"label {index} ({label!r}) has leading or trailing whitespace"
        key = " ".join(label.lower().split())
        if key in seen:
            return f"duplicate labels: {labels[seen[key]]!r} (label {seen[key]}) and {label!r} (label {index}) make the same prompt"
        seen[key] = index
    return None


def _values_problem(labels: Sequence, values) -> str | None:
    """What is wrong with a vocabulary's values, or None (None itself is fine: no scale)."""
    import math

    if values is None:
        return None
    if len(values) != len(labels):
        return f"{len(values)} values for {len(labels)} labels: give one value per label, in label order"
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"value {index} (for {labels[index]!r}) is not a finite number: {value!r}"
    return None


def bundled_vocabularies() -> list[str]:
    """Names of the vocabularies shipped in ``engine/vocabularies``, sorted."""
    return sorted(entry.name[: -len(".json")] for entry in resources.files(_PACKAGE).iterdir() if entry.name.endswith(".json"))


def load_vocabulary(name_or_path: str | os.PathLike | Vocabulary) -> Vocabulary:
    """A bundled vocabulary by name (``"styles"``), or one read from a ``.json``, ``.txt`` or ``.csv`` file.

    A string without a path separator and without one of those suffixes is taken as a bundled name;
    anything else is a path. A ``Vocabulary`` is returned as it is. Raises ``ValueError`` naming the name or file on bad input (see the
    module docstring), and for an unknown name lists the bundled ones.
    """
    if isinstance(name_or_path, Vocabulary):
        return name_or_path
    if isinstance(name_or_path, str) and _looks_like_name(name_or_path):
        return _load_bundled(name_or_path)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_vocabulary takes a bundled name or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{path}: unsupported vocabulary file type {path.suffix or '(no suffix)'!r}; use .json, .txt or .csv")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM from a spreadsheet export is dropped
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the vocabulary file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    parse = {".json": _parse_json, ".txt": _parse_txt, ".csv": _parse_csv}[suffix]
    return parse(text, where=str(path), default_name=path.stem)


def _looks_like_name(text: str) -> bool:
    return "/" not in text and os.sep not in text and not text.lower().endswith(_SUFFIXES)


def _load_bundled(name: str) -> Vocabulary:
    names = bundled_vocabularies()
    if name not in names:
        raise ValueError(
            f"unknown vocabulary {name!r}: bundled vocabularies are {', '.join(names)}; "
            "or pass the path to a .json, .txt or .csv file"
        )
    text = resources.files(_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return _parse_json(text, where=f"bundled vocabulary {name!r}", default_name=name)


def _build(where: str, name, template, labels, description, values=None) -> Vocabulary:
    problem = _problem(name, template, labels, description) or _values_problem(labels, values)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return Vocabulary(name=name, template=template, labels=tuple(labels), description=description,
                      values=None if values is None else tuple(float(v) for v in values))


def _parse_json(text: str, *, where: str, default_name: str) -> Vocabulary:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'labels' list, got {type(data).__name__}")
    unknown = sorted(set(data) - _JSON_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_JSON_KEYS))}")
    if "labels" not in data:
        raise ValueError(f"{where}: no 'labels' list")
    labels = data["labels"]
    if not isinstance(labels, list):
        raise ValueError(f"{where}: 'labels' must be a list of strings, got {type(labels).__name__}")
    labels = [label.strip() if isinstance(label, str) else label for label in labels]
    values = data.get("values")
    if values is not None and not isinstance(values, list):
        raise ValueError(f"{where}: 'values' must be a list of numbers, one per label, got {type(values).__name__}")
    return _build(where, data.get("name", default_name), data.get("template", DEFAULT_TEMPLATE), labels,
                  data.get("description", ""), values)


def _parse_txt(text: str, *, where: str, default_name: str) -> Vocabulary:
    fields = {"name": default_name, "template": DEFAULT_TEMPLATE, "description": ""}
    labels = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            key, sep, value = stripped[1:].partition(":")
            if sep and key.strip().lower() in fields:
                fields[key.strip().lower()] = value.strip()
            continue  # any other comment
        labels.append(stripped)
    return _build(where, fields["name"], fields["template"], labels, fields["description"])


def _parse_csv(text: str, *, where: str, default_name: str) -> Vocabulary:
    reader = csv.DictReader(io.StringIO(text))
    columns = [column.strip().lower() for column in reader.fieldnames or []]
    if "label" not in columns:
        raise ValueError(f"{where}: no 'label' column in the header row (columns: {', '.join(reader.fieldnames or []) or 'none'})")
    names = reader.fieldnames or []
    column = names[columns.index("label")]
    value_column = names[columns.index("value")] if "value" in columns else None
    labels, values = [], []
    for number, row in enumerate(reader, 2):
        label = (row.get(column) or "").strip()
        if not label:
            continue  # a blank cell
        labels.append(label)
        if value_column is not None:
            cell = (row.get(value_column) or "").strip()
            try:
                values.append(float(cell))
            except ValueError:
                raise ValueError(f"{where}: line {number}: value {cell!r} of {label!r} is not a number") from None
    return _build(where, default_name, DEFAULT_TEMPLATE, labels, "", values if value_column is not None else None)


def _sha256_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        data = line.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
        digest.update(data)
    return digest.hexdigest()


class TextEmbeddingCache:
    """Text embeddings of vocabularies, computed once per (model, vocabulary) and kept.

    In memory the key is ``(model_key, vocab.name, vocab.template, vocab.labels_hash)``. With a
    ``cache_dir`` the embeddings are also written there as ``<sha256>.safetensors``, where the sha256
    covers ``model_key`` and the prompts (not the vocabulary's name, so identical prompts share a
    file), and read back in a later process instead of encoding again. ``model_key`` must identify the
    model's weights, not only its architecture (e.g. ``"ViT-B-32/openai"`` or a checkpoint's sha256):
    two checkpoints of one architecture sharing a key would share embeddings.

    ``get`` returns the tensor that ``encode_fn`` returned (detached), or, read from disk, a CPU
    tensor of the dtype that was written; callers move it to their device. Do not modify it in place:
    the same tensor is returned to every caller. Safe to use from several threads: one lock covers
    lookup and encoding, so a key is encoded once even when threads ask for it together.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._memory: dict[tuple[str, str, str, str], torch.Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._memory)

    def clear(self) -> None:
        """Forget the in-memory embeddings (files on disk stay)."""
        with self._lock:
            self._memory.clear()

    @staticmethod
    def disk_key(model_key: str, vocab: Vocabulary) -> str:
        """sha256 (hex) of the model key and the prompts: the file name under ``cache_dir``."""
        return _sha256_lines([model_key, *vocab.prompts()])

    def get(self, model_key: str, vocab: Vocabulary, encode_fn: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """The (T, D) text embeddings of ``vocab.prompts()`` under ``model_key``; ``encode_fn`` is called only on a miss."""
        if not isinstance(model_key, str) or not model_key:
            raise ValueError(f"model_key must be a non-empty string identifying the model, got {model_key!r}")
        key = (model_key, vocab.name, vocab.template, vocab.labels_hash)
        with self._lock:
            cached = self._memory.get(key)
            if cached is not None:
                return cached
            path = self.cache_dir / f"{self.disk_key(model_key, vocab)}.safetensors" if self.cache_dir else None
            embeddings = self._read(path, len(vocab)) if path is not None else None
            if embeddings is None:
                embeddings = self._encode(vocab, encode_fn)
                if path is not None:
                    self._write(path, embeddings)
            self._memory[key] = embeddings
            return embeddings

    @staticmethod
    def _encode(vocab: Vocabulary, encode_fn) -> torch.Tensor:
        import torch

        prompts = vocab.prompts()
        embeddings = encode_fn(prompts)
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"encode_fn must return a torch.Tensor, got {type(embeddings).__name__}")
        if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
            raise ValueError(f"encode_fn must return a ({len(prompts)}, D) tensor for vocabulary {vocab.name!r}, got shape {tuple(embeddings.shape)}")
        return embeddings.detach()

    @staticmethod
    def _read(path: Path, rows: int) -> torch.Tensor | None:
        """The tensor stored at ``path``, or None if there is none (or it is unreadable or the wrong shape)."""
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            embeddings = load_file(path)["embeddings"]
        except Exception:  # a torn or foreign file: encode again and overwrite it
            return None
        return embeddings if embeddings.ndim == 2 and embeddings.shape[0] == rows else None

    @staticmethod
    def _write(path: Path, embeddings: torch.Tensor) -> None:
        """Write atomically (a temporary file, then rename), so a reader never sees half a file."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            save_file({"embeddings": embeddings.detach().to("cpu").contiguous()}, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

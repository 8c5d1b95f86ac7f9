"""Label vocabularies: the bundled ones, user files in three formats, every bad input, and the text-embedding cache."""

import json
import re
import threading

import pytest
import torch

from engine.config import DEFAULT_VOCABULARIES
from engine.vocab import DEFAULT_TEMPLATE, TextEmbeddingCache, Vocabulary, bundled_vocabularies, load_vocabulary

BUNDLED = ["furniture", "materials", "mediums", "movements", "periods", "styles", "urban"]


def test_bundled_names_and_the_config_defaults_exist():
    assert bundled_vocabularies() == BUNDLED
    assert set(DEFAULT_VOCABULARIES) <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_vocabulary_loads_and_fills_its_template(name):
    vocab = load_vocabulary(name)
    assert isinstance(vocab, Vocabulary) and vocab.name == name
    assert isinstance(vocab.labels, tuple) and len(vocab) == len(vocab.labels) >= 9
    assert vocab.description and "{label}" in vocab.template
    prompts = vocab.prompts()
    assert len(prompts) == len(vocab.labels)
    before, after = vocab.template.split("{label}")
    for label, prompt in zip(vocab.labels, prompts, strict=True):
        assert prompt == f"{before}{label}{after}" and "{" not in prompt
        # Grammar: "a" never before a vowel and "an" never before a consonant.
        assert not re.search(r"\ba [aeiou]", prompt, re.IGNORECASE), prompt
        assert not re.search(r"\ban [^aeiou\s]", prompt, re.IGNORECASE), prompt


def test_bundled_contents_that_research_questions_rely_on():
    styles = load_vocabulary("styles")
    for style in ("Romanesque", "Gothic", "Renaissance", "Baroque", "Rococo", "Neoclassical", "Beaux-Arts", "Art Nouveau", "Art Deco",
                  "Modernist", "Brutalist", "Postmodern", "contemporary", "vernacular", "Fascist rationalist", "Islamic"):
        assert f"{style} architecture" in styles.labels
    assert 25 <= len(styles) <= 35
    assert load_vocabulary("styles").prompts()[styles.labels.index("Baroque architecture")] == "a photo of Baroque architecture"
    periods = load_vocabulary("periods")
    assert periods.labels[0] == "ancient Roman period" and periods.labels[-1] == "21st century"
    assert "a photo of a street from the 15th century" in periods.prompts()
    urban = load_vocabulary("urban")
    for quality in ("public space", "private space", "inclusive place", "exclusive place", "crowded place", "empty place", "safe place",
                    "unsafe place", "lively street", "quiet street", "green space", "touristic place", "residential street", "commercial street"):
        assert any(label.endswith(f" {quality}") for label in urban.labels), quality
    for material in ("stone", "brick", "marble", "concrete", "glass", "steel", "wood", "stucco", "travertine", "asphalt", "cobblestones"):
        assert material in load_vocabulary("materials").labels
    for item in ("bench", "street lamp", "fountain", "bollard", "bus stop", "kiosk", "bicycle rack", "trash can", "traffic light", "statue"):
        assert item in load_vocabulary("furniture").labels
    # The interrogator's flavours: a medium is a noun phrase that can follow a caption as it is.
    mediums = load_vocabulary("mediums")
    for medium in ("a photograph", "an oil painting", "a watercolor painting", "an engraving", "a 3D rendering"):
        assert medium in mediums.labels
    assert all(re.match(r"^(a|an) ", label) for label in mediums.labels)
    assert "an oil painting of a place" in mediums.prompts()
    movements = load_vocabulary("movements")
    for movement in ("Impressionism", "Cubism", "Futurism", "Surrealism", "Venetian vedutismo"):
        assert movement in movements.labels
    assert "a work in the style of Impressionism" in movements.prompts()


def test_vocabulary_is_frozen_and_validated_on_construction():
    vocab = Vocabulary("mine", "a {label} with {braces} kept", ["cat", "dog"])
    assert vocab.labels == ("cat", "dog") and vocab.description == ""
    assert vocab.prompts() == ["a cat with {braces} kept", "a dog with {braces} kept"]  # literal replace, not str.format
    with pytest.raises(AttributeError):
        vocab.name = "other"
    with pytest.raises(ValueError, match=r"^vocabulary 'mine': template 'a photo' has no \{label\}"):
        Vocabulary("mine", "a photo", ["cat"])
    assert load_vocabulary(vocab) is vocab


def test_user_txt(tmp_path):
    path = tmp_path / "my-streets.txt"
    path.write_text("# template: a street view of {label}\n# a comment\n\n  cathedral  \nmarket\n# description: two labels\n", encoding="utf-8")
    vocab = load_vocabulary(path)
    assert vocab.name == "my-streets" and vocab.labels == ("cathedral", "market") and vocab.description == "two labels"
    assert vocab.prompts() == ["a street view of cathedral", "a street view of market"]
    plain = tmp_path / "plain.txt"
    plain.write_text("harbour\r\nbridge\r\n", encoding="utf-8")
    assert load_vocabulary(str(plain)).template == DEFAULT_TEMPLATE
    assert load_vocabulary(str(plain)).prompts() == ["a photo of harbour", "a photo of bridge"]


def test_user_json(tmp_path):
    path = tmp_path / "roofs.json"
    path.write_text(json.dumps({"name": "roofs", "template": "a building with a {label}", "description": "d", "labels": ["flat roof", " dome "]}))
    vocab = load_vocabulary(path)
    assert vocab == Vocabulary("roofs", "a building with a {label}", ("flat roof", "dome"), "d")
    minimal = tmp_path / "minimal.json"
    minimal.write_text('{"labels": ["tower"]}')
    assert load_vocabulary(minimal) == Vocabulary("minimal", DEFAULT_TEMPLATE, ("tower",), "")


def test_user_csv(tmp_path):
    path = tmp_path / "signs.csv"
    path.write_text("\ufeffid,Label,notes\n1,stop sign,x\n2,\n3,\"yield sign, red\",y\n", encoding="utf-8")  # BOM, capitalised header
    vocab = load_vocabulary(path)
    assert vocab.name == "signs" and vocab.labels == ("stop sign", "yield sign, red") and vocab.template == DEFAULT_TEMPLATE


def test_unknown_bundled_name_lists_the_bundled_ones():
    with pytest.raises(ValueError, match=r"unknown vocabulary 'baroque': bundled vocabularies are furniture, materials, mediums, movements, periods, styles, urban"):
        load_vocabulary("baroque")


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("empty.txt", "# template: a {label}\n\n", "no labels"),
        ("empty.csv", "label\n", "no labels"),
        ("empty.json", '{"labels": []}', "no labels"),
        ("blank.json", '{"labels": ["ok", "  "]}', "label 1 is empty"),
        ("dup.txt", "Gothic\nbaroque\ngothic\n", r"duplicate labels: 'Gothic' \(label 0\) and 'gothic' \(label 2\)"),
        ("dup.json", '{"labels": ["public  space", "Public space"]}', "duplicate labels"),
        ("dup.csv", "label\nbench\nbench\n", "duplicate labels"),
        ("notemplate.txt", "# template: a photo of a place\nbench\n", r"template 'a photo of a place' has no \{label\} placeholder"),
        ("notemplate.json", '{"template": "a photo of {labels}", "labels": ["x"]}', r"has no \{label\} placeholder"),
        ("typo.json", '{"lables": ["x"]}', r"unknown key\(s\) 'lables'"),
        ("nolabels.json", '{"name": "x"}', "no 'labels' list"),
        ("notlist.json", '{"labels": "bench"}', "'labels' must be a list"),
        ("notstr.json", '{"labels": ["bench", 3]}', "label 1 is not a string"),
        ("array.json", '["bench"]', "expected a JSON object"),
        ("broken.json", '{"labels": [', "not valid JSON"),
        ("nocolumn.csv", "name\nbench\n", "no 'label' column"),
        ("vocab.yaml", "labels: [x]", "unsupported vocabulary file type '.yaml'"),
    ],
)
def test_bad_files_are_value_errors_that_name_the_file(tmp_path, file_name, content, message):
    path = tmp_path / file_name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_vocabulary(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere\.txt: cannot read the vocabulary file"):
        load_vocabulary(tmp_path / "nowhere.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        load_vocabulary(latin1)
    with pytest.raises(TypeError):
        load_vocabulary(42)


# --- TextEmbeddingCache ----------------------------------------------------------------------------


class CountingEncoder:
    """An encode_fn that records its calls and returns a deterministic (T, 4) tensor per prompt list."""

    def __init__(self, dim: int = 4):
        self.calls: list[list[str]] = []
        self.dim = dim

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        seed = sum(map(ord, "".join(prompts))) + len(self.calls) * 1000  # a later call gives different numbers
        return torch.randn(len(prompts), self.dim, generator=torch.Generator().manual_seed(seed))


def test_cache_encodes_once_per_key():
    cache, encode = TextEmbeddingCache(), CountingEncoder()
    styles, periods = load_vocabulary("styles"), load_vocabulary("periods")
    first = cache.get("ViT-B-32/openai", styles, encode)
    assert first.shape == (len(styles), 4) and encode.calls == [styles.prompts()]
    assert cache.get("ViT-B-32/openai", styles, encode) is first
    assert cache.get("ViT-B-32/openai", load_vocabulary("styles"), encode) is first  # an equal vocabulary, loaded again
    assert len(encode.calls) == 1
    cache.get("ViT-B-32/openai", periods, encode)  # another vocabulary
    assert len(encode.calls) == 2
    other_model = cache.get("ViT-L-14/openai", styles, encode)  # another model: encoded again
    assert len(encode.calls) == 3 and not torch.equal(other_model, first)
    retemplated = Vocabulary(styles.name, "a street with {label}", styles.labels)
    cache.get("ViT-B-32/openai", retemplated, encode)  # same name and labels, another template
    relabelled = Vocabulary(styles.name, styles.template, styles.labels[:-1])
    cache.get("ViT-B-32/openai", relabelled, encode)  # same name and template, other labels
    assert len(encode.calls) == 5 and len(cache) == 5
    cache.clear()
    cache.get("ViT-B-32/openai", styles, encode)
    assert len(encode.calls) == 6


def test_cache_on_disk_survives_a_new_cache_object(tmp_path):
    encode = CountingEncoder()
    urban = load_vocabulary("urban")
    first = TextEmbeddingCache(tmp_path / "text").get("m1", urban, lambda p: encode(p).half())
    files = list((tmp_path / "text").iterdir())
    assert len(files) == 1 and files[0].name == f"{TextEmbeddingCache.disk_key('m1', urban)}.safetensors"
    again = TextEmbeddingCache(tmp_path / "text").get("m1", urban, encode)  # a later process: read, not encoded
    assert len(encode.calls) == 1 and again.dtype == torch.float16 and torch.equal(again, first)
    renamed = Vocabulary("renamed", urban.template, urban.labels)  # same prompts under another name: same file
    TextEmbeddingCache(tmp_path / "text").get("m1", renamed, encode)
    assert len(encode.calls) == 1
    TextEmbeddingCache(tmp_path / "text").get("m2", urban, encode)  # another model: a second file
    assert len(encode.calls) == 2 and len(list((tmp_path / "text").iterdir())) == 2


def test_cache_replaces_a_torn_file_on_disk(tmp_path):
    vocab = Vocabulary("v", "{label}", ("a", "b"))
    path = tmp_path / f"{TextEmbeddingCache.disk_key('m', vocab)}.safetensors"
    path.write_bytes(b"half a file")
    encode = CountingEncoder()
    out = TextEmbeddingCache(tmp_path).get("m", vocab, encode)
    assert len(encode.calls) == 1 and out.shape == (2, 4)
    assert torch.equal(TextEmbeddingCache(tmp_path).get("m", vocab, encode), out) and len(encode.calls) == 1


def test_cache_checks_what_encode_returns_and_the_model_key():
    vocab = Vocabulary("v", "{label}", ("a", "b", "c"))
    cache = TextEmbeddingCache()
    with pytest.raises(ValueError, match=r"must return a \(3, D\) tensor for vocabulary 'v', got shape \(2, 4\)"):
        cache.get("m", vocab, lambda prompts: torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        cache.get("m", vocab, lambda prompts: [[0.0]] * 3)
    with pytest.raises(ValueError, match="model_key"):
        cache.get("", vocab, CountingEncoder())
    assert len(cache) == 0


def test_cache_encodes_once_when_threads_ask_together():
    cache, encode = TextEmbeddingCache(), CountingEncoder()
    vocab = load_vocabulary("materials")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("m", vocab, encode))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(encode.calls) == 1 and all(result is results[0] for result in results)

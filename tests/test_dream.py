"""Machine dreams on the tiny Stable Diffusion and tiny CLIP: seeds, trajectories, walks, loops, prompts, errors, CLI."""

import csv
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, EngineConfig, Panorama, cli
from engine.dream.core import count_mp4_frames
from engine.dream.dream import dream, save_dreams
from engine.dream.loop import LoopResult, fit_square, loop, save_loop
from engine.dream.params import DreamParams, LoopParams, WalkParams
from engine.dream.walk import Keyframe, check_keyframes, save_walk, slerp, walk
from engine.models.diffusion import DiffusionModelError, Dreamer, check_size, clean_from_model_output
from engine.models.tiny import make_tiny_clip
from engine.models.tiny_sd import make_tiny_sd

from .test_clip_model import as_open_clip_prepares

STEPS = 4
ROUNDING = 2e-3  # a cosine recomputed from the saved uint8 images, against the float images it was scored on


def reference_text(engine, texts) -> torch.Tensor:
    """Unit text embeddings from open_clip's tokenizer and the raw model, not through the engine."""
    clip = engine.clip
    with torch.no_grad():
        return torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(texts)).float(), dim=-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"clip": f"local-dir:{make_tiny_clip(folder)}", "sd": str(make_tiny_sd(folder))}


@pytest.fixture(scope="module")
def engine(models) -> Engine:
    return Engine(EngineConfig(clip_model=models["clip"], views="ring4", top_k=3, vocabularies=("styles",)))


@pytest.fixture(scope="module")
def dreamer(models) -> Dreamer:
    return Dreamer(models["sd"])


@pytest.fixture(scope="module")
def small(louvre, jordan_pond) -> dict:
    size = (512, 256)
    return {
        "louvre": np.asarray(Image.fromarray(louvre).resize(size, Image.Resampling.BILINEAR)),
        "pond": np.asarray(Image.fromarray(jordan_pond).resize(size, Image.Resampling.BILINEAR)),
    }


@pytest.fixture(scope="module")
def views(dreamer, engine, small) -> torch.Tensor:
    """The eight ring4 views of both panoramas at the model's size, [-1, 1]: (8, 3, 64, 64)."""
    rendered = dreamer.render([small["louvre"], small["pond"]], engine.views)
    return rendered.reshape(8, *rendered.shape[2:])


def run(dreamer, images, prompts, seeds, **kwargs):
    options = {"strength": 0.75, "steps": STEPS, "guidance": 7.5, **kwargs}
    return dreamer.img2img(images, prompts=prompts, seeds=seeds, **options)


# -- loading ---------------------------------------------------------------------------------------


def test_tiny_pipeline_loads_through_the_real_loader(dreamer, views):
    info = dreamer.info()
    assert info["img2img"] == "StableDiffusionImg2ImgPipeline" and info["txt2img"] == "StableDiffusionPipeline"
    assert (info["size"], info["vae_scale_factor"], info["attention"]) == (64, 8, "sdpa")
    assert dreamer.pipe_txt2img.unet is dreamer.pipe_img2img.unet  # from_pipe shares, never copies
    assert views.shape == (8, 3, 64, 64) and views.min() >= -1 and views.max() <= 1 and views.min() < -0.5
    tokens = dreamer.pipe_img2img.tokenizer("a photograph of Baroque architecture, 17th century").input_ids
    assert len(tokens) < 20  # whole-word tokens, not one per byte
    assert dreamer.pipe_img2img.tokenizer.decode(tokens, skip_special_tokens=True).startswith("a photograph of baroque")


def test_a_safety_checker_the_folder_lacks_is_left_out_not_fetched(models, tmp_path):
    """SD-1.5's model_index.json names a safety checker and feature extractor; a folder without them still loads."""
    folder = tmp_path / "sd"
    shutil.copytree(models["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = Dreamer(folder)
    assert loaded.info()["safety_checker"] is False and loaded.pipe_img2img.feature_extractor is None


# -- seeds and batches -----------------------------------------------------------------------------


def test_a_seed_gives_the_same_dream_whatever_else_is_in_the_batch(dreamer, views):
    first = run(dreamer, views[[0, 1, 2]], ["a street", "a church", "a river"], [7, 1, 2]).images
    again = run(dreamer, views[[0, 1, 2]], ["a street", "a church", "a river"], [7, 1, 2]).images
    assert torch.equal(first, again)
    # Other images, prompts and seeds beside it, same batch size: bit for bit the same.
    others = run(dreamer, views[[0, 5, 6]], ["a street", "old stone", "glass"], [7, 99, 3]).images
    assert torch.equal(first[0], others[0])
    # Alone, or last in a batch of four: only float rounding from a different matrix blocking.
    alone = run(dreamer, views[[0]], ["a street"], [7]).images
    last = run(dreamer, views[[4, 3, 2, 0]], ["x", "y", "z", "a street"], [5, 6, 8, 7]).images
    torch.testing.assert_close(alone[0], first[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(last[3], first[0], atol=1e-4, rtol=0)
    # The seed and the prompt do matter.
    assert (run(dreamer, views[[0]], ["a street"], [8]).images - alone).abs().max() > 1e-2
    assert (run(dreamer, views[[0]], ["a church"], [7]).images - alone).abs().max() > 1e-3


def test_dream_of_a_panorama_does_not_depend_on_the_others(engine, dreamer, small):
    params = DreamParams(prompt="a street", strength=0.75, steps=STEPS, seed=3, batch_size=4)
    alone = dream(engine, dreamer, [Panorama(id="louvre", data=small["louvre"])], params)[0]
    both = dream(engine, dreamer, [Panorama(id="pond", data=small["pond"]), Panorama(id="louvre", data=small["louvre"])], params)
    assert [r.id for r in both] == ["pond", "louvre"]
    for a, b in zip(alone.dreams, both[1].dreams, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.source, b.source) and a.seed == b.seed == 3


# -- trajectories ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "strength", "every", "expected"), [(8, 1.0, 2, [2, 4, 6, 8]), (8, 1.0, 3, [3, 6]), (8, 0.5, 2, [2, 4]), (6, 0.5, 1, [1, 2, 3])])
def test_trajectory_has_a_frame_every_k_steps(dreamer, views, steps, strength, every, expected):
    out = run(dreamer, views[:2], ["a street"] * 2, [1, 2], steps=steps, strength=strength, every=every)
    assert out.steps_run == int(steps * strength)
    assert [step for step, _ in out.trajectory] == expected == list(range(every, out.steps_run + 1, every))
    for _, frames in out.trajectory:
        assert frames.shape == (2, 3, 64, 64) and 0 <= frames.min() and frames.max() <= 1
    # Asking for the trajectory does not change the dream.
    torch.testing.assert_close(out.images, run(dreamer, views[:2], ["a street"] * 2, [1, 2], steps=steps, strength=strength).images, atol=0, rtol=0)


def test_trajectory_drift_curve_is_recorded_per_view(engine, dreamer, small):
    params = DreamParams(prompt="a street", strength=1.0, steps=STEPS, trajectory_every=2, batch_size=8)
    [result] = dream(engine, dreamer, [Panorama(id="louvre", data=small["louvre"])], params)
    prompt = reference_text(engine, ["a street"])[0]
    drifts = []
    for d in result.dreams:
        t = d.trajectory
        assert t.steps == [2, 4] and t.frames.shape == (2, 64, 64, 3) and t.frames.dtype == np.uint8
        # 1 - cos(view, frame) and cos(frame, prompt), recomputed with open_clip's own preprocessing.
        view = as_open_clip_prepares(engine.clip, [d.source])[0]
        frames = as_open_clip_prepares(engine.clip, list(t.frames))
        np.testing.assert_allclose(t.drift, (1 - frames @ view).numpy(), atol=ROUNDING, rtol=0)
        np.testing.assert_allclose(t.prompt_cosine, (frames @ prompt).numpy(), atol=ROUNDING, rtol=0)
        drifts.append(t.drift[-1])
    assert max(drifts) - min(drifts) > 10 * ROUNDING  # the views drift by different amounts: the check has teeth


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_clean_image_from_the_model_output_matches_ddim(dreamer, prediction):
    """The x0 fallback (for schedulers that do not report it) agrees with DDIM's own pred_original_sample."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(dreamer.scheduler.config, prediction_type=prediction)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[[0, 5, 9]]:
        expected = scheduler.step(output, t, sample).pred_original_sample
        torch.testing.assert_close(clean_from_model_output(scheduler, output, t, sample), expected, atol=1e-5, rtol=1e-5)


# -- prompts from labels and mimesis scores --------------------------------------------------------


def test_prompts_from_labels_contain_each_views_top_labels(engine, dreamer, small, tmp_path):
    template = "a photograph of a {style} street, {period}"  # the form: placeholders named KEY=VOCABULARY
    params = DreamParams(from_labels=("style=styles", "period=periods"), template=template, strength=0.5, steps=STEPS, seed=1)
    [result] = dream(engine, dreamer, [Panorama(id="louvre", data=small["louvre"])], params)
    [seen] = engine.embed([Panorama(id="louvre", data=small["louvre"])])  # the engine's own reading of its views
    assert len(result.dreams) == 4
    for n, d in enumerate(result.dreams):
        top_style, top_period = (seen.readings[name]["views"][n][0][0] for name in ("styles", "periods"))
        assert d.prompt == f"a photograph of a {top_style} street, {top_period}"
        assert d.labels["style"][0][0] == top_style and len(d.labels["period"]) == 3
        assert set(d.scores) == {"view_dream", "dream_prompt", "view_prompt"}
        assert all(-1 <= s <= 1 for s in d.scores.values())
    record = json.loads(save_dreams([result], tmp_path, engine=engine, dreamer=dreamer, params=params).read_text())
    assert record["template"] == template and record["parameters"]["from_labels"] == ["style=styles", "period=periods"]
    assert record["placeholders"]["style"]["vocabulary"] == "styles"
    rows = record["panoramas"][0]["dreams"]
    assert [r["prompt"] for r in rows] == [d.prompt for d in result.dreams]
    assert rows[0]["seed"] == 1 and rows[0]["scores"] == result.dreams[0].scores
    with Image.open(tmp_path / rows[0]["files"]["dream"]) as image:
        assert np.array_equal(np.asarray(image), result.dreams[0].image)


def test_mimesis_scores_are_clip_cosines_of_view_dream_and_prompt(engine, dreamer, small):
    params = DreamParams(prompt="a baroque street", strength=0.75, steps=STEPS, seed=2)
    [result] = dream(engine, dreamer, [Panorama(id="louvre", data=small["louvre"])], params)
    # Recomputed from the returned uint8 images with open_clip's own preprocessing and the raw model.
    sources = as_open_clip_prepares(engine.clip, [d.source for d in result.dreams])
    images = as_open_clip_prepares(engine.clip, [d.image for d in result.dreams])
    prompt = reference_text(engine, ["a baroque street"])[0]
    for k, d in enumerate(result.dreams):
        assert math.isclose(d.scores["view_dream"], float(sources[k] @ images[k]), abs_tol=ROUNDING)
        assert math.isclose(d.scores["dream_prompt"], float(images[k] @ prompt), abs_tol=ROUNDING)
        assert math.isclose(d.scores["view_prompt"], float(sources[k] @ prompt), abs_tol=ROUNDING)
    view_dream = [d.scores["view_dream"] for d in result.dreams]
    assert max(view_dream) - min(view_dream) > 10 * ROUNDING  # each view its own score, apart by more than rounding


def test_a_bad_panorama_gets_its_error_and_the_others_go_on(engine, dreamer, small):
    params = DreamParams(from_labels=("styles",), strength=0.5, steps=STEPS, batch_size=8)
    items = [Panorama(id="broken", data=b"not an image"), Panorama(id="square", data=small["louvre"][:, :256]),
             Panorama(id="louvre", data=small["louvre"])]
    broken, square, good = dream(engine, dreamer, items, params)
    assert "broken" in broken.error and not broken.dreams
    assert "square" in square.error and "2:1" in square.error
    assert good.error is None and len(good.dreams) == 4


# -- latent walks ----------------------------------------------------------------------------------


def test_walk_has_every_frame_and_the_mp4_decodes_to_that_count(dreamer, tmp_path):
    keyframes = [Keyframe(0, "a street", 1), Keyframe(3, "a church", 2), Keyframe(5, "a river", 3)]
    result = walk(dreamer, keyframes, WalkParams(steps=3, batch_size=4, fps=8))
    assert result.frames.shape == (6, 64, 64, 3)
    assert [k for k, _ in result.positions] == [0, 0, 0, 1, 1, 1] and result.positions[-1][1] == 1.0
    # Keyframe frames are their own prompt and seed, rendered alone.
    for key in keyframes:
        direct = dreamer.txt2img(dreamer.encode_prompt([key.prompt]), dreamer.noise([key.seed]), steps=3, guidance=7.5)
        expected = (direct.images[0].permute(1, 2, 0) * 255).round()
        assert (torch.from_numpy(result.frames[key.frame]).float() - expected).abs().max() <= 1
    assert not np.array_equal(result.frames[1], result.frames[0])
    written = save_walk(result, tmp_path / "walk.mp4", dreamer=dreamer, frames_dir=tmp_path / "frames")
    assert count_mp4_frames(written["video"]) == 6
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 6
    record = json.loads(written["record"].read_text())
    assert record["keyframes"][1] == {"frame": 3, "prompt": "a church", "seed": 2} and len(record["frames"]) == 6
    with Image.open(written["contact_sheet"]) as sheet:
        assert sheet.size == (3 * 128, 2 * 128)


def test_slerp_keeps_the_noise_on_the_sphere():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=generator), torch.randn(4, 8, 8, generator=generator)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    assert abs(middle.norm() - (a.norm() + b.norm()) / 2) < 0.05 * a.norm()  # lerp would shrink it by ~1/sqrt(2)
    assert torch.lerp(a, b, 0.5).norm() < 0.8 * a.norm()


@pytest.mark.parametrize(
    ("keyframes", "message"),
    [
        ([Keyframe(0, "a", 1)], "at least two"),
        ([Keyframe(1, "a", 1), Keyframe(3, "b", 2)], "frame 0"),
        ([Keyframe(0, "a", 1), Keyframe(0, "b", 2)], "increase"),
        ([Keyframe(0, "a", 1), Keyframe(2, "b", -1)], "seed"),
    ],
)
def test_bad_keyframes_are_refused(keyframes, message):
    with pytest.raises(ValueError, match=message):
        check_keyframes(keyframes)


# -- feedback loop ---------------------------------------------------------------------------------


def test_loop_records_k_plus_one_drift_values_and_replays_from_any_frame(engine, dreamer, views):
    originals = [(f"view{k}", ((views[k].float().permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for k in (0, 5)]
    params = LoopParams(iterations=3, strength=0.5, steps=STEPS, prompt="a painting", seed=10)
    results = loop(engine, dreamer, originals, params)
    for result, (_, image) in zip(results, originals, strict=True):
        assert result.frames.shape == (4, 64, 64, 3) and np.array_equal(result.frames[0], fit_square(image, 64))
        assert len(result.drift) == len(result.step_drift) == len(result.prompt_cosine) == 4
        assert abs(result.drift[0]) < 1e-5 and result.step_drift[0] == 0 and result.seeds == [10, 11, 12]
        # Every curve recomputed from the saved frames (the very pixels each iteration embedded).
        frames = as_open_clip_prepares(engine.clip, list(result.frames))
        np.testing.assert_allclose(result.drift, (1 - frames @ frames[0]).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(result.step_drift[1:], (1 - (frames[1:] * frames[:-1]).sum(-1)).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(result.prompt_cosine, (frames @ reference_text(engine, ["a painting"])[0]).numpy(), atol=1e-4, rtol=0)
        assert result.drift[-1] > 1e-2  # three img2img rounds at strength 0.5 do move the image
    # The saved frames 1, looped again from seed 11 (the same batch), give frames 2 and 3 again, bit for bit.
    again = [(f"again{k}", result.frames[1]) for k, result in enumerate(results)]
    replay = loop(engine, dreamer, again, LoopParams(iterations=2, strength=0.5, steps=STEPS, prompt="a painting", seed=11))
    for first, second in zip(results, replay, strict=True):
        assert np.array_equal(second.frames[1:], first.frames[2:])


# -- bad parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        DreamParams(prompt="x", strength=strength).check()
    with pytest.raises(ValueError, match="strength"):
        LoopParams(strength=strength).check()


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_below_one_are_refused(steps, dreamer, views):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DreamParams(prompt="x", steps=steps).check()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        WalkParams(steps=steps).check()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        run(dreamer, views[:1], ["x"], [0], steps=steps)


@pytest.mark.parametrize(("steps", "strength", "every"), [(4, 0.5, 3), (30, 0.5, 16), (8, 1.0, 9)])
def test_a_trajectory_that_would_record_no_step_is_refused(steps, strength, every):
    runs = int(steps * strength)
    with pytest.raises(ValueError, match=rf"--trajectory-every\) is {every}, more than the {runs} denoising steps"):
        DreamParams(prompt="x", steps=steps, strength=strength, trajectory_every=every).check()
    DreamParams(prompt="x", steps=steps, strength=strength, trajectory_every=runs).check()  # the last step: one frame


def test_too_few_steps_for_the_strength_is_refused():
    with pytest.raises(ValueError, match="at least one denoising step"):
        DreamParams(prompt="x", steps=3, strength=0.3).check()


@pytest.mark.parametrize("size", [60, 0, 100, 513])
def test_size_not_a_multiple_of_8_is_refused(size, models):
    with pytest.raises(ValueError, match="multiple of 8"):
        check_size(size)
    with pytest.raises(ValueError, match="multiple of 8"):
        Dreamer(models["sd"], size=size)


def test_unknown_vocabulary_and_bad_templates_are_refused():
    with pytest.raises(ValueError, match="unknown vocabulary 'nonsense'"):
        DreamParams(from_labels=("styles", "nonsense")).check()
    with pytest.raises(ValueError, match=r"\{place\} is not one of the vocabularies"):
        DreamParams(from_labels=("styles",), template="a {place} in {styles}").check()
    with pytest.raises(ValueError, match=r"no placeholder for \{periods\}"):
        DreamParams(from_labels=("styles", "periods"), template="a photograph of {styles}").check()
    with pytest.raises(ValueError, match="given twice"):
        DreamParams(from_labels=("styles", "styles")).check()
    with pytest.raises(ValueError, match="must be a plain name"):
        DreamParams(from_labels=("my style=styles",)).check()
    with pytest.raises(ValueError, match="give one of a prompt, from_labels"):
        DreamParams(prompt="x", from_labels=("styles",)).check()
    with pytest.raises(ValueError, match="give one of a prompt, from_labels"):
        DreamParams().check()


def test_missing_or_empty_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DiffusionModelError, match=r"Stable Diffusion folder not found: .*nowhere.*make-tiny"):
        Dreamer(tmp_path / "nowhere")
    with pytest.raises(DiffusionModelError, match=r"no model_index\.json"):
        Dreamer(tmp_path)


# -- attention -------------------------------------------------------------------------------------


def test_xformers_falls_back_to_sdpa_without_cuda_and_says_why(models, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the xformers path itself is tested below")
    with caplog.at_level(logging.WARNING, logger="engine.models.diffusion"):
        assert Dreamer(models["sd"], attention="xformers").attention == "sdpa"
    assert "xformers was asked for" in caplog.text


@pytest.mark.cuda
def test_xformers_path_is_taken_on_cuda(models):
    pytest.importorskip("xformers.ops", reason="xformers is not installed")
    xformed = Dreamer(models["sd"], device="cuda", attention="xformers")
    assert xformed.attention == "xformers" and xformed.dtype == torch.float16
    names = {type(p).__name__ for p in xformed.unet.attn_processors.values()}
    assert names == {"XFormersAttnProcessor"}
    sdpa = Dreamer(models["sd"], device="cuda", attention="sdpa")
    image = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1
    a = run(xformed, image, ["a street"] * 2, [1, 2]).images
    b = run(sdpa, image, ["a street"] * 2, [1, 2]).images
    assert torch.isfinite(a).all()
    # Two fp16 attention kernels, the same maths: rounding only, through a few random-weight steps.
    assert (a - b).abs().mean() < 5e-3 and (a - b).abs().max() < 0.1


# -- the commands ----------------------------------------------------------------------------------


def mimetic(*argv: str) -> int:
    """Run ``mimetic ARGV`` in-process, through ``engine.cli.main`` and its one error handler."""
    return cli.main(list(argv))


def test_cli_dream_writes_images_and_the_record(models, small, tmp_path, capsys):
    Image.fromarray(small["louvre"]).save(tmp_path / "louvre.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    status = mimetic("dream", str(tmp_path / "louvre.jpg"), str(tmp_path / "broken.jpg"), "--from-labels", "styles,periods",
                     "--steps", "4", "--strength", "0.5", "--seed", "5", "--trajectory-every", "1", "--out", str(out),
                     "--sd-model", models["sd"], "--clip-model", models["clip"], "--views", "ring4")
    captured = capsys.readouterr()
    assert status == 1 and "broken.jpg" in captured.err
    [line] = [line for line in captured.err.splitlines() if "broken.jpg" in line]
    assert line.count("broken.jpg") == 1  # the error names its panorama once
    record = json.loads((out / "dreams.json").read_text())
    good, bad = record["panoramas"]
    assert bad["error"] and not bad["dreams"] and good["error"] is None
    assert record["template"] == "a photograph of {styles}, {periods}" and record["parameters"]["seed"] == 5
    assert len(good["dreams"]) == 4 and record["diffusion"]["attention"] == "sdpa"
    for row in good["dreams"]:
        assert row["prompt"].startswith("a photograph of ") and row["labels"]["styles"][0][0] in row["prompt"]
        assert row["trajectory"]["steps"] == [1, 2]
        for name in (row["files"]["view"], row["files"]["dream"], *row["trajectory"]["files"]):
            assert (out / name).is_file()
    assert good["dreams"][1]["files"]["dream"] == "louvre_1_y90_p0_dream.png"


def test_cli_walk_reads_yaml_keyframes(models, tmp_path, capsys):
    (tmp_path / "walk.yaml").write_text(
        "steps: 2\nfps: 6\nbatch_size: 4\nkeyframes:\n  - {frame: 0, prompt: a street, seed: 1}\n  - {frame: 4, prompt: a church, seed: 2}\n"
    )
    status = mimetic("walk", "--keyframes", str(tmp_path / "walk.yaml"), "--out", str(tmp_path / "walk.mp4"), "--sd-model", models["sd"])
    assert status == 0, capsys.readouterr().err
    assert count_mp4_frames(tmp_path / "walk.mp4") == 5
    record = json.loads((tmp_path / "walk.json").read_text())
    assert record["parameters"]["steps"] == 2 and record["parameters"]["fps"] == 6 and len(record["keyframes"]) == 2
    assert record["parameters"]["batch_size"] == 4 and record["parameters"]["guidance"] == 7.5  # the file's, then the default
    # A flag overrides the file, --sd-batch-size too (it used to lose to the file's batch_size).
    status = mimetic("walk", "--keyframes", str(tmp_path / "walk.yaml"), "--out", str(tmp_path / "again.mp4"), "--sd-model", models["sd"],
                     "--sd-batch-size", "2", "--fps", "9", "--quiet")
    assert status == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "again.json").read_text())
    assert (record["parameters"]["batch_size"], record["parameters"]["fps"], record["parameters"]["steps"]) == (2, 9, 2)


def test_cli_loop_writes_frames_video_and_drift_curve(models, small, tmp_path, capsys):
    Image.fromarray(small["louvre"][64:192, 0:128]).save(tmp_path / "view.png")
    out = tmp_path / "out"
    status = mimetic("loop", str(tmp_path / "view.png"), "--iterations", "3", "--strength", "0.5", "--steps", "4",
                     "--out", str(out), "--sd-model", models["sd"], "--clip-model", models["clip"])
    assert status == 0, capsys.readouterr().err
    record = json.loads((out / "loop.json").read_text())
    [entry] = record["images"]
    assert len(entry["drift"]) == 4 and entry["seeds"] == [0, 1, 2] and record["parameters"]["strength"] == 0.5
    assert record["fps"] == record["parameters"]["fps"] == 12 and record["parameters"]["guidance"] == 7.5  # the defaults
    assert len(list((out / "view").glob("frame_*.png"))) == 4 and count_mp4_frames(out / "view.mp4") == 4
    with open(out / "view-drift.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    assert [math.isclose(float(r["drift"]), d, abs_tol=1e-5) for r, d in zip(rows, entry["drift"], strict=True)] == [True] * 4


def test_cli_loop_shows_a_progress_bar_on_stderr_and_quiet_hides_it(models, small, tmp_path):
    """As a user runs it, in a subprocess (stderr is then not a terminal, and tqdm still draws)."""
    from .test_cli import mimetic as run_mimetic

    Image.fromarray(small["louvre"][64:192, 0:128]).save(tmp_path / "view.png")
    argv = ["loop", str(tmp_path / "view.png"), "--iterations", "2", "--strength", "0.5", "--steps", "4",
            "--sd-model", models["sd"], "--clip-model", models["clip"]]
    shown = run_mimetic(*argv, "--out", str(tmp_path / "a"))
    assert shown.returncode == 0, shown.stderr
    frames = shown.stderr.replace("\r", "\n").splitlines()
    assert any(line.startswith("loop:") and "2.0/2 iterations" in line and "100%" in line for line in frames), shown.stderr
    assert any("<" in line and "iteration" in line for line in frames)  # elapsed<remaining: the ETA
    quiet = run_mimetic(*argv, "--out", str(tmp_path / "b"), "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "iterations [" not in quiet.stderr and "%|" not in quiet.stderr


@pytest.fixture
def every_redraw(monkeypatch):
    """tqdm bars that draw every update, however fast the tiny model is, and never skip one under load.

    TQDM_MININTERVAL and TQDM_MINITERS do not do this: tqdm reads them once, when it is first imported,
    so they had no effect whenever an earlier test in the same worker had imported it."""
    import tqdm

    class EveryUpdate(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

    monkeypatch.setattr(tqdm, "tqdm", EveryUpdate)


def test_cli_dream_and_walk_progress_count_views_and_frames(models, small, tmp_path, capsys, every_redraw):
    Image.fromarray(small["louvre"]).save(tmp_path / "louvre.jpg")
    status = mimetic("dream", str(tmp_path / "louvre.jpg"), "--prompt", "a street", "--steps", "4", "--strength", "0.5",
                     "--sd-batch-size", "2", "--out", str(tmp_path / "d"), "--sd-model", models["sd"],
                     "--clip-model", models["clip"], "--views", "ring4")
    err = capsys.readouterr().err
    assert status == 0, err
    # Four views in two batches of two, two denoising steps each: the bar moves a view per step.
    steps = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("dream:")]
    counts = [float(line.split("|")[-1].split()[0].split("/")[0]) for line in steps]
    # It moves within the panorama, step by step (a redraw may coalesce two steps), never back.
    assert counts[0] == 0.0 and counts[-1] == 4.0 and counts == sorted(counts), err
    assert len({c for c in counts if 0.0 < c < 4.0}) >= 2, err
    assert "4.0/4 views" in steps[-1] and "<00:00" in steps[-1]
    (tmp_path / "walk.yaml").write_text("steps: 2\nkeyframes:\n  - {frame: 0, prompt: a, seed: 1}\n  - {frame: 2, prompt: b, seed: 2}\n")
    status = mimetic("walk", "--keyframes", str(tmp_path / "walk.yaml"), "--out", str(tmp_path / "w.mp4"), "--sd-model", models["sd"])
    err = capsys.readouterr().err
    assert status == 0 and "3.0/3 frames" in err, err
    status = mimetic("walk", "--keyframes", str(tmp_path / "walk.yaml"), "--out", str(tmp_path / "w2.mp4"), "--sd-model", models["sd"], "--quiet")
    err = capsys.readouterr().err
    assert status == 0 and "frames [" not in err, err


def test_the_drift_csv_escapes_formula_text_and_keeps_numbers(engine, dreamer, tmp_path):
    """A prompt a spreadsheet would run (OWASP's CSV injection) is escaped; drift values stay numbers, even negative."""
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    prompt = '=HYPERLINK("http://x","y")'
    result = LoopResult(id="view", frames=frames, drift=[0.0, 0.25, -0.125], step_drift=[0.0, 0.25, 0.5],
                        prompt_cosine=[-0.5, 0.1, 0.2], seeds=[4, 5])
    save_loop([result], tmp_path, engine=engine, dreamer=dreamer, params=LoopParams(iterations=2, prompt=prompt))
    text = (tmp_path / "view-drift.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["prompt"] for r in rows] == ["", "'" + prompt, "'" + prompt]
    assert [float(r["drift"]) for r in rows] == [0.0, 0.25, -0.125] and rows[0]["prompt_cosine"] == "-0.5"
    assert [r["seed"] for r in rows] == ["", "4", "5"] and "'-" not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dream", "p.jpg", "--prompt", "x", "--strength", "1.5", "--out", "o"], "strength"),
        (["dream", "p.jpg", "--prompt", "x", "--steps", "0", "--out", "o"], "steps"),
        (["dream", "p.jpg", "--from-labels", "nonsense", "--out", "o"], "unknown vocabulary"),
        (["dream", "p.jpg", "--prompt", "x", "--size", "100", "--out", "o"], "multiple of 8"),
        (["loop", "i.png", "--iterations", "0", "--out", "o"], "iterations"),
        (["dream", "p.jpg", "--prompt", "x", "--out", "o", "--sd-model", "/nonexistent/sd"], "not found: /nonexistent/sd"),
        (["dream", "p.jpg", "--prompt", "x", "--steps", "4", "--strength", "0.5", "--trajectory-every", "3", "--out", "o"],
         "--trajectory-every) is 3, more than the 2 denoising steps"),
    ],
)
def test_cli_bad_parameters_exit_2_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mimetic(*argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

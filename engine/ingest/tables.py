"""The Arrow tables of a shard: panoramas, views and quarantine."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from engine.ingest.inputs import InputItem, canonical_fields
from engine.results import PANORAMA_FIELDS, VIEW_FIELDS, embedding_lists, label_lists

# -- tables ---------------------------------------------------------------------------------------

# The view and panorama columns are the project's one results schema (engine.results); a run adds the
# city's own columns beside them.
_VIEW = {f.name: f for f in VIEW_FIELDS}
_PANORAMA = {f.name: f for f in PANORAMA_FIELDS}

PANORAMAS_SCHEMA = pa.schema(
    [
        _PANORAMA["id"],
        ("source", pa.string()),
        ("shard", pa.int32()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("heading", pa.float64()),  # compass bearing of the panorama's centre column (yaw 0), from the metadata
        ("captured_at", pa.string()),
        _PANORAMA["meta"],  # JSON: every metadata column, as given
        ("yaw_offset", pa.float64()),  # added to every view's yaw when cutting (-heading with --north-up)
        _PANORAMA["embedding"],
        _PANORAMA["labels"],
    ]
)
VIEWS_SCHEMA = pa.schema(
    [
        *(_VIEW[name] for name in ("id", "view", "yaw", "pitch", "roll", "fov", "width", "height")),  # yaw: a bearing with --north-up
        ("pano_yaw", pa.float32()),  # where the view was cut, in the panorama's own frame (0 = centre column)
        ("bearing", pa.float32()),  # absolute compass bearing (0 = north, 90 = east); null without a heading
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        _VIEW["embedding"],
        _VIEW["labels"],
        _VIEW["thumbnail"],  # null unless the run keeps thumbnails (--thumbnails SIZE)
        ("caption", pa.string()),  # with --captions: the captioner's reading of the view; null otherwise
        ("prompt", pa.string()),  # with --captions: the interrogator prompt, the caption then each flavour's top label
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("shard", pa.int32()), ("reason", pa.string()), ("meta", pa.string())]
)
SCHEMAS = {"panoramas": PANORAMAS_SCHEMA, "views": VIEWS_SCHEMA, "quarantine": QUARANTINE_SCHEMA}
DESCRIPTIONS = {
    "panoramas": "one row per panorama embedded: metadata, pooled CLIP embedding, top labels per vocabulary",
    "views": "one row per perspective view: panorama id, view spec, absolute bearing when the heading is known, embedding, top labels",
    "quarantine": "one row per input that failed, with the reason",
}


def _table(name: str, columns: dict, context: dict) -> pa.Table:
    schema = SCHEMAS[name].with_metadata(
        {"mimetic": json.dumps({"table": name, "description": DESCRIPTIONS[name], **context})}
    )
    arrays = [c if isinstance(c, pa.Array) else pa.array(c, f.type) for f, c in ((f, columns[f.name]) for f in schema)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _captions(done: Sequence[tuple[InputItem, object]], count: int, flavours: Sequence[str]) -> dict[str, list]:
    from engine.dream.interrogate import interrogator_prompt

    captions, prompts = [], []
    for _, r in done:
        if r.captions is None:
            captions += [None] * count
            prompts += [None] * count
            continue
        for k, caption in enumerate(r.captions):
            captions.append(caption)
            prompts.append(interrogator_prompt(caption, {name: r.readings[name]["views"][k][0] for name in flavours}, flavours))
    return {"caption": captions, "prompt": prompts}


def yaw_offset(item: InputItem, north_up: bool) -> float:
    """-heading with --north-up: view yaw v is then cut at v - heading in the panorama, i.e. bearing v."""
    heading = canonical_fields(item.meta)["heading"]
    return -heading if north_up and heading is not None else 0.0


def shard_tables(shard: int, outcomes: Sequence[tuple[InputItem, object]], north_up: bool, context: dict,
                 flavours: Sequence[str] = ()) -> dict[str, pa.Table]:
    """One shard's (item, EmbedResult) pairs -> its panoramas, views and quarantine tables.

    Results with captions (``Engine.embed_iter(captioner=...)``) fill ``caption`` and ``prompt``, the
    caption followed by the top label of each of ``flavours`` (read by the Engine from the same view).

    The views table is built column by column with numpy (every panorama has the same view set), so
    writing a shard costs little next to embedding it, even at GPU rates.
    """
    failed = [(item, r) for item, r in outcomes if r.error is not None]
    done = [(item, r) for item, r in outcomes if r.error is None]
    quarantine = {"id": [i.id for i, _ in failed], "source": [i.source for i, _ in failed], "shard": [shard] * len(failed),
                  "reason": [r.error for _, r in failed], "meta": [json.dumps(i.meta, default=str, sort_keys=True) for i, _ in failed]}
    fields = [canonical_fields(item.meta) for item, _ in done]
    offsets = np.asarray([yaw_offset(item, north_up) for item, _ in done], np.float64)
    column = lambda key: [f[key] for f in fields]  # noqa: E731
    dim = done[0][1].embeddings.shape[-1] if done else 0
    pano = {
        "id": [item.id for item, _ in done], "source": [item.source for item, _ in done], "shard": [shard] * len(done),
        "lat": column("lat"), "lon": column("lon"), "heading": column("heading"), "captured_at": column("captured_at"),
        "meta": [json.dumps(item.meta, default=str, sort_keys=True) for item, _ in done], "yaw_offset": offsets,
        "embedding": embedding_lists(np.stack([r.pooled.float().numpy() for _, r in done]) if done else np.zeros((0, dim))),
        "labels": label_lists([{name: reading["pooled"] for name, reading in r.readings.items()} for _, r in done]),
    }

    specs = done[0][1].views if done else []
    count = len(specs)
    spec = {key: np.asarray([getattr(v, key) for v in specs], np.float64) for key in ("yaw", "pitch", "roll", "fov", "width", "height")}
    cut_at = (spec["yaw"][None, :] + offsets[:, None]) % 360.0  # (M, N): where each view was cut in its panorama
    heading = np.asarray([np.nan if h is None else h for h in column("heading")], np.float64)[:, None]
    # With --north-up the view's own yaw is its bearing; taken directly, it stays exact.
    bearing = np.where(np.isnan(heading), np.nan, spec["yaw"][None, :] % 360.0 if north_up else (cut_at + heading) % 360.0)
    views = {
        "id": np.repeat(np.asarray(pano["id"], dtype=object), count), "view": np.tile(np.arange(count), len(done)),
        **{key: np.tile(values, len(done)) for key, values in spec.items()},
        "pano_yaw": cut_at.reshape(-1), "bearing": pa.array(bearing.reshape(-1), pa.float32(), from_pandas=True),
        "lat": np.repeat(np.asarray(pano["lat"], dtype=object), count), "lon": np.repeat(np.asarray(pano["lon"], dtype=object), count),
        "embedding": embedding_lists(np.concatenate([r.embeddings.float().numpy() for _, r in done]) if done else np.zeros((0, dim))),
        "labels": label_lists([{name: reading["views"][k] for name, reading in r.readings.items()}
                                for _, r in done for k in range(count)]),
        "thumbnail": pa.array([r.thumbnails[k] if r.thumbnails else None for _, r in done for k in range(count)], pa.binary()),
        **_captions(done, count, flavours),
    }
    context = {**context, "embedding_dim": dim}
    return {"panoramas": _table("panoramas", pano, context), "views": _table("views", views, context),
            "quarantine": _table("quarantine", quarantine, context)}

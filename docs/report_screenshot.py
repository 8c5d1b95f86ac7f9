"""Make docs/report.png, the README's picture of ``mimetic report``, from the shared panoramas.

    python docs/report_screenshot.py [--panoramas 200] [--work DIR]

A synthetic city, and labelled so: ``--panoramas`` re-encodes of ../shared/panoramas/louvre.jpg and
jordan-pond.jpg (1024 x 512, each turned by a random yaw), scattered over 4 x 4 km of Rome, with a
made-up ``year_built`` table; ingested with CLIP ViT-B-32 built with random weights (``--thumbnails 64``),
then reported with two queries and ``--against year_built``. The page says, at its top, that the readings
are meaningless. The screenshot is taken in headless Chromium with the first query's circles on the map
and a panorama hovered.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PANORAMAS = Path(os.environ.get("MIMETIC_PANORAMAS") or ROOT.parent / "shared" / "panoramas")  # as bench._results
SHOW = """new Promise(done => {
  const select = document.getElementById('map-query');
  select.value = 'query:0'; select.dispatchEvent(new Event('change'));
  const div = document.getElementById('fig-map'), trace = div.data[0], layout = div._fullLayout, drag = div.querySelector('.nsewdrag');
  const box = drag.getBoundingClientRect();
  drag.dispatchEvent(new MouseEvent('mousemove', {clientX: box.left + layout.xaxis.l2p(trace.x[0]),
                                                  clientY: box.top + layout.yaxis.l2p(trace.y[0]), bubbles: true}));
  window.scrollTo(0, 0);
  setTimeout(() => done(true), 500);
})"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--panoramas", type=int, default=200)
    parser.add_argument("--work", type=Path, default=None, help="a new folder for the dump, the run and the report (default: a temporary one)")
    args = parser.parse_args()
    from engine.analysis import ReportOptions, build_report
    from engine.analysis.browser import open_page
    from engine.config import EngineConfig
    from engine.ingest.job import ingest

    work = args.work or Path(tempfile.mkdtemp(prefix="mimetic-docs-"))
    rng = np.random.default_rng(7)
    sources = [np.asarray(Image.open(PANORAMAS / name).convert("RGB").resize((1024, 512), Image.Resampling.LANCZOS))
               for name in ("louvre.jpg", "jordan-pond.jpg")]
    dump = work / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    rows, ages = ["id,lat,lon,note"], ["id,year_built"]
    for k in range(args.panoramas):
        pano = np.roll(sources[k % 2], int(rng.integers(0, 1024)), axis=1)
        buffer = io.BytesIO()
        Image.fromarray(pano).save(buffer, format="JPEG", quality=88)
        (dump / f"pano{k:04d}.jpg").write_bytes(buffer.getvalue())
        rows.append(f"pano{k:04d},{41.88 + rng.uniform(0, 0.036):.6f},{12.46 + rng.uniform(0, 0.048):.6f},synthetic city")
        ages.append(f"pano{k:04d},{int(rng.uniform(1500, 2000))}")
    (work / "where.csv").write_text("\n".join(rows) + "\n")
    (work / "ages.csv").write_text("\n".join(ages) + "\n")
    config = EngineConfig(clip_model="ViT-B-32", random_weights=True, batch_size=64)
    ingest(dump, work / "run", config=config, metadata=[work / "where.csv"], thumbnails=64, shard_size=100)
    options = ReportOptions(queries=["a baroque church", "a lake in the woods"], against="year_built", metadata=[work / "ages.csv"])
    build_report(work / "run", work / "report", options)
    shot = ROOT / "docs" / "report.png"
    seen = open_page(work / "report" / "index.html", screenshot=work / "full.png", width=1400, height=900, evaluate=[SHOW])
    Image.open(work / "full.png").convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(shot, optimize=True)
    print(f"{shot}: {shot.stat().st_size / 1024:.0f} KB; first screen drawn in {seen.first_screen:.2f} s, every figure in "
          f"{seen.seconds:.2f} s, {len(seen.errors)} errors, {len(seen.requests)} requests; work in {work}")


if __name__ == "__main__":
    main()

"""Draw the PNGs of a gpu_check.sh run on the CPU, afterwards (the device tool returns 8 files, so none are drawn
there): one PNG beside each JSON that has measurements, through record.plot_results.

    python benchmarks/plot_gpu_check.py benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import plot_results  # noqa: E402

# (JSON name, PNG name, plot_results arguments); a record enters a chart only with status "ok" and the y value.
# gpu_probe.json (pass/fail, two ceilings) and gpu_tests.json are read in the summary, not drawn.
CHARTS = (
    ("gpu_linear_logps.json", "gpu_linear_logps.png", dict(x="impl", y="tflops_equiv", group="shape", facet="mode")),
    ("gpu_linear_logps.json", "gpu_linear_logps_memory.png",
     dict(x="impl", y="extra_mib", group="shape", facet="mode", log_y=True)),
    ("gpu_step.json", "gpu_step.png", dict(x="method", y="step_ms", group="mode", facet="config")),
    ("gpu_tiles.json", "gpu_tiles.png", dict(x="config", y="median_ms", group="op")),
)


def draw(folder: Path) -> list[Path]:
    drawn = []
    for name, png, chart in CHARTS:
        path = folder / name
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        ok = [r for r in payload["records"] if r.get("status") == "ok" and r.get(chart["y"]) is not None]
        if not ok:
            print(f"{png}: nothing measured in {name}, no chart")
            continue
        only_ok = path.with_name(Path(png).stem + "_ok.json")
        only_ok.write_text(json.dumps(dict(payload, records=ok)))
        try:
            drawn.append(plot_results(only_ok, **chart).rename(folder / png))
        finally:
            only_ok.unlink()
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    for png in draw(args.folder):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

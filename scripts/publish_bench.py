"""Copy a finished `spindle-local bench` run into docs/: docs/benchmarks.md + docs/bench/*.png.

Usage: python scripts/publish_bench.py OUT_DIR "EXACT COMMAND" [NOTES.md]

The report is re-rendered from OUT_DIR/results.json with the plots next to it; NOTES.md
(hand-written analysis: where we lose and why) is appended when given.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from spindle_local.eval.bench import write_report

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    command = sys.argv[2]
    doc = json.loads((out / "results.json").read_text())
    target = ROOT / "docs" / "bench"
    target.mkdir(parents=True, exist_ok=True)
    report = write_report(doc, target)
    body = report.read_text()
    report.unlink()
    header = (f"Command: `{command}`\n\n"
              "Reproduce on a fresh machine: `make setup && .venv/bin/spindle-local setup --stock`, then the command.\n\n")
    body = body.replace("# spindle-local benchmark\n", "# spindle-local benchmarks\n\n" + header, 1)
    body = body.replace("](memory_vs_kld.png)", "](bench/memory_vs_kld.png)")
    body = body.replace("](needle_heatmaps.png)", "](bench/needle_heatmaps.png)")
    if len(sys.argv) > 3:
        body += "\n" + Path(sys.argv[3]).read_text()
    (ROOT / "docs" / "benchmarks.md").write_text(body)
    shutil.copy(out / "results.json", target / "results.json")
    print(ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

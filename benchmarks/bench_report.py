"""The report at scale: SmolLM2-135M (bundled, 30 layers) with every default, on a paragraph
of about 100 tokens: the page's size, the time `report` takes (wall clock and this
process's CPU time, 2 threads; the load average is printed, since the machine may be
shared), and the time and peak memory (resident, every process of the browser) headless
Chromium takes until every component is drawn.

Issue 20's targets: ≤ 8 MiB, ≤ 60 s on a 2-core machine, rendered by headless Chromium.

Run: ``python benchmarks/bench_report.py`` (a minute or two of CPU). To measure another
checkout of the library with the same script: ``PYTHONPATH=/path/to/checkout python
benchmarks/bench_report.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import tl_decomp as td
from tl_decomp.reporting import report

PARAGRAPH = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He carried a small "
    "lamp, a notebook and a thermos of tea. From the top he could see the fishing boats "
    "returning to the harbour, their lights scattered across the dark water like stars. "
    "Some nights the wind was so strong that the whole tower seemed to sway, but he never "
    "missed a single evening. When he finally retired, the town gave him a brass telescope, "
    "and he still watches the boats from his kitchen window."
)


LIMIT = 600  # seconds for Chromium to draw the page (a page script can block Playwright's calls)


def _tree_rss(root: int) -> int:
    """Resident bytes of every descendant of process `root` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    total, todo = 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rss = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if x.startswith("VmRSS:"))  # fmt: skip
            total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return total


class _PeakMemory:
    """The peak of `_tree_rss(this process)`, sampled twice a second while in the block."""

    def __enter__(self) -> _PeakMemory:
        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._done.wait(0.5):
            self.peak = max(self.peak, _tree_rss(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def main() -> None:
    torch.set_num_threads(2)
    print(f"tl_decomp from {Path(td.__file__).parent}; load average {os.getloadavg()}")
    model = td.load_model("smollm2")
    path = Path(tempfile.mkdtemp(prefix="bench_report_")) / "smollm2.html"
    wall, cpu = time.perf_counter(), time.process_time()
    rep = report(model, PARAGRAPH, path, model_name="smollm2", progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    size = path.stat().st_size / 2**20
    print(f"{len(rep.tokens)} tokens: page {size:.1f} MiB, report {wall:.1f} s wall "
          f"({cpu:.1f} s CPU); load average {os.getloadavg()}")  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.browser import load  # Playwright on the system Chromium

    glyphs = sum(t != t.replace("Ġ", "").replace("Ċ", "") for t in rep.tokens)
    left_out = getattr(rep, "left_out", ())  # the report before issue 20 had none
    print(f"tokens with byte-level BPE glyphs (Ġ, Ċ): {glyphs}; left out: {len(left_out)}")
    got: dict = {}

    def render() -> None:  # a page too large to open is the figure: no answer at all
        try:
            got["page"] = load(path, timeout=180)
        except Exception as err:
            got["failure"] = f"{type(err).__name__}: {str(err)[:200]}"

    with _PeakMemory() as memory:
        thread = threading.Thread(target=render, daemon=True)
        thread.start()
        thread.join(LIMIT)
    peak = memory.peak / 2**30
    if "page" not in got:
        why = got.get("failure", f"no answer within {LIMIT} s")
        print(f"Chromium: not rendered ({why}); peak {peak:.1f} GiB resident", flush=True)
        os._exit(1)  # Playwright's driver, then Chromium, end with this process
    page = got["page"]
    comps = page.dom["components"]
    drawn = sum(c["mounted"] and (c["drawn"] > 1 or c["spans"] > 0) for c in comps)
    shot = len(page.png) / 2**20
    print(f"Chromium: {drawn} of {len(comps)} components drawn in {page.seconds:.1f} s, "
          f"peak {peak:.1f} GiB resident; {len(page.problems)} script problems; "
          f"screenshot {shot:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()

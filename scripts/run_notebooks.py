"""Execute every demo notebook in place of a reader, failing on the first error."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(folder: str) -> int:
    books = sorted(Path(folder).glob("*.ipynb"))
    if not books:
        print(f"no notebooks in {folder}", file=sys.stderr)
        return 1
    for path in books:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb,
            timeout=900,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
        print(f"{path}: ok in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demos"))

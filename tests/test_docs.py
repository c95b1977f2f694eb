"""The docs run: every ```python block of README.md, CONTRIBUTING.md and docs/*.md is
executed in order, one namespace per file (a block may use what an earlier block of the same
file defined), and every `tl-decomp ...` line of a ```bash block parses with the CLI's own
parser (not run: `tests/test_cli.py` runs the CLI).

The blocks check their own claims with `assert` statements; this test adds that each block
ran and that the names the README promises exist. The bundled models are the real ones
(MiniLM loads in seconds; SmolLM2 in one or two once `load_model` has dequantised it into
`$TL_DECOMP_CACHE`, which the bundled tests do too).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced block in `lang`, in order."""
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == lang
    ]


def cli_lines(code: str) -> list[str]:
    """The `tl-decomp` commands of a bash block, comments dropped, `&&` chains split."""
    out = []
    for line in code.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "tl-decomp":
                out.append(part.strip())
    return out


def with_python(paths: list[Path]) -> list[Path]:
    return [p for p in paths if blocks(p, "python")]


@pytest.mark.bundled
@pytest.mark.parametrize("path", with_python(DOCS), ids=lambda p: p.name)
def test_python_blocks_run_in_order(path: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plots draw off-screen
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    ran = 0
    for line, code in blocks(path, "python"):
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as e:  # name the block: its line in the file
            raise AssertionError(f"{path.name}, the python block at line {line} failed") from e
        ran += 1
    assert ran == len(blocks(path, "python")) > 0
    if path.name == "README.md":
        check_readme_namespace(namespace)


def check_readme_namespace(ns: dict) -> None:
    """What the README's prose promises, beyond the blocks' own asserts."""
    import matplotlib.pyplot as plt

    td = ns["td"]
    plt.close("all")
    for name in (
        "decompose",
        "decompose_layers",
        "corpus_statistics",
        "DecompositionRecipe",
        "effective_attention",
        "effective_attention_layers",
        "attention_null_space",
        "attention_correlation",
        "special_token_attention",
        "attention_names_filter",
        "token_identifiability",
        "hidden_token_attribution",
        "probe_subsets",
        "masked_prediction",
        "report",
        "load_corpus",
        "load_pos",
        "tiny_model",
    ):
        assert name in td.__all__, name
    for name in (
        "shares",
        "layer_stats",
        "identifiability",
        "attribution",
        "attribution_by_offset",
        "correlation_by_length",
    ):
        assert callable(getattr(td.plots, name)), name
    # The layer table: MiniLM's "final" is layer 6; SmolLM2's is a site of its own.
    assert ns["heads"].layer == ns["model"].cfg.n_layers == 6
    assert ns["d"].layer == "final" and ns["lens"][-1].layer == "final"
    assert [x.layer for x in ns["lens"]] == [10, 20, 30, "final"]
    assert ns["att"].layers == (1, 6)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_cli_lines_parse(path: Path):
    from tl_decomp.cli import build_parser

    for _, code in blocks(path, "bash"):
        for command in cli_lines(code):
            args = shlex.split(command, comments=True)[1:]
            if args == ["--version"]:
                continue  # argparse's version action prints and exits by design
            try:
                build_parser().parse_args(args)
            except SystemExit as e:
                raise AssertionError(f"{path.name}: {command!r} does not parse") from e


def test_the_readme_names_its_commands():
    """The README shows each subcommand and the flags of issue #11 at least once."""
    text = (ROOT / "README.md").read_text()
    commands = [c for _, code in blocks(ROOT / "README.md", "bash") for c in cli_lines(code)]
    for needle in (
        "tl-decomp decompose",
        "tl-decomp stats",
        "tl-decomp report",
        "--layers",
        "--granularity",
        "--json",
        "--csv",
        "--attention-blocks",
        "--attribution-layers",
        "--max-tokens",
        "tl-decomp --version",
    ):
        assert any(needle in c for c in commands), needle
    assert "SPEC" not in text, "cite docs/method.md, not a file the repository does not ship"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_to_docs_resolve(path: Path):
    """Every relative link (`docs/method.md#6-effective-attention`) names a file that ships
    and, with an anchor, a heading of it."""
    for target, anchor in re.findall(r"\]\(([^)#:\s]*\.md)(?:#([^)\s]+))?\)", path.read_text()):
        linked = (path.parent / target).resolve()
        assert linked.is_file(), f"{path.name} links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{path.name}: {target}#{anchor}"

"""A small offline English corpus shipped with tl_decomp.

``data/corpus.txt`` holds 2,500 English prose sentences, one per line, taken
from Jane Austen's six completed novels (public domain, via Project Gutenberg)
as packaged in Debian's ``r-cran-janeaustenr`` 1.0.0-1 (MIT). See
``data/CORPUS.md`` for the exact source and extraction rules, and
``data/build_corpus.py`` to rebuild the file.
"""

from __future__ import annotations

from importlib.resources import files


def load_corpus(n: int | None = None) -> list[str]:
    """Return sentences from the bundled English corpus.

    Args:
        n: How many sentences to return, counted from the start of the file.
            ``None`` (the default) returns every sentence; a value larger than
            the corpus returns the whole corpus.

    Returns:
        A list of sentences (str), in file order, without trailing newlines.

    Raises:
        ValueError: If ``n`` is less than 1.

    Example:
        >>> len(load_corpus(3))
        3
        >>> load_corpus(1)[0].split(",")[0]
        'Emma Woodhouse'
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    text = (files("tl_decomp") / "data" / "corpus.txt").read_text(encoding="utf-8")
    sentences = text.splitlines()
    return sentences if n is None else sentences[:n]

"""Token-labelled data for probing: the shipped POS-tagged corpus, and checks on user data.

``data/pos.tsv`` is the shipped corpus (``load_corpus``) tokenized Penn-Treebank style and
tagged by an averaged-perceptron tagger (silver labels; provenance, licence and a spot check
of their accuracy in ``data/POS.md``). Any other data set is a pair ``(words, labels)``: a
list of sentences, each a list of words, and a parallel list of per-word labels.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal

from tl_decomp._core.results import Result

# Penn Treebank -> the universal tagset of Petrov, Das & McDonald (2012), en-ptb mapping.
UNIVERSAL = {
    **dict.fromkeys(["#", "$", "''", "``", ",", "-LRB-", "-RRB-", ".", ":"], "."),
    **dict.fromkeys(["JJ", "JJR", "JJS"], "ADJ"),
    **dict.fromkeys(["IN"], "ADP"),
    **dict.fromkeys(["RB", "RBR", "RBS", "WRB"], "ADV"),
    **dict.fromkeys(["CC"], "CONJ"),
    **dict.fromkeys(["DT", "EX", "PDT", "WDT"], "DET"),
    **dict.fromkeys(["NN", "NNS", "NNP", "NNPS"], "NOUN"),
    **dict.fromkeys(["CD"], "NUM"),
    **dict.fromkeys(["POS", "RP", "TO"], "PRT"),
    **dict.fromkeys(["PRP", "PRP$", "WP", "WP$"], "PRON"),
    **dict.fromkeys(["MD", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ"], "VERB"),
    **dict.fromkeys(["FW", "LS", "SYM", "UH"], "X"),
}


@dataclass(frozen=True, repr=False)
class LabelledWords(Result):
    """Sentences as words with one label per word; unpacks as ``words, labels = data``.

    Attributes:
        words: one tuple of words per sentence.
        labels: one tuple of labels per sentence, aligned with `words`.
    """

    words: tuple[tuple[str, ...], ...]
    labels: tuple[tuple[Hashable, ...], ...]

    def rows(self) -> list[dict[str, Any]]:
        """One row per word occurrence: ``sentence``, ``word``, ``label``."""
        return [
            {"sentence": s, "word": w, "label": label}
            for s, (ws, ls) in enumerate(zip(self.words, self.labels, strict=True))
            for w, label in zip(ws, ls, strict=True)
        ]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.words, self.labels))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def n_words(self) -> int:
        """Word occurrences over all sentences."""
        return sum(len(s) for s in self.words)

    @property
    def classes(self) -> tuple[Hashable, ...]:
        """The distinct labels, sorted."""
        return tuple(sorted({x for s in self.labels for x in s}, key=str))

    def head(self, n: int) -> LabelledWords:
        """The first `n` sentences."""
        return LabelledWords(self.words[:n], self.labels[:n])


def as_labelled(data: Any) -> LabelledWords:
    """Check a ``(words, labels)`` pair (or a `LabelledWords`) and return it as `LabelledWords`.

    Raises:
        ValueError: no sentences, an empty sentence or word, labels not aligned with the
            words (the message names the sentence), or a single class.

    Example:
        >>> d = as_labelled(([["The", "cat"], ["sat"]], [["DET", "NOUN"], ["VERB"]]))
        >>> d.n_words, d.classes
        (3, ('DET', 'NOUN', 'VERB'))
        >>> as_labelled(([["The", "cat"]], [["DET"]]))
        Traceback (most recent call last):
        ...
        ValueError: sentence 0 has 2 words but 1 labels
    """
    if isinstance(data, LabelledWords):
        words, labels = data.words, data.labels
    else:
        try:
            words, labels = data
        except (TypeError, ValueError):
            raise ValueError("expected a (words, labels) pair of parallel lists") from None
    for name, part in (("words", words), ("labels", labels)):
        if isinstance(part, str) or not isinstance(part, Sequence):
            raise ValueError(f"{name} must be a list of sentences, each a list")
    if len(words) == 0:
        raise ValueError("empty dataset: no sentences")
    if len(words) != len(labels):
        raise ValueError(f"{len(words)} sentences of words but {len(labels)} of labels")
    out_w, out_l = [], []
    for k, (ws, ls) in enumerate(zip(words, labels, strict=True)):
        if isinstance(ws, str) or isinstance(ls, str):
            raise ValueError(f"sentence {k}: give a list of words and a list of labels, not a str")
        if len(ws) != len(ls):
            raise ValueError(f"sentence {k} has {len(ws)} words but {len(ls)} labels")
        if len(ws) == 0:
            raise ValueError(f"sentence {k} is empty")
        if any(not isinstance(w, str) or not w.strip() for w in ws):
            raise ValueError(f"sentence {k} has an empty or non-string word")
        out_w.append(tuple(w.strip() for w in ws))
        out_l.append(tuple(ls))
    result = LabelledWords(tuple(out_w), tuple(out_l))
    if len(result.classes) < 2:
        raise ValueError(f"a single class {result.classes!r}: probing needs at least two")
    return result


def load_pos(n: int | None = None, *, tagset: Literal["universal", "ptb"] = "universal"):
    """The shipped POS-tagged corpus: 2,500 Austen sentences, 61,971 words.

    Args:
        n: how many sentences, from the start (None: all).
        tagset: ``universal`` (12 tags, Petrov et al. 2012) or ``ptb`` (the tagger's 45-tag
            Penn Treebank set).

    Returns:
        `LabelledWords`; sentence ``k`` is line ``k`` of `load_corpus`, split into words.

    Example:
        >>> words, labels = load_pos(2)
        >>> list(zip(words[1], labels[1]))[:4]
        [('It', 'PRON'), ('was', 'VERB'), ('Miss', 'NOUN'), ('Taylor', 'NOUN')]
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if tagset not in ("universal", "ptb"):
        raise ValueError(f"tagset must be 'universal' or 'ptb', not {tagset!r}")
    text = (files("tl_decomp") / "data" / "pos.tsv").read_text(encoding="utf-8")
    words, labels = [], []
    for block in text.split("\n\n")[:n]:
        pairs = [line.split("\t") for line in block.splitlines()]
        words.append(tuple(w for w, _ in pairs))
        labels.append(tuple(t if tagset == "ptb" else UNIVERSAL[t] for _, t in pairs))
    return LabelledWords(tuple(words), tuple(labels))


__all__ = ["UNIVERSAL", "LabelledWords", "as_labelled", "load_pos"]

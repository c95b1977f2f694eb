"""Data shipped with the package (no download): the English corpus (`load_corpus`) and the
part-of-speech tagged words (`load_pos`); files and provenance in `tl_decomp/data/`."""

from tl_decomp.datasets._corpus import load_corpus
from tl_decomp.datasets._pos import UNIVERSAL, LabelledWords, as_labelled, load_pos

__all__ = ["UNIVERSAL", "LabelledWords", "as_labelled", "load_corpus", "load_pos"]

"""Re-create pos.tsv: corpus.txt tokenized Penn-Treebank style and POS-tagged (see POS.md).

Usage: python build_pos.py PATH/TO/trontagger-0.1.0.pickle [out]

The tagger is Matthew Honnibal's greedy averaged perceptron (MIT), whose trained weights ship
inside the PyPI wheel ``textblob-aptagger==0.2.0``. Only the pickle is read, through an
unpickler that admits nothing but ``set``; the 30 lines of tagging logic below follow
``textblob_aptagger/taggers.py`` exactly, so neither textblob nor nltk is needed.
Standard library only. Importing this module does nothing.
"""

import pickle
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
START, END = ["-START-", "-START2-"], ["-END-", "-END2-"]
CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
KEEP = {"o'clock", "ma'am"}  # one word each, as in the Penn Treebank
LEADING = "\"'("
TRAILING = ",;:!?\"')"


class _OnlySets(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("__builtin__", "set"):
            return set
        raise pickle.UnpicklingError(f"refusing {module}.{name} in the tagger pickle")


def load_tagger(path):
    """(weights, tagdict, classes) from trontagger-0.1.0.pickle (a Python 2 pickle)."""
    with open(path, "rb") as f:
        return _OnlySets(f, encoding="utf-8").load()


def split_word(chunk, last):
    """Penn-style pieces of one whitespace-delimited chunk (no dash inside)."""
    lead, tail = [], []
    while chunk and chunk[0] in LEADING and len(chunk) > 1:
        lead.append(chunk[0])
        chunk = chunk[1:]
    while chunk and (chunk[-1] in TRAILING or (last and chunk[-1] == ".")):
        tail.insert(0, chunk[-1])
        chunk = chunk[:-1]
    m = CLITIC.match(chunk)
    core = [m.group(1), m.group(2)] if m and chunk.lower() not in KEEP else [chunk] if chunk else []
    return lead + core + tail


def tokenize(sentence):
    """Whitespace, then the em dash, then leading/trailing punctuation and clitics."""
    chunks = [p for c in sentence.split() for p in re.split(r"(\u2014)", c) if p]
    words = []
    for k, chunk in enumerate(chunks):
        if chunk == "\u2014":
            words.append(chunk)
        else:
            words.extend(split_word(chunk, last=k == len(chunks) - 1))
    return words


def tagger_view(words):
    """What the tagger was trained on: Penn quotes ``/'' and -- for the em dash."""
    out, open_double = [], False
    for k, w in enumerate(words):
        if w == '"':
            open_double = not open_double
            out.append("``" if open_double else "''")
        elif w == "'":
            # An opening single quote starts a sentence or follows punctuation.
            after_punct = k == 0 or not words[k - 1][-1:].isalnum()
            opening = after_punct and k + 1 < len(words) and words[k + 1][:1].isalpha()
            out.append("`" if opening else "'")
        elif w == "\u2014":
            out.append("--")
        else:
            out.append(w)
    return out


def normalize(word):
    if "-" in word and word[0] != "-":
        return "!HYPHEN"
    if word.isdigit() and len(word) == 4:
        return "!YEAR"
    if word[0].isdigit():
        return "!DIGITS"
    return word.lower()


def features(i, word, context, prev, prev2):
    feats = defaultdict(int)

    def add(name, *args):
        feats[" ".join((name, *args))] += 1

    i += len(START)
    add("bias")
    add("i suffix", word[-3:])
    add("i pref1", word[0])
    add("i-1 tag", prev)
    add("i-2 tag", prev2)
    add("i tag+i-2 tag", prev, prev2)
    add("i word", context[i])
    add("i-1 tag+i word", prev, context[i])
    add("i-1 word", context[i - 1])
    add("i-1 suffix", context[i - 1][-3:])
    add("i-2 word", context[i - 2])
    add("i+1 word", context[i + 1])
    add("i+1 suffix", context[i + 1][-3:])
    add("i+2 word", context[i + 2])
    return feats


def predict(weights, classes, feats):
    scores = defaultdict(float)
    for feat, value in feats.items():
        for label, weight in weights.get(feat, {}).items():
            scores[label] += value * weight
    return max(classes, key=lambda label: (scores[label], label))


def tag(model, words):
    """Greedy left-to-right tagging of one sentence (textblob_aptagger's `tag`)."""
    weights, tagdict, classes = model
    view = tagger_view(words)
    context = START + [normalize(w) for w in view] + END
    prev, prev2 = START
    tags = []
    for i, word in enumerate(view):
        t = tagdict.get(word) or predict(weights, classes, features(i, word, context, prev, prev2))
        tags.append(t)
        prev2, prev = prev, t
    return tags


def main(pickle_path, out):
    model = load_tagger(pickle_path)
    lines, n_words = [], 0
    for sentence in (HERE / "corpus.txt").read_text(encoding="utf-8").splitlines():
        words = tokenize(sentence)
        for w, t in zip(words, tag(model, words), strict=True):
            lines.append(f"{w}\t{t}")
        lines.append("")
        n_words += len(words)
    Path(out).write_text("\n".join(lines), encoding="utf-8")
    print(f"{n_words} words in {lines.count('')} sentences written to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else HERE / "pos.tsv")

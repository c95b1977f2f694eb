"""Re-create corpus.txt from janeaustenr's Rdata.rdb (see CORPUS.md).

Usage: python build_corpus.py /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb [out]
Standard library only.
"""
import re
import struct
import sys
import zlib
from pathlib import Path

TARGET = 2500  # sentences kept, evenly spaced over all candidates
ABBREV = re.compile(r"\b(?:Mr|Mrs|Dr|St|Messrs|Col|Capt|Lieut|Gen|Esq)\.$")
SPLIT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'(]?[A-Z])")
GOOD = re.compile(r"^[\"']?[A-Z][^*\[\]&()]*[.!?][\"']?$")


def read_books(path):
    """Yield each novel as a list of lines from an R lazy-load .rdb file."""
    data, pos = Path(path).read_bytes(), 0
    while pos < len(data):  # blobs: 4-byte length + zlib(serialize(x))
        dec = zlib.decompressobj()
        raw = dec.decompress(data[pos + 4:])
        pos = len(data) - len(dec.unused_data)
        i = 18 + struct.unpack(">i", raw[14:18])[0]  # skip "X\n", v3 header
        flags, n = struct.unpack(">ii", raw[i:i + 8])
        assert raw[:2] == b"X\n" and flags & 0xFF == 16, "not a STRSXP"
        i, lines = i + 8, []
        for _ in range(n):  # CHARSXP: flags, length (-1 = NA), bytes
            ln = struct.unpack(">i", raw[i + 4:i + 8])[0]
            lines.append(raw[i + 8:i + 8 + max(ln, 0)].decode("utf-8"))
            i += 8 + max(ln, 0)
        yield lines


def sentences(lines):
    """Join lines into paragraphs, then split paragraphs into sentences."""
    for para in re.split(r"\n\s*\n", "\n".join(lines)):
        text = " ".join(para.split()).replace("_", "")
        text = re.sub(r"([.!?])--", r"\1 ", text).replace("--", "\u2014")
        parts = []
        for piece in SPLIT.split(text):
            if parts and ABBREV.search(parts[-1]):
                parts[-1] += " " + piece
            else:
                parts.append(piece)
        yield from parts


def main(src, out):
    seen, cands = set(), []
    for book in read_books(src):
        for s in sentences(book):
            if (5 <= len(s.split()) <= 60 and GOOD.match(s)
                    and s.count('"') % 2 == 0 and s not in seen):
                seen.add(s)
                cands.append(s)
    step = len(cands) / TARGET
    keep = [cands[int(k * step)] for k in range(min(TARGET, len(cands)))]
    Path(out).write_text("\n".join(keep) + "\n", encoding="utf-8")
    print(f"{len(cands)} candidates, {len(keep)} written to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else
         Path(__file__).with_name("corpus.txt"))

"""`tl-decomp`: the library's main jobs from a terminal.

tl-decomp decompose "The cat sat on the mat." --model minilm
tl-decomp stats --model smollm2 --sentences 200
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tl_decomp.models import BUNDLED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-decomp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decompose", help="share of i, h, f, c in every layer for one text")
    d.add_argument("text")
    s = sub.add_parser("stats", help="mean ± std shares per layer over the shipped corpus")
    s.add_argument("--sentences", type=int, default=200, help="corpus sentences (default 200)")
    s.add_argument("--batch-size", type=int, default=16)
    for q in (d, s):
        q.add_argument(
            "--model",
            default="minilm",
            help=f"a bundled model ({', '.join(BUNDLED)}) or a hub name",
        )
        q.add_argument("--centering", choices=("correction", "terms"), default="correction")
    return p


def _decompose(args: argparse.Namespace) -> int:
    from tl_decomp.decompose import decompose_layers
    from tl_decomp.models import load_model

    if not args.text.strip():
        raise ValueError("TEXT is empty")
    model = load_model(args.model)
    ds = decompose_layers(model, args.text, centering=args.centering)
    ids = ds[0].tokens
    assert ids is not None  # decompose_layers always records its input
    tokens = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    print(f"{args.model}: {len(tokens)} tokens: {' '.join(tokens)}")
    print("mean share <e,t>/|e|^2 over tokens (the four sum to 1)")
    print(f"{'layer':>6} " + "".join(f"{k:>8}" for k in ds[0].labels) + f"{'max rel err':>14}")
    for d in ds:
        row = "".join(f"{v:>8.3f}" for v in d.shares()[:, 0].mean(-1).tolist())
        name = "final" if d.layer is None else str(d.layer + 1)
        print(f"{name:>6} {row}{d.relative_error:>14.2e}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from tl_decomp.corpus import load_corpus
    from tl_decomp.models import load_model
    from tl_decomp.stats import corpus_statistics

    model = load_model(args.model)
    stats = corpus_statistics(
        model, load_corpus(args.sentences), batch_size=args.batch_size, centering=args.centering
    )
    print(
        f"{args.model}: {stats.n_tokens} tokens, max relative error {stats.max_relative_error:.2e}"
    )
    print(stats.table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad arguments, 1 failure)."""
    args = _parser().parse_args(argv)
    try:
        return {"decompose": _decompose, "stats": _stats}[args.command](args)
    except (ValueError, ModuleNotFoundError, NotImplementedError) as err:
        print(f"tl-decomp: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())

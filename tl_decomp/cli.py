"""`tl-decomp`: the library's main jobs from a terminal.

tl-decomp decompose "The cat sat on the mat." --model minilm
tl-decomp stats --model smollm2 --sentences 200
tl-decomp report "The cat sat on the mat." --model minilm -o report.html
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tl_decomp.models import BUNDLED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-decomp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decompose", help="share of i, h, f, c in every layer for one text")
    d.add_argument("text")
    s = sub.add_parser("stats", help="mean ± std shares per layer over the shipped corpus")
    s.add_argument("--sentences", type=int, default=200, help="corpus sentences (default 200)")
    s.add_argument("--batch-size", type=int, default=16)
    r = sub.add_parser(
        "report",
        help="one self-contained HTML page (opens offline): every view, plots and tables",
        description="Decomposition, raw vs effective attention, identifiability and Hidden "
        "Token Attribution of one text, as one HTML page that needs no network.",
    )
    r.add_argument("text", help="one short text; longer than d_head tokens to see A_eff != A")
    r.add_argument(
        "-o",
        "--output",
        default="report.html",
        metavar="PATH",
        help="where to write the page (report.html)",
    )
    r.add_argument(
        "--attention-layers", type=_layers, metavar="L,L", help="blocks to show, e.g. 0,5 (all)"
    )
    r.add_argument(
        "--attribution-layers",
        type=_layers,
        default=(1, 2, 3),
        metavar="L,L",
        help="hidden-state layers (0 = input) for attribution, e.g. 1,6; '' skips it (1,2,3)",
    )
    r.add_argument("--exact", action="store_true", help="exact attribution (slow) not estimate")
    r.add_argument("--probes", type=int, default=8, metavar="N", help="probes per token (8)")
    r.add_argument("--query", type=int, metavar="POS", help="token whose attribution to show")
    r.add_argument(
        "--corpus",
        type=int,
        default=0,
        metavar="N",
        help="also fit a linear identifiability map on N sentences of the shipped corpus (0)",
    )
    r.add_argument("--max-tokens", type=int, default=48, metavar="N", help="refuse longer (48)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    for q in (d, s, r):
        q.add_argument(
            "--model",
            default="minilm",
            help=f"a bundled model ({', '.join(BUNDLED)}) or a hub name",
        )
    for q in (d, s):
        q.add_argument("--centering", choices=("correction", "terms"), default="correction")
    return p


def _layers(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of layers: {value!r}"
        ) from None


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


def _report(args: argparse.Namespace) -> int:
    from tl_decomp.models import load_model
    from tl_decomp.report import check_path, report

    if not args.text.strip():
        raise ValueError("TEXT is empty")
    out = check_path(args.output)  # before the model loads: a bad path fails in a second
    replaced = out.exists()
    if not args.no_progress:
        print(f"loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model)
    rep = report(
        model,
        args.text,
        out,
        model_name=args.model,
        attention_layers=args.attention_layers,
        attribution_layers=args.attribution_layers,
        attribution_method="exact" if args.exact else "estimate",
        n_probes=args.probes,
        query=args.query,
        corpus_sentences=args.corpus,
        max_tokens=args.max_tokens,
        progress=not args.no_progress,
    )
    print(rep.summary())
    size = Path(out).stat().st_size / 2**20
    what = "replaced" if replaced else "wrote"
    print(f"\n{what} {out} ({size:.1f} MiB, self-contained) in {rep.seconds:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad arguments, 1 failure)."""
    args = _parser().parse_args(argv)
    try:
        return {"decompose": _decompose, "stats": _stats, "report": _report}[args.command](args)
    except (ValueError, ModuleNotFoundError, NotImplementedError, OSError) as err:
        print(f"tl-decomp: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())

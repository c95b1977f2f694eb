"""`tl-decomp`: the library's main jobs from a terminal.

tl-decomp decompose "The cat sat on the mat." --model minilm
tl-decomp stats --model smollm2 --sentences 200
tl-decomp report "The cat sat on the mat." --model minilm -o report.html

Layers are residual-stream indices, as everywhere in tl_decomp: 0 is the layer-0 input,
l the output of block l-1, negatives count from the end, "final" is a decoder's final-norm
output. Every option's form is checked before the model loads; what needs the model
(layer ranges, the query position) before any forward pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, get_args

from tl_decomp.decomposition import Centering, Granularity
from tl_decomp.models import BUNDLED


def _version() -> str:
    try:
        return version("tl-decomp")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser; its choices derive from the library's option sets."""
    p = argparse.ArgumentParser(prog="tl-decomp", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decompose", help="share of each term at every layer for one text")
    d.add_argument("text")
    d.add_argument(
        "--layers", type=_layer_list, metavar="L,L", help="layers, e.g. 0,3,-1,final (all)"
    )
    d.add_argument(
        "--granularity",
        choices=[g for g in get_args(Granularity) if g != "source"],  # source: no terminal table
        default="coarse",
    )
    s = sub.add_parser("stats", help="mean ± std shares per layer over the shipped corpus")
    s.add_argument(
        "--sentences", type=_positive, default=200, help="corpus sentences (200; more: all)"
    )
    s.add_argument(
        "--batch-size", type=_bounded(MAX_BATCH), default=16, help=f"1..{MAX_BATCH} (16)"
    )
    f = sub.add_parser(
        "flow",
        help="the input tokens that make up one position's state, per layer (exact)",
        description="Each input token's share of one position's state at every layer (or, "
        "with --target, its direct logit for that token: the decomposed logit lens), from "
        "granularity='token'; and the strongest routes into that position.",
    )
    f.add_argument("text")
    f.add_argument("--target", help="a token whose logit to explain, e.g. ' Paris'")
    f.add_argument("--position", type=int, default=-1, help="the position (-1: the last)")
    f.add_argument(
        "--top", type=_bounded(MAX_TOP), default=5, help=f"tokens shown per layer, 1..{MAX_TOP} (5)"
    )
    f.add_argument("--threshold", type=_fraction, default=0.05, help="route pruning, 0..1 (0.05)")
    r = _report_parser(sub)
    for q in (d, s, f, r):
        q.add_argument(
            "--model",
            default="minilm",
            help=f"a bundled model ({', '.join(BUNDLED)}) or a hub name",
        )
    d.add_argument("--centering", choices=get_args(Centering), default="correction")
    s.add_argument("--centering", choices=get_args(Centering), default="correction")
    for q in (d, s, f):
        out = q.add_mutually_exclusive_group()
        out.add_argument("--json", action="store_true", help="the table as JSON records")
        out.add_argument("--csv", action="store_true", help="the table as CSV")
        q.add_argument(
            "-o",
            "--output",
            default="-",
            metavar="PATH",
            help="write the table there; '-' is standard output (-)",
        )
    return p


# Bounds on what costs time or memory in proportion to the value, checked by the parser.
MAX_BATCH = 1024  # texts per forward pass: the factor stacks grow with it
MAX_TOP = 1000  # rows per layer printed


def _bounded(most: int):
    def parse(value: str) -> int:
        n = _int(value, 1, f"in 1..{most}")
        if n > most:
            raise argparse.ArgumentTypeError(f"must be in 1..{most}, not {n}")
        return n

    return parse


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 <= x <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be in 0..1, not {value}")
    return x


def _report_parser(sub: Any) -> argparse.ArgumentParser:
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
        help="where to write the page; an existing file is replaced (report.html)",
    )
    r.add_argument(
        "--attention-blocks",
        type=_int_list,
        metavar="B,B",
        help="blocks whose attention to show, e.g. 0,-1 (as many as fit the budget)",
    )
    r.add_argument(
        "--attribution-layers",
        type=_layer_list,
        metavar="L,L",
        help="layers for attribution, e.g. 1,6; '' skips it (up to 3 that fit the budget)",
    )
    r.add_argument("--exact", action="store_true", help="exact attribution (slow) not estimate")
    r.add_argument("--probes", type=_at_least_2, default=8, metavar="N", help="per token (8)")
    r.add_argument("--query", type=int, metavar="POS", help="token whose attribution to show")
    r.add_argument(
        "--share-layers",
        type=_layer_list,
        metavar="L,L",
        help="layers whose shares to draw token by token (up to 6, spread over the depth)",
    )
    r.add_argument(
        "--flow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the routes into the last token's prediction (default: when they fit the budget)",
    )
    r.add_argument(
        "--corpus",
        type=_non_negative,
        default=0,
        metavar="N",
        help="also fit a linear identifiability map on N corpus sentences (0)",
    )
    r.add_argument(
        "--max-tokens", type=_positive, default=128, metavar="N", help="refuse longer texts (128)"
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return r


def _int(value: str, least: int, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"must be {what}, not {n}")
    return n


def _positive(value: str) -> int:
    return _int(value, 1, "at least 1")


def _non_negative(value: str) -> int:
    return _int(value, 0, "0 or more")


def _at_least_2(value: str) -> int:
    return _int(value, 2, "at least 2")


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {value!r}") from None


def _layer_list(value: str) -> tuple[int | str, ...]:
    out: list[int | str] = []
    for v in value.replace(",", " ").split():
        if v == "final":
            out.append(v)
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a layer: {v!r} (an int, negatives from the end, or 'final')"
            ) from None
    return tuple(out)


def _print_rows(rows: list[dict[str, Any]], args: argparse.Namespace, text: str) -> None:
    """The table as text, JSON records or CSV (pandas, installed with TransformerLens), on
    standard output or in the file ``--output`` names."""
    if args.json:
        out = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    elif args.csv:
        import pandas as pd

        out = pd.DataFrame(rows).to_csv(index=False)
    else:
        out = text + "\n"
    if args.output == "-":
        print(out, end="")
        return
    from tl_decomp._core.files import atomic_write

    path, replaced = atomic_write(args.output, out, what="the table")
    print(f"{'replaced' if replaced else 'wrote'} {str(path)!r}", file=sys.stderr)


def _check_output(args: argparse.Namespace) -> None:
    """A table's file is checked before the model loads (a bad path fails in a second)."""
    if getattr(args, "output", "-") != "-" and args.command != "report":
        from tl_decomp._core.files import check_path

        check_path(args.output, what="the table")


def _decompose(args: argparse.Namespace) -> int:
    from tl_decomp._core.results import text_table
    from tl_decomp.decomposition import decompose_layers
    from tl_decomp.models import load_model

    if not args.text.strip():
        raise ValueError("TEXT is empty")
    model = load_model(args.model)
    ds = decompose_layers(
        model, args.text, layers=args.layers, granularity=args.granularity, centering=args.centering
    )
    shares = [d.shares()[:, 0][:, d.mask()[0]] for d in ds]
    rows = [  # a zero state has no shares (NaN): the mean is over the others
        {"layer": str(d.layer)}
        | dict(zip(d.labels, s.nanmean(-1).tolist(), strict=True))
        | {"max rel err": d.relative_error}
        for d, s in zip(ds, shares, strict=True)
    ]
    tokens = ds[0].str_tokens()  # as text, not the tokenizer's byte-level glyphs
    head = f"{args.model}: {len(tokens)} tokens: {' '.join(map(repr, tokens))}\n"
    head += "mean share <e,t>/|e|^2 over tokens (each row sums to 1)\n"
    zero = [f"{d.layer}: {int(s[0].isnan().sum())}" for d, s in zip(ds, shares, strict=True)
            if s[0].isnan().any()]  # fmt: skip
    if zero:  # all-zero at a layer: that row is nan
        head += f"zero states have no shares, left out (layer: tokens) {', '.join(zero)}\n"
    _print_rows(rows, args, head + text_table(rows))
    return 0


def _stats(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc_per_node=N -m tl_decomp.cli stats``: each rank takes its share
    of the corpus (a gloo or NCCL group started here if none is), rank 0 prints."""
    from tl_decomp._core import distributed
    from tl_decomp.datasets import load_corpus
    from tl_decomp.decomposition import corpus_statistics
    from tl_decomp.models import load_model

    corpus = load_corpus(args.sentences)  # before the model: a bad count fails at once
    if args.sentences > len(corpus):
        print(f"--sentences {args.sentences}: the corpus has {len(corpus)} sentences; "
              f"running all {len(corpus)}", file=sys.stderr)  # fmt: skip
    with distributed.from_environment():
        model = load_model(args.model)
        stats = corpus_statistics(
            model, corpus, batch_size=args.batch_size, centering=args.centering, progress=False
        )
        main = distributed.is_main()  # read before the group is gone
    if not main:
        return 0
    head = f"{args.model}: {stats.n_tokens} tokens, max relative error "
    head += f"{stats.max_relative_error:.2e}\n"
    _print_rows(stats.rows(), args, head + stats.table())
    return 0


def _flow(args: argparse.Namespace) -> int:
    from tl_decomp._core.results import text_table
    from tl_decomp.decomposition import information_flow
    from tl_decomp.models import load_model

    if not args.text.strip():
        raise ValueError("TEXT is empty")
    model = load_model(args.model)
    flow = information_flow(
        model, args.text, position=args.position, target=args.target, threshold=args.threshold
    )
    rows = [
        {"layer": layer, "rank": rank, "token": tok, "position": pos, "value": value}
        for layer in range(flow.contributions.shape[0])
        for rank, (tok, pos, value) in enumerate(flow.top_tokens(layer, args.top), 1)
    ]
    what = f"logit of {args.target!r}" if args.target is not None else "share <e,t>/|e|^2"
    at = f"{flow.tokens[flow.position]!r} at position {flow.position}"
    table = [
        {"layer": layer, "bias": flow.bias[layer].item()}
        | {
            f"#{r}": f"{tok!r}@{pos} {v:+.3g}"
            for r, (tok, pos, v) in enumerate(flow.top_tokens(layer, args.top), 1)
        }  # fmt: skip
        for layer in range(flow.contributions.shape[0])
    ]
    head = f"{args.model}: each input token's {what} in the state of {at}, per layer\n"
    _print_rows(rows, args, head + text_table(table))
    return 0


def _report(args: argparse.Namespace) -> int:
    from tl_decomp.models import load_model
    from tl_decomp.reporting import check_path, report

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
        attention_blocks=args.attention_blocks,
        attribution_layers=args.attribution_layers,
        attribution_method="exact" if args.exact else "estimate",
        n_probes=args.probes,
        share_layers=args.share_layers,
        flow=args.flow,
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
    args = build_parser().parse_args(argv)
    try:
        commands = {"decompose": _decompose, "stats": _stats, "flow": _flow, "report": _report}
        _check_output(args)
        return commands[args.command](args)
    except (
        ValueError,
        TypeError,
        ModuleNotFoundError,
        NotImplementedError,
        OSError,
        MemoryError,
    ) as err:
        print(f"tl-decomp: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, TypeError)) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Hidden states of one stack of an encoder–decoder, for token identifiability.

Both stacks run in one forward pass per batch: the encoder on the corpus, the decoder on
`decoder_input` (or on its start token alone where only the encoder's states are asked for,
which no decoder token can change). The tokens identified are the stack's own: the corpus's
for the encoder, the decoder text's for the decoder; layer 0 is what the stack's block 0 reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tl_decomp import adapters
from tl_decomp._core import convention, distributed
from tl_decomp._core.convention import Layer
from tl_decomp._core.spec import ModelSpec
from tl_decomp.identifiability._scoring import StateBatch


def check_stack(
    model: Any,
    stack: adapters.StackName | None,
    corpus: Sequence[str],
    decoder_input: Sequence[str] | None,
    batch_size: int,
    lookup: str,
) -> tuple[ModelSpec, list[str], list[str] | None]:
    """The stack's spec, the checked corpus and the checked decoder texts (None: the encoder
    alone), before any forward pass."""
    if stack == "decoder" and decoder_input is None:
        raise ValueError("stack='decoder' needs decoder_input= (one decoder text per text)")
    if lookup == "vocab":
        raise NotImplementedError(
            f"lookup='vocab' on an encoder–decoder's {stack} is not supported by tl_decomp: "
            "lookup='sequence' is"
        )
    spec = adapters.model_spec(model, stack=stack)
    encoder = adapters.model_spec(model, stack="encoder")
    corpus = adapters.check_corpus(model, encoder, corpus, batch_size, "corpus")
    if stack != "decoder":
        return spec, corpus, None
    decoder = adapters.check_corpus(model, spec, decoder_input, batch_size, "decoder_input")
    if len(decoder) != len(corpus):
        raise ValueError(
            f"corpus has {len(corpus)} texts but decoder_input {len(decoder)}: one each"
        )
    return spec, corpus, decoder


def gather_stack_states(
    model: Any,
    spec: ModelSpec,
    corpus: Sequence[str],
    decoder: Sequence[str] | None,
    order: Sequence[int],
    layers: Sequence[Layer],
    batch_size: int,
    bar: Any,
) -> Iterator[StateBatch]:
    """`gather_states` for one stack (`decoder` None: the encoder's states)."""
    sites = [spec.layer0, *(convention.site(spec, L) for L in layers)]
    wanted = frozenset(sites).__contains__
    device = adapters.model_device(model)
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    for _, idx in distributed.deal(batches):  # under torch.distributed: this rank's share
        enc, enc_mask = adapters.tokenize(model, [corpus[i] for i in idx], encoder=True)
        enc, enc_mask = enc.to(device), enc_mask.to(device)
        if decoder is None:
            dec, dec_mask = adapters.start_tokens(model, len(idx), device), None
            tokens, mask = enc, enc_mask
        else:
            dec, dec_mask = adapters.tokenize(model, [decoder[i] for i in idx], encoder=False)
            dec, dec_mask = dec.to(device), dec_mask.to(device)
            tokens, mask = dec, dec_mask
        cache = adapters.run_seq2seq(model, enc, enc_mask, dec, dec_mask, wanted)
        adapters.check_finite({s: cache[s] for s in dict.fromkeys(sites)}, mask)
        states = torch.stack([cache[convention.site(spec, L)] for L in layers])
        yield StateBatch(tokens, mask, cache[spec.layer0], states, None, torch.tensor(idx))
        bar.update(len(idx))

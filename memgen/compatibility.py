"""Whether the decoding engine can drive a base model's decoder, checked before a generate call does any work.

The engine feeds a decoder ragged calls through `memgen.cache.RaggedCache`: explicit position ids, an
additive mask over per-row cache slots, keys and values written at each row's own offsets. A decoder
whose attention reads a key/value cache that way gives each row what the row alone would give. Others
do not: decoders that derive positions from the cache's length (learned absolute positions, ALiBi),
state-space or linear-attention layers, caches of other kinds (an indexer's). Those fail deep inside
a call, or could silently compute something else. So a decoder of a class the test suite does not cover
(`TESTED_DECODERS`) is probed once: a ragged prefill and a ragged step of two rows through the
engine's cache (under the engine's attention, `memgen.attention.mask_attention`), compared with each row
run alone through the decoder's own forward. A decoder that raises or differs is refused with the reason;
the training forward, which runs the decoder's own forward over whole sequences, does not need this.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from memgen.attention import attention_implementation, mask_attention
from memgen.cache import RaggedCache
from memgen.layer_stack import DIRECT_DECODERS, MASK_DICT_DECODERS, direct_call, forward_call, text_config
from memgen.modes import evaluating
from memgen.ops import pack_ragged

# Decoder classes whose generation and training forward the test suite checks against the reference
# (tests/test_architectures.py, tests/test_sliding_windows.py, tests/test_generation.py): no probe. The training
# forward keeps its weaver cache across rounds (`memgen.prefix_cache`) for these classes only.
TESTED_DECODERS = frozenset((*DIRECT_DECODERS, *MASK_DICT_DECODERS, "DeepseekV3Model", "GemmaModel", "GPTJModel",
                             "GPTNeoXModel", "GraniteModel", "MixtralModel", "StableLmModel"))

# Relative difference between an item's ragged and solo hidden states above which they differ: far above rounding
# (float32 ~1e-6; 16-bit floats ~1e-2 after many layers), below what a wrong position or a missing key gives (~1).
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_HALF_TOLERANCE = 0.1

_verdicts: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()


def check_engine_support(model: nn.Module, role: str) -> None:
    """Raise ValueError unless the engine can drive `model`'s decoder (`role` names it in the message: "reasoner",
    "weaver's base", ...). Probes a class outside `TESTED_DECODERS` once per decoder module."""
    decoder = model.get_decoder()
    if type(decoder).__name__ in TESTED_DECODERS and type(decoder).__module__.startswith("transformers."):
        return
    if decoder not in _verdicts:
        _verdicts[decoder] = _probe(model, decoder)
    problem = _verdicts[decoder]
    if problem is not None:
        raise ValueError(f"memgen's decoding engine cannot drive the {role}'s decoder {type(decoder).__name__}: "
                         f"{problem}. It needs attention that reads a key/value cache at explicit position ids "
                         "(as Llama, Qwen, Mistral, Gemma and GPT-NeoX do); learned absolute or ALiBi positions, "
                         "state-space or linear-attention layers are not supported. (The training forward does not "
                         "use this cache.)")


def _probe(model: nn.Module, decoder: nn.Module) -> str | None:
    """None when a ragged prefill and a ragged step through the engine's cache give each row's solo hidden states,
    else what went wrong."""
    embed = model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embed.num_embeddings, (2, 8), generator=g).to(device)
    first = torch.tensor([3, 5], dtype=torch.int32)  # items each row reads in the prefill, then in the step
    second = torch.tensor([2, 1], dtype=torch.int32)
    call = direct_call(decoder) or forward_call(decoder)
    layers = text_config(model).num_hidden_layers
    try:
        # as the engine runs
        with torch.no_grad(), evaluating(decoder), attention_implementation(decoder.config, mask_attention(decoder)):
            stream = embed(ids)
            cache = RaggedCache(layers, 2, ids.shape[1], device)
            rows = torch.arange(2, device=device)
            got = []
            for seen, pending in ((torch.zeros_like(first), first), (first, second)):
                items, positions, slots, mask = pack_ragged(stream, rows, seen.to(device), pending.to(device),
                                                            int(pending.max()), None, ids.shape[1],
                                                            int((seen + pending).max()))
                cache.prepare(rows, slots, mask.shape[-1])
                got.append(call(items, mask, positions, cache))
            for row in range(2):
                n = int(first[row] + second[row])
                alone = decoder(inputs_embeds=stream[row:row + 1, :n],
                                attention_mask=torch.ones(1, n, dtype=torch.long, device=device),
                                position_ids=torch.arange(n, device=device)[None], use_cache=False).last_hidden_state[0]
                ragged = torch.cat([got[0][row, : int(first[row])], got[1][row, : int(second[row])]])
                gap = float(((ragged.float() - alone.float()).norm(dim=-1)
                             / alone.float().norm(dim=-1).clamp(min=1e-12)).max())
                if not gap <= _TOLERANCE.get(dtype, _HALF_TOLERANCE):
                    return (f"through its ragged cache a row's hidden states differ from the row's alone (relative "
                            f"difference up to {gap:.2g})")
    except Exception as err:  # noqa: BLE001 (any failure of the probe is the answer)
        return f"a ragged call raised {type(err).__name__}: {err}"
    return None

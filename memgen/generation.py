"""The decoding engine: MemGen generation with per-row caches, nothing recomputed.

- The reasoner reads each stream item (token or latent) once, through a ragged KV cache: a row's
  insertion adds cache entries to that row only. Steps are packed by `memgen.ops.pack_step`
  (latent-token injection) and cache writes go through `memgen.ops.write_kv`.
- The weaver keeps its own ragged cache over the stream (its rows a block of the reasoner's cache
  when it reads in the reasoner's calls): at an insertion the invoking rows, batched, read only
  the stream items they have not seen (projected into its space as they are read), then the K
  queries, whose entries are not kept (`memgen.ops.pack_ragged` in its own calls). The queries'
  LayerNorm and scale are applied once per generate call.
- The `lora` trigger reads each token of the rows that may still weave as the reasoner reads it,
  through its own incremental cache. When it is an adapter on the reasoner's own base (the
  default) its cache rows sit beside the reasoner's and one call serves both: the shared base
  weights run once over both sets of rows and only the trigger's rows get its LoRA update
  (`memgen.adapters.SplitBatch`, which also runs the weaver's rows through its own adapter in the
  same pass). `head` reads the reasoner's hidden state of the delimiter (no extra forward).
  Decisions come from the fused trigger-scoring op.
- `always` decides before the reasoner reads the token; `head` and `lora` after (their decision
  needs a hidden state of it). By default rows run ahead of each other, each at its own column:
  a row that weaves chooses no token while its latents are made and read, and falls behind the
  others. The weaver, an adapter on the reasoner's own base, reads in the reasoner's calls
  (`JOINT_WEAVER_MODES`: `always` and `head` on a CPU, every mode on a GPU): an `always` row's weaver reads
  beside its token and the row reads its latents in the next step's call, beside the others'
  tokens; a `head`/`lora` row's weaver reads in the call after its decision and the latents in
  the one after that. Otherwise the weaver makes a call of its own after the decisions, and a
  `head`/`lora` row reads its latents in the next step's call, an `always` row with its token.
  A streamer (it takes every row's token at each step) and synced ranks keep the rows in step:
  the weaver makes calls of its own and the latents are read in the same step.
- A call over rows of several kinds (tokens, latents, the trigger's and the weaver's items) is
  laid out one batch row per row when the padding this adds stays under a per-device bound
  (`PACKED_PADDING_ITEMS`), else one batch row per item (an item's batch row reads its row's
  cache, which the same layer call has just written), so no row pads. There attention groups the
  items back by cache row and reads each row's cache in place (`memgen.attention`), rather than
  copying it for every item (`BY_ROW_ATTENTION`). A call of one batch row per row that is not the
  cache's leading rows in order, or reads several items a row, reads its rows' caches in place
  too, its grouped query heads packed so that no key is repeated (`memgen.attention.PaddedRows`).
- Sampling draws one uniform per row and column up front (tokens, then `head`/`lora` decisions),
  so a row's draws do not depend on the schedule: in step or not, the same seed samples the same.
- A one-item call whose rows are all equally long (every plain step at batch 1) attends without a
  mask, which would hide nothing: attention then takes the path plain decoding takes.
- One host synchronisation per step fetches the decisions, the finished flags and the tokens.
  Host bookkeeping is vectorised over CPU tensors; the caches keep their per-row lengths there,
  so sizing a call never waits on the device.
- With a model sharded by FSDP every forward of a decoder is a collective, so the ranks of the
  default process group make the same calls in the same order (`_RankSync`): each step they agree on
  whether any rank still decodes and whether any weaves; a rank that has nothing of
  its own to run makes an idle call instead (one dummy item, written nowhere), and a rank whose
  rows are all finished keeps making the others' calls until every rank is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F
from transformers.utils import ModelOutput

from memgen import transfers
from memgen.adapters import BareBase, SplitBatch, active_adapter, tuner_layers
from memgen.attention import (RAGGED_ATTENTION, PaddedRows, RaggedGroups, attention_implementation, mask_attention,
                              windowed)
from memgen.cache import RaggedCache
from memgen.layer_stack import FULL, SLIDING, direct_call, forward_call, sliding_window, text_config
from memgen.logits import logits_function
from memgen.ops import pack_ragged, pack_step, trigger_scoring
from memgen.sharding import ranks_max
from memgen.weaver import INFERENCE, PROMPT

# Padding items (rows that do not invoke x K) that a packed [token, latents] step may add before the
# engine lays the step out one item per batch row instead. On a GPU a small-batch step is bound by
# reading the weights, so padding is nearly free while the per-item layout copies each batch row's
# cache view; on a CPU every padding item costs compute.
PACKED_PADDING_ITEMS = {"cuda": 512, "cpu": 0}

# Trigger modes whose weaver, running ahead, reads in the reasoner's calls (per device) rather than in calls of its
# own. `head` and `lora` rows decide after reading their token, so their weaver reads a step later and each weave
# holds the row back two steps, not one. On the CPU (one batch row per item in such calls) `always` and `head` gain
# (benchmarks/results/small-cpu-schedules*); `lora`, whose trigger rows already double each call, does not. On a GPU
# every weaver call saved is a step's kernel launches.
JOINT_WEAVER_MODES = {"cuda": ("always", "head", "lora"), "cpu": ("always", "head")}

# The attention implementations (of `mask_attention`) under which a call's items attend to their cache rows in place
# (`memgen.attention`), where the engine drives the layers itself; under any other each batch row gets a copy of its
# row's cache.
BY_ROW_ATTENTION = ("sdpa",)


@dataclass
class MemGenGenerateOutput(ModelOutput):
    """sequences: [B, L + T] prompts then new tokens (pad after a row's EOS);
    augmentation_mask: [B, T] the decision taken before each new token (-100 / 0 SKIP / 1 INVOKE);
    latent_norms: float32 [B, T] the mean L2 norm of the K latents woven before each new token (NaN
    where none were), to compare with the reasoner's token embeddings;
    completion_mask: bool [B, T] the tokens each row generated, through the one that finished it (its first EOS,
    or the last token of a stop string); False on the pad after it, which the pad token alone cannot tell apart
    where the model may generate that token itself;
    latents: (with `output_latents`) for each row, the latents woven into it in stream order, one [K, d] tensor a
    weave (the prompt's first, where it wove there): the INVOKE entries of its augmentation mask, in column
    order."""

    sequences: torch.Tensor | None = None
    augmentation_mask: torch.Tensor | None = None
    latent_norms: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None
    latents: list[list[torch.Tensor]] | None = None


class _RaggedDecoder:
    """A base model (with one adapter active, or none) reading ragged rows through its own cache.

    blocks: adapters on the same base whose rows share the cache (the `lora` trigger's, the weaver's): cache rows
    [(i + 1) B, (i + 2) B) are rows 0..B-1 read through adapter blocks[i], so one call can serve them all (`run`'s
    starts). longest: the most positions a row's items span (default: the capacity); a sliding window at least
    that long cannot bind, and its layers then need no mask of their own.
    """

    def __init__(self, model, adapter: str | None, batch: int, capacity: int, device: torch.device,
                 blocks: tuple[str, ...] = (), longest: int | None = None) -> None:
        self.model, self.adapter, self.capacity, self.batch = model, adapter, capacity, batch
        decoder = model.get_decoder()
        direct = direct_call(decoder)
        self.call, self.direct = direct or forward_call(decoder), direct is not None
        self.config = decoder.config
        window = sliding_window(self.config)
        # the sliding window, where one may bind: then its layers get a mask of their own (`layer_stack`)
        self.window = window if window is not None and (capacity if longest is None else longest) > window else None
        self.attention = mask_attention(decoder)  # the attention implementation its calls run under
        self.by_row = self.direct and self.attention in BY_ROW_ATTENTION
        # query heads per key/value head (the direct decoders' configs name both)
        self.gqa = self.config.num_attention_heads // self.config.num_key_value_heads if self.by_row else 1
        heads = self.config.num_attention_heads
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // heads
        self.layers = tuner_layers(model) if adapter is not None else None
        self.bare = BareBase(model) if adapter is None else None
        self.blocks = blocks
        self.offsets = {name: (i + 1) * batch for i, name in enumerate(blocks)}
        self.split = SplitBatch(model, *blocks) if blocks else None
        self.cache = RaggedCache(self.config.num_hidden_layers, batch * (1 + len(blocks)), capacity, device)
        self.lengths = self.cache.lengths  # host int32 [cache rows]: items each cache row has read
        self.dtype = model.get_input_embeddings().weight.dtype
        self.width, self.device = self.config.hidden_size, device

    def run(self, rows: torch.Tensor | int | None, packed: tuple[torch.Tensor, ...], advance: torch.Tensor | int | None,
            n_items: torch.Tensor, starts: tuple[int, ...] | None = None,
            groups: RaggedGroups | PaddedRows | None = None) -> torch.Tensor:
        """Feed a packed call (items, positions, slots, mask) to cache rows `rows` (device [G], repeats
        allowed; an int n: the first n cache rows in order; None: the batch's rows in order); returns hidden
        [G, W, d].

        advance: host int64 cache rows (no repeats; an int n: the first n; None: the batch's rows) whose lengths grow
        by n_items (host int32). starts: the call's first batch row read through each block's adapter (one per block,
        non-decreasing; the rows before the first run on the bare base), None: every row through `adapter`.
        groups: (only where `by_row`) for a call of one item per batch row, the items grouped by cache row; for one
        of a batch row per row, where its rows' caches lie (`PaddedRows`): for an attention that reads each row's
        cache in place.
        """
        items, positions, slots, mask = packed
        advanced = self._advanced(advance)
        visible = mask.shape[-1]
        self.cache.prepare(self.batch if rows is None else rows, slots, visible, by_row=groups is not None)
        full = mask
        if self.direct and items.shape[1] == 1 and self._sees_only_own_slots(advanced, items.shape[0], visible):
            # The mask hides nothing, and without one Hugging Face's SDPA attention takes plain decoding's path
            # (grouped-query heads passed to SDPA as they are, not packed around a mask). A decoder's own forward
            # would build a mask of its own, so only direct calls drop it.
            full = None
        if self.window is not None and visible > self.window:  # some item is a window past some slot
            sliding = windowed(mask, positions, self.window)
            if groups is not None:
                groups = {FULL: groups, SLIDING: groups.masked(sliding)}
            mask = {FULL: full, SLIDING: sliding}
        else:
            mask = full
        if starts is not None:
            context = self.split(*starts)
        else:
            context = self.bare() if self.bare is not None else active_adapter(self.model, self.adapter, self.layers)
        if groups is not None:
            with context, attention_implementation(self.config, RAGGED_ATTENTION):
                hidden = self.call(items, mask, positions, self.cache, ragged=groups)
        else:
            with context, attention_implementation(self.config, self.attention):
                hidden = self.call(items, mask, positions, self.cache)
        if isinstance(advanced, slice):
            self.lengths[advanced].add_(n_items)  # in place on a view
        else:
            self.lengths.index_add_(0, advanced, n_items)  # one op, not a gather, an add and a scatter
        return hidden

    def packs_heads(self, width: int) -> bool:
        """Whether a call laid out one batch row per row, `width` items each, attends through `PaddedRows`."""
        return PaddedRows.pays(width, self.gqa, self.config.num_attention_heads, self.head_dim)

    def only(self, block: str) -> tuple[int, ...]:
        """`run`'s starts for a call whose rows are all `block`'s."""
        return tuple(0 if self.blocks.index(name) <= self.blocks.index(block) else 2**62 for name in self.blocks)

    def _advanced(self, advance: torch.Tensor | int | None) -> torch.Tensor | slice:
        """`run`'s advance as an index into the lengths: the rows, or a slice for the first n."""
        if advance is None:
            return slice(0, self.batch)
        return slice(0, advance) if isinstance(advance, int) else advance

    def _sees_only_own_slots(self, advanced: torch.Tensor | slice, n_rows: int, visible: int) -> bool:
        """Whether a call of one item per batch row, its batch rows being the advanced rows (`run`'s contract), has
        every row attend to exactly its own valid slots: every row equally long, with `visible` slots after it."""
        lengths = self.lengths[advanced]
        return lengths.shape[0] == n_rows and bool((lengths == visible - 1).all())

    def lengths_of(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.lengths[: self.batch].clone() if rows is None else self.lengths[rows]

    def idle(self) -> None:
        """One call that changes nothing: a zero item in row 0's scratch slot, attending to its slot 0. It
        runs the same modules (and so the same collectives of a sharded model) as a real call."""
        device = self.device
        items = torch.zeros(1, 1, self.width, dtype=self.dtype, device=device)
        positions = torch.zeros(1, 1, dtype=torch.long, device=device)
        slots = torch.full((1, 1), self.capacity, dtype=torch.long, device=device)
        mask = torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=device)
        self.run(positions[0], (items, positions, slots, mask), torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.int32))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of `tensors`, without its copy when there is only one."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _without(rows: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Host rows less those in any of `others` (host, int64); `rows` themselves, with no search, when every one of
    `others` is empty (the common case in a decode step)."""
    present = [other for other in others if other.numel()]
    return rows[~torch.isin(rows, _joined(present))] if present else rows


def completion_mask(new_tokens: torch.Tensor, eos_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """bool [B, T]: each row's new tokens up to and including its first EOS (eos_ids: a list, or a tensor of them
    already on the tokens' device)."""
    is_eos = torch.isin(new_tokens, torch.as_tensor(eos_ids, device=new_tokens.device))
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0


def _choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                   top_p: float | None, uniforms: torch.Tensor | None, min_p: float | None = None) -> torch.Tensor:
    """Next tokens [B] from float logits [B, V]: argmax, or a draw after temperature, top-k, top-p and min-p (in
    Hugging Face's order): the token in whose share of the cumulative distribution the row's uniform (float [B] in
    [0, 1)) falls."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits / temperature if temperature != 1.0 else logits  # x / 1.0 is x: skip the op
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(ordered, -1)
        drop = probs.cumsum(-1) - probs >= top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if min_p:  # tokens less likely than min_p times the likeliest (which always stays)
        probs = torch.softmax(scores, -1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    cumulative = torch.softmax(scores, -1).cumsum(-1)
    # the first token whose cumulative probability reaches u * total: one of positive probability, as the point
    # is above 0 and at most the total
    point = (uniforms * cumulative[:, -1]).clamp(min=torch.finfo(cumulative.dtype).tiny)
    return torch.searchsorted(cumulative, point[:, None]).squeeze(-1)


def _at_columns(table: torch.Tensor, columns: torch.Tensor | int) -> torch.Tensor:
    """table[b, columns[b]] for each row b ([B]; columns: device int64 [B], or one column for every row)."""
    return table[:, columns] if isinstance(columns, int) else table.gather(1, columns[:, None]).squeeze(1)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty on logits [B, V] for the tokens each row has seen (bool [B, V])."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class _RankSync:
    """Agreement between the ranks of the default process group on each step's calls (see the module
    docstring), one `ranks_max` all-reduce per vote."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def any(self, *flags: bool) -> list[bool]:
        """For each flag: whether it holds on any rank (one all-reduce)."""
        return [bool(v) for v in ranks_max([int(f) for f in flags], self.device)]

    def check_same(self, **settings: int) -> None:
        """Raise (on every rank) unless every rank passed the same settings: they fix the calls' sequence."""
        values = list(settings.values())
        spread = ranks_max(values + [-v for v in values], self.device)
        differ = [name for name, high, low in zip(settings, spread[:len(values)], spread[len(values):]) if high != -low]
        if differ:
            raise ValueError(f"with synced_ranks every rank must pass the same {', '.join(differ)}: they fix which "
                             "calls each step makes, and ranks that disagree would wait on each other forever")


@dataclass
class _Part:
    """One block's rows in a reasoner call: rows (host int64 [R], the block's own row ids) read items[r, :counts[r]]
    (device [R, W, d]; host int32 counts), of which the cache keeps the first kept[r] (None: all)."""

    rows: torch.Tensor
    counts: torch.Tensor
    items: torch.Tensor
    kept: torch.Tensor | None = None


class _Engine:
    """State of one generate call: the three ragged decoders, the weaver's stream and the host bookkeeping.

    run_ahead: rows may run ahead of each other (no streamer, no synced ranks); only then can the weaver read in
    the reasoner's calls.
    """

    def __init__(self, model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_new_tokens: int,
                 trigger_mode: str, prompt_budget: int, budget: int, do_sample: bool, temperature: float,
                 generator: torch.Generator | None, synced: bool = False, run_ahead: bool = False,
                 keep_latents: bool = False) -> None:
        config, device = model.config, prompts.device
        batch, width = prompts.shape
        self.model, self.device, self.batch, self.synced = model, device, batch, synced
        self.all_rows = torch.arange(batch)  # host
        self.trigger_mode, self.budget = trigger_mode, budget
        self.do_sample, self.temperature = do_sample, temperature
        # Sampling draws one uniform per row and column, up front: the token a row samples at a column (and its
        # decision before it) does not depend on when the row gets there, nor on the other rows.
        # (float32 whatever torch's default dtype: a program that set it to bfloat16 would sample otherwise)
        self.token_uniforms = (torch.rand(batch, max_new_tokens, generator=generator, dtype=torch.float32,
                                          device=device) if do_sample else None)
        learned = trigger_mode != "always" and (prompt_budget > 0 or budget > 0)  # `always` samples no decision
        self.decision_uniforms = (torch.rand(batch, max_new_tokens, generator=generator, dtype=torch.float32,
                                             device=device) if do_sample and learned else None)
        self.k = {PROMPT: config.prompt_latents_len, INFERENCE: config.inference_latents_len}
        self.memory = prompt_budget > 0 or budget > 0
        self.recording = self.memory  # whether reads append their items to the weaver's stream
        # The `lora` trigger reads every token of the rows that may still weave, as the reasoner reads it, and the
        # weaver (running ahead) reads a row's stream in the call after its decision: in the reasoner's calls
        # (their rows a block of the reasoner's cache) when they are adapters on the reasoner's own base, else
        # through their own caches and calls.
        self.lora = trigger_mode == "lora" and self.memory
        trigger_model = model.trigger.model if self.lora else None
        self.joint = self.lora and _shares_base(model.reasoner, trigger_model, model.trigger.adapter_name)
        self.joint_weaver = (self.memory and run_ahead and weaves_in_reasoner_calls(trigger_mode, device.type, batch)
                             and _shares_base(model.reasoner, model.weaver.model, model.weaver.adapter_name))
        blocks = ((model.trigger.adapter_name,) if self.joint else ()) + (
            (model.weaver.adapter_name,) if self.joint_weaver else ())
        capacity = width + max_new_tokens + (self.k[PROMPT] if prompt_budget else 0) + self.k[INFERENCE] * budget
        weaver_capacity = capacity + max(self.k.values())  # room for the queries
        # (a row's positions stay under `capacity`: the weaver's queries follow a stream short of this weave's latents)
        self.reasoner = _RaggedDecoder(model.reasoner, None, batch, weaver_capacity if self.joint_weaver else capacity,
                                       device, blocks, longest=capacity)
        self.cache_rows = torch.arange(self.reasoner.lengths.shape[0])  # host: the reasoner cache's row ids
        # The same ids on the device, and device ones (the counts of a call of one item per batch row), so that a
        # call over the leading rows in order, one item each (every plain step), copies no rows or counts there.
        self.row_ids = self.cache_rows.to(device)
        self.ones = torch.ones(max(64, self.cache_rows.shape[0]), dtype=torch.int32, device=device)
        self.embed = model.reasoner.get_input_embeddings()
        self.lm_head = logits_function(model.reasoner)
        self.last_hidden = torch.zeros(batch, self.embed.weight.shape[1], dtype=self.reasoner.dtype, device=device)
        self.packed_padding = PACKED_PADDING_ITEMS.get(device.type, 0)
        self.latent_norms = torch.full((batch, max_new_tokens), float("nan"), dtype=torch.float32, device=device)
        # (host rows [G], their columns: host [G] or one int, latents [G, K, d]) of each weave, where asked for
        self.kept_latents = [] if keep_latents else None
        if self.memory:
            if self.joint_weaver:
                self.weaver, self.weaver_offset = self.reasoner, self.reasoner.offsets[model.weaver.adapter_name]
            else:
                self.weaver = _RaggedDecoder(model.weaver.model, model.weaver.adapter_name, batch, weaver_capacity,
                                             device, longest=capacity)
                self.weaver_offset = 0
            self.queries = {kind: model.weaver.queries(kind).to(self.weaver.dtype) for kind in (PROMPT, INFERENCE)}
            # Every row's stream of reasoner inputs (slot i: its i-th item); the weaver projects what it reads.
            d_reasoner = self.embed.weight.shape[1]
            self.stream = torch.zeros(batch, capacity + 1, d_reasoner, dtype=self.reasoner.dtype, device=device)
            self.stream_lengths = torch.zeros(batch, dtype=torch.int32)  # host: items in each row's stream
            # Zero items that reserve the queries' columns in the weaver's packed call.
            self.query_slots = {kind: self.stream.new_zeros(k, d_reasoner) for kind, k in self.k.items()}
        if self.lora:
            if not self.joint:
                self.trigger = _RaggedDecoder(trigger_model, model.trigger.adapter_name, batch,
                                              width + max_new_tokens, device)
                self.trigger_embed = trigger_model.get_input_embeddings()
            self.trigger_hidden = torch.zeros(batch, text_config(trigger_model).hidden_size,
                                              dtype=trigger_model.get_input_embeddings().weight.dtype, device=device)

    def to_device(self, *host: torch.Tensor) -> list[torch.Tensor]:
        """Host tensors on the engine's device, in one copy without a synchronisation (`memgen.transfers`). On the
        CPU they are returned as they are."""
        if self.device.type == "cpu":
            return list(host)
        return transfers.to_device(host, self.device)

    def _ones(self, n: int) -> torch.Tensor:
        """Device int32 ones [n] (grown on demand)."""
        if self.ones.shape[0] < n:
            self.ones = torch.ones(2 * n, dtype=self.ones.dtype, device=self.device)
        return self.ones[:n]

    # -- the reasoner's calls -------------------------------------------------------------------

    def _call(self, parts: dict[str | None, _Part],
              padding: int) -> tuple[torch.Tensor, dict[str | None, torch.Tensor]]:
        """One call of the reasoner's decoder over parts keyed by block (None: the reasoner's own rows, else an
        adapter whose rows share its cache); returns the hidden states flat [N, d] and, per part, the flat index of
        each row's first item (host int64 [R]: row r's item j is at first[r] + j). The reasoner's rows' last
        hidden states go to last_hidden (their items to the stream while recording), the trigger's to
        trigger_hidden.

        Laid out one batch row per row, padded to the longest, when that adds at most `padding` items; else one
        batch row per item, mapped to its row's cache, which the same layer call has just written (the row's
        earlier items): then nothing pads, and where `by_row` attention reads each row's cache once for all of its
        items.
        """
        decoder = self.reasoner
        names = [name for name in (None, *decoder.blocks) if name in parts]
        offsets = [decoder.offsets.get(name, 0) for name in names]
        cache_rows = _joined([parts[name].rows + offset if offset else parts[name].rows
                              for name, offset in zip(names, offsets)])
        counts = _joined([parts[name].counts for name in names])
        lengths = decoder.lengths[cache_rows]
        width = max(parts[name].items.shape[1] for name in names)
        n_rows, n_items = cache_rows.shape[0], int(counts.sum())
        visible = int((lengths + counts).max())
        items = _joined([parts[name].items if parts[name].items.shape[1] == width
                         else F.pad(parts[name].items, (0, 0, 0, width - parts[name].items.shape[1]))
                         for name in names])
        if n_rows * width - n_items <= padding:  # one batch row per row
            call_rows, call_lengths = cache_rows, lengths
            call_counts = None if width == 1 else counts  # None: one item each
            first = torch.arange(0, n_rows * width, width)
            sizes = [parts[name].rows.shape[0] for name in names]
        else:  # one batch row per item
            real = (torch.arange(width) < counts[:, None]).nonzero()  # (row, item) of every real item
            real_device, = self.to_device(real)
            items = items[real_device[:, 0], real_device[:, 1]][:, None]
            call_rows, call_lengths = cache_rows[real[:, 0]], (lengths[real[:, 0]] + real[:, 1]).to(torch.int32)
            call_counts = None
            first = torch.cumsum(counts, 0) - counts
            sizes = [int(parts[name].counts.sum()) for name in names]
        n_batch = call_rows.shape[0]
        # the cache's leading rows: views, no copies (batch rows beyond the cache's repeat some row)
        in_order = n_batch <= self.cache_rows.shape[0] and torch.equal(call_rows, self.cache_rows[:n_batch])
        # one copy: the lengths, the counts unless all are one, the rows unless they are the cache's leading rows
        lengths_device, *sent = self.to_device(call_lengths, *([] if call_counts is None else [call_counts]),
                                               *([] if in_order else [call_rows]))
        counts_device = self._ones(n_batch) if call_counts is None else sent.pop(0)
        rows_device = None if in_order else sent.pop(0)
        packed = pack_step(None, self.embed.weight, items, counts_device, lengths_device, decoder.capacity, visible)
        starts = None  # the reasoner's rows alone: the bare base (no per-site split, whose Python costs add up)
        if names != [None]:  # each block's first batch row; one absent from the call starts where the next does
            bounds = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
            starts, following = [], n_batch
            for name in reversed(decoder.blocks):
                following = bounds.get(name, following)
                starts.append(following)
            starts = tuple(reversed(starts))
        kept = _joined([parts[name].counts if parts[name].kept is None else parts[name].kept for name in names])
        groups = None
        if decoder.by_row and n_batch > n_rows:  # one batch row per item, some rows with several
            groups = RaggedGroups(cache_rows, counts, packed[3], decoder.gqa, self.to_device)
        elif decoder.by_row and (width > 1 or not in_order) and decoder.packs_heads(width):  # one batch row per row
            groups = PaddedRows(call_rows, rows_device, packed[3], decoder.gqa)
        advance = n_rows if in_order and n_batch == n_rows else cache_rows  # then cache_rows are the first n_rows
        hidden = decoder.run(n_batch if in_order else rows_device, packed, advance, kept, starts, groups)
        flat = hidden.flatten(0, 1)
        firsts, at = {}, 0
        for name in names:
            firsts[name] = first[at:at + parts[name].rows.shape[0]]
            at += parts[name].rows.shape[0]
        # One item a row, laid out one batch row per row, in the cache's order: each block's rows are its first
        # rows in order (all B of them where a later block follows), its items a run of flat: no index to copy.
        leading = in_order and width == 1
        if None in parts:
            n = parts[None].rows.shape[0]
            self._after_reasoner(parts[None], lengths[:n], firsts[None], flat, lengths_device[:n] if leading else None)
        if self.joint and self.model.trigger.adapter_name in parts:
            trigger, first = parts[self.model.trigger.adapter_name], firsts[self.model.trigger.adapter_name]
            if leading:
                start, n = int(first[0]), trigger.rows.shape[0]
                self.trigger_hidden[:n] = flat[start:start + n]
            else:
                rows_device, last_device = self.to_device(trigger.rows, first + trigger.counts.long() - 1)
                self.trigger_hidden[rows_device] = flat[last_device]
        return flat, firsts

    def _after_reasoner(self, part: _Part, lengths: torch.Tensor, first: torch.Tensor, flat: torch.Tensor,
                        leading: torch.Tensor | None) -> None:
        """The reasoner's rows after a call: their last hidden states, and their items in the stream.

        lengths: the rows' cache lengths before the call (host int32 [R]). leading: when the rows are the first R
        batch rows in order, one item each, at flat[:R], the same lengths on the device (nothing to copy there).
        """
        n = part.rows.shape[0]
        if leading is not None:
            rows_device = self.row_ids[:n]
            self.last_hidden[:n] = flat[:n]
        else:
            rows_device, last_device = self.to_device(part.rows, first + part.counts.long() - 1)
            self.last_hidden[rows_device] = flat[last_device]
        if self.recording:
            if part.items.shape[1] == 1:  # one item a row (every plain step): at each row's next slot
                slots = leading.long() if leading is not None else self.to_device(lengths.long())[0]
                self.stream[rows_device, slots] = part.items[:, 0].to(self.stream.dtype)
            else:
                real = (torch.arange(part.items.shape[1]) < part.counts[:, None]).nonzero()
                real_device, rows_at, slots = self.to_device(real, part.rows[real[:, 0]], lengths.long()[real[:, 0]]
                                                             + real[:, 1])
                self.stream[rows_at, slots] = part.items[real_device[:, 0], real_device[:, 1]].to(self.stream.dtype)
            self.stream_lengths.index_add_(0, part.rows, part.counts)  # rows are distinct

    def read_prompts(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
        """The reasoner reads the prompts, and so does the `lora` trigger (in the same call when joint)."""
        embeds = self.embed(prompts)
        parts = {None: _Part(self.all_rows, prompt_lengths, embeds)}
        if self.joint:
            parts[self.model.trigger.adapter_name] = _Part(self.all_rows, prompt_lengths, embeds)
        self._call(parts, padding=2**62)  # one batch row per prompt, always
        if self.lora and not self.joint:
            lengths_device, = self.to_device(prompt_lengths)
            zeros = torch.zeros_like(lengths_device)
            packed = pack_ragged(self.trigger_embed(prompts), self.to_device(self.all_rows)[0], zeros, lengths_device,
                                 prompts.shape[1], None, self.trigger.capacity, max(int(prompt_lengths.max()), 1))
            hidden = self.trigger.run(None, packed, None, prompt_lengths)
            last, = self.to_device(self.all_rows * prompts.shape[1] + (prompt_lengths.long() - 1).clamp(min=0))
            self.trigger_hidden[:] = hidden.flatten(0, 1)[last]

    def read(self, readers: torch.Tensor, tokens: torch.Tensor | None, waiting: torch.Tensor | None = None,
             latents: torch.Tensor | None = None, trigger_rows: torch.Tensor | None = None,
             weavers: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> torch.Tensor | None:
        """One reasoner call in which readers (host int64 [A]) read their token (ids [B] on the device); waiting rows
        (host int64 [G]) read latents [G, K, d] (after their token when they also read one); the `lora` trigger
        reads trigger_rows' tokens (host [T], None: none), in the same call when joint, else in its own; and the
        joint weaver reads weavers' (host [W], None: none) unseen stream items (a reader's token among them),
        then the inference queries. Returns the weavers' latents [W, K, d] (None without weavers); their mean
        norms go to latent_norms[weavers, columns] (host int64 [W]).

        Laid out one batch row per row while the padding stays under the device's bound (`_call`).
        """
        parts = {}
        reasoner = self._reasoner_part(readers, tokens, waiting, latents)
        if reasoner is not None:
            parts[None] = reasoner
        if trigger_rows is not None and not self.joint:
            self._trigger_reads(trigger_rows, tokens)
        elif trigger_rows is not None and trigger_rows.numel():
            # the trigger reads the embeddings the reasoner reads, when the two read the same tokens
            same = (reasoner is not None and reasoner.items.shape[1] == 1
                    and torch.equal(reasoner.rows, trigger_rows))
            parts[self.model.trigger.adapter_name] = _Part(
                trigger_rows, torch.ones(trigger_rows.shape[0], dtype=torch.int32),
                reasoner.items if same else self.embed(tokens[self.to_device(trigger_rows)[0]])[:, None])
        pending = None
        if weavers is not None and weavers.numel():
            ahead = torch.isin(weavers, readers)
            if ahead.any():
                self.record_tokens(weavers[ahead], tokens[self.to_device(weavers[ahead])[0]])
            part, pending = self._weaver_part(weavers, INFERENCE, ahead.to(torch.int32))
            parts[self.model.weaver.adapter_name] = part
        if not parts:  # the trigger's own call was the whole step (no row had anything else to read)
            return None
        flat, firsts = self._call(parts, self.packed_padding)
        if pending is None:
            return None
        k = self.k[INFERENCE]
        queries = firsts[self.model.weaver.adapter_name][:, None] + pending.long()[:, None] + torch.arange(k)
        return self._latents(flat[self.to_device(queries)[0]], weavers, columns)

    def _reasoner_part(self, readers: torch.Tensor, tokens: torch.Tensor | None, waiting: torch.Tensor | None,
                       latents: torch.Tensor | None) -> _Part | None:
        """`read`'s reasoner rows: the readers, each with its token then its latents if it waits too, then the
        waiting rows that read latents only."""
        if waiting is None or not waiting.numel():
            if not readers.numel():
                return None
            every_row = readers.shape[0] == self.batch and torch.equal(readers, self.all_rows)
            return _Part(readers, torch.ones(readers.shape[0], dtype=torch.int32),
                         self.embed(tokens if every_row else tokens[self.to_device(readers)[0]])[:, None])
        readers_device, = self.to_device(readers)
        a, (g, k) = readers.shape[0], latents.shape[:2]
        alone = _without(waiting, readers)
        rows = torch.cat([readers, alone])
        place = torch.full((self.batch,), -1)
        place[waiting] = torch.arange(g)
        weaves = place[rows] >= 0
        with_token = torch.arange(rows.shape[0]) < a
        counts = (with_token.to(torch.int32) + weaves.to(torch.int32) * k)
        items = latents.new_zeros(rows.shape[0], int(counts.max()), latents.shape[2])
        if a:
            items[:a, 0] = self.embed(tokens[readers_device])
        at = weaves.nonzero().flatten()
        at_device, columns, sources = self.to_device(at, with_token[at].long()[:, None] + torch.arange(k),
                                                     place[rows[at]])
        items[at_device[:, None], columns] = latents[sources]
        return _Part(rows, counts, items)

    def _trigger_reads(self, trigger_rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The `lora` trigger's own call (not joint): trigger_rows (host int64 [T]) read their tokens (ids [B] on
        the device); an idle call when T = 0 under synced ranks, so that every rank makes it."""
        if not trigger_rows.numel():
            if self.synced:
                self.trigger.idle()
            return
        lengths = self.trigger.lengths_of(trigger_rows)
        trigger_rows_device, lengths_device = self.to_device(trigger_rows, lengths)
        # the embedding module, not its weight: some scale their rows (Gemma)
        embeds = self.trigger_embed(tokens[trigger_rows_device])[:, None]
        packed = pack_step(None, self.trigger_embed.weight, embeds, self._ones(trigger_rows.shape[0]), lengths_device,
                           self.trigger.capacity, int(lengths.max()) + 1)
        every_row = trigger_rows.shape[0] == self.batch
        hidden = self.trigger.run(None if every_row else trigger_rows_device, packed,
                                  None if every_row else trigger_rows,
                                  torch.ones(trigger_rows.shape[0], dtype=torch.int32))
        self.trigger_hidden[trigger_rows_device] = hidden[:, 0]

    def idle_read(self) -> None:
        """The idle twin of a step's token read (synced ranks): the same calls, changing nothing."""
        self.reasoner.idle()
        if self.lora and not self.joint:
            self.trigger.idle()

    def record_tokens(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Put rows' pending tokens (host [G]; ids on the device) in the stream ahead of the reasoner's read,
        for a weave that must see them; the read writes the same items again."""
        rows_device, slots = self.to_device(rows, self.stream_lengths[rows].long())
        self.stream[rows_device, slots] = self.embed(tokens).to(self.stream.dtype)

    # -- the weaver -----------------------------------------------------------------------------

    def weave(self, rows: torch.Tensor, kind: str, column: int | torch.Tensor, ahead: int = 0) -> torch.Tensor:
        """Latents [G, K, d_R] for rows (host [G]), in a call of the weaver's own: it reads its unseen stream items
        (plus `ahead` items put there by `record_tokens`), then the queries, whose cache entries are rolled back.
        Their mean norm goes to latent_norms[rows, column] (column: one for every row, or host int64 [G])."""
        cache_rows = rows + self.weaver_offset
        seen, pending = self._unseen(rows, ahead)
        k = self.k[kind]
        width = int(pending.max())
        rows_device, cache_rows_device, seen_device, pending_device = self.to_device(rows, cache_rows, seen, pending)
        items, positions, slots, mask = pack_ragged(self.stream, rows_device, seen_device, pending_device, width,
                                                    self.query_slots[kind], self.weaver.capacity,
                                                    int((seen + pending).max()) + k)
        inputs = self.model.reasoner_to_weaver(items).to(self.weaver.dtype)
        inputs[:, width:] = self.queries[kind]
        mask = mask.to(self.weaver.dtype)  # made in the stream's (the reasoner's) dtype; a separate base may differ
        starts = self.weaver.only(self.model.weaver.adapter_name) if self.joint_weaver else None
        hidden = self.weaver.run(cache_rows_device, (inputs, positions, slots, mask), cache_rows, pending, starts)
        return self._latents(hidden[:, width:], rows, column)

    def _weaver_part(self, rows: torch.Tensor, kind: str, ahead: torch.Tensor) -> tuple[_Part, torch.Tensor]:
        """The joint weaver's rows in a reasoner call, and their pending counts (host int32 [W]): each row's unseen
        stream items (plus `ahead` put there by `record_tokens`), projected, then the queries, whose cache entries
        are not kept."""
        seen, pending = self._unseen(rows, ahead)
        k = self.k[kind]
        counts = pending + k
        width = int(counts.max())
        rows_device, seen_device, pending_device = self.to_device(rows, seen, pending)
        column = torch.arange(width, device=self.device)
        sources = (seen_device[:, None] + column).clamp(max=self.stream.shape[1] - 1)
        read = self.model.reasoner_to_weaver(self.stream[rows_device[:, None], sources]).to(self.weaver.dtype)
        queries = self.queries[kind][(column - pending_device[:, None]).clamp(0, k - 1)]
        items = torch.where((column < pending_device[:, None])[..., None], read, queries)
        return _Part(rows, counts, items, kept=pending), pending

    def _unseen(self, rows: torch.Tensor, ahead: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weaver's cache lengths of rows (host [G]) and the stream items it has not read (host int32 [G]),
        `ahead` more of them put there by `record_tokens`."""
        seen = self.weaver.lengths[rows + self.weaver_offset]
        return seen, self.stream_lengths[rows] + ahead - seen

    def _latents(self, hidden: torch.Tensor, rows: torch.Tensor, column: int | torch.Tensor) -> torch.Tensor:
        """The weaver's query outputs [G, K, d_W] for rows (host [G]) as latents in the reasoner's space, their mean
        norm written to latent_norms[rows, column]."""
        latents = self.model.weaver_to_reasoner(hidden)
        if self.kept_latents is not None:
            self.kept_latents.append((rows, column, latents.to(self.reasoner.dtype)))
        rows_device, = self.to_device(rows)
        if isinstance(column, torch.Tensor):
            column = self.to_device(column)[0]
        self.latent_norms[rows_device, column] = latents.float().norm(dim=-1).mean(-1)
        return latents.to(self.reasoner.dtype)

    def woven_latents(self) -> list[list[torch.Tensor]]:
        """Each row's kept latents in stream order (`MemGenGenerateOutput.latents`)."""
        by_row: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(self.batch)]
        for rows, column, latents in self.kept_latents:
            columns = column.tolist() if isinstance(column, torch.Tensor) else [column] * rows.shape[0]
            for row, at, row_latents in zip(rows.tolist(), columns, latents.unbind(0)):
                by_row[row].append((at, row_latents))
        return [[row_latents for _, row_latents in sorted(weaves, key=lambda weave: weave[0])] for weaves in by_row]

    # -- the trigger ----------------------------------------------------------------------------

    def decide(self, tokens: torch.Tensor, finished: torch.Tensor, counts: torch.Tensor, prompt_step: bool,
               columns: torch.Tensor | int) -> torch.Tensor:
        """Decisions int8 [B] of this step (counts updated in place), from the trigger's view of the last item
        read: the `lora` trigger's hidden state of it, or (`head`) the reasoner's. columns: the column of the
        token each row's decision comes before (device int64 [B], or one for every row)."""
        kwargs = {}
        if self.trigger_mode == "lora":  # rows it did not read are at no decision point: their logits go unused
            kwargs["logits"] = self.model.trigger.output_layer(self.trigger_hidden)
        elif self.trigger_mode == "head":
            kwargs["hidden"] = self.last_hidden
            kwargs["head_weight"] = self.model.trigger.output_layer.weight
            kwargs["head_bias"] = self.model.trigger.output_layer.bias
        uniforms = _at_columns(self.decision_uniforms, columns) if self.decision_uniforms is not None else None
        return trigger_scoring(tokens, self.model.delimiter_table, counts, self.budget, finished,
                               prompt_step=prompt_step, trigger_mode=self.trigger_mode, do_sample=self.do_sample,
                               temperature=self.temperature, uniforms=uniforms, **kwargs)

    # -- a whole insertion ----------------------------------------------------------------------

    def insert(self, active: torch.Tensor, invoking: torch.Tensor, tokens: torch.Tensor | None, kind: str,
               column: int, company: bool = False) -> None:
        """Read this step's items, the weaver in a call of its own: active rows' tokens (if not read yet) and
        latents for the invoking rows.

        active, invoking: host int64 row indices (invoking within active); tokens: [B] on the device, or None
        when the reasoner already read them; column: the new token the latents precede (for latent_norms);
        company: another rank weaves at this step, so a rank with no invoking row makes the calls idle.
        """
        if not invoking.numel():
            if company:
                self.weaver.idle()
            if tokens is not None:
                self.read(active, tokens)
            elif company:
                self.reasoner.idle()
            return
        if tokens is None:
            self.read(self.all_rows[:0], None, invoking, self.weave(invoking, kind, column))
            return
        self.record_tokens(invoking, tokens[self.to_device(invoking)[0]])
        self.read(active, tokens, invoking, self.weave(invoking, kind, column, ahead=1))


def weaves_in_reasoner_calls(trigger_mode: str, device_type: str, batch: int) -> bool:
    """Whether rows running ahead have their weaver (an adapter on the reasoner's base) read in the reasoner's
    calls: per device (`JOINT_WEAVER_MODES`), from batch 2 (with one row nothing runs beside a weave, which then
    takes two calls either way)."""
    return batch > 1 and trigger_mode in JOINT_WEAVER_MODES.get(device_type, ())


def _shares_base(reasoner, model, adapter: str) -> bool:
    """Whether adapter `adapter` of `model` can read in the reasoner's calls: it sits on the reasoner's own base
    and `SplitBatch` reproduces its layers."""
    return model is reasoner and SplitBatch.supported(model, adapter)


def _idle_rest_of_step(engine: _Engine, reads_first: bool, weave: bool) -> None:
    """A step's calls after its agreement, idle. reads_first: the step's tokens were read before the decisions
    (`head`, `lora`); weave: the agreement's vote that some rank weaves."""
    if weave:
        engine.weaver.idle()
    if not reads_first or weave:
        engine.reasoner.idle()


def _follow(engine: _Engine, sync: _RankSync, reads_first: bool, step: int, max_new_tokens: int,
            weave: bool) -> None:
    """After this rank's rows all finished at `step`: make the other ranks' calls, idle, until every rank is
    done (the last step makes no call)."""
    _idle_rest_of_step(engine, reads_first, weave)
    for _ in range(step + 1, max_new_tokens - 1):
        if reads_first:
            engine.idle_read()
        running, weave = sync.any(False, False)
        if not running:
            return
        _idle_rest_of_step(engine, reads_first, weave)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
             generator: torch.Generator | None, eos_ids: list[int], trigger_mode: str, prompt_budget: int,
             budget: int, repetition_penalty: float = 1.0, streamer=None,
             stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
             synced_ranks: bool = False, pad_id: int, output_latents: bool = False,
             min_new_tokens: int = 0, min_p: float | None = None) -> MemGenGenerateOutput:
    """MemGen generation for validated inputs (see `MemGenModel.generate`).

    pad_id: what fills each row after its EOS.
    min_new_tokens: a row's EOS ids are barred before this many new tokens (as Hugging Face's
    `MinNewTokensLogitsProcessor`; a stop string may still end it).
    stop: maps the new tokens so far [B, t] to bool [B], rows whose text now ends with a stop string.
    synced_ranks: keep the ranks of the default process group in step (a sharded model).
    """
    device = input_ids.device
    batch = input_ids.shape[0]
    sync = _RankSync(device) if synced_ranks else None
    if sync is not None:
        sync.check_same(max_new_tokens=max_new_tokens, trigger_mode=("always", "lora", "head").index(trigger_mode),
                        max_prompt_aug_num=prompt_budget, max_inference_aug_num=budget)
    real = attention_mask.bool()
    n_prompt = real.sum(1)
    order = torch.argsort((~real).long(), dim=1, stable=True)  # each row's prompt tokens first, in order
    prompts = input_ids.gather(1, order)[:, : int(n_prompt.max())]
    prompt_lengths = n_prompt.to(device="cpu", dtype=torch.int32)
    # Rows run ahead of each other unless a streamer (it takes every row's token at each step) or synced ranks keep
    # them in step: a row that weaves then reads its latents in a later call, beside the others' tokens, instead of
    # in a call of its own, and chooses its next token later than the others; each row keeps its own column.
    run_ahead = sync is None and streamer is None
    engine = _Engine(model, prompts, prompt_lengths, max_new_tokens, trigger_mode, prompt_budget, budget, do_sample,
                     temperature, generator, synced=sync is not None, run_ahead=run_ahead, keep_latents=output_latents)
    # `head` and `lora` decide from the token's hidden state (the reasoner's, the trigger's): they read it first
    reads_first = trigger_mode in ("head", "lora") and engine.memory
    run_ahead = run_ahead and (reads_first or engine.joint_weaver)
    counts = torch.zeros(batch, dtype=torch.int32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    # Where a stop string may finish a row, the column its completion ends at (else its first EOS tells)
    ends = torch.zeros(batch, dtype=torch.long, device=device) if stop is not None else None
    aug_mask = torch.full((batch, max_new_tokens), -100, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, device=device)
    penalize = repetition_penalty != 1.0
    rows_t = torch.arange(batch, device=device)
    if penalize:  # the tokens each row has seen, for the repetition penalty
        seen_tokens = torch.zeros(batch, model.delimiter_table.shape[0], dtype=torch.bool, device=device)
        seen_tokens[rows_t[:, None].expand_as(input_ids)[real], input_ids[real]] = True
    if streamer is not None:
        streamer.put(input_ids.cpu())

    engine.read_prompts(prompts, prompt_lengths)
    all_rows = engine.all_rows
    if prompt_budget > 0:
        decisions = engine.decide(prompts[:, 0], finished, counts, True, 0)
        aug_mask[:, 0] = decisions
        invoking = (decisions.cpu() == 1).nonzero().flatten()  # the prompt step's synchronisation
        company = sync.any(invoking.numel() > 0)[0] if sync is not None else False
        engine.insert(all_rows, invoking, None, PROMPT, 0, company)
    active = all_rows  # host: rows unfinished at the last synchronisation, short of max_new_tokens
    weaves_left = torch.full((batch,), budget, dtype=torch.int32)  # host: inference weaves each row may still make
    lag = torch.zeros(batch, dtype=torch.long)  # host: steps each row spent on weaving, choosing no token
    lags_equal = True  # every row has the same lag (checked when lags change, not every step)
    nothing = all_rows[:0]
    waiting, woven = nothing, None  # host rows whose latents [G, K, d], woven at the last call, this step reads
    weavers, weave_columns = nothing, None  # host rows (and columns) whose joint weaver reads in this step's call
    weaving = engine.memory
    step = width = 0
    while True:
        # Once no unfinished row can weave again, the rest are plain steps: no trigger, no decisions (each row
        # would get none), and the stream only the weaver reads is no longer written. Synced ranks keep every
        # call (their agreement counts on the same calls each step), idle where this rank has nothing to run.
        weaving = weaving and bool((weaves_left[active] > 0).any())
        engine.recording = weaving
        behind = woven is not None or weavers.numel() > 0  # some rows have latents or weaver items to read
        first = reads_first and (weaving or behind or (sync is not None and engine.memory))
        # every row at one column (always so with rows in step, and at batch 1): whole-column writes
        uniform = not behind and lags_equal
        stepping = _without(active, waiting, weavers)
        if not stepping.numel():  # every running row is weaving: a call of latents and weaver items only
            woven_next = engine.read(nothing, None, waiting, woven, weavers=weavers, columns=weave_columns)
            waiting, woven, weavers, step = weavers, woven_next, nothing, step + 1
            continue
        logits = engine.lm_head(engine.last_hidden).float()
        if penalize:
            logits = _penalize(logits, seen_tokens, repetition_penalty)
        if uniform:
            idle, at = finished, step - int(lag[0])
        else:
            columns = step - lag[stepping]  # host: the column of each stepping row's token
            stepping_device, columns_device, at = engine.to_device(
                stepping, columns, (step - lag).clamp(0, max_new_tokens - 1))  # every row's column (idle rows: any)
            # index_fill_ takes its value as a scalar: `idle[rows] = False` would copy it from pageable host
            # memory, a synchronisation per step on CUDA
            idle = torch.ones_like(finished).index_fill_(0, stepping_device, False) | finished
        if min_new_tokens and uniform and at < min_new_tokens:  # (index_fill_: a scalar, no host copy to wait on)
            logits.index_fill_(1, eos, float("-inf"))
        elif min_new_tokens and not uniform:  # each row at its own column
            logits[:, eos] = logits[:, eos].masked_fill((at < min_new_tokens)[:, None], float("-inf"))
        uniforms = _at_columns(engine.token_uniforms, at) if do_sample else None
        tokens = torch.where(idle, pad_id, _choose_tokens(logits, do_sample, temperature, top_k, top_p, uniforms,
                                                          min_p))
        if ends is not None:  # each row that chose a token: its completion runs through this column
            ends = torch.where(idle, ends, at + 1)
        if uniform:
            new_tokens[:, at] = tokens
            width = at + 1
        else:
            new_tokens[stepping_device, columns_device] = tokens[stepping_device]
            width = max(width, int(columns.max()) + 1)
        if penalize:
            seen_tokens[rows_t, tokens] |= ~idle
        ended = torch.isin(tokens, eos)
        finished = finished | (ended if uniform else ended & ~idle)  # uniform: the idle rows are the finished
        if stop is not None:
            if uniform:
                finished = finished | stop(new_tokens[:, : at + 1])
            else:  # rows at one column at a time: a row's text ends at its own column
                for column in columns.unique().tolist():
                    group = engine.to_device(stepping[columns == column])[0]
                    finished[group] |= stop(new_tokens[group, : column + 1])
        if uniform and at + 1 == max_new_tokens:
            if streamer is not None:
                streamer.put(tokens.cpu())
            break
        # rows with a token still to come read this one and decide; the others are complete
        readers = continuing = active
        if not uniform:
            complete = columns + 1 == max_new_tokens  # stepping rows that chose their last token
            if complete.any():
                readers = stepping[~complete]
                continuing = _without(active, stepping[complete])
            else:
                readers = stepping
        decisions = None
        if first and (readers.numel() or behind):  # the rows still decoding read the token (the `lora` trigger's
            # rows: those that may weave), beside the latents woven at the last call and the joint weaver's items
            trigger_rows = readers[weaves_left[readers] > 0] if engine.lora else None
            woven_next = engine.read(readers, tokens, waiting, woven, trigger_rows, weavers, weave_columns)
            waiting, woven, weavers = weavers, woven_next, nothing
        if weaving and readers.numel():
            if uniform:
                excluded = finished
            else:
                readers_device = engine.to_device(readers)[0]
                excluded = torch.ones_like(finished).index_fill_(0, readers_device, False) | finished
            decisions = engine.decide(tokens, excluded, counts, False,
                                      at + 1 if uniform else (at + 1).clamp(max=max_new_tokens - 1))
        # the step's synchronisation: the finished flags, the tokens and the decisions (if any)
        host = transfers.to_host([tokens, finished] + ([decisions] if decisions is not None else []))
        host_finished, host_invoking = host[1], (host[2] == 1 if decisions is not None else None)
        if streamer is not None:
            streamer.put(host[0])
        company = False
        if sync is not None:
            unfinished = (~host_finished).nonzero().flatten()
            running, company = sync.any(unfinished.numel() > 0,  # and whether some rank weaves
                                        host_invoking is not None and bool(host_invoking.any()))
            if not unfinished.numel():
                if running:
                    _follow(engine, sync, reads_first, step, max_new_tokens, company)
                break
        if decisions is not None:
            if uniform:
                aug_mask[:, at + 1] = decisions
            else:
                decided_columns = engine.to_device(step + 1 - lag[readers])[0]
                aug_mask[readers_device, decided_columns] = decisions[readers_device].long()
        continuing = continuing[~host_finished[continuing]]
        if not continuing.numel():
            break
        invoking = host_invoking.nonzero().flatten() if host_invoking is not None else nothing
        columns_next = None  # host: the column each invoking row's latents precede
        if invoking.numel():
            weaves_left[invoking] -= 1
            columns_next = step + 1 - lag[invoking]
        held = 0  # steps the invoking rows spend without a token for this weave
        if engine.joint_weaver and first:  # `head`, `lora` (tokens read): the weaver reads in the next step's call,
            weavers, weave_columns = invoking, columns_next  # the reasoner the latents in the one after: two steps
            held = 2  # without a token
        elif engine.joint_weaver and not reads_first:  # `always`: the weaver reads beside the token, the reasoner
            # the latents in the next step's call
            readers = _without(continuing, waiting)
            woven_next = engine.read(readers, tokens, waiting, woven, weavers=invoking, columns=columns_next)
            waiting, woven = invoking, woven_next
            held = 1
        elif run_ahead and invoking.numel():  # `head`, `lora`: the reasoner reads the latents in the next step's call
            waiting, woven = invoking, engine.weave(invoking, INFERENCE, columns_next)
            held = 1
        elif first:
            engine.insert(active, invoking, None, INFERENCE, step + 1, company)
        else:
            engine.insert(continuing, invoking, tokens, INFERENCE, step + 1, company)
        if held and invoking.numel():
            lag[invoking] += held
            lags_equal = bool((lag == lag[0]).all())
        active = continuing
        step += 1
    if streamer is not None:
        streamer.end()
    new_tokens = new_tokens[:, :width]
    real = (completion_mask(new_tokens, eos) if ends is None
            else torch.arange(width, device=device) < ends[:, None])
    return MemGenGenerateOutput(sequences=torch.cat([input_ids, new_tokens], 1), augmentation_mask=aug_mask[:, :width],
                                latent_norms=engine.latent_norms[:, :width], completion_mask=real,
                                latents=engine.woven_latents() if output_latents else None)

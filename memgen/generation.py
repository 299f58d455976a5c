"""The decoding engine: MemGen generation with per-row caches, nothing recomputed.

- The reasoner reads each stream item (token or latent) once, through a ragged KV cache: a row's
  insertion adds cache entries to that row only. Steps are packed by `memgen.ops.pack_step`
  (latent-token injection) and cache writes go through `memgen.ops.write_kv`.
- The weaver keeps its own ragged cache over the stream: at an insertion the invoking rows,
  batched, read only the stream items they have not seen (projected into its space as they are
  read), then the K queries, whose entries are rolled back (`memgen.ops.pack_ragged`). The
  queries' LayerNorm and scale are applied once per call.
- The `lora` trigger reads each token of the rows that may still weave as the reasoner reads it,
  through its own incremental cache. When it is an adapter on the reasoner's own base (the
  default) its cache rows sit beside the reasoner's and one call serves both: the shared base
  weights run once over both sets of rows and only the trigger's rows get its LoRA update
  (`memgen.adapters.SplitBatch`). `head` reads the reasoner's hidden state of the delimiter (no
  extra forward). Decisions come from the fused trigger-scoring op.
- In `always` mode the decision comes before the reasoner reads the token, so every step is one
  reasoner call: [token, K latents] per row when the padding this adds to rows that do not invoke
  stays under a per-device bound (`PACKED_PADDING_ITEMS`), else one batch row per item (a
  latent's batch row reads its row's cache, which the same layer call has just written), so no
  row pads. `head` and `lora` read the token first (their decision needs a hidden state of it);
  the invoking rows read their latents in the next step's call, beside the other rows' tokens
  (`read_beside`), and choose their next token a step after the others: each row keeps its own
  column. A streamer (it takes every row's token at each step) and synced ranks keep the rows in
  step instead, and the latents take a call of their own.
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
from transformers.utils import ModelOutput

from memgen.adapters import BareBase, SplitBatch, active_adapter, tuner_layers
from memgen.cache import RaggedCache
from memgen.layer_stack import direct_call, forward_call
from memgen.ops import pack_ragged, pack_step, trigger_scoring
from memgen.sharding import ranks_max
from memgen.weaver import INFERENCE, PROMPT

# Padding items (rows that do not invoke x K) that a packed [token, latents] step may add before the
# engine lays the step out one item per batch row instead. On a GPU a small-batch step is bound by
# reading the weights, so padding is nearly free while the per-item layout copies each batch row's
# cache view; on a CPU every padding item costs compute.
PACKED_PADDING_ITEMS = {"cuda": 512, "cpu": 0}


@dataclass
class MemGenGenerateOutput(ModelOutput):
    """sequences: [B, L + T] prompts then new tokens (pad after a row's EOS);
    augmentation_mask: [B, T] the decision taken before each new token (-100 / 0 SKIP / 1 INVOKE);
    latent_norms: float32 [B, T] the mean L2 norm of the K latents woven before each new token (NaN
    where none were), to compare with the reasoner's token embeddings."""

    sequences: torch.Tensor | None = None
    augmentation_mask: torch.Tensor | None = None
    latent_norms: torch.Tensor | None = None


class _RaggedDecoder:
    """A base model (with one adapter active, or none) reading ragged rows through its own cache.

    With `split` (an adapter name) the cache holds 2 x batch rows: cache row batch + r is row r read through
    that adapter (the `lora` trigger on the reasoner's own base), so one call can serve both (`run`'s
    split_from).
    """

    def __init__(self, model, adapter: str | None, batch: int, capacity: int, device: torch.device,
                 split: str | None = None) -> None:
        self.model, self.adapter, self.capacity, self.batch = model, adapter, capacity, batch
        decoder = model.get_decoder()
        direct = direct_call(decoder)
        self.call, self.direct = direct or forward_call(decoder), direct is not None
        self.layers = tuner_layers(model) if adapter is not None else None
        self.bare = BareBase(model) if adapter is None else None
        self.split = SplitBatch(model, split) if split is not None else None
        self.cache = RaggedCache(model.config.num_hidden_layers, batch * (2 if split else 1), capacity, device)
        self.lengths = self.cache.lengths  # host int32 [cache rows]: items each cache row has read
        self.dtype = model.get_input_embeddings().weight.dtype
        self.width, self.device = model.config.hidden_size, device

    def run(self, rows: torch.Tensor | int | None, packed: tuple[torch.Tensor, ...], advance: torch.Tensor | None,
            n_items: torch.Tensor, split_from: int | None = None) -> torch.Tensor:
        """Feed a packed call (items, positions, slots, mask) to cache rows `rows` (device [G], repeats
        allowed; an int n: the first n cache rows in order; None: the batch's rows in order); returns hidden
        [G, W, d].

        advance: host int64 cache rows (no repeats; None: the batch's rows) whose lengths grow by n_items (host
        int32). split_from: the call's batch rows from this one on run through the `split` adapter, the
        others through the bare base.
        """
        items, positions, slots, mask = packed
        self.cache.prepare(self.batch if rows is None else rows, slots, mask.shape[-1])
        if self.direct and items.shape[1] == 1 and self._sees_only_own_slots(advance, items.shape[0], mask.shape[-1]):
            # The mask hides nothing, and without one Hugging Face's SDPA attention takes plain decoding's path
            # (grouped-query heads passed to SDPA as they are, not packed around a mask). A decoder's own forward
            # would build a mask of its own, so only direct calls drop it.
            mask = None
        if split_from is not None:
            context = self.split(split_from)
        else:
            context = self.bare() if self.bare is not None else active_adapter(self.model, self.adapter, self.layers)
        with context:
            hidden = self.call(items, mask, positions, self.cache)
        if advance is None:
            self.lengths[: self.batch] += n_items
        else:
            self.lengths[advance] += n_items
        return hidden

    def _sees_only_own_slots(self, advance: torch.Tensor | None, n_rows: int, visible: int) -> bool:
        """Whether a call of one item per batch row, its batch rows being the advanced rows (`run`'s contract), has
        every row attend to exactly its own valid slots: every row equally long, with `visible` slots after it."""
        lengths = self.lengths[: self.batch] if advance is None else self.lengths[advance]
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


def _choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                   top_p: float | None, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next tokens [B] from float logits [B, V]: argmax, or a draw after temperature, top-k and top-p: the
    token in whose share of the cumulative distribution the row's uniform (float [B] in [0, 1)) falls."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(ordered, -1)
        drop = probs.cumsum(-1) - probs >= top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
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


class _Engine:
    """State of one generate call: the three ragged decoders, the weaver's stream and the host bookkeeping."""

    def __init__(self, model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_new_tokens: int,
                 trigger_mode: str, prompt_budget: int, budget: int, do_sample: bool, temperature: float,
                 generator: torch.Generator | None, synced: bool = False) -> None:
        config, device = model.config, prompts.device
        batch, width = prompts.shape
        self.model, self.device, self.batch, self.synced = model, device, batch, synced
        self.all_rows = torch.arange(batch)  # host
        self.all_rows_device = torch.arange(batch, device=device)
        self.trigger_mode, self.budget = trigger_mode, budget
        self.do_sample, self.temperature = do_sample, temperature
        # Sampling draws one uniform per row and column, up front: the token a row samples at a column (and its
        # decision before it) does not depend on when the row gets there, nor on the other rows.
        self.token_uniforms = (torch.rand(batch, max_new_tokens, generator=generator, device=device)
                               if do_sample else None)
        learned = trigger_mode != "always" and (prompt_budget > 0 or budget > 0)  # `always` samples no decision
        self.decision_uniforms = (torch.rand(batch, max_new_tokens, generator=generator, device=device)
                                  if do_sample and learned else None)
        self.k = {PROMPT: config.prompt_latents_len, INFERENCE: config.inference_latents_len}
        self.memory = prompt_budget > 0 or budget > 0
        self.recording = self.memory  # whether reads append their items to the weaver's stream
        # The `lora` trigger reads every token of the rows that may still weave, as the reasoner reads it: in the
        # same call (its rows are the reasoner cache's second half) when it is an adapter on the reasoner's own
        # base, else through its own cache and calls.
        self.lora = trigger_mode == "lora" and self.memory
        trigger_model = model.trigger.model if self.lora else None
        self.joint = self.lora and trigger_model is model.reasoner and SplitBatch.supported(
            trigger_model, model.trigger.adapter_name)
        capacity = width + max_new_tokens + (self.k[PROMPT] if prompt_budget else 0) + self.k[INFERENCE] * budget
        self.reasoner = _RaggedDecoder(model.reasoner, None, batch, capacity, device,
                                       split=model.trigger.adapter_name if self.joint else None)
        self.embed = model.reasoner.get_input_embeddings()
        self.lm_head = model.reasoner.get_output_embeddings()
        self.last_hidden = torch.zeros(batch, self.embed.weight.shape[1], dtype=self.reasoner.dtype, device=device)
        self.packed_padding = PACKED_PADDING_ITEMS.get(device.type, 0)
        self.latent_norms = torch.full((batch, max_new_tokens), float("nan"), device=device)
        if self.memory:
            self.weaver = _RaggedDecoder(model.weaver.model, model.weaver.adapter_name, batch,
                                         capacity + max(self.k.values()), device)
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
            self.trigger_hidden = torch.zeros(batch, trigger_model.config.hidden_size,
                                              dtype=trigger_model.get_input_embeddings().weight.dtype, device=device)

    def to_device(self, *host: torch.Tensor) -> list[torch.Tensor]:
        """Host tensors on the engine's device without a synchronisation: a copy from pageable memory
        makes the host wait for the copy (and so for the stream's queued work), one from pinned memory
        does not. On the CPU they are returned as they are."""
        if self.device.type == "cpu":
            return list(host)
        return [t.pin_memory().to(self.device, non_blocking=True) for t in host]

    # -- the reasoner ---------------------------------------------------------------------------

    def _read(self, rows: torch.Tensor | int | None, packed: tuple[torch.Tensor, ...], advance: torch.Tensor | None,
              n_items: torch.Tensor, last: torch.Tensor,
              trigger: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """One reasoner call (see `_RaggedDecoder.run`); then last_hidden of the advanced rows is the hidden
        state at flat index last[a] of [G * W], and their items join the stream.

        trigger: (rows, n_items, last), host tensors [T]: the call's last T batch rows are these rows' `lora`
        trigger, reading the same tokens (a joint call, cache rows batch + r); trigger_hidden[rows[t]] becomes
        the hidden state at flat index last[t].
        """
        advance = self.all_rows if advance is None else advance
        split_from = None
        if trigger is None:
            hidden = self.reasoner.run(rows, packed, advance, n_items)
        else:
            split_from = packed[0].shape[0] - trigger[0].shape[0]
            hidden = self.reasoner.run(rows, packed, torch.cat([advance, trigger[0] + self.batch]),
                                       torch.cat([n_items, trigger[1]]), split_from)
        advance_device, last_device = self.to_device(advance, last)
        flat = hidden.flatten(0, 1)
        self.last_hidden[advance_device] = flat[last_device]
        if trigger is not None:
            trigger_rows_device, trigger_last_device = self.to_device(trigger[0], trigger[2])
            self.trigger_hidden[trigger_rows_device] = flat[trigger_last_device]
        if self.recording:
            cache_rows = self.all_rows_device if rows is None or isinstance(rows, int) else rows[:split_from]
            items, slots = packed[0][:split_from], packed[2][:split_from]
            self.stream[cache_rows[:, None], slots] = items.to(self.stream.dtype)  # padding: scratch slot
            self.stream_lengths[advance] += n_items

    def read_prompts(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
        """The reasoner reads the prompts, and so does the `lora` trigger (in the same call when joint)."""
        embeds = self.embed(prompts)
        width = prompts.shape[1]
        n = 2 * self.batch if self.joint else self.batch
        lengths = prompt_lengths.repeat(n // self.batch)
        rows_device, zeros, lengths_device = self.to_device(torch.arange(n), torch.zeros(n, dtype=torch.int32), lengths)
        packed = pack_ragged(embeds.repeat(n // self.batch, 1, 1), rows_device, zeros, lengths_device, width, None,
                             self.reasoner.capacity, max(int(prompt_lengths.max()), 1))
        last = self.all_rows * width + (prompt_lengths.long() - 1).clamp(min=0)
        trigger = (self.all_rows, prompt_lengths, last + self.batch * width) if self.joint else None
        self._read(n if self.joint else None, packed, None, prompt_lengths, last, trigger)
        if self.lora and not self.joint:
            packed = pack_ragged(self.trigger_embed(prompts), rows_device, zeros, lengths_device, width, None,
                                 self.trigger.capacity, max(int(prompt_lengths.max()), 1))
            hidden = self.trigger.run(None, packed, None, prompt_lengths)
            self.trigger_hidden[:] = hidden.flatten(0, 1)[self.to_device(last)[0]]

    def read_tokens(self, rows: torch.Tensor, tokens: torch.Tensor, trigger_rows: torch.Tensor | None) -> None:
        """The reasoner reads rows' (host int64 [G]) tokens (ids [B] on the device); the `lora` trigger reads
        the same tokens of trigger_rows (host int64 [T], None: no trigger): in the same call when joint, else
        in its own (`_trigger_reads`)."""
        if trigger_rows is None or not self.joint:
            self.read_step(rows, tokens[self.to_device(rows)[0]], None, None)
            if trigger_rows is not None:
                self._trigger_reads(trigger_rows, tokens)
            return
        g, t = rows.shape[0], trigger_rows.shape[0]
        cache_rows = torch.cat([rows, trigger_rows + self.batch])
        lengths = self.reasoner.lengths[cache_rows]
        cache_rows_device, token_rows_device, lengths_device = self.to_device(
            cache_rows, torch.cat([rows, trigger_rows]), lengths)
        packed = pack_step(tokens[token_rows_device], self.embed.weight, None, None, lengths_device,
                           self.reasoner.capacity, int(lengths.max()) + 1)
        ones = torch.ones(g + t, dtype=torch.int32)
        in_order = g == t == self.batch  # every row, twice: the cache's rows in order (views, no copies)
        self._read(2 * self.batch if in_order else cache_rows_device, packed, rows, ones[:g], torch.arange(g),
                   (trigger_rows, ones[g:], torch.arange(g, g + t)))

    def read_beside(self, rows: torch.Tensor, tokens: torch.Tensor, waiting: torch.Tensor, latents: torch.Tensor,
                    trigger_rows: torch.Tensor | None) -> None:
        """One reasoner call in which rows (host int64 [A]) read their token (ids [B] on the device) and the
        waiting rows (host int64 [G], none of them in rows) read the latents [G, K, d] woven for them after the
        last step's decisions; the `lora` trigger reads trigger_rows' tokens (host [T], None: no trigger) in the
        same call when joint, else in its own.

        Laid out like `insert`'s step: one batch row per reasoner row when the padding this adds stays under the
        device's bound, else one batch row per item (`read_flat`).
        """
        joint = trigger_rows is not None and self.joint
        if trigger_rows is not None and not joint:
            self._trigger_reads(trigger_rows, tokens)
        trigger_rows = trigger_rows if joint else None
        a, (g, k) = rows.shape[0], latents.shape[:2]
        t = trigger_rows.shape[0] if joint else 0
        if (a + t) * (k - 1) > self.packed_padding:
            self.read_flat(rows, tokens, waiting, latents, trigger_rows)
            return
        trigger_cache_rows = [trigger_rows + self.batch] if joint else []
        cache_rows = torch.cat([rows, waiting, *trigger_cache_rows])
        lengths = self.reasoner.lengths[cache_rows]
        embedded = self.embed(tokens[self.to_device(torch.cat([rows, *([trigger_rows] if joint else [])]))[0]])
        items = embedded.new_zeros(a + g + t, k, embedded.shape[1])
        items[:a, 0], items[a:a + g], items[a + g:, 0] = embedded[:a], latents, embedded[a:]
        counts = torch.cat([torch.ones(a, dtype=torch.int32), torch.full((g,), k, dtype=torch.int32),
                            torch.ones(t, dtype=torch.int32)])
        last = torch.arange(a + g + t) * k + counts.long() - 1
        cache_rows_device, counts_device, lengths_device = self.to_device(cache_rows, counts, lengths)
        packed = pack_step(None, self.embed.weight, items, counts_device, lengths_device, self.reasoner.capacity,
                           int((lengths + counts).max()))
        trigger = (trigger_rows, counts[a + g:], last[a + g:]) if joint else None
        self._read(cache_rows_device, packed, torch.cat([rows, waiting]), counts[:a + g], last[:a + g], trigger)

    def _trigger_reads(self, trigger_rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The `lora` trigger's own call (not joint): trigger_rows (host int64 [T]) read their tokens (ids [B] on
        the device); an idle call when T = 0 under synced ranks, so that every rank makes it."""
        if not trigger_rows.numel():
            if self.synced:
                self.trigger.idle()
            return
        lengths = self.trigger.lengths_of(trigger_rows)
        trigger_rows_device, lengths_device = self.to_device(trigger_rows, lengths)
        packed = pack_step(tokens[trigger_rows_device], self.trigger_embed.weight, None, None, lengths_device,
                           self.trigger.capacity, int(lengths.max()) + 1)
        every_row = trigger_rows.shape[0] == self.batch
        hidden = self.trigger.run(None if every_row else trigger_rows_device, packed,
                                  None if every_row else trigger_rows,
                                  torch.ones(trigger_rows.shape[0], dtype=torch.int32))
        self.trigger_hidden[trigger_rows_device] = hidden[:, 0]

    def idle_read(self) -> None:
        """The idle twin of `read_tokens` (synced ranks): the same calls, changing nothing."""
        self.reasoner.idle()
        if self.lora and not self.joint:
            self.trigger.idle()

    def read_step(self, rows: torch.Tensor, tokens: torch.Tensor | None, latents: torch.Tensor | None,
                  n_latents: torch.Tensor | None) -> None:
        """The reasoner reads, for rows (host int64 [G]), their token (if given) then n_latents[g] latents."""
        n_items = (1 if tokens is not None else 0) + (n_latents if n_latents is not None else 0)
        n_items = torch.as_tensor(n_items, dtype=torch.int32).expand(rows.shape[0]).contiguous()
        lengths = self.reasoner.lengths_of(rows)
        rows_device, lengths_device = self.to_device(rows, lengths)
        n_latents_device = self.to_device(n_latents)[0] if n_latents is not None else None
        packed = pack_step(tokens, self.embed.weight, latents, n_latents_device, lengths_device,
                           self.reasoner.capacity, int((lengths + n_items).max()))
        width = packed[0].shape[1]
        last = torch.arange(rows.shape[0]) * width + n_items.long() - 1
        every_row = rows.shape[0] == self.batch
        self._read(None if every_row else rows_device, packed, None if every_row else rows, n_items, last)

    def read_flat(self, rows: torch.Tensor, tokens: torch.Tensor, latent_rows: torch.Tensor, latents: torch.Tensor,
                  trigger_rows: torch.Tensor | None = None) -> None:
        """One call in which each item is its own batch row: rows' (host int64 [A]) tokens (ids [B] on the device),
        then latent_rows' (host int64 [G], ascending) K latents [G, K, d], then the joint `lora` trigger's reading
        of trigger_rows' tokens (host [T], None: none). A latent row among rows reads its latents after its token;
        one that is not reads latents only.

        A latent's batch row maps to its row's cache, which the same layer call has just written (the token
        and the earlier latents), so nothing pads the rows that do not weave.
        """
        a, (g, k) = rows.shape[0], latents.shape[:2]
        t = trigger_rows.shape[0] if trigger_rows is not None else 0
        trigger_cache_rows = [trigger_rows + self.batch] if t else []
        after_token = torch.isin(latent_rows, rows)
        advance = torch.cat([rows, latent_rows[~after_token]])  # the reasoner's rows, each once
        lengths = self.reasoner.lengths[torch.cat([rows, latent_rows, *trigger_cache_rows])]
        latent_lengths = (lengths[a:a + g] + after_token.to(torch.int32))[:, None] + torch.arange(k)
        item_rows = torch.cat([rows, latent_rows.repeat_interleave(k), *trigger_cache_rows])
        item_lengths = torch.cat([lengths[:a], latent_lengths.flatten(), lengths[a + g:]]).to(torch.int32)
        embedded = self.embed(tokens[self.to_device(torch.cat([rows, *([trigger_rows] if t else [])]))[0]])
        items = torch.cat([embedded[:a], latents.flatten(0, 1), embedded[a:]])[:, None]
        item_rows_device, lengths_device = self.to_device(item_rows, item_lengths)
        ones = torch.ones(item_rows.shape[0], dtype=torch.int32, device=self.device)
        packed = pack_step(None, self.embed.weight, items, ones, lengths_device, self.reasoner.capacity,
                           int(item_lengths.max()) + 1)
        # each advanced row ends on its last latent, else on its token
        place = torch.searchsorted(latent_rows, advance).clamp(max=max(g - 1, 0))
        weaves = latent_rows[place] == advance if g else torch.zeros(advance.shape[0], dtype=torch.bool)
        last = torch.where(weaves, a + place * k + k - 1, torch.arange(advance.shape[0]))
        n_items = (torch.arange(advance.shape[0]) < a).to(torch.int32) + weaves.to(torch.int32) * k
        trigger = (trigger_rows, torch.ones(t, dtype=torch.int32), a + g * k + torch.arange(t)) if t else None
        self._read(item_rows_device, packed, advance, n_items, last, trigger)

    def record_tokens(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Put rows' pending tokens (host [G]; ids on the device) in the stream ahead of the reasoner's read,
        for a weave that must see them; the read writes the same items again."""
        rows_device, slots = self.to_device(rows, self.stream_lengths[rows].long())
        self.stream[rows_device, slots] = self.embed(tokens).to(self.stream.dtype)

    # -- the weaver -----------------------------------------------------------------------------

    def weave(self, rows: torch.Tensor, kind: str, column: int | torch.Tensor, ahead: int = 0) -> torch.Tensor:
        """Latents [G, K, d_R] for rows (host [G]): the weaver reads its unseen stream items (plus `ahead`
        items put there by `record_tokens`), then the queries, whose cache entries are rolled back.
        Their mean norm goes to latent_norms[rows, column] (column: one for every row, or host int64 [G])."""
        seen = self.weaver.lengths_of(rows)
        pending = self.stream_lengths[rows] + ahead - seen
        k = self.k[kind]
        width = int(pending.max())
        rows_device, seen_device, pending_device = self.to_device(rows, seen, pending)
        items, positions, slots, mask = pack_ragged(self.stream, rows_device, seen_device, pending_device, width,
                                                    self.query_slots[kind], self.weaver.capacity,
                                                    int((seen + pending).max()) + k)
        inputs = self.model.reasoner_to_weaver(items.float()).to(self.weaver.dtype)
        inputs[:, width:] = self.queries[kind]
        hidden = self.weaver.run(rows_device, (inputs, positions, slots, mask), rows, pending + k)
        self.weaver.lengths[rows] -= k  # the queries' entries are rolled back
        latents = self.model.weaver_to_reasoner(hidden[:, width:].float())
        if isinstance(column, torch.Tensor):
            column = self.to_device(column)[0]
        self.latent_norms[rows_device, column] = latents.norm(dim=-1).mean(-1)
        return latents.to(self.reasoner.dtype)

    # -- the trigger ----------------------------------------------------------------------------

    def decide(self, tokens: torch.Tensor, finished: torch.Tensor, counts: torch.Tensor, prompt_step: bool,
               columns: torch.Tensor | int) -> torch.Tensor:
        """Decisions int8 [B] of this step (counts updated in place), from the trigger's view of the last item
        read: the `lora` trigger's hidden state of it, or (`head`) the reasoner's. columns: the column of the
        token each row's decision comes before (device int64 [B], or one for every row)."""
        kwargs = {}
        if self.trigger_mode == "lora":  # rows it did not read are at no decision point: their logits go unused
            kwargs["logits"] = self.model.trigger.output_layer(self.trigger_hidden.float())
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
        """Read this step's items: active rows' tokens (if not read yet) and latents for the invoking rows.

        active, invoking: host int64 row indices (invoking within active); tokens: [B] on the device, or None
        when the reasoner already read them; column: the new token the latents precede (for latent_norms);
        company: another rank weaves at this step, so a rank with no invoking row makes the calls idle.
        """
        k = self.k[kind]
        if tokens is None:
            if invoking.numel():
                self.read_step(invoking, None, self.weave(invoking, kind, column),
                               torch.full((invoking.numel(),), k, dtype=torch.int32))
            elif company:
                self.weaver.idle()
                self.reasoner.idle()
            return
        if not invoking.numel():
            if company:
                self.weaver.idle()
            self.read_step(active, tokens[self.to_device(active)[0]], None, None)
            return
        invoking_tokens = tokens[self.to_device(invoking)[0]]
        self.record_tokens(invoking, invoking_tokens)
        latents = self.weave(invoking, kind, column, ahead=1)
        if (active.numel() - invoking.numel()) * k > self.packed_padding:
            self.read_flat(active, tokens, invoking, latents)
            return
        invokes = torch.isin(active, invoking)
        place = (torch.cumsum(invokes, 0) - 1).clamp(min=0)  # each invoking row's index in `latents`
        place_device, invokes_device = self.to_device(place, invokes)
        padded = latents[place_device] * invokes_device[:, None, None].to(latents.dtype)
        self.read_step(active, tokens[self.to_device(active)[0]], padded, invokes.to(torch.int32) * k)


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
             synced_ranks: bool = False) -> MemGenGenerateOutput:
    """MemGen generation for validated inputs (see `MemGenModel.generate`).

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
    engine = _Engine(model, prompts, prompt_lengths, max_new_tokens, trigger_mode, prompt_budget, budget, do_sample,
                     temperature, generator, synced=sync is not None)
    # `head` and `lora` decide from the token's hidden state (the reasoner's, the trigger's): they read it first
    reads_first = trigger_mode in ("head", "lora") and engine.memory
    counts = torch.zeros(batch, dtype=torch.int32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = model.tokenizer.pad_token_id
    new_tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
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
    # `head` and `lora` rows that weave after a step's decisions read their latents in the next step's call, beside
    # the others' tokens, instead of in a call of their own: they choose their next token a step later than the
    # others, so each row keeps its own column (`lag`: the steps it spent reading latents). Synced ranks and a
    # streamer keep every row in step (the latents then take a call of their own).
    run_ahead = reads_first and sync is None and streamer is None
    active = all_rows  # host: rows unfinished at the last synchronisation, short of max_new_tokens
    weaves_left = torch.full((batch,), budget, dtype=torch.int32)  # host: inference weaves each row may still make
    lag = torch.zeros(batch, dtype=torch.long)  # host
    waiting, woven = all_rows[:0], None  # host rows whose latents [G, K, d], woven last step, this step reads
    weaving = engine.memory
    step = width = 0
    while True:
        # Once no unfinished row can weave again, the rest are plain steps: no trigger, no decisions (each row
        # would get none), and the stream only the weaver reads is no longer written. Synced ranks keep every
        # call (their agreement counts on the same calls each step), idle where this rank has nothing to run.
        weaving = weaving and bool((weaves_left[active] > 0).any())
        engine.recording = weaving
        first = reads_first and (weaving or woven is not None or (sync is not None and engine.memory))
        # every row at one column (always so with rows in step, and at batch 1): whole-column writes
        uniform = woven is None and bool((lag == lag[0]).all())
        stepping = active[~torch.isin(active, waiting)]
        if not stepping.numel():  # every running row waits for its latents
            engine.read_step(waiting, None, woven, torch.full((waiting.numel(),), woven.shape[1], dtype=torch.int32))
            waiting, woven, step = all_rows[:0], None, step + 1
            continue
        logits = engine.lm_head(engine.last_hidden).float()
        if penalize:
            logits = _penalize(logits, seen_tokens, repetition_penalty)
        if uniform:
            idle, at = finished, step - int(lag[0])
        else:
            columns = step - lag[stepping]  # host: the column of each stepping row's token
            stepping_device, columns_device, at = engine.to_device(
                stepping, columns, (step - lag).clamp(max=max_new_tokens - 1))  # at: every row's column
            idle = torch.ones_like(finished)
            idle[stepping_device] = False
            idle |= finished
        uniforms = _at_columns(engine.token_uniforms, at) if do_sample else None
        tokens = torch.where(idle, pad, _choose_tokens(logits, do_sample, temperature, top_k, top_p, uniforms))
        if uniform:
            new_tokens[:, at] = tokens
            width = at + 1
        else:
            new_tokens[stepping_device, columns_device] = tokens[stepping_device]
            width = max(width, int(columns.max()) + 1)
        if penalize:
            seen_tokens[rows_t, tokens] |= ~idle
        finished = finished | (torch.isin(tokens, eos) & ~idle)
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
        readers = active if uniform else stepping[columns + 1 < max_new_tokens]
        continuing = active if uniform else active[~torch.isin(active, stepping[columns + 1 == max_new_tokens])]
        decisions = None
        if first and (readers.numel() or woven is not None):  # the rows still decoding read the token (the
            # `lora` trigger's rows: those that may weave), beside the latents woven at the last step
            trigger_rows = readers[weaves_left[readers] > 0] if engine.lora else None
            if woven is None:
                engine.read_tokens(readers, tokens, trigger_rows)
            else:
                engine.read_beside(readers, tokens, waiting, woven, trigger_rows)
                waiting, woven = all_rows[:0], None
        if weaving and readers.numel():
            if uniform:
                excluded = finished
            else:
                readers_device = engine.to_device(readers)[0]
                excluded = torch.ones_like(finished)
                excluded[readers_device] = False
                excluded |= finished
            decisions = engine.decide(tokens, excluded, counts, False,
                                      at + 1 if uniform else (at + 1).clamp(max=max_new_tokens - 1))
        host_decisions = decisions.long() if decisions is not None else torch.full_like(tokens, -100)
        host = torch.stack([host_decisions, finished.long(), tokens]).cpu()  # the step's synchronisation
        if streamer is not None:
            streamer.put(host[2])
        unfinished = (host[1] == 0).nonzero().flatten()
        company = False
        if sync is not None:
            running, company = sync.any(unfinished.numel() > 0, bool((host[0] == 1).any()))  # some rank weaves
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
        continuing = continuing[host[1][continuing] == 0]
        if not continuing.numel():
            break
        invoking = (host[0] == 1).nonzero().flatten()
        if invoking.numel():
            weaves_left[invoking] -= 1
        if run_ahead and invoking.numel():
            waiting, woven = invoking, engine.weave(invoking, INFERENCE, step + 1 - lag[invoking])
            lag[invoking] += 1
        elif first:
            engine.insert(active, invoking, None, INFERENCE, step + 1, company)
        else:
            engine.insert(continuing, invoking, tokens, INFERENCE, step + 1, company)
        active = continuing
        step += 1
    if streamer is not None:
        streamer.end()
    return MemGenGenerateOutput(sequences=torch.cat([input_ids, new_tokens[:, :width]], 1),
                                augmentation_mask=aug_mask[:, :width], latent_norms=engine.latent_norms[:, :width])

"""The decoding engine: MemGen generation with per-row caches, nothing recomputed.

- The reasoner reads each stream item (token or latent) once, through a ragged KV cache: a row's
  insertion adds cache entries to that row only.
- The weaver keeps its own ragged cache over the stream: at an insertion it reads only the items
  it has not seen, then the K queries, whose entries are rolled back. The queries' LayerNorm and
  scale are applied once per call.
- The `lora` trigger keeps its own cache over the token ids and catches up only at decision
  points; `head` reads the reasoner's hidden state of the delimiter (no extra forward). Decisions
  come from the fused trigger-scoring op.
- One host synchronisation per step fetches the decisions and the finished flags; the `lora`
  trigger adds one on steps where some row is at a delimiter. The caches keep their per-row
  lengths on the host, derived from those values, so sizing a ragged call never waits on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from memgen.adapters import active_adapter
from memgen.cache import RaggedCache
from memgen.ops import trigger_scoring
from memgen.weaver import INFERENCE, PROMPT


@dataclass
class MemGenGenerateOutput(ModelOutput):
    """sequences: [B, L + T] prompts then new tokens (pad after a row's EOS);
    augmentation_mask: [B, T] the decision taken before each new token (-100 / 0 SKIP / 1 INVOKE)."""

    sequences: torch.Tensor | None = None
    augmentation_mask: torch.Tensor | None = None


class _RaggedDecoder:
    """A base model (with one adapter active, or none) reading ragged rows through its own cache."""

    def __init__(self, model, adapter: str | None, batch: int, capacity: int, device: torch.device) -> None:
        self.model, self.adapter = model, adapter
        self.decoder = model.get_decoder()
        self.cache = RaggedCache(model.config.num_hidden_layers, batch, capacity, device)
        self.lengths = self.cache.lengths  # per-row items read so far (host ints)
        self.dtype = model.get_input_embeddings().weight.dtype

    def run(self, rows: list[int], n_items: list[int], inputs_embeds: torch.Tensor | None = None,
            input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed rows[g] its first n_items[g] items.

        Returns final-norm hidden states [G, T, d] and the slots written [G, T] (padding items:
        the scratch slot `capacity`).
        """
        width = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        positions, mask = self.cache.begin_step(rows, n_items, width, self.dtype)
        slots = self.cache.write_slots
        with active_adapter(self.model, self.adapter):
            hidden = self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                                  position_ids=positions, past_key_values=self.cache, use_cache=True).last_hidden_state
        self.cache.end_step(rows, n_items)
        return hidden, slots

    def rollback(self, rows: list[int], lengths: list[int]) -> None:
        self.cache.rollback(rows, lengths)


def _choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                   top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from float logits [B, V]: argmax, or a draw after temperature, top-k and top-p."""
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
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty on logits [B, V] for the tokens each row has seen (bool [B, V])."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
             generator: torch.Generator | None, eos_ids: list[int], trigger_mode: str, prompt_budget: int,
             budget: int, repetition_penalty: float = 1.0, streamer=None) -> MemGenGenerateOutput:
    """MemGen generation for validated inputs (see `MemGenModel.generate`)."""
    device = input_ids.device
    batch = input_ids.shape[0]
    config = model.config
    real = attention_mask.bool()
    n_prompt = real.sum(1)
    order = torch.argsort((~real).long(), dim=1, stable=True)  # each row's prompt tokens first, in order
    prompts = input_ids.gather(1, order)[:, : int(n_prompt.max())]
    prompt_lengths = n_prompt.tolist()
    k_prompt, k_inference = config.prompt_latents_len, config.inference_latents_len
    capacity = prompts.shape[1] + max_new_tokens + (k_prompt if prompt_budget else 0) + k_inference * budget

    reasoner = _RaggedDecoder(model.reasoner, None, batch, capacity, device)
    weaver = _RaggedDecoder(model.weaver.model, model.weaver.adapter_name, batch,
                            capacity + max(k_prompt, k_inference), device)
    lora_trigger = trigger_mode == "lora"
    if lora_trigger:
        trigger = _RaggedDecoder(model.trigger.model, model.trigger.adapter_name, batch,
                                 prompts.shape[1] + max_new_tokens, device)
        token_history = torch.zeros(batch, prompts.shape[1] + max_new_tokens, dtype=torch.long, device=device)
        token_history[:, : prompts.shape[1]] = prompts
        history_lengths = list(prompt_lengths)
    embed = model.reasoner.get_input_embeddings()
    lm_head = model.reasoner.get_output_embeddings()
    weaver_dtype = weaver.dtype
    queries = {kind: model.weaver.queries(kind).to(weaver_dtype) for kind in (PROMPT, INFERENCE)}
    stream = torch.zeros(batch, capacity + 1, embed.weight.shape[1], dtype=reasoner.dtype, device=device)
    last_hidden = torch.zeros(batch, embed.weight.shape[1], dtype=reasoner.dtype, device=device)
    all_rows = list(range(batch))

    def read(rows: list[int], items: torch.Tensor, n_items: list[int]) -> None:
        """The reasoner reads items [G, T, d] (n_items real per row); updates the stream and last_hidden."""
        hidden, slots = reasoner.run(rows, n_items, inputs_embeds=items)
        row_t = torch.tensor(rows, device=device)
        stream[row_t[:, None], slots] = items.to(stream.dtype)  # padding lands in the scratch slot
        n_t = torch.tensor(n_items, device=device)
        last = hidden[torch.arange(len(rows), device=device), (n_t - 1).clamp(min=0)]
        last_hidden[row_t] = torch.where((n_t > 0)[:, None], last, last_hidden[row_t])

    def gather_pending(source: torch.Tensor, rows: list[int], seen: list[int], pending: list[int],
                       width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items seen[g] .. seen[g] + pending[g] of source[rows[g]], left-aligned in [G, width]; and the mask of real ones."""
        t = torch.arange(width, device=device)
        real = t[None, :] < torch.tensor(pending, device=device)[:, None]
        index = torch.where(real, torch.tensor(seen, device=device)[:, None] + t[None, :], 0)
        return source[torch.tensor(rows, device=device)[:, None], index], real

    def weave(rows: list[int], kind: str) -> torch.Tensor:
        """Latents [G, K, d_R]: the weaver reads the items it has not seen, then the queries (rolled back)."""
        k, d_weaver = queries[kind].shape
        seen = [weaver.lengths[r] for r in rows]
        pending = [reasoner.lengths[r] - s for r, s in zip(rows, seen)]
        width = max(pending) + k
        items, real = gather_pending(stream, rows, seen, pending, width)
        inputs = model.reasoner_to_weaver(items.float()).to(weaver_dtype) * real[..., None]
        query_at = torch.tensor(pending, device=device)[:, None] + torch.arange(k, device=device)
        group = torch.arange(len(rows), device=device)[:, None]
        inputs[group, query_at] = queries[kind].expand(len(rows), k, d_weaver)
        hidden, _ = weaver.run(rows, [p + k for p in pending], inputs_embeds=inputs)
        weaver.rollback(rows, [s + p for s, p in zip(seen, pending)])
        return model.weaver_to_reasoner(hidden[group, query_at].float()).to(reasoner.dtype)

    def trigger_logits(rows: list[int]) -> torch.Tensor:
        """[B, 2] float logits of the `lora` trigger for `rows`, catching up on their new ids (zeros elsewhere)."""
        logits = torch.zeros(batch, 2, device=device)
        if rows:
            seen = [trigger.lengths[r] for r in rows]
            pending = [history_lengths[r] - s for r, s in zip(rows, seen)]
            ids, _ = gather_pending(token_history, rows, seen, pending, max(pending))
            hidden, _ = trigger.run(rows, pending, input_ids=ids)
            last = hidden[torch.arange(len(rows), device=device), torch.tensor(pending, device=device) - 1]
            logits[torch.tensor(rows, device=device)] = model.trigger.output_layer(last.float())
        return logits

    def decide(last_tokens: torch.Tensor, finished: torch.Tensor, counts: torch.Tensor, prompt_step: bool,
               candidates: list[int]) -> torch.Tensor:
        kwargs = {}
        if lora_trigger:
            kwargs["logits"] = trigger_logits(candidates)
        elif trigger_mode == "head":
            kwargs["hidden"] = last_hidden
            kwargs["head_weight"] = model.trigger.output_layer.weight
            kwargs["head_bias"] = model.trigger.output_layer.bias
        uniforms = torch.rand(batch, generator=generator, device=device) if do_sample else None
        return trigger_scoring(last_tokens, model.delimiter_table, counts, budget, finished,
                               prompt_step=prompt_step, trigger_mode=trigger_mode, do_sample=do_sample,
                               temperature=temperature, uniforms=uniforms, **kwargs)

    def insert(decisions: list[int], kind: str) -> None:
        rows = [r for r in all_rows if decisions[r] == 1]
        if rows:
            latents = weave(rows, kind)
            read(rows, latents, [latents.shape[1]] * len(rows))

    counts = torch.zeros(batch, dtype=torch.int32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = torch.full((batch, max_new_tokens), model.tokenizer.pad_token_id, dtype=torch.long, device=device)
    aug_mask = torch.full((batch, max_new_tokens), -100, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids, device=device)
    seen_tokens = torch.zeros(batch, model.delimiter_table.shape[0], dtype=torch.bool, device=device)
    rows_t = torch.arange(batch, device=device)
    seen_tokens[rows_t[:, None].expand_as(input_ids)[real], input_ids[real]] = True
    if streamer is not None:
        streamer.put(input_ids.cpu())

    read(all_rows, embed(prompts), prompt_lengths)
    if prompt_budget > 0:
        decisions = decide(prompts[:, 0], finished, counts, True, all_rows)
        aug_mask[:, 0] = decisions
        insert(decisions.tolist(), PROMPT)
    done = [False] * batch
    steps = 0
    for step in range(max_new_tokens):
        logits = _penalize(lm_head(last_hidden).float(), seen_tokens, repetition_penalty)
        tokens = _choose_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        tokens = torch.where(finished, new_tokens[:, step], tokens)
        new_tokens[:, step] = tokens
        seen_tokens[rows_t, tokens] |= ~finished
        steps = step + 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        finished = finished | torch.isin(tokens, eos)
        if step + 1 == max_new_tokens:
            break
        active = [r for r in all_rows if not done[r]]
        read(active, embed(tokens[active])[:, None], [1] * len(active))
        candidates: list[int] = []
        if lora_trigger:
            active_t = torch.tensor(active, device=device)
            token_history[active_t, torch.tensor([history_lengths[r] for r in active], device=device)] = tokens[active_t]
            for r in active:
                history_lengths[r] += 1
            at_point = ~finished & model.delimiter_table[tokens] & (counts < budget)
            candidates = at_point.nonzero().flatten().tolist()
        decisions = decide(tokens, finished, counts, False, candidates)
        aug_mask[:, step + 1] = decisions
        fetched = torch.stack([decisions.long(), finished.long()]).tolist()  # the step's host synchronisation
        done = [bool(f) for f in fetched[1]]
        if all(done):
            break
        insert(fetched[0], INFERENCE)
    if streamer is not None:
        streamer.end()
    return MemGenGenerateOutput(sequences=torch.cat([input_ids, new_tokens[:, :steps]], 1),
                                augmentation_mask=aug_mask[:, :steps])

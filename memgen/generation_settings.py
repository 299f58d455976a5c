"""A Hugging Face `GenerationConfig` as `MemGenModel.generate` arguments.

`generate`'s defaults are its own arguments' (greedy, no penalty, the tokenizer's EOS). Hugging Face's `generate`
instead starts from the model's `generation_config` (an instruct model's usually samples, with its own temperature,
top-k / top-p, repetition penalty and a list of EOS ids). `generation_kwargs(model.reasoner.generation_config)`
gives the same settings to memgen, for like-for-like comparisons and for the decoding a model was published with.
"""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig

# Hugging Face's values for the fields converted here when a config leaves them unset
# (`GenerationConfig._get_default_generation_params` in transformers 5).
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
# Fields that do not change which tokens are chosen, or that memgen settles itself: `max_length` (prompt and new
# tokens together, often a model's context) is left to generate's own check of the context.
_IGNORED = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "max_length",
            "use_cache", "cache_implementation", "cache_config", "compile_config", "return_dict_in_generate",
            "output_scores", "output_logits", "output_attentions", "output_hidden_states"}
_PASSED_ON = {"max_new_tokens", "min_new_tokens", "min_p", "eos_token_id", "pad_token_id", "num_return_sequences",
              "stop_strings"}


def generation_kwargs(generation_config: GenerationConfig) -> dict[str, Any]:
    """`generate` keyword arguments that decode as Hugging Face's `generate` does with `generation_config`:
    sampling or not, temperature, top-k, top-p, repetition penalty, EOS and pad ids, and, where set, min-p, the
    number of new tokens (at most and at least), samples per prompt and stop strings. Raises, naming them, for
    settings memgen cannot honour (beam search, `min_length` counted with the prompt, n-gram blocking, other
    logits processors) rather than decode otherwise.

        model.generate(input_ids, attention_mask, **{**generation_kwargs(model.reasoner.generation_config),
                                                     "max_new_tokens": 512})
    """
    if not isinstance(generation_config, GenerationConfig):
        raise ValueError(f"generation_config must be a transformers.GenerationConfig, got "
                         f"{type(generation_config).__name__}")
    given = generation_config.to_diff_dict()
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    unsupported = sorted(name for name, value in given.items()
                         if name not in _HF_DEFAULTS and name not in _IGNORED and name not in _PASSED_ON
                         and not (name in defaults and defaults[name] == value))
    if unsupported:
        raise ValueError(f"generation_config sets {unsupported}, which memgen's generate does not support; it "
                         f"supports {sorted(_HF_DEFAULTS) + sorted(_PASSED_ON)}")
    kwargs = {name: given[name] if given.get(name) is not None else default for name, default in _HF_DEFAULTS.items()}
    kwargs.update({name: given[name] for name in _PASSED_ON if given.get(name) is not None})
    if not kwargs["do_sample"]:  # greedy: sampling settings would change nothing (and `generate` warns of them)
        for name in ("temperature", "top_k", "top_p", "min_p"):
            kwargs.pop(name, None)
    return kwargs

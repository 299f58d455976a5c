"""The `memgen` command line.

    memgen generate --memgen CKPT [--model PATH] --prompt TEXT [--prompt TEXT ...] [options]
    memgen bench [--suite ops|decode|train|all] [--preset NAME | --model PATH] [--device cpu|cuda] [--out DIR]
    memgen train --config run.yaml [key=value ...]
    memgen eval --memgen CKPT --task NAME [--data FILES] [--split test] [--limit N] [options]
    memgen demo [--steps 60] [--out memgen-demo]

`generate` prints each completion with a marker where memory was woven, then one line per
insertion: the mean norm of the woven latents against the mean norm of the reasoner's token
embeddings (latents many times larger than any token are a known failure of trained weavers).
`bench` runs the benchmark suites (`memgen.bench`), prints their tables and writes results.json,
results.md and results.png. `train` runs one training stage described in YAML
(`memgen.training.run`); `eval` reports a task's accuracy with memory and without; `demo` runs the method
end to end on a tiny model, offline (`memgen.demo`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
from collections.abc import Iterator, Sequence

import torch

from memgen.config import TORCH_DTYPES

MARKER = "⟦M⟧"


def _sampling_arguments(p: argparse.ArgumentParser, samples_help: str) -> None:
    """--sample, its settings, its seed and the samples per prompt (`_check_sampling` checks them)."""
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float, help="drop tokens less likely than this times the likeliest")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help=samples_help)


def _check_sampling(command: str, args: argparse.Namespace) -> None:
    """Exit with a message where the sampling flags contradict each other: samples or settings without --sample."""
    if args.num_return_sequences < 1 or (args.num_return_sequences > 1 and not args.sample):
        raise SystemExit(f"memgen {command}: --num-return-sequences must be >= 1, and above 1 needs --sample")
    sampling = [flag for flag, value, unset in (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, None),
                                                ("--top-p", args.top_p, None), ("--min-p", args.min_p, None))
                if value != unset]
    if sampling and not args.sample:
        raise SystemExit(f"memgen {command}: {' and '.join(sampling)} change only sampling; add --sample (without it "
                         "decoding is greedy)")


def _generator(args: argparse.Namespace, rank: int = 0) -> torch.Generator | None:
    """A generator on --device seeded with --seed (each rank of several its own), where --sample asks for one."""
    return torch.Generator(device=args.device).manual_seed(args.seed + 1_000_003 * rank) if args.sample else None


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object (`--chat-template-kwargs '{"enable_thinking": false}'`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text!r}")
    return value


TEMPLATE_HELP = ("extra variables for the chat template, as a JSON object, e.g. '{\"enable_thinking\": false}' for "
                 "Qwen3")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate with latent memory and show where it was woven",
                       description="Generate with a MemGen checkpoint; mark insertions and report latent norms.")
    p.add_argument("--memgen", required=True, metavar="CKPT",
                   help="memgen checkpoint directory (memgen's format or the reference implementation's)")
    p.add_argument("--model", metavar="PATH", help="the reasoner (Hugging Face name or directory); default: the "
                   "name the checkpoint records")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt (repeat for a batch; '-' reads one from standard input)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--chat-template-kwargs", type=_json_object, metavar="JSON", help=TEMPLATE_HELP + " (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    _sampling_arguments(p, "samples per prompt (needs --sample)")
    p.add_argument("--trigger-mode", choices=("always", "lora", "head"), help="override the checkpoint's")
    p.add_argument("--no-memory", action="store_true", help="decode the bare reasoner (a baseline)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeatable)")
    p.add_argument("--eos", nargs="+", metavar="TOKEN", help=EOS_HELP)
    p.add_argument("--latent-tokens", type=int, default=0, metavar="N",
                   help="also show, for each woven latent, the N tokens whose embeddings lie nearest (a probe)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="float32", help="the reasoner's weights")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if any(not p for p in prompts):
        raise SystemExit("memgen generate: --prompt must not be empty")
    return prompts


def _encode(tokenizer, prompts: list[str], chat: bool, template: dict | None) -> dict[str, torch.Tensor]:
    if chat:
        from memgen.training.data import template_kwargs

        if not getattr(tokenizer, "chat_template", None):
            raise SystemExit("memgen generate: --chat needs a tokenizer with a chat template")
        try:
            extra = template_kwargs(tokenizer, template)
        except ValueError as error:
            raise SystemExit(f"memgen generate: --chat-template-kwargs: {error}") from error
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True, **extra) for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def marked_text(tokenizer, tokens: list[int], woven_before: list[int]) -> str:
    """The decoded tokens with MARKER spliced in before each token index in `woven_before`."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = sorted({len(tokenizer.decode(tokens[:i], skip_special_tokens=True)) for i in woven_before})
    pieces, start = [], 0
    for cut in cuts:
        pieces += [text[start:cut], MARKER]
        start = cut
    return "".join(pieces) + text[start:]


EOS_HELP = ("tokens that end a completion (default: the tokenizer's EOS), e.g. --eos '<|im_end|>' for a chat model "
            "whose turns end with another token than its EOS")


def _eos_token_ids(tokenizer, tokens: list[str] | None, command: str) -> list[int]:
    """The ids of `tokens` (--eos), each one token of the tokenizer's vocabulary; the tokenizer's EOS without them."""
    if not tokens:
        return [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    unknown = [t for t in tokens if t not in vocab]
    if unknown:
        raise SystemExit(f"memgen {command}: --eos {unknown} are not tokens of the tokenizer (pass each as one token "
                         "of its vocabulary, e.g. '<|im_end|>')")
    return [vocab[t] for t in tokens]


def _check_device(command: str, device: str) -> None:
    """Exit with a message, before anything loads, where `device` is not one this torch can use."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise SystemExit(f"memgen {command}: --device {device!r} is not a device ({error})") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"memgen {command}: --device {device!r}, but this torch ({torch.__version__}) sees no CUDA "
                         "device")


def _generate(args: argparse.Namespace) -> int:
    from memgen.training.run import build_model

    prompts = _prompts(args)
    _check_sampling("generate", args)
    if args.latent_tokens < 0:
        raise SystemExit(f"memgen generate: --latent-tokens must be >= 0, got {args.latent_tokens}")
    if args.chat_template_kwargs is not None and not args.chat:
        raise SystemExit("memgen generate: --chat-template-kwargs applies to the chat template: add --chat")
    _check_device("generate", args.device)
    model = build_model(args.model, args.memgen, dtype=args.dtype).to(device=args.device).eval()
    tok = model.tokenizer
    eos = _eos_token_ids(tok, args.eos, "generate")
    vocab = model.reasoner.get_input_embeddings().weight.shape[0]
    if args.latent_tokens > vocab:
        raise SystemExit(f"memgen generate: --latent-tokens {args.latent_tokens} exceeds the vocabulary ({vocab})")
    batch = _encode(tok, prompts, args.chat, args.chat_template_kwargs)
    generator = _generator(args)
    out = model.generate(batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device),
                         max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, generator=generator,
                         memory=not args.no_memory,
                         trigger_mode=args.trigger_mode, stop_strings=args.stop, return_dict_in_generate=True,
                         num_return_sequences=args.num_return_sequences, eos_token_id=eos,
                         output_latents=args.latent_tokens > 0)
    embed = model.reasoner.get_input_embeddings().weight
    token_norm = float(embed.float().norm(dim=-1).mean())
    width = batch["input_ids"].shape[1]
    samples = args.num_return_sequences
    for row in range(out.sequences.shape[0]):
        prompt = prompts[row // samples]
        new = out.sequences[row, width:].tolist()
        real = int(out.completion_mask[row].sum())  # through the EOS or stop string that ended it
        decisions = out.augmentation_mask[row, :real].tolist()
        norms = out.latent_norms[row, :real].tolist()
        woven = [i for i, d in enumerate(decisions) if d == 1]
        sample = f", sample {row % samples + 1}" if samples > 1 else ""
        print(f"=== prompt {row // samples + 1}{sample} ===\n{prompt}")
        print(f"--- completion ({MARKER} marks where memory was woven) ---")
        print(marked_text(tok, new[:real], woven))
        points = sum(d != -100 for d in decisions)
        print(f"--- {len(woven)} insertions at {points} decision points; mean token-embedding norm "
              f"{token_norm:.3g} ---")
        for i in woven:
            kind = "prompt" if i == 0 else "inference"
            preceding = tok.decode(new[max(0, i - 3):i], skip_special_tokens=True)
            ratio = norms[i] / token_norm if token_norm > 0 and not math.isnan(norms[i]) else float("nan")
            print(f"  before token {i:4d} ({kind:9s}) after {preceding!r}: latent norm {norms[i]:.3g} "
                  f"= {ratio:.2f}x the token embeddings")
        if args.latent_tokens > 0:
            _print_latent_tokens(model, out.latents[row], woven, args.latent_tokens)
    return 0


def _print_latent_tokens(model, latents: list[torch.Tensor], woven: list[int], n: int) -> None:
    """For each weave (before token woven[i]) and each of its latents, the n nearest tokens and their similarity."""
    from memgen.probing import nearest_tokens

    tok = model.tokenizer
    print(f"--- the {n} tokens nearest each latent (cosine similarity of the input embeddings) ---")
    for i, weave in zip(woven, latents):
        similarity, ids = nearest_tokens(model, weave, n)
        for j, (sims, tokens) in enumerate(zip(similarity.tolist(), ids.tolist())):
            shown = ", ".join(f"{tok.decode([t])!r} {s:.2f}" for t, s in zip(tokens, sims))
            print(f"  before token {i:4d}, latent {j}: {shown}")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from memgen.bench import SUITES
    from memgen.presets import PRESETS

    p = sub.add_parser("bench", help="run the benchmark suites and write results.json, results.md, results.png",
                       description="Measure memgen against vanilla decoding, Hugging Face generate and the "
                                   "reference algorithm, side by side, on a preset (built offline) or your model.")
    p.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS,
                        help="a model built offline: 'tiny' is trained in seconds to write punctuated text; the "
                             "others have real architecture shapes and random weights (default: tiny)")
    source.add_argument("--model", metavar="PATH", help="a Hugging Face causal LM (directory or name) instead")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(TORCH_DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--out", default="memgen-bench", metavar="DIR", help="where the three files go (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="timed rounds per case (default: ops 30, decode 9, train 5)")
    p.add_argument("--batch", type=int, nargs="+", metavar="B",
                   help="batch sizes (default: ops 1 64, decode 1 16, train 1 8)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens per row in the decode suite")
    p.add_argument("--skip", nargs="+", default=[], metavar="IMPL",
                   help="implementations not to run, e.g. 'reference' (slow on a large model); ratios over a "
                        "skipped one are left out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _bench(args: argparse.Namespace) -> int:
    from memgen import bench
    from memgen.bench.report import markdown, write

    suites = bench.SUITES if args.suite == "all" else (args.suite,)
    try:
        results = bench.run(suites, preset=None if args.model else args.preset or "tiny", model_path=args.model,
                            device=args.device, dtype=TORCH_DTYPES[args.dtype] if args.dtype else None,
                            rounds=args.rounds, batches=args.batch, new_tokens=args.new_tokens,
                            progress=not args.no_progress, command="memgen " + shlex.join(args.argv),
                            skip=args.skip)
    except ValueError as error:
        raise SystemExit(f"memgen bench: {error}") from error
    paths = write(results, args.out)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training stage (sft, grpo, trigger) described in a YAML file",
                       description="Train a MemGen stage; see memgen.training.run for the YAML keys.")
    p.add_argument("--config", required=True, metavar="YAML", help="the run description")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.learning_rate=3e-6 limit=64")


def _train(args: argparse.Namespace) -> int:
    from memgen.training.run import load_run_config, train_from_config

    try:
        run = load_run_config(args.config, args.overrides)
    except ValueError as error:
        raise SystemExit(f"memgen train: {error}") from error
    trainer = train_from_config(run)
    print(f"memgen train: {run['stage']} finished after {trainer.state.global_step} steps; checkpoint in "
          f"{trainer.args.output_dir}")
    return 0


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    from memgen.tasks import TASKS

    p = sub.add_parser("eval", help="a task's accuracy with memory and without",
                       description="Decoding of a task's rows (greedy, or sampled), scored by its reward, with and "
                                   "without memory.")
    p.add_argument("--memgen", required=True, metavar="CKPT", help="memgen checkpoint directory")
    p.add_argument("--model", metavar="PATH", help="the reasoner (default: the name the checkpoint records)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", nargs="+", metavar="FILE", help="local json/jsonl/parquet files or a hub name")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--trigger-mode", choices=("always", "lora", "head"), help="override the checkpoint's")
    _sampling_arguments(p, "samples per row, all scored; pass@k is reported for k = 1, the powers of two below N, "
                           "and N (needs --sample)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="a stop string (repeatable): a completion also "
                   "ends once its text ends with it")
    p.add_argument("--chat-template-kwargs", type=_json_object, metavar="JSON", help=TEMPLATE_HELP)
    p.add_argument("--eos", nargs="+", metavar="TOKEN", help=EOS_HELP)
    p.add_argument("--reward-workers", type=int, default=1, metavar="N",
                   help="completions scored at once (the code task's sandboxed test runs overlap)")
    p.add_argument("--memory", choices=("both", "on", "off"), default="both",
                   help="evaluate with memory, without (the bare reasoner), or both (default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="float32", help="the reasoner's weights")
    p.add_argument("--out", metavar="JSON", help="also write the results here")
    p.add_argument("--samples", metavar="JSONL", help="also write each completion, its reward and insertions here "
                                                       "(one line per completion and memory setting)")


@contextlib.contextmanager
def _launched_ranks(device: str) -> Iterator[tuple[str, int]]:
    """Under `torchrun` (WORLD_SIZE > 1): the default process group (NCCL on CUDA devices, else gloo), set up for
    the block unless the launcher did, and (this rank's device, its rank); elsewhere (device, 0)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device, 0
        return
    if torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        yield device, dist.get_rank()
    finally:
        if created:
            dist.barrier()  # (a rank tearing the group down while another still talks to it aborts)
            dist.destroy_process_group()


def _eval(args: argparse.Namespace) -> int:
    _check_device("eval", args.device)
    _check_sampling("eval", args)
    for flag, value in (("--batch-size", args.batch_size), ("--reward-workers", args.reward_workers)):
        if value < 1:
            raise SystemExit(f"memgen eval: {flag} must be >= 1, got {value}")
    with _launched_ranks(args.device) as (device, rank):
        args.device = device
        return _evaluate_ranks(args, rank)


def _evaluate_ranks(args: argparse.Namespace, rank: int) -> int:
    """`memgen eval` on this rank (under `torchrun` each decodes a share of the rows; rank 0 prints and writes)."""
    from memgen.evaluation import evaluate, paired_difference, reported_ks
    from memgen.tasks import TASKS, load_task
    from memgen.training.data import template_kwargs
    from memgen.training.run import build_model

    try:
        rows = list(load_task(args.task, args.data, args.split, args.limit))
    except ValueError as error:
        raise SystemExit(f"memgen eval: {error}") from error
    model = build_model(args.model, args.memgen, dtype=args.dtype).to(args.device).eval()
    eos = _eos_token_ids(model.tokenizer, args.eos, "eval")
    try:
        template_kwargs(model.tokenizer, args.chat_template_kwargs)
    except ValueError as error:
        raise SystemExit(f"memgen eval: --chat-template-kwargs: {error}") from error
    results = {}
    for memory in {"both": (True, False), "on": (True,), "off": (False,)}[args.memory]:
        results["with memory" if memory else "without memory"] = evaluate(  # each setting from the same seed
            model, rows, TASKS[args.task].reward, memory=memory, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, trigger_mode=args.trigger_mode, eos_token_id=eos,
            reward_workers=args.reward_workers, return_samples=True, do_sample=args.sample,
            num_return_sequences=args.num_return_sequences, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, generator=_generator(args, rank), stop_strings=args.stop,
            chat_template_kwargs=args.chat_template_kwargs)
    if rank:  # every rank holds the whole evaluation; the first reports it
        return 0
    passes = [f"pass@{k}" for k in reported_ks(args.num_return_sequences)]
    print(f"| {args.task} ({len(rows)} rows) | accuracy | {' | '.join(passes)} | insertions per response |\n"
          f"|---|---|{'---|' * len(passes)}---|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.4f} | {' | '.join(f'{r[k]:.4f}' for k in passes)} | "
              f"{r['insertions_per_response']:.2f} |")
    samples = {name: r.pop("samples") for name, r in results.items()}
    report = {"task": args.task, "checkpoint": args.memgen, **results}
    if len(samples) == 2:  # the same rows with memory and without: how much memory changed each row's reward
        n = args.num_return_sequences
        rewards = {name: [s["reward"] for s in done] for name, done in samples.items()}
        per_row = {name: [sum(r[i:i + n]) / n for i in range(0, len(r), n)] for name, r in rewards.items()}
        difference = paired_difference(per_row["with memory"], per_row["without memory"])
        report["memory_minus_no_memory"] = difference
        print(f"memory - no memory: accuracy {difference['mean']:+.4f} (95% paired bootstrap interval "
              f"{difference['low']:+.4f} to {difference['high']:+.4f}, {len(rows)} rows)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.samples:
        with open(args.samples, "w") as f:
            for name, rows in samples.items():
                for row in rows:  # targets are the task's (a list of aliases, test code): anything else as text
                    f.write(json.dumps({"memory": name == "with memory", **row}, default=str) + "\n")
    return 0


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the method end to end on a tiny model, offline, in under a minute",
                       description="Train a weaver on the tiny preset, compare answer losses with memory and without, "
                                   "generate with memory and time it, and save the checkpoint (memgen.demo).")
    p.add_argument("--steps", type=int, default=60, help="SFT steps of the weaver (8 rows each)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5, help="timed generate calls with memory and without")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="memgen-demo", metavar="DIR", help="where the checkpoint goes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _demo(args: argparse.Namespace) -> int:
    from memgen.demo import run_demo

    for flag, value in (("--steps", args.steps), ("--max-new-tokens", args.max_new_tokens),
                        ("--rounds", args.rounds)):
        if value < 1:
            raise SystemExit(f"memgen demo: {flag} must be >= 1, got {value}")
    _check_device("demo", args.device)
    run_demo(args.steps, args.out, args.device, args.max_new_tokens, args.seed, args.rounds)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memgen", description="MemGen: generative latent memory for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _bench_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return {"generate": _generate, "bench": _bench, "train": _train, "eval": _eval, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m nanochat.generate``: continue a prompt with a GGUF file or a checkpoint.

    python -m nanochat.generate --model model.gguf --prompt "def main():" --max-tokens 64 --stream

Prints the prompt and its continuation on stdout and the speed (tokens/s) on stderr. Any bad
input (a missing or damaged model, an out-of-range option) is one ``error:`` line on stderr
and exit status 2.
"""
from __future__ import annotations

import sys

from nanochat.cli.common import (EXIT_BAD_INPUT, OneLineParser, add_backend_argument, check_model_path,
                                 check_text, fail, non_negative_int, say_if_compiling)


def build_parser():
    p = OneLineParser(prog="python -m nanochat.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file or a checkpoint directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-tokens", type=non_negative_int, default=128, help="tokens to generate at most (128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (0.8)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    p.add_argument("--seed", type=non_negative_int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (not printed)")
    p.add_argument("--stream", action="store_true", help="print pieces as they are generated")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the continuation")
    add_backend_argument(p)
    p.add_argument("--dequantized", action="store_true",
                   help="float32 matmuls with dequantized weights instead of the packed kernels")
    p.add_argument("--head", choices=("float32", "int8"), default="float32",
                   help="LM head: float32 (exact) or int8 (a quarter of the bytes per token; docs/engine.md)")
    p.add_argument("--speculative", type=non_negative_int, default=0, metavar="K",
                   help="self-speculative decoding: the model's first K multi-token-prediction heads draft, "
                        "one forward verifies (needs a model trained with mtp_n_tokens >= K; 0 = off)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from nanochat.infer.engine import Engine, SamplingParams

    out = sys.stdout
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
        check_text(args.prompt, "--prompt")
        for stop in args.stop:
            check_text(stop, "--stop")
        check_model_path(args.model)
        engine = Engine.from_path(args.model, args.backend, dequantized=args.dequantized, head=args.head)
        engine.require_tokenizer()
        say_if_compiling(engine)
        options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                       speculative=args.speculative)
        if args.stream:
            pieces = engine.generate(args.prompt, args.max_tokens, **options)
            first = next(pieces, "")  # input errors surface before anything is printed
            out.write(("" if args.no_echo else args.prompt) + first)
            out.flush()
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
        else:
            text = engine.complete(args.prompt, args.max_tokens, **options).text
            out.write(("" if args.no_echo else args.prompt) + text + "\n")
        out.flush()
    except ValueError as exc:
        return fail(exc)
    except OSError as exc:
        print(f"error: {args.model}: {exc.strerror or exc}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(engine.last_stats.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

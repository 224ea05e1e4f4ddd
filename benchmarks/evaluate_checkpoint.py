"""The model card's evaluation: ``lqae-eval`` with the LLM rows on, on a fixed number of torch threads.

Every figure comes from ``lqae-eval`` (``lqae_sklearn.evaluation.evaluate_checkpoint``;
``lqae-eval --help`` says what each is). What this script adds is what the model card
and ``benchmarks/gpu_train_default.sh`` fix:

- ``--threads N``: torch's CPU threads, so that the timings of two runs compare;
- ``--llm-episodes`` defaults to 200 (``lqae-eval``'s default is 0), the model card's
  LLM rows;
- the options of this script's earlier version, ``--train-limit`` and ``--test-limit``,
  are ``lqae-eval``'s ``--train-images`` and ``--test-images`` (a seeded random subset
  now, no longer the first N images).

Any other option goes to ``lqae-eval`` as it is:

    python benchmarks/evaluate_checkpoint.py --threads 1 --out docs/results/evaluation/fashion-mnist-small-28
    python benchmarks/evaluate_checkpoint.py runs/x/checkpoint --llm-episodes 0 --quick --out /tmp/eval_x

CHECKPOINT defaults to the shipped one. Writes ``OUT.json`` and ``OUT.md`` (default OUT:
``evaluation``).
"""

from __future__ import annotations

import argparse

from lqae_sklearn.cli.eval import main as lqae_eval
from lqae_sklearn.model import DEFAULT_CHECKPOINT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--llm-episodes", type=int, default=200, help="LLM episodes per cell (0: no LLM)")
    parser.add_argument("--train-limit", type=int, default=None, help="= lqae-eval --train-images")
    parser.add_argument("--test-limit", type=int, default=None, help="= lqae-eval --test-images")
    parser.add_argument("--out", default="evaluation", help="output stem: writes OUT.json and OUT.md")
    args, rest = parser.parse_known_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    forwarded = [args.checkpoint, "--llm-episodes", str(args.llm_episodes), "--out", args.out, *rest]
    for option, value in (("--train-images", args.train_limit), ("--test-images", args.test_limit)):
        if value is not None:
            forwarded += [option, str(value)]
    lqae_eval(forwarded)


if __name__ == "__main__":
    main()

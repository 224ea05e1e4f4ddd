"""Command-line tools: lqae-encode, lqae-eval, lqae-fewshot, lqae-info."""

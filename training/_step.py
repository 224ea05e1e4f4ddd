"""One training step (forward, loss, backward), eager or compiled as one graph, and its optimizer.

Nothing inside the step is read back by the host: the ``<mask>`` positions are drawn before it
(from the step's generator), the MLM term has one shape whatever was masked, and the loss terms
and token counts stay on the device until the trainer reads them every ``log_every`` steps. So
``torch.compile`` makes the whole forward pass with its losses (encoder, nearest-row search, LM,
decoder, MLM cross-entropy) one graph, and its backward another, and CUDA runs ahead of Python.

Compile modes (``TrainConfig.compile_mode``): the default (None) fuses and schedules kernels, no
CUDA graphs. ``"reduce-overhead"`` also records CUDA graphs, which removes the per-kernel launch
cost: that matters when a step is short, less at the paper's scale (a few hundred ms of GPU work
in large kernels, queued ahead by a host that never waits), and it holds its own memory pool.
``"max-autotune"`` and ``"max-autotune-no-cudagraphs"`` also benchmark candidate matmul kernels for
every shape while compiling. ``benchmarks/gpu_paper_scale.py`` measures the modes.
"""

from __future__ import annotations

import torch


def make_optimizer(params, lr: float, betas, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW as one fused kernel on CUDA; on other devices the single-tensor loop.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        The trained parameters.
    lr : float
        Learning rate (the trainer sets it again every step).
    betas : tuple of float
        AdamW betas.
    weight_decay : float
        AdamW weight decay.
    device : torch.device
        Where the parameters live.

    Returns
    -------
    torch.optim.AdamW
        The optimizer.
    """
    # The single-tensor loop is torch's own default on a CPU; naming it keeps CPU runs, and the
    # exact-resume tests that compare them, independent of a change of that default.
    options = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **options)


class TrainStep:
    """Forward pass, loss and backward pass of one micro-batch.

    Parameters
    ----------
    net : torch.nn.Module
        An :class:`~lqae_sklearn.model.LQAE` or :class:`~lqae_sklearn.model.VQVAE`, or
        its DistributedDataParallel wrapper.
    device_type : str
        ``"cuda"`` or ``"cpu"``: where autocast applies.
    bf16 : bool, default=False
        Run the forward pass under bf16 autocast.
    compile : bool, default=False
        ``torch.compile`` the forward pass and its losses as one graph.
    compile_mode : str or None, default=None
        The ``torch.compile`` mode (module notes).
    fullgraph : bool, default=False
        Make a graph break an error instead of a split graph.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn import LQAE, preset_config
    >>> from lqae_sklearn.training._step import TrainStep
    >>> model = LQAE(preset_config("small-28", patch_size=7, encoder_depth=1, decoder_depth=1)).train()
    >>> step = TrainStep(model, "cpu")
    >>> images = torch.rand(2, 1, 28, 28)
    >>> terms, ids = step(images, model.draw_mask(2, torch.Generator().manual_seed(0)))
    >>> terms.shape, ids.shape
    (torch.Size([4]), torch.Size([2, 16]))
    """

    def __init__(self, net: torch.nn.Module, device_type: str, bf16: bool = False, compile: bool = False,
                 compile_mode: str | None = None, fullgraph: bool = False):
        self.net = net
        self.device_type = device_type
        self.bf16 = bf16
        self.forward = torch.compile(self.losses, mode=compile_mode, fullgraph=fullgraph) if compile else self.losses

    def losses(self, images: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None = None):
        """The loss, the four logged terms and the ids of one micro-batch (no backward).

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        mask : torch.Tensor or None
            The model's :meth:`~lqae_sklearn.model.LQAE.draw_mask`; None for a model that masks nothing.
        generator : torch.Generator or None, default=None
            The step's generator, for a model that masks nothing but draws in its forward pass (a
            VQ-VAE's k-means initialisation and dead-code restarts).

        Returns
        -------
        loss : torch.Tensor
            The training loss (scalar).
        terms : torch.Tensor
            Loss, reconstruction, commitment and MLM terms (4,), float32.
        ids : torch.Tensor
            The chosen ids (B, n_tokens).
        """
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(images, generator=generator) if mask is None else self.net(images, mask=mask)
        terms = torch.stack([out.loss, out.reconstruction_loss, out.commitment_loss, out.mlm_loss]).float()
        return out.loss, terms, out.ids

    def __call__(self, images: torch.Tensor, mask: torch.Tensor | None, accumulation: int = 1,
                 generator: torch.Generator | None = None):
        """Forward and backward; the gradients of ``loss / accumulation`` add to the parameters' ``.grad``.

        Parameters
        ----------
        images : torch.Tensor
            Float images (B, C, H, W) in [0, 1].
        mask : torch.Tensor or None
            As in :meth:`losses`.
        accumulation : int, default=1
            Micro-batches per optimizer step.
        generator : torch.Generator or None, default=None
            As in :meth:`losses`.

        Returns
        -------
        terms : torch.Tensor
            Loss, reconstruction, commitment and MLM terms (4,), float32, detached.
        ids : torch.Tensor
            The chosen ids (B, n_tokens).
        """
        loss, terms, ids = self.forward(images, mask, generator)
        (loss / accumulation).backward()
        return terms.detach(), ids

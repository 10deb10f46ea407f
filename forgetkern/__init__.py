"""forgetkern: fast, exact kernels for forgetting-aware LoRA fine-tuning.

* :func:`tmkl_loss` / :class:`TMKLLoss` -- cross-entropy plus target-masked KL to the base model.
* :func:`linear_tmkl_loss` / :class:`LinearTMKLLoss` -- the same loss from hidden states and the LM
  head, without materializing the logits.
* :class:`TopKBase` / :func:`topk_base` -- a top-k record of the base logits, accepted by both
  losses in place of base logits / base hidden states (a sparse base cache).
* :func:`generalized_eigh` -- batched generalized symmetric eigenproblems.
* :class:`ForgetAwareStep` -- one forgetting-aware LoRA training step for any loop.
* :func:`info` -- versions and available backends.
"""
from ._info import info
from ._version import __version__
from ._params import TopKBase
from .functional import generalized_eigh, linear_tmkl_loss, tmkl_loss, topk_base
from .nn import LinearTMKLLoss, TMKLLoss
from .train import ForgetAwareStep

__all__ = [
    "__version__",
    "info",
    "tmkl_loss",
    "TMKLLoss",
    "linear_tmkl_loss",
    "LinearTMKLLoss",
    "TopKBase",
    "topk_base",
    "generalized_eigh",
    "ForgetAwareStep",
]

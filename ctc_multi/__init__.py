"""ctc_multi: CTC loss, forward probabilities, gradients and alignments for NumPy, JAX and PyTorch, from one recursion."""

from .alignment import TokenSpan, ctc_posteriors, forced_align, merge_tokens
from .conventions import lengths_to_paddings, paddings_to_lengths, torch_ctc_loss
from .losses import ctc_loss, ctc_loss_and_grad, ctc_loss_with_forward_probs

__all__ = [
    "ctc_loss",
    "ctc_loss_and_grad",
    "ctc_loss_with_forward_probs",
    "lengths_to_paddings",
    "paddings_to_lengths",
    "torch_ctc_loss",
    "forced_align",
    "merge_tokens",
    "ctc_posteriors",
    "TokenSpan",
]
__version__ = "0.1.0"

"""ctc_multi: the CTC loss and forward probabilities for NumPy, JAX and PyTorch, from one recursion."""

from .losses import ctc_loss, ctc_loss_and_grad, ctc_loss_with_forward_probs

__all__ = ["ctc_loss", "ctc_loss_and_grad", "ctc_loss_with_forward_probs"]
__version__ = "0.1.0"

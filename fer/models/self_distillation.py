"""Progressive self-knowledge distillation (PS-KD; Kim et al., ICCV 2021): each face's target is softened
by what the model itself predicted for that face one epoch earlier, more so as training goes on.

    t = (1 - a) * y + a * p_prev(face),      a = alpha * (epoch + 1) / epochs

y is the (label-smoothed) one-hot label and p_prev the softmax the training pass gave the face's
augmented view in the previous epoch. Unlike uniform label smoothing, the softening is per face: a
face the model keeps reading as sad while it is labelled angry (FER2013's labels are noisy) pulls less
hard towards angry. It costs no extra forward pass: predictions are remembered as training makes them
(one row of class probabilities per training face: 0.8 MB for FER2013).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fer.errors import ConfigError


def check_self_distill(alpha: float, loss: str, mixup_alpha: float, cutmix_alpha: float) -> None:
    """A clear error for a share outside [0, 1) or a combination the memory cannot serve, naming the key."""
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"optim.self_distill={alpha}: expected a value in [0, 1) (0: off)")
    if alpha > 0 and loss != "ce":
        raise ConfigError(f"optim.self_distill={alpha} works with optim.loss=ce only, not {loss!r}")
    if alpha > 0 and (mixup_alpha > 0 or cutmix_alpha > 0):
        # Remembered predictions of mixed faces would belong to no single face.
        raise ConfigError(f"optim.self_distill={alpha} does not combine with mixup or CutMix (optim.mixup_alpha, "
                          f"optim.cutmix_alpha)")


class PredictionMemory:
    """The last training-pass probabilities of every training face, and the PS-KD targets built from them.

    Deliberately not an nn.Module with buffers: it is no part of the model, so the state dict, exports and
    weight averages (the EMA copies every buffer at every step) leave it out. Checkpoints carry it separately
    (FERClassifier.on_save_checkpoint), so a resumed run goes on with it.
    """

    def __init__(self, alpha: float, num_classes: int) -> None:
        self.alpha = alpha
        # A face not seen yet has a row of zeros: a softmax row sums to 1, so no separate mask is needed.
        self.probs = torch.zeros(0, num_classes)

    def __len__(self) -> int:
        return len(self.probs)

    def reset(self, size: int) -> None:
        """Forget everything; room for `size` training faces."""
        self.probs = torch.zeros(size, self.probs.shape[1])

    def state_dict(self) -> dict[str, Tensor]:
        return {"probs": self.probs.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.probs = state["probs"].float()

    def _follow(self, device: torch.device) -> None:
        if self.probs.device != device:  # moves once, to wherever training runs
            self.probs = self.probs.to(device)

    def share(self, epoch: int, epochs: int) -> float:
        """The share of the remembered prediction in the target: rises linearly to `alpha` at the last epoch."""
        return self.alpha * min(1.0, (epoch + 1) / max(1, epochs))

    def targets(self, base: Tensor, positions: Tensor, share: float) -> Tensor:
        """(B, K) label targets softened by the remembered predictions; faces not seen yet keep their labels."""
        self._follow(base.device)
        previous = self.probs[positions]
        remembered = (1.0 - share) * base + share * previous
        return torch.where(previous.sum(dim=1, keepdim=True) > 0, remembered, base)

    def remember(self, positions: Tensor, probs: Tensor) -> None:
        """Keep `probs` (B, K), this step's softmax outputs, as the faces at `positions` were last seen."""
        self._follow(probs.device)
        self.probs[positions] = probs.detach().float()

    def __repr__(self) -> str:
        return f"PredictionMemory(alpha={self.alpha}, faces={len(self)})"

"""Sharpness-aware minimisation (Foret et al., ICLR 2021) around any torch optimiser.

Each step climbs `rho` along the normalised gradient, takes the gradient there, steps back and lets the base
optimiser apply that second gradient: it seeks weights whose whole neighbourhood has low loss, at twice the
cost of a step. It is a closure optimiser, like LBFGS, so Lightning's automatic optimisation drives it
unchanged; the base optimiser's state dict is the one saved, so a checkpoint resumes with or without SAM.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch.optim import Optimizer

from fer.errors import ConfigError


class SAM(Optimizer):
    def __init__(
        self,
        base: Optimizer,
        rho: float = 0.05,
        perturbed_pass: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        if rho <= 0:
            raise ConfigError(f"optim.sam_rho={rho}: expected a value > 0 (0 turns SAM off)")
        self.base, self.rho = base, float(rho)
        # What the model should do differently on the second, perturbed pass (keep BN statistics, metrics).
        self.perturbed_pass = perturbed_pass or nullcontext
        super().__init__(base.param_groups, base.defaults)  # schedulers read defaults (OneCycleLR: betas)
        self._share_base_state()

    def _share_base_state(self) -> None:
        # One set of groups and moments: learning-rate schedulers and checkpoints see the base optimiser's.
        self.param_groups, self.state = self.base.param_groups, self.base.state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if closure is None:
            # torch's GradScaler (Lightning's 16-mixed precision) runs the closure itself and steps without one.
            raise RuntimeError("optim.sam_rho > 0 needs a closure optimiser step: use trainer.precision "
                               "32-true or bf16-mixed, not 16-mixed")
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.rho / (norm + 1e-12)
        climbs = [p.grad * scale for p in params]
        torch._foreach_add_(params, climbs)
        with torch.enable_grad(), self.perturbed_pass():
            closure()
        torch._foreach_sub_(params, climbs)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self._share_base_state()  # torch rebuilds the groups on load

"""KL-coefficient (β) controllers for the KL penalty in RLHF rewards."""

from __future__ import annotations


class FixedKLController:
    """Constant β. ``update`` is a no-op."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for API parity with AdaptiveKLController)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller driving the observed KL toward ``target``
    (Ziegler et al. 2019, sec. 2.2).

    init_kl_coef: initial β; target: KL_target (> 0); horizon: H (> 0), the number of
    samples over which β changes by at most ±20%.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: observed KL (float); n_steps: samples since the last update."""
        e = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # e_t = clip(KL/KL_target - 1, ±0.2)
        self.value *= 1.0 + e * n_steps / self.horizon  # β_{t+1} = β_t (1 + K_β e_t), K_β = n/H

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


KL_CONTROLLERS = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}

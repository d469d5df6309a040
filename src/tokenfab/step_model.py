"""A live model of step time: step_s ~= a + b_dec x decodes + b_pre x prefill tokens, fitted online.

Exponentially weighted least squares over recent steps (decode rows cost more per token than
prefill rows: each reads its own KV and they batch less efficiently). The embedded engine's scheduler
uses it to fit a step into the time that keeps the fastest tier with work at its tok/s per user; the
gateway's admission gets the same instance from the backend, to predict TTFT. It starts from priors
and follows the machine. Pure (NumPy only), so the gateway can hold one without the engine.
"""

from __future__ import annotations

import numpy as np

# Steps are sized for a tier's tok/s per user divided by this (15% headroom for sampling, streaming
# and a CPU shared with the HTTP side), by the scheduler and by admission alike.
SPEED_HEADROOM = 0.85


class StepTimeModel:
    def __init__(self, a_s: float = 0.008, b_dec_s: float = 0.0008, b_pre_s: float = 0.0005,
                 decay: float = 0.98) -> None:
        self.decay = decay
        self.a_s, self.b_dec_s, self.b_pre_s = a_s, b_dec_s, b_pre_s
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        for d, p in ((1, 0), (32, 0), (0, 256), (8, 128)):  # prior pseudo-observations
            self._add(d, p, a_s + b_dec_s * d + b_pre_s * p, 0.5)
        self.observations = 0

    def _add(self, dec: float, pre: float, y: float, w: float = 1.0) -> None:
        x = np.array([1.0, dec, pre])
        self._xtx += w * np.outer(x, x)
        self._xty += w * x * y

    def observe(self, decodes: int, prefill_tokens: int, step_s: float) -> None:
        self._xtx *= self.decay
        self._xty *= self.decay
        self._add(decodes, prefill_tokens, step_s)
        self.observations += 1
        try:
            a, bd, bp = np.linalg.solve(self._xtx + 1e-9 * np.eye(3), self._xty)
        except np.linalg.LinAlgError:
            return
        self.a_s = float(max(a, 1e-4))
        self.b_dec_s = float(max(bd, 1e-6))
        self.b_pre_s = float(max(bp, 1e-6))

    def step_s(self, decodes: int, prefill_tokens: int = 0) -> float:
        return self.a_s + self.b_dec_s * decodes + self.b_pre_s * prefill_tokens

    def time_for(self, min_tok_s_user: float) -> float:
        """Seconds of work (beyond the fixed cost) a step may hold and still give `min_tok_s_user`."""
        if min_tok_s_user <= 0:
            return float("inf")
        return max(1.0 / min_tok_s_user - self.a_s, self.b_dec_s)

    def max_decodes_for(self, min_tok_s_user: float) -> int:
        """Most decoding sequences per step at `min_tok_s_user` (at least 1)."""
        t = self.time_for(min_tok_s_user)
        return 1 << 30 if t == float("inf") else max(1, int(t / self.b_dec_s))

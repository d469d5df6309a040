"""A live model of step time: step_s ~= a + b x tokens, fitted online (exponentially weighted least squares).

The scheduler uses it to cap a step's tokens so the fastest tier with work keeps its tok/s per user;
admission uses it to predict TTFT. Starts from priors and follows the machine.
"""

from __future__ import annotations


class StepTimeModel:
    def __init__(self, a_s: float = 0.008, b_s: float = 0.0008, decay: float = 0.98) -> None:
        self.decay = decay
        # weighted sums for least squares, seeded with two prior points (weight ~ 2 observations)
        self._w = 0.0
        self._t = self._tt = self._y = self._ty = 0.0
        for t in (1.0, 64.0):
            self._add(t, a_s + b_s * t, 1.0)
        self.a_s, self.b_s = a_s, b_s
        self.observations = 0

    def _add(self, t: float, y: float, w: float) -> None:
        self._w += w
        self._t += w * t
        self._tt += w * t * t
        self._y += w * y
        self._ty += w * t * y

    def observe(self, tokens: int, step_s: float) -> None:
        d = self.decay
        self._w, self._t, self._tt, self._y, self._ty = (d * self._w, d * self._t, d * self._tt, d * self._y,
                                                          d * self._ty)
        self._add(float(tokens), step_s, 1.0)
        self.observations += 1
        var = self._tt / self._w - (self._t / self._w) ** 2
        if var > 1e-9:
            b = (self._ty / self._w - self._t / self._w * self._y / self._w) / var
            self.b_s = max(b, 1e-6)
            self.a_s = max(self._y / self._w - self.b_s * self._t / self._w, 1e-4)

    def step_s(self, tokens: int) -> float:
        return self.a_s + self.b_s * tokens

    def max_tokens_for(self, min_tok_s_user: float) -> int:
        """Most tokens per step that keep every decoding sequence at `min_tok_s_user` (at least 1)."""
        if min_tok_s_user <= 0:
            return 1 << 30
        return max(1, int((1.0 / min_tok_s_user - self.a_s) / self.b_s))

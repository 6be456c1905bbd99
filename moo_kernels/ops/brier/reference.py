"""Float64 reference of the Brier calibration reward.

R = c - (q - c)^2 with c in {0, 1} the correctness of the answer and q in [0, 1] the confidence the
model stated. A correct answer scores 1 - (1 - q)^2 (best with q = 1), a wrong one -q^2 (best with
q = 0): maximising R rewards accuracy and calibration together. dR/dq = -2 (q - c).
"""

import torch


def brier_reference(correct: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    c = correct.to(torch.float64)
    q = confidence.to(torch.float64)
    return c - (q - c) ** 2

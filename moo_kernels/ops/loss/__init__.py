"""The token-level policy loss that every loss entry point shares (from log-probs, from logits): its arguments
(spec.py), its float64 semantics (reference.py) and the per-token Triton helpers (triton_kernels.py)."""

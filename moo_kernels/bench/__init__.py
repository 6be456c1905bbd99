"""moo-bench: the benchmark suites of moo_kernels (python -m moo_kernels.bench --help).

Suites: advantages, policy_loss, logits_loss. Each compares moo_kernels with eager PyTorch written the
way TRL and verl compute the step, torch.compile of it, verl's per-sample loop (advantages, CPU) and
Liger-Kernel (logits_loss, CUDA, when importable); every implementation is checked against the float64
reference on the benchmarked inputs before anything is timed.
"""

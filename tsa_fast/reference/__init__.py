"""Pure-PyTorch references: the math of each kernel spelled out, the oracle of tests and benchmarks.

One module per op family, named as the op: `tsa_fast.reference.distillation_loss.distillation_loss`.
"""

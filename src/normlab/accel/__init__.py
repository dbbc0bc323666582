"""Acceleration behind one seam: what makes a training step fast without changing what the
model computes (normlab's C kernels, convolutions on kept oneDNN primitives, the step by
hand)."""

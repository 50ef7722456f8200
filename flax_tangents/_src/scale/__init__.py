"""Kernels at scale: tiling over a mesh, checkpointed tiles, Monte Carlo."""

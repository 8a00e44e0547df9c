"""Solvers: instance optimisation (shared), affine stage, ConvexAdam discrete stage."""

"""Kernels, launchers and autograd Functions, one file per op.

Modules here are imported lazily by :mod:`forgetkern.functional`, so that importing forgetkern
neither imports Triton nor fixes its interpreter mode.
"""

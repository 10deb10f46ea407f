"""The Triton backend: one file per op, each holding its kernels and their host launchers
(``tmkl``, ``sparse_tmkl``, ``linear_tmkl`` for the on-chip fused-linear form, ``generalized_eigh``,
``folora``), plus ``_tmkl_math`` (the jit math the TMKL kernels share) and ``_triton`` (the import
shim). The autograd Functions live in :mod:`forgetkern._autograd`.

Nothing here is imported with forgetkern: :mod:`forgetkern._backend` imports a module on the first
call it serves, so that importing forgetkern neither imports Triton nor fixes its interpreter mode.
"""

"""Formulas (``counting``: parameters, FLOPs, payload, Algorithm 1's checkpoint set, recompute
memory, TP traffic; no torch) and the rank advisor (``residuals``)."""

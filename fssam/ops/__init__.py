"""Fused operators with their references and deployment bindings (one package per operator).

`fssam.ops.scma`: Support-Calibrated Memory Attention.
"""

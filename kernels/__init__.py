"""Triton kernels of gflowgr, installed as ``gflowgr_core.kernels``."""

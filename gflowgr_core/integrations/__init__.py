"""Adapters that plug gflowgr's pieces into third-party training libraries.

* :mod:`gflowgr_core.integrations.trl`: Hugging Face TRL (``pip install 'gflowgr[trl]'``): SID-row per-token
  log-probabilities for ``GRPOTrainer`` and its forks, trie-constrained rollouts, and a GFlowNet trainer with
  ``GRPOTrainer``'s constructor.

Each adapter imports its library on import and raises ``ImportError`` with the install command when it is absent;
importing this package itself needs nothing beyond gflowgr.
"""

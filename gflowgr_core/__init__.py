"""gflowgr: GFlowNet fine-tuning of generative recommenders over semantic-ID tokens."""
__version__ = "0.1.0"

"""The trainer: model loading and sharding, rollout, the SFT and MedGRPO loops, checkpoints.

Submodules are imported where they are used (``from medgrpo.train.model import load_model``):
importing this package does not import transformers or torch.distributed.
"""

"""One GRPO advantage + loss step with medgrpo's fused ops, on CPU or GPU.

Run: python examples/core_ops.py
"""

from __future__ import annotations

import torch

import medgrpo

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
prompts, group_size, length = 4, 8, 32  # G = 8 completions per prompt, as in MedGRPO

# Raw rewards of two task keys, e.g. (CholecT50, tal) and (NurViD, next_action), with their
# SFT-rollout (p25, p50, p75) statistics.
stats = torch.tensor([[0.20, 0.45, 0.70], [0.0, 1.0, 1.0]], device=device)
keys = torch.arange(prompts, device=device).repeat_interleave(group_size) % 2
rewards = torch.rand(prompts * group_size, device=device)
rewards[5] = float("nan")  # an unscorable answer: excluded, advantage 0

normalized = medgrpo.normalize_rewards(rewards, keys, stats, k=3.0)
out = medgrpo.group_advantages_with_stats(rewards, group_size=group_size, keys=keys, stats=stats)
print(f"normalized rewards {normalized[:4].tolist()}")
print(f"advantages         {out.advantages[:4].tolist()}")
print(f"zero-std groups    {out.zero_std_fraction.item():.2f}, NaN rewards {out.nan_fraction.item():.3f}")

# Per-token log-probs of the completions under the current and the sampling policy.
logp = (-torch.rand(prompts * group_size, length, device=device)).requires_grad_(True)
old_logp = logp.detach() + 0.05 * torch.randn_like(logp)
mask = torch.rand(prompts * group_size, length, device=device) > 0.1
loss = medgrpo.policy_loss(
    logp, out.advantages, mask, old_logp=old_logp, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.3
)
loss.loss.backward()
print(
    f"loss {loss.loss.item():.5f}  clip fraction {loss.clip_fraction.item():.3f}  "
    f"|grad| {logp.grad.abs().sum().item():.4f}  native CPU kernels: {medgrpo.has_native_cpu_kernels()}"
)

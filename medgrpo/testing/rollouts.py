"""Rollouts with chosen completion lengths, for tests and benchmarks of the training passes.

:func:`synthetic_rollout` builds the :class:`~medgrpo.train.rollout.Rollout` that
:func:`~medgrpo.train.rollout.generate` would return for given prompts, with random text tokens as
completions of exactly the lengths asked for: an EOS ends a completion (then padding), or a
completion fills all ``steps`` without one (truncated). No model runs; the masks come from the
rollout's own :func:`~medgrpo.train.rollout.completion_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medgrpo.train.rollout import Rollout, completion_masks


def synthetic_rollout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    video_embeds: Sequence[torch.Tensor],
    *,
    rows: Sequence[tuple[int, bool]],
    steps: int,
    token_range: tuple[int, int],
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
) -> Rollout:
    """A rollout of ``len(rows) / B`` completions per prompt with the given lengths.

    Args:
        prompt_ids, prompt_mask: ``(B, P)`` prompts (padded on either side) and their masks.
        video_embeds: per prompt, its video's embeddings (what the rollout hands to the update).
        rows: ``(length, truncated)`` of each completion, group-major (``B * G`` of them): ``length``
            tokens, the last one EOS unless ``truncated`` (then ``length`` must be ``steps``).
        steps: T, the completions' width.
        token_range: ``[low, high)`` of the random completion tokens (keep special tokens out).
        eos_token_id, pad_token_id: the stop token and the padding written after it.
        seed: seed of the random tokens.
    """
    num_prompts = prompt_ids.shape[0]
    if len(rows) % num_prompts:
        raise ValueError(f"{len(rows)} completions do not split into groups over {num_prompts} prompts")
    for length, truncated in rows:
        if not 1 <= length <= steps or (truncated and length != steps):
            raise ValueError(f"bad completion (length {length}, truncated {truncated}) for {steps} steps")
    group = len(rows) // num_prompts
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(*token_range, (len(rows), steps), generator=generator)
    for row, (length, truncated) in enumerate(rows):
        if not truncated:
            ids[row, length - 1] = eos_token_id
            ids[row, length:] = pad_token_id
    device = prompt_ids.device
    ids = ids.to(device)
    mask, lengths, is_truncated = completion_masks(ids, torch.tensor([eos_token_id], device=device))
    return Rollout(
        prompt_ids=prompt_ids.repeat_interleave(group, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group, dim=0),
        completion_ids=ids,
        completion_mask=mask,
        completion_lengths=lengths,
        prompt_index=torch.arange(num_prompts, device=device).repeat_interleave(group),
        is_truncated=is_truncated,
        video_embeds=[embeds.detach() for embeds in video_embeds],
        group_size=group,
        encode_s=0.0,
        prefill_s=0.0,
        decode_s=0.0,
        prompt_tokens=int(prompt_mask.sum()),
        completion_tokens=int(lengths.sum()),
        decode_steps=steps,
    )


__all__ = ["synthetic_rollout"]

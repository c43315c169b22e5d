"""Differentiable augmentation of everything the discriminator sees (DiffAugment, Zhao et al. 2020).

With 4,500 training digits the discriminator memorises the real set and its verdicts stop teaching the
generator. Augmenting real and fake images alike, in both the D and the G step, keeps D from
memorising while the generator still learns the un-augmented distribution (the augmentations are
applied to its output, differentiably, never to what it is asked to produce).
Images are in the generator's tanh scale: -1 is the black background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKGROUND = -1.0


def translate(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with background."""
    n, c, h, w = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (2, n, 1, 1), device=x.device)
    padded = F.pad(x, [max_shift] * 4, value=BACKGROUND).permute(0, 2, 3, 1)    # [N, H+2s, W+2s, C]
    rows = torch.arange(h, device=x.device)[None, :, None] + max_shift + shift[0]  # [N, H, 1]
    cols = torch.arange(w, device=x.device)[None, None, :] + max_shift + shift[1]  # [N, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)                           # [N, C, H, W]


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Blank one random `size` x `size` square of each image to background."""
    n, _, h, w = x.shape
    centre = torch.stack([torch.randint(0, h, (n,), device=x.device), torch.randint(0, w, (n,), device=x.device)])
    rows = (torch.arange(h, device=x.device)[None, :] - centre[0][:, None]).abs() <= size // 2  # [N, H]
    cols = (torch.arange(w, device=x.device)[None, :] - centre[1][:, None]).abs() <= size // 2  # [N, W]
    hole = (rows[:, :, None] & cols[:, None, :])[:, None]                                      # [N, 1, H, W]
    return torch.where(hole, torch.full_like(x, BACKGROUND), x)


POLICIES = {"translation": lambda x: translate(x, 3), "cutout": lambda x: cutout(x, 14)}


def augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """Apply the comma-separated `policy` (e.g. "translation,cutout"); "" leaves x as it is."""
    for name in filter(None, policy.split(",")):
        x = POLICIES[name](x)
    return x

"""Test data shared by the kernel test modules."""
import torch


def random_catalogue(gen: torch.Generator, cpl, n_items: int) -> torch.Tensor:
    """SIDs with skewed code frequencies (nodes with one child next to nodes with many) and repeated rows
    (items sharing a SID)."""
    cols = []
    for k in cpl:
        probs = torch.rand(k, generator=gen) ** 4 + 1e-3
        cols.append(torch.multinomial(probs, n_items, replacement=True, generator=gen))
    codes = torch.stack(cols, dim=1)
    dup = codes[torch.randint(0, n_items, (max(1, n_items // 8),), generator=gen)]
    return torch.cat([codes, dup])

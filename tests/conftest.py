"""Session-wide test settings, the bundled Beauty slice, and a count of skipped tests by reason.

Without a GPU, Triton kernels run in the CPU interpreter. TRITON_INTERPRET must be set before triton is
first imported, which is why it lives here rather than in a test module. On a CUDA machine it is left
alone so the kernels compile for the GPU.
"""
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BEAUTY_TINY = Path(__file__).resolve().parent / "fixtures" / "beauty_tiny"


@pytest.fixture(scope="session")
def beauty_tiny() -> Path:
    """The bundled 313-user LETTER Beauty slice (``fixtures/beauty_tiny/README.md``), always present."""
    if not (BEAUTY_TINY / "Beauty.inter.json").is_file():
        raise FileNotFoundError(f"bundled fixture {BEAUTY_TINY / 'Beauty.inter.json'} is missing from the checkout")
    return BEAUTY_TINY


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """After pytest's own summary: one ``skipped: N (reason)`` line per distinct reason, most frequent first."""
    result = yield
    counts = Counter(_skip_reason(r) for r in terminalreporter.stats.get("skipped", []))
    if counts:
        terminalreporter.section("skips by reason", sep="-")
        for reason, n in counts.most_common():
            terminalreporter.write_line(f"skipped: {n} ({reason})")
    return result

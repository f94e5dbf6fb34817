"""lema.use_allocator: CPU tensors several times the budget in total, computed on with torch ops
and numpy, give the same results as with torch's own allocator, while the resident memory stays
under the budget."""
import os
import sys

import numpy as np
import pytest
import torch

PACKAGE_PARENT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "python"))
sys.path.insert(0, PACKAGE_PARENT)
import lema  # noqa: E402

BUDGET = 8 << 20


def compute():
    torch.manual_seed(7)
    xs = [torch.randn(512, 1024) for _ in range(16)]  # 2 MiB each, 32 MiB in all
    acc = torch.zeros(512, 1024)
    sums = []
    for i in range(len(xs) - 1):
        y = torch.tanh(xs[i] * 0.5 + xs[i + 1]) @ xs[i + 1].T[:, :256]
        sums.append(y.sum(dim=1))
        acc += xs[i]
    a = acc.numpy()  # numpy reads the tensor's memory directly
    return [s.clone() for s in sums] + [acc.clone(), torch.from_numpy(np.cumsum(a, axis=1) @ a.T[:, :64])]


def test_tensors_beyond_the_budget_compute_the_same():
    lema.load_library(os.environ.get("LEMA_TORCH_OPS"))
    expected = compute()
    with lema.use_allocator(budget=BUDGET, capacity="1GiB") as scope:
        stats = scope.stats()
        if stats["mode"] != "fault":
            pytest.skip("userfaultfd unavailable here")
        got = compute()
        stats = scope.stats()
    assert stats["peak_resident_bytes"] <= BUDGET
    assert stats["spilled_pages"] > 0, "the tensors never exceeded the budget"
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), i
    # After the scope, tensors come from torch's own allocator again and still work.
    assert torch.ones(3).sum().item() == 3.0


def test_a_bad_budget_names_the_setting():
    lema.load_library(os.environ.get("LEMA_TORCH_OPS"))
    with pytest.raises(RuntimeError, match="budget="):
        lema.use_allocator(budget=0)
    with pytest.raises(RuntimeError, match="budget="):
        lema.use_allocator(budget="1MiB")  # under one page of 2 MiB
    with pytest.raises(ValueError):
        lema.use_allocator(budget="lots")

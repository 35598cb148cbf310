"""Fixtures of the deployment tests: a small random classifier and a batch of images."""

from __future__ import annotations

import pytest
import torch
from deploy_helpers import SIZE, with_batch_statistics
from torch import nn

from mnv3.models import mobilenet_v3_small


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    return with_batch_statistics(mobilenet_v3_small(num_classes=5), SIZE, classes=5)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

"""Real-CT fixtures shared by the segmentation tests (one load per test session; ``integration``)."""

from __future__ import annotations

import pytest

from osteonode.volume import Volume
from tests.conftest import require_data
from tests.ctdata import References, example_image, load_references


@pytest.fixture(scope="session")
def refs() -> References:
    """Reference masks of the example abdomen CT (TotalSegmentator output; for measuring only)."""
    return load_references(require_data)


@pytest.fixture(scope="session")
def volume(refs) -> Volume:
    """The example abdomen CT as a Volume ((z, y, x) HU)."""
    return Volume.from_sitk(example_image())

import pytest

from tests import models


@pytest.fixture(scope="session")
def tiny():
    """tiny(kind) -> (diffusers folder, fp32 OpenVINO folder), built and converted once."""

    def get(kind: str, weight_format: str = "fp32"):
        return models.source_dir(kind), models.ov_dir(kind, weight_format)

    return get

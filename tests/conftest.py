import pytest

from tests.util import NUMERICS_ARGS, train_run


@pytest.fixture(scope="session")
def single_reference(tmp_path_factory):
    """The `single` run every strategy's numerics test compares against (tiny preset, fp32, CPU)."""
    return train_run(tmp_path_factory.mktemp("reference") / "run", "--strategy", "single", *NUMERICS_ARGS)

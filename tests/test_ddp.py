import pytest

from tests.util import NUMERICS_ARGS, assert_same_training, train_run


@pytest.mark.parametrize("nproc", [2, 4])
def test_ddp_matches_single(tmp_path, single_reference, nproc):
    run = train_run(tmp_path / "ddp", "--strategy", "ddp", "--nproc", str(nproc), *NUMERICS_ARGS)
    assert_same_training(run, single_reference)

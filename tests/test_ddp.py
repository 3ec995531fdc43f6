import pytest

from tests.util import NUMERICS_ARGS, assert_same_training, train_run


@pytest.mark.parametrize("nproc", [2, 4])
def test_ddp_matches_single(tmp_path, single_reference, nproc):
    run = train_run(tmp_path / "ddp", "--strategy", "ddp", "--nproc", str(nproc), *NUMERICS_ARGS)
    assert_same_training(run, single_reference)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_data_parallel_on_one_process_matches_single(tmp_path, single_reference, strategy):
    """With one process there is no peer and no process group: the model trains unwrapped."""
    run = train_run(tmp_path / strategy, "--strategy", strategy, *NUMERICS_ARGS)
    assert_same_training(run, single_reference)

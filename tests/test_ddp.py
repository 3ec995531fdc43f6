import pytest

from tests.util import assert_same_training


@pytest.mark.parametrize("layout", ["ddp", "ddp_one_process", "fsdp_one_process"])
def test_data_parallel_matches_single(trained, single_reference, layout):
    """ddp on 2 processes (2 micro-batches each, synced on the last); ddp and fsdp on one process,
    where there is no peer and no process group and the model trains unwrapped."""
    assert_same_training(trained(layout), single_reference)

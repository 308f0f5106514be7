"""What tests/conftest.py guarantees every test, whatever ran before it: one intra-op thread, the model hub
offline, and no process group or print wrapper left by an earlier test. The two leftover tests run in file order:
the first leaves both behind, the second finds neither."""
import builtins

import torch
import torch.distributed as dist

from utils import utils


def test_one_intra_op_thread_and_the_hub_offline():
    import huggingface_hub.constants

    assert torch.get_num_threads() == 1
    assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_leaves_a_process_group_and_the_print_wrapper_behind():
    dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    utils.setup_for_distributed(False)
    assert builtins.print is not utils._BUILTIN_PRINT


def test_finds_no_process_group_and_the_builtin_print():
    assert not dist.is_initialized()
    assert builtins.print is utils._BUILTIN_PRINT

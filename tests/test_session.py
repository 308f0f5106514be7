"""What tests/conftest.py guarantees every test, whatever ran before it: one intra-op thread, the model hub
offline, and no process group or print wrapper left by an earlier test (the two leftover tests run in file order:
the first leaves both behind, the second finds neither); and its launch on a free port."""
import builtins
import subprocess

import torch
import torch.distributed as dist

from tests.conftest import on_free_port
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


def test_a_launch_whose_port_was_taken_meanwhile_runs_once_more_on_another():
    # TCPStore's error when another process bound the port between free_port() and the launch
    taken = "The server socket has failed to listen on any local network address. port: {}, useIpv6: false, " \
            "code: -98, name: EADDRINUSE, message: address already in use"
    ports = []

    def launch(port: int, fails: int) -> subprocess.CompletedProcess:
        ports.append(port)
        return subprocess.CompletedProcess([], 1, "", taken.format(port)) if len(ports) <= fails else \
            subprocess.CompletedProcess([], 0, "ran", "")

    assert on_free_port(lambda port: launch(port, fails=0)).stdout == "ran" and len(ports) == 1
    ports.clear()
    assert on_free_port(lambda port: launch(port, fails=1)).stdout == "ran"
    assert len(ports) == 2 and all(1024 <= port < 65536 for port in ports)
    ports.clear()
    assert on_free_port(lambda port: launch(port, fails=2)).returncode == 1 and len(ports) == 2  # once more only

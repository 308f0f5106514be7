"""What tests/conftest.py guarantees every test, whatever ran before it: one intra-op thread, the model hub
offline, and no process group or print wrapper left by an earlier test, not even a destroyed one kept alive by a
reference cycle (each pair of leftover tests runs in file order: the first leaves it behind, the second finds
nothing); and its launch on a free port."""
import builtins
import gc
import os
import signal
import subprocess
import weakref

import pytest
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


_LEFT_BEHIND = []  # a weak reference to the DDP module of the next test but one


def test_leaves_a_destroyed_group_in_a_reference_cycle():
    """What an entry point run in-process leaves once the test has destroyed its group: its DDP module (which
    holds the gloo group) reachable only through a reference cycle (a pytest.raises ExceptionInfo in the test's
    frame holds the traceback through the run; DDP references itself), old enough that only a full collection of
    the cyclic garbage frees it."""
    dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    cycle = {"module": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))}
    cycle["cycle"] = cycle
    _LEFT_BEHIND.append(weakref.ref(cycle["module"]))
    gc.collect()
    dist.destroy_process_group()


def test_finds_it_freed_so_a_forked_loader_worker_cannot_hang_on_it():
    """The group was freed in this process, where gloo's threads are. A forked child (a DataLoader worker) whose
    garbage collection found it would run ~ProcessGroupGloo without them and wait forever on their condition
    variable (or crash): here such a child gets SIGALRM's default action (death) after 30 s."""
    if not _LEFT_BEHIND:
        pytest.skip("runs after test_leaves_a_destroyed_group_in_a_reference_cycle")
    assert _LEFT_BEHIND[0]() is None, "the previous test's group is still alive"
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"forked child: wait status {status}"


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

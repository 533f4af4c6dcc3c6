"""Megatron-Core's checkpoint-writer helper process, tied to the rank that starts it.

`dist_checkpointing.save` creates, on first use, a module-global results queue from a `spawn`
multiprocessing Manager: a server process (~365 MB) that lives as long as nothing shuts it
down. A rank that dies by SIGKILL, or by SIGTERM without cleanup, leaves it running for good.
This creates that same queue first, from a Manager whose server process asks Linux to kill it
when the rank exits, and has every process the rank forks (the writers of a save) do the same (they would otherwise
finish, or hang, on their own after a kill during a save). Nothing of Megatron-Core's code is
replaced, on any device; the global is set only if the release still has it, still unset.

Call sites (both checked releases): megatron.core.dist_checkpointing.strategies.filesystem_async,
`_results_queue`, read by `_get_write_results_queue()` (0.16.1) / `get_write_results_queue()`
(0.19.2) in `FileSystemWriterAsync.prepare_write_data`.
"""

import multiprocessing as mp
import os
import warnings
from multiprocessing.managers import SyncManager

from megatron_memorizing.lifetime import exit_with_parent

_manager = None


def tie_checkpoint_writer_to_this_process() -> bool:
    """Create the writer's results queue from a Manager that dies with this process (idempotent).
    Returns whether the queue is ours."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None and filesystem_async._results_queue is not None:
        return True
    if not hasattr(filesystem_async, "_results_queue"):
        warnings.warn("megatron-core moved the checkpoint writer's results queue: its helper process is not "
                      "tied to this rank (see patches/checkpoint_writer.py)", RuntimeWarning, stacklevel=2)
        return False
    if filesystem_async._results_queue is not None:  # created already, by Megatron-Core itself
        return False
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
    # The writer processes a save forks (filesystem_async, `fork` context) go with the rank too.
    # The parent's pid is taken before the fork: a child forked just as the rank dies would
    # otherwise see init as its parent and tie itself to that.
    os.register_at_fork(before=_remember_parent, after_in_child=_forked_helper_exits_with_parent)
    return True


_parent_pid = None


def _remember_parent():
    global _parent_pid
    _parent_pid = os.getpid()


def _forked_helper_exits_with_parent():
    exit_with_parent(_parent_pid)

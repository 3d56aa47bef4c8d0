"""Starting a tensor-parallel model: ranks spawned by mtplx on this machine, or torchrun's.

    model = load_parallel("ckpt/", tp=2, dtype="float32", device="cpu")   # rank 0 returns a ParallelModel

- Spawned (no torchrun environment): this process is rank 0; it starts ranks 1..N-1 as
  `python -m mtplx.backends.torch.tp_launch` with the load arguments, over a loopback TCP
  rendezvous. A monitor thread watches them: a rank that exits makes rank 0 say so and exit
  too (the rest are killed), and each spawned rank dies with rank 0 (PR_SET_PDEATHSIG), so
  nothing is left waiting.
- torchrun (RANK / WORLD_SIZE set, several machines): every rank runs the same mtplx command;
  rank 0 goes on with it, the others load their shard, serve rank 0 and exit when it stops.
CPU ranks use gloo and split the machine's cores between them; CUDA ranks use NCCL, one GPU each.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from mtplx.backends import BackendUnavailable

from .tp import LOST, ParallelModel, attach, serve_worker
from .tp_comm import TensorParallel

ENV_SPEC = "MTPLX_TP_SPEC"
# Ranks wait on rank 0 for as long as a server is idle: no collective timeout to speak of. A rank
# that dies closes its sockets, which the others see at once (gloo: "Connection closed by peer").
IDLE_TIMEOUT = datetime.timedelta(days=365)


def _backend_for(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        if not dist.is_nccl_available():
            raise BackendUnavailable("tensor parallel on CUDA needs NCCL, and this torch build has none "
                                     "(torch.distributed.is_nccl_available() is False)")
        return "nccl"
    if kind != "cpu":
        raise ValueError(f"tensor parallel runs on cpu (gloo) or cuda (NCCL) devices, got {device!r}")
    if not dist.is_gloo_available():
        raise BackendUnavailable("tensor parallel on CPU needs gloo, and this torch build has none")
    return "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and ENV_SPEC not in os.environ


def load_parallel(path, tp: int, dtype: str, device: str, threads: int | None = None, **options) -> ParallelModel:
    """Load `path` over `tp` ranks; rank 0 gets the ParallelModel (other torchrun ranks serve it
    and exit in here). options: the loader's (kernel, quantize, draft_lm_head, ...)."""
    from mtplx.checkpoint.config import load_config
    from mtplx.checkpoint.shard import check_tp

    check_tp(load_config(path), tp)
    if dist.is_initialized():
        raise RuntimeError("this process already runs a tensor-parallel model (one per process): close it first "
                           "(model.model.close())")
    spec = {"path": str(path), "tp": tp, "dtype": dtype, "device": device, "threads": threads, "options": options}
    if _under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise ValueError(f"--tp {tp} under torchrun with WORLD_SIZE={world}: launch {tp} processes "
                             f"(torchrun --nproc-per-node / --nnodes) or pass --tp {world}")
        rank = int(os.environ["RANK"])
        if rank:
            end_process(_worker_main(spec, rank))
        model = _start_rank(spec, 0, int(os.environ.get("LOCAL_RANK", 0)))
        _opened.append(model)
        atexit.register(model.close)
        return model
    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    workers = _Workers(spec, port)
    workers.watch()  # from the start: a rank that fails to load must not leave rank 0 waiting
    try:
        model = _start_rank(spec, 0, 0, workers)
    except BaseException:
        workers.kill()
        raise
    _opened.append(model)
    atexit.register(model.close)
    return model


_opened: list[ParallelModel] = []


def opened_here() -> bool:
    """Whether this process loaded a tensor-parallel model as rank 0 (it then ends via end_process)."""
    return bool(_opened)


def end_process(code: int):
    """Leave a process that ran a tensor-parallel group: close its models, flush, os._exit(code).

    gloo's run-loop threads release each finished collective (and the tensors it holds) a moment
    after the caller's wait returns. If the interpreter is being torn down by then, that release
    needs the GIL of a dying interpreter and the process aborts ("terminate called without an
    active exception"; seen under load, at random, on either rank). Ending without the teardown
    removes the race: a rank has nothing left to clean up that the OS does not."""
    for model in _opened:
        try:
            model.close()
        except Exception as e:  # noqa: BLE001 - say it, then still end the process
            sys.stderr.write(f"error: closing the tensor-parallel model: {e}\n")
            code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _start_rank(spec: dict, rank: int, local_rank: int, workers=None):
    """Join the group, load this rank's shard; rank 0 returns its ParallelModel, the others run
    serve_worker until rank 0 stops (and return None)."""
    from .loader import load_torch_model

    tp = spec["tp"]
    device = spec["device"]
    backend = _backend_for(device)
    if backend == "nccl":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    else:  # split the cores between the ranks of this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group(backend, rank=rank, world_size=tp, timeout=IDLE_TIMEOUT)
    group = TensorParallel(rank, tp, torch.device(device))
    local = load_torch_model(spec["path"], dtype=spec["dtype"], device=device, shard=(rank, tp), **spec["options"])
    attach(local, group)
    _check_same_kernels(local, rank)
    if rank:
        try:
            serve_worker(local, group)
        finally:
            dist.destroy_process_group()
        return None
    return ParallelModel(local, group, workers)


def _check_same_kernels(local, rank: int) -> None:
    """Every rank must route MoE tokens alike and so compute its shard with the same kernels:
    compare (kernel, instruction set, dtype, torch version) over the ranks."""
    from . import kernels

    mine = (local.kernel, kernels.kernel_isa() if local.kernel == "rowmm" else "", str(local.dtype), torch.__version__)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        raise RuntimeError(f"tensor-parallel ranks run different kernels {every}: install the same torch on every "
                           f"machine and pass the same --kernel (e.g. --kernel torch)")


class _Workers:
    """The spawned ranks 1..N-1 of this machine."""

    def __init__(self, spec: dict, port: int):
        self.procs: list[subprocess.Popen] = []
        self.closing = False
        for rank in range(1, spec["tp"]):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(spec["tp"]), LOCAL_RANK=str(rank), **{ENV_SPEC: json.dumps(spec)})
            self.procs.append(subprocess.Popen([sys.executable, "-m", "mtplx.backends.torch.tp_launch"], env=env,
                                               preexec_fn=_die_with_parent))

    def watch(self) -> None:
        threading.Thread(target=self._monitor, name="mtplx-tp-monitor", daemon=True).start()

    def _monitor(self) -> None:
        while not self.closing:
            who = self.exited()
            if who is not None:
                time.sleep(2.0)  # rank 0 inside a forward sees it too and stops with an error
                if self.closing:
                    return
                sys.stderr.write(f"error: tensor-parallel {who}; stopping\n")
                sys.stderr.flush()
                self.kill()
                os._exit(1)
            time.sleep(0.2)

    def exited(self, wait_s: float = 0.0) -> str | None:
        """'rank R exited (code C)' for the first spawned rank that has exited, or None."""
        end = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, 1):
                if p.poll() is not None:
                    return f"rank {rank} exited (code {p.returncode})"
            if time.monotonic() >= end:
                return None
            time.sleep(0.05)

    def join(self, timeout: float = 30.0) -> None:
        self.closing = True
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    def kill(self) -> None:
        self.closing = True
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def _die_with_parent() -> None:  # Linux: a spawned rank gets SIGKILL when rank 0 goes away
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: rank 0's closed sockets still end the rank
        pass


def _worker_main(spec: dict, rank: int) -> int:
    """A rank other than 0, spawned or torchrun's: load, serve rank 0 until it stops (0), or
    until it goes away (1, one line: rank 0 or its launcher says why)."""
    try:
        _start_rank(spec, rank, int(os.environ.get("LOCAL_RANK", rank)))
    except RuntimeError as e:
        if any(w in str(e) for w in LOST):
            sys.stderr.write(f"mtplx: tensor-parallel rank {rank}: rank 0 went away; exiting\n")
            return 1
        raise
    return 0


if __name__ == "__main__":
    end_process(_worker_main(json.loads(os.environ[ENV_SPEC]), int(os.environ["RANK"])))

__all__ = ["load_parallel", "end_process", "opened_here"]

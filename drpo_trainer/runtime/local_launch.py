"""drpo-train's own single-node launch: torchrun, with its rendezvous store listening on loopback.

`drpo-train` with `distributed.nproc_per_node > 1` runs

    python -m drpo_trainer.runtime.local_launch --store_port=0 <torchrun arguments> -m drpo_trainer.cli ...

torchrun's agent hosts the run's TCP store, and a TCPStore server listens on every interface
whatever host it is given. This module binds the store's socket to 127.0.0.1 first, starts a
multi-tenant TCPStore server on it, and then runs torchrun in the same process with
--master_addr=127.0.0.1 and that port: torchrun's own TCPStore on that port shares the server
instead of opening another. The workers inherit single_node_env() (gloo and NCCL on loopback).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from drpo_trainer.runtime.distributed import LOOPBACK, single_node_env, store_server


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    port = 0
    if args and args[0].startswith("--store_port="):
        port = int(args.pop(0).split("=", 1)[1])
    os.environ.update(single_node_env())
    from datetime import timedelta

    from torch.distributed.run import main as torchrun

    store = store_server(LOOPBACK, port, None, timedelta(minutes=30), wait=False)  # held until torchrun returns
    torchrun([f"--master_addr={LOOPBACK}", f"--master_port={store.port}", *args])


if __name__ == "__main__":
    main()

"""Starting several run.py processes as one `jax.distributed` job on
localhost, for the multi-process tests."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(args, env, n=2, stdout=subprocess.PIPE):
  """`n` run.py processes with `args`, joined on a free localhost port;
  each process gets its `--config.distributed.*` flags."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), *args,
       "--config.distributed.enabled=True",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       f"--config.distributed.num_processes={n}",
       f"--config.distributed.process_id={pid}"],
      stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
          for pid in range(n)]

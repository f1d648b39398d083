"""Orbax checkpoints of the train state, data-iterator state and config.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/` with
three items: `state` (params, optimizer state, step, RNG), `data` (the
JSON state of every data iterator) and `config`. Orbax writes each step to a
temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores the train state with its data state and config."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict,
           config_json: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json)), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self) -> None:
    self.manager.close()

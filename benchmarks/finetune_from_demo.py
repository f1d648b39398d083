"""Does pretraining help? Finetune each synthetic task from the README demo's
pretrained model and from a random initialisation, and print both.

    python run.py --config configs/demo.py --workdir /tmp/uniter-demo   # once
    python benchmarks/finetune_from_demo.py --demo /tmp/uniter-demo/export_flax

For each task (VQA, SNLI-VE, NLVR2 paired-attn, image-text retrieval) this
runs `run.py --config configs/finetune_<task>.py:synthetic` twice, with
`--config.init_checkpoint=<demo>` and without (random initialisation), in
fresh workdirs under `--out`, and prints every held-out metric of the last
evaluation of both runs with the chance level of the headline metric. The
runs are the configs' own: a few hundred updates of the demo's model size
on the `demo` synthetic preset, on a CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from uniter_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# task -> (config, headline metric suffix, chance level of that metric).
# Chance: VE's three classes are balanced (1/3); NLVR2's statements are
# true half the time (0.5); for VQA the evaluator reports the score of the
# split's best single answer (`vqa_score_majority`) as its baseline; for
# retrieval, R@1 over N images by chance is 100/N percent.
TASKS = {
    "vqa": ("configs/finetune_vqa.py:synthetic", "vqa_score", None),
    "ve": ("configs/finetune_ve.py:synthetic", "ve_acc", 1.0 / 3),
    "nlvr2": ("configs/finetune_nlvr2.py:synthetic", "nlvr2_acc", 0.5),
    "itr": ("configs/finetune_itr.py:synthetic", "r_mean", None),
}


def _run(config: str, workdir: str, init: str, extra: list[str]) -> float:
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--config",
         os.path.join(ROOT, config), "--workdir", workdir] + extra
  if init:
    cmd.append(f"--config.init_checkpoint={init}")
  t0 = time.perf_counter()
  log = workdir + ".log"
  with open(log, "w") as f:
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
  if rc:
    raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
  return time.perf_counter() - t0


def _last_val(workdir: str) -> dict[str, float]:
  """The last value of every evaluation metric (held-out and test splits;
  everything but the `train/` rows)."""
  rows = metrics_lib.read_metrics(workdir)
  out: dict[str, float] = {}
  for row in rows:
    out.update({k: v for k, v in row.items()
                if "/" in k and not k.startswith("train/")})
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--demo", default="/tmp/uniter-demo/export_flax",
                 help="the demo's export_flax (or its workdir)")
  p.add_argument("--out", default="/tmp/uniter-finetune-from-demo")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--set", action="append", default=[],
                 help="extra --config.X=Y for every run")
  args = p.parse_args(argv)
  if not os.path.exists(args.demo):
    raise SystemExit(f"{args.demo} does not exist: run the README demo "
                     "first (python run.py --config configs/demo.py "
                     "--workdir /tmp/uniter-demo)")
  os.makedirs(args.out, exist_ok=True)
  extra = [f"--config.{s}" for s in args.set]
  for task in args.tasks.split(","):
    config, headline, chance = TASKS[task]
    res = {}
    for label, init in (("pretrained", args.demo), ("random", "")):
      wd = os.path.join(args.out, f"{task}_{label}")
      secs = _run(config, wd, init, extra)
      res[label] = (_last_val(wd), secs)
    names = sorted(set(res["pretrained"][0]) | set(res["random"][0]))
    print(f"\n## {task} ({config}); chance of *{headline}: "
          f"{'n/a' if chance is None else f'{chance:.3f}'}")
    print(f"{'metric':48s} {'from demo':>10s} {'random init':>12s}")
    for n in names:
      a = res["pretrained"][0].get(n, float("nan"))
      b = res["random"][0].get(n, float("nan"))
      mark = " <-" if n.endswith(headline) else ""
      print(f"{n:48s} {a:10.4f} {b:12.4f}{mark}")
    print(f"{'wall seconds':48s} {res['pretrained'][1]:10.0f} "
          f"{res['random'][1]:12.0f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

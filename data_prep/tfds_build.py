"""`tfds build` without TensorFlow: `python -m data_prep.tfds_build ...`.

The `tfds` console script of tensorflow-datasets 4.9.10 imports its
`convert_format` command at start-up, which needs TensorFlow, so
`tfds build` fails when TensorFlow is not installed. This runs the very same
`build` command (same flags, same code) without the other commands, e.g.

  python -m data_prep.tfds_build uniter_synthetic_images \
      --imports data_prep.builders --config tiny --data_dir ~/tensorflow_datasets

With TensorFlow installed, `tfds build ...` with the same flags is equivalent.
"""
from absl import app
from tensorflow_datasets.scripts.cli import build
from tensorflow_datasets.scripts.cli import cli_utils


def _main(args: build.Args) -> None:
  args.execute()


def main() -> None:
  app.run(_main, flags_parser=cli_utils.make_flags_parser(
      build.Args, description="tfds build (no TensorFlow needed)"))


if __name__ == "__main__":
  main()

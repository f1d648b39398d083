"""UNITER in JAX/Flax.

The public entry points are re-exported here lazily so that importing the
package stays cheap (no torch, no TFDS) until a feature is used.
"""

__version__ = "0.1.0"


def load_checkpoint(path, task, **kwargs):
  """Returns ``(model, params)`` for an official ``.pt`` or a converted dir.

  See :func:`uniter_jax.convert.load_checkpoint`.
  """
  from uniter_jax.convert import load_checkpoint as _load  # pylint: disable=g-import-not-at-top
  return _load(path, task, **kwargs)


__all__ = ["load_checkpoint", "__version__"]

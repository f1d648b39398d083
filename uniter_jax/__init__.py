"""UNITER in JAX/Flax.

The public entry points are re-exported here lazily so that importing the
package stays cheap (no torch, no TFDS) until a feature is used:

    model, params = uniter_jax.load_checkpoint("export_dir")
    proc = uniter_jax.Processor.from_pretrained("export_dir")
    batch = proc("a dog on a bench .", proc.regions(feats, boxes,
                                                    image_size=(w, h)))
    out = model.apply({"params": params}, batch)      # every head
    probs = uniter_jax.score_pairs(model, params, batch)
    enc = uniter_jax.encode(model, params, batch)
"""

__version__ = "0.1.0"


def load_checkpoint(path, task=None, **kwargs):
  """Returns ``(model, params)`` for an official ``.pt`` or a converted dir.

  `task` is optional: a converted directory records its own, and an
  official state_dict's keys show its head. See
  :func:`uniter_jax.convert.core.load_checkpoint`.
  """
  from uniter_jax.convert import core as _core  # pylint: disable=g-import-not-at-top
  return _core.load_checkpoint(path, task, **kwargs)


def encode(model, params, batch, **kwargs):
  """Pooled, sequence, text and image outputs of any head
  (:func:`uniter_jax.inference.encode`)."""
  from uniter_jax import inference as _inf  # pylint: disable=g-import-not-at-top
  return _inf.encode(model, params, batch, **kwargs)


def score_pairs(model, params, batch, **kwargs):
  """Image-text match probabilities (:func:`uniter_jax.inference.
  score_pairs`: the retrieval head's sigmoid rank score, or the pretraining
  model's ITM softmax)."""
  from uniter_jax import inference as _inf  # pylint: disable=g-import-not-at-top
  return _inf.score_pairs(model, params, batch, **kwargs)


_LAZY = {"Processor": "uniter_jax.processor",
         "Regions": "uniter_jax.processor"}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'uniter_jax' has no attribute {name!r}")


__all__ = ["Processor", "Regions", "encode", "load_checkpoint",
           "score_pairs", "__version__"]

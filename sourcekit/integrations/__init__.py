"""Recording a :class:`~sourcekit.Trajectory` from the trainers people use.

- :mod:`sourcekit.integrations.hf`: a callback for Hugging Face's ``transformers.Trainer``
  (``pip install "sourcekit[hf]"``);
- :mod:`sourcekit.integrations.lightning`: a callback for PyTorch Lightning's
  ``Trainer.fit`` (``pip install "sourcekit[lightning]"``).

Both hand the trainer a dataset over the training :class:`~sourcekit.Examples`
(``callback.dataset``) that notes which examples each batch holds, whatever sampler the
trainer shuffles them with, and record the run with a
:class:`~sourcekit.TrajectoryRecorder`: the optimiser and scheduler the trainer built,
gradient accumulation, gradient-norm clipping and dropout. The modules import their
trainer package; this package imports neither.
"""

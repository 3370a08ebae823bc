"""Optional integrations with the tools people train with. Each module needs its own extra and
is imported on its own (``import balanced_sam.integrations`` imports none of them):

- :mod:`balanced_sam.integrations.torchmetrics` (``pip install 'balanced-sam[torchmetrics]'``):
  the DIR metrics as ``torchmetrics.Metric`` subclasses that sync across DDP ranks;
- :mod:`balanced_sam.integrations.wandb` (``pip install 'balanced-sam[wandb]'``): a Weights &
  Biases logger for the training loop's per-epoch rows.

PyTorch Lightning and Hugging Face Accelerate need no adapter: ``BalancedSAM.step(closure=...)``
and ``opt.reduce(...)`` are what they call. The tested examples are in the repository's
``examples/`` folder and in the documentation.
"""

__all__: list[str] = []

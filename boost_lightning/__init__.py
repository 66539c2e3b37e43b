"""boost_lightning: BOOST (Bilevel Optimization Of Synthetic Trajectories) on PyTorch Lightning."""

# Registers the package's named specs (``embedded:<task>/<split>``, ``embedded:<task>``, model aliases) with the data
# layer. Here because this file runs before any submodule is imported: the specs then work however the package is
# entered. Cheap: it imports the data layer's spec registry only.
from boost_lightning import resolve as _resolve  # noqa: F401

__version__ = "0.1.0"

"""boost_lightning: BOOST (Bilevel Optimization Of Synthetic Trajectories) on PyTorch Lightning."""

__version__ = "0.1.0"

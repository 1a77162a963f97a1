"""dcnbench: Deformable Convolutional Networks (Dai et al., 2017), reproduced and benchmarked."""

__version__ = "0.1.0"

"""nos-gym: Neural Optimizer Search (Bello, Zoph, Vasudevan, Le, ICML 2017) as a Gymnasium env."""

__version__ = "0.1.0"

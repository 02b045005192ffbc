"""The rule engine: update rules of the language (``nos_gym.dsl``) run on tensors.

- ``random_streams``: the counter-based random streams of ``drop`` and ``noise``;
- ``step_plan``: what one batched step does, as plain records (no torch);
- ``rules``: ``Rule`` (one program) and ``BatchedRule`` (many programs side by side);
- ``fused``, ``fused_batched``: the same steps as fused tensor kernels;
- ``native``: the C++ Rosenbrock kernel (``csrc/``) and the loader of every native kernel.

Importing this package imports no torch; its modules do.
"""

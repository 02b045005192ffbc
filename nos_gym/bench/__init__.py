"""NOS-Bench: the child reward as a table, every canonical rule of a space scored once.

>>> from nos_gym import bench
>>> table = bench.load()                      # the default table, "small1-cifar10-cpu"
>>> table.meta["protocol"], len(table)        # how it was made, and its rules
>>> table.rows["mul(exp(mul(sign_g,sign_m)),g)"]["reward"]
>>> table.rewards(programs)                   # a batch of Programs, keys or paper notation
>>> table.to_csv("small1.csv")                # for pandas or R

The env serves a table as the task ``"nosbench"`` (``OptimizerSearch-Bench-v0``);
``nos-gym tabulate`` makes one (``nos_gym.evaluation.tabulate``). The file format is in
``nos_gym.bench.table``. No torch is imported here.
"""

from nos_gym.bench.table import (
    COLUMNS,
    DEFAULT,
    SCHEMA_VERSION,
    TABLES_DIR,
    BenchTable,
    RuleNotInTableError,
    TableError,
    available,
    load,
    table_path,
    write_table,
)

__all__ = ["COLUMNS", "DEFAULT", "SCHEMA_VERSION", "TABLES_DIR", "BenchTable", "RuleNotInTableError", "TableError",
           "available", "load", "table_path", "write_table"]

"""Sharding: several processes (`distributed`), the device mesh (`mesh`), logical axis rules as data (`rules`),
abstract trees -> shardings (`partition`)."""

from jaxgen.parallel.distributed import initialize_distributed
from jaxgen.parallel.mesh import MESH_AXES, create_mesh, mesh_shape
from jaxgen.parallel.partition import (
    abstract_boxed,
    abstract_boxed_params,
    activation_rules,
    batch_sharding,
    fit_spec,
    init_sharded,
    keep_logical_boxes,
    shard_batch,
    strip_boxes,
    tree_shardings,
)
from jaxgen.parallel.rules import DEFAULT_RULES, rules_from_config, rules_to_config

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "abstract_boxed",
    "abstract_boxed_params",
    "activation_rules",
    "batch_sharding",
    "create_mesh",
    "fit_spec",
    "init_sharded",
    "initialize_distributed",
    "keep_logical_boxes",
    "mesh_shape",
    "rules_from_config",
    "rules_to_config",
    "shard_batch",
    "strip_boxes",
    "tree_shardings",
]

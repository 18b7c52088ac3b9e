"""Codegen stage: plan → torch.fx GraphModules (the artifact on disk is :mod:`gndgl_compiler.artifact`)."""

from .modules import PartitionModule, build_assembled, build_partitions

__all__ = ["PartitionModule", "build_assembled", "build_partitions"]

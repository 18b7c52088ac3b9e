"""Codegen stage: plan → torch.fx GraphModules, and the artifact writer/reader."""

from .artifact import read_manifest, write_artifact
from .modules import PartitionModule, build_assembled, build_partitions

__all__ = ["PartitionModule", "build_assembled", "build_partitions", "read_manifest", "write_artifact"]

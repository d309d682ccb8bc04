"""Yuma consensus's public names (`moe.consensus.yuma_epoch`); the implementation is `moe.incentives.consensus`."""

from moe.incentives.consensus import YumaResult, yuma_epoch

__all__ = ["YumaResult", "yuma_epoch"]

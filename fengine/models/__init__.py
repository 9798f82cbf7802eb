"""Models the recipes share (importable, so replay's hash of fengine's sources covers them)."""

from fengine.models.resnet import Block as Block, ResNet as ResNet


__all__ = ["Block", "ResNet"]

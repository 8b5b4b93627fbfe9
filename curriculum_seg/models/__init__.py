"""Segmentation networks, built from `config.model`."""

from curriculum_seg.models.unet import UNet, build_model, init_variables, level_widths, num_classes

__all__ = ['UNet', 'build_model', 'init_variables', 'level_widths', 'num_classes']

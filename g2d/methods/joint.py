"""Joint-Train: cross-entropy (MSE for regression) on the fused prediction only."""
from g2d.methods.base import Method
from g2d.registry import register_method


@register_method("joint")
class Joint(Method):
    """The baseline every paper compares against; uses the base step unchanged."""

from g2d.models.model import MultimodalModel, Output  # noqa: F401

"""tokenfab: an open token factory (serve, meter, bench, plan)."""

__version__ = "0.1.0"

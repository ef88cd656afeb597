"""kubeos os-agent: the node daemon that drives the kubeos.os collection."""

__version__ = "0.1.0"

"""kubeos os-agent: the node daemon that drives the kubeos.os collection."""

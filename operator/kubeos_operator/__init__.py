"""kubeos os-operator and os-proxy."""

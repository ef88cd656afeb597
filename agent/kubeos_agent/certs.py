"""Certificate names from a request, resolved only inside the configured certificate directory.

KubeOS names ``cacert``/``clientcert``/``clientkey`` as files under ``/etc/KubeOS/certs``. A request
comes from the cluster, so a name must never reach outside that directory: ``../`` escapes, absolute
paths elsewhere and symbolic links that lead out are refused (400), as are names of missing files.
"""

from __future__ import annotations

import os
from pathlib import Path

from .models import RequestError


def resolve(cert_dir: Path, name: str, field: str) -> Path:
    """The real path of ``name`` (relative to ``cert_dir``, or absolute inside it)."""
    if "\x00" in name:
        raise RequestError(field, "contains a NUL byte")
    base = Path(os.path.realpath(cert_dir))
    candidate = Path(name) if os.path.isabs(name) else base / name
    real = Path(os.path.realpath(candidate))
    if real != base and base not in real.parents:
        raise RequestError(
            field,
            f"{name!r} is outside the certificate directory {cert_dir}; name a file inside it",
        )
    if not real.is_file():
        raise RequestError(field, f"{name!r} is not a file in the certificate directory {cert_dir}")
    return real

"""Bundle files: written with the umask's mode, so workers running as another user can read them."""

from __future__ import annotations

import os
import stat

from tests.helpers.plate_fixtures import make_bundle


def test_bundle_weights_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        bundle = make_bundle(tmp_path / "bundle")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(bundle / "model.safetensors").st_mode)
    assert mode == 0o644, oct(mode)
    old = os.umask(0o077)
    try:
        private = make_bundle(tmp_path / "private")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(private / "model.safetensors").st_mode) == 0o600

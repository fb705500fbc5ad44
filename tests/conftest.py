"""Put the bundle root on ``sys.path`` so tests import ``scripts`` as the bundle configs do."""

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "calsam_bundle"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

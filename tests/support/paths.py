"""Where the repository and the shared real data (COCO128, BCCD, LVIS, KubeRay CRDs) are."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

"""The web process stays free of TensorFlow, Keras, shap and ml/ (ARCHITECTURE.md)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "shap", "ml", "worker", "cv2", "torch")

PROBE = """
import json, sys
from webapp import create_app
app = create_app({"TESTING": True, "INSTANCE_DIR": sys.argv[1], "DATABASE_URL": "sqlite://"})
client = app.test_client()
client.get("/login")
client.get("/api/v1/cases/1")
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"heavy": heavy}))
"""


def test_create_app_does_not_import_tensorflow(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), json.dumps(HEAVY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []


def test_webapp_sources_do_not_import_ml_or_worker():
    for path in (ROOT / "webapp").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in HEAVY, f"{path.relative_to(ROOT)} imports {name}"


def test_the_dataset_vocabularies_on_both_sides_of_the_boundary_are_the_same():
    """webapp may not import ml, so each holds HAM10000's vocabularies: the web validates and stores
    what ml encodes for the metadata head and names in its cards. A site the web accepts that ml does
    not know would silently reach the head as "site missing"."""
    from ml.metadata import SEXES as ML_SEXES
    from ml.metadata import SITES as ML_SITES
    from ml.model import CLASS_LONG_NAMES, CLASS_NAMES
    from webapp.models import DX_CLASSES, DX_LONG_NAMES, SEXES, SITES

    assert tuple(s for s in SITES if s != "unknown") == ML_SITES  # ml: "unknown" is the missing-site feature
    assert tuple(s for s in SEXES if s != "unknown") == ML_SEXES
    assert DX_CLASSES == CLASS_NAMES and DX_LONG_NAMES == CLASS_LONG_NAMES

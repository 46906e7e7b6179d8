"""lsn_exp: identify, amplify and evaluate language-specific neurons of decoder LLMs."""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"

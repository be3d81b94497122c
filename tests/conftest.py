import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from exocom import logs  # noqa: E402

# Logs go through the real processors (JSON lines) so that a broken processor fails tests.
logs.configure("json", "debug")

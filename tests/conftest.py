import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from exocom import logs  # noqa: E402

import auth_mode  # noqa: E402

if auth_mode.ON:
    # The relays of this process and every example service it starts present it (open_relay's default).
    os.environ["EXOCOM_TOKEN"] = auth_mode.TOKEN

# Logs go through the real processors (JSON lines) so that a broken processor fails tests.
logs.configure("json", "debug")

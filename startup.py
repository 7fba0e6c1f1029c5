"""What finetune.py and merge_and_push.py do first, before the seconds of importing torch, transformers and trl:
it imports nothing heavy itself."""

import logging
import signal
import sys

# Only what the user needs to read: bitsandbytes warns at every start on a CPU with AVX512-BF16 that an optional
# kernel from the Hub (the `kernels` package) is missing, and huggingface_hub logs each of its 5 retries of an
# unreachable Hub before the one error line. Their own loggers, raised to errors, say neither.
QUIETED_LOGGERS = ("bitsandbytes.backends.cpu.ops", "huggingface_hub.utils._http")


def interrupted_while_loading(signum, frame):
    print("interrupted (Ctrl-C) while loading the libraries: nothing was started", file=sys.stderr)
    sys.exit(130)


def before_the_imports(as_script):
    """Ctrl-C during the imports: one line, not a traceback (run_cli takes Ctrl-C over once they are done); and the
    libraries' lines nobody needs, silenced."""
    if as_script:
        signal.signal(signal.SIGINT, interrupted_while_loading)
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def after_the_imports(as_script):
    """From here on Ctrl-C raises KeyboardInterrupt again, for run_cli and finetune.py's save-on-Ctrl-C."""
    if as_script:
        signal.signal(signal.SIGINT, signal.default_int_handler)

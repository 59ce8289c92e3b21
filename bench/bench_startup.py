"""Start-up time of the command line, as a ratio to the bare interpreter in the same run.

    python bench/bench_startup.py [--repeat 30]

Both sides run with the interpreter sl-forgery is installed for (the console script's own), so the ratio measures
sl-forgery, not the interpreter. Two floors are shown beside it: `import argparse`, where any argparse program
starts, and the installer's console-script wrapper with the program taken out, which every command installed by
pip pays before its first line runs (the wrapper imports `re`, and with it `enum`, `functools` and `collections`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from common import median_seconds, print_table


def empty_wrapper(script: str) -> str:
    """A copy of the installed wrapper whose entry point returns at once, written to a temporary file."""
    text = open(script).read()
    empty = re.sub(r"^from sl_forgery import (\w+)$", r"def \1():\n    return 0", text, flags=re.MULTILINE)
    if empty == text:
        sys.exit(f"{script} is not a console-script wrapper of sl_forgery")
    handle, path = tempfile.mkstemp(prefix="slf-empty-wrapper-", suffix=".py")
    with os.fdopen(handle, "w") as file:
        file.write(empty)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    script = shutil.which("sl-forgery", path=os.path.dirname(sys.executable)) or shutil.which("sl-forgery")
    if not script:
        sys.exit("sl-forgery is not installed: pip install .")
    python = open(script).readline()[2:].strip()

    def timed(argv: list[str]) -> float:
        def run() -> None:
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

        run()
        return median_seconds(run, args.repeat)

    baseline = timed([python, "-c", "pass"])
    floor = timed([python, "-c", "import argparse"])
    wrapper = empty_wrapper(script)
    try:
        wrapper_floor = timed([python, wrapper])
    finally:
        os.unlink(wrapper)
    help_time = timed([script, "--help"])
    completion = timed([script, "completion", "bash"])
    print_table(
        f"start-up, median of {args.repeat} ({python})",
        [
            ("python -c pass", baseline, "s", 1.0, "itself"),
            ("python -c 'import argparse' (floor)", floor, "s", floor / baseline, "python -c pass"),
            ("empty console-script wrapper (floor)", wrapper_floor, "s", wrapper_floor / baseline, "python -c pass"),
            ("sl-forgery --help", help_time, "s", help_time / baseline, "python -c pass (target <= 1.6x)"),
            ("sl-forgery completion bash", completion, "s", completion / baseline, "python -c pass (target <= 1.6x)"),
            ("sl-forgery --help", help_time, "s", help_time / wrapper_floor, "empty console-script wrapper"),
            ("sl-forgery completion bash", completion, "s", completion / wrapper_floor, "empty console-script wrapper"),
        ],
    )


if __name__ == "__main__":
    main()
